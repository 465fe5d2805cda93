"""Build a configured LSCH model (its frozen LLM loaded, or the tiny random one for tests)."""
from __future__ import annotations

from medhash.services.config import MedhashConfig
from medhash.services.lsch.model import LSCHModel

TINY_RANDOM_LLM = "tiny-random"  # llm.name for fast tests: a tiny random Gemma3, no weights read


def build_lsch(cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int = 0) -> LSCHModel:
    """The LSCH model of ``cfg`` with its frozen LLM loaded (when ``lsch.use_llm``); ``n_labels`` sizes
    the label classifiers of ``lsch.classification_weight``."""
    from medhash.services.encoders.llm import load_causal_lm, tiny_causal_lm

    llm = tokenizer = None
    if cfg.lsch.use_llm:
        if cfg.llm.name == TINY_RANDOM_LLM:
            llm, tokenizer = tiny_causal_lm(num_layers=cfg.llm.num_layers or 2)
        else:
            llm, tokenizer = load_causal_lm(cfg.llm)
    return LSCHModel(cfg.lsch, image_dim, text_dim, llm, tokenizer, n_labels)
