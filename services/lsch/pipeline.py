"""Build a configured LSCH model and turn backbone features into v and binary codes in batches."""
from __future__ import annotations

import numpy as np
import torch

from services.codes import pack_codes
from services.config import MedhashConfig
from services.lsch.model import LSCHModel
from services.run_dir import RunDir

TINY_RANDOM_LLM = "tiny-random"  # llm.name for fast tests: a tiny random Gemma3, no weights read


def build_lsch(cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int = 0) -> LSCHModel:
    """The LSCH model of ``cfg`` with its frozen LLM loaded (when ``lsch.use_llm``); ``n_labels`` sizes
    the label classifiers of ``lsch.classification_weight``."""
    from services.encoders.llm import load_causal_lm, tiny_causal_lm

    llm = tokenizer = None
    if cfg.lsch.use_llm:
        if cfg.llm.name == TINY_RANDOM_LLM:
            llm, tokenizer = tiny_causal_lm(num_layers=cfg.llm.num_layers or 2)
        else:
            llm, tokenizer = load_causal_lm(cfg.llm)
    return LSCHModel(cfg.lsch, image_dim, text_dim, llm, tokenizer, n_labels)


def load_trained(run: RunDir) -> tuple[MedhashConfig, LSCHModel]:
    """The configuration and the trained model (eval mode) of a finished run directory."""
    cfg, meta = run.config(), run.meta()
    model = build_lsch(cfg, meta["image_dim"], meta["text_dim"], len(run.label_names()))
    model.load_state_dict_trainable(run.weights())
    return cfg, model.eval()


@torch.no_grad()
def embed(model: LSCHModel, image: np.ndarray, text: np.ndarray, batch_size: int = 128) -> dict[str, np.ndarray]:
    """v^x of every image row and v^y of every text row: {"image": [N, d], "text": [M, d]}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {
        "image": _batched(model.embed_image, image, batch_size, device),
        "text": _batched(model.embed_text, text, batch_size, device),
    }
    model.train(was_training)
    return out


def hash_codes(model: LSCHModel, v: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """Packed codes (np.packbits rows) of each modality's v at one code length."""
    device = next(model.parameters()).device
    return {
        m: pack_codes(model.codes(torch.from_numpy(x).to(device), bits).cpu().numpy().astype(np.uint8))
        for m, x in v.items()
    }


def _batched(fn, rows: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    parts = [
        fn(torch.from_numpy(rows[i : i + batch_size]).to(device)).cpu().numpy()
        for i in range(0, len(rows), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)
