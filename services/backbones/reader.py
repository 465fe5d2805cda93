"""The frozen LLM reads a text once: its keys and values at every layer are the text's features.

LSCH's text side (docs/method.md, stage 3, with ``text_backbone.name: llm``) places its trainable prompt
tokens *after* the report. Under causal attention the report's own tokens never see them, so nothing they
compute depends on a trained parameter: ``[BOS, report tokens]`` run through the frozen LLM once per text,
and their keys and values are cached like any backbone feature. Training and serving then run only the
prompt tokens, attending to those keys and values (:meth:`PromptedLLM.read
<medhash.services.methods.prompted_llm.PromptedLLM.read>`); the result equals the full forward pass.

A feature row is ``[mask (T) | keys (L, H, T, D) | values (L, H, T, D)]`` flattened: T = ``max_length``
tokens (BOS included, right-padded, longer texts cut), L layers, H key/value heads of width D.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from medhash.services.config import LLM_READER, LLMConfig, TextBackboneConfig
from medhash.services.errors import ConfigError, DataError


@dataclass(frozen=True)
class ReadingLayout:
    """Where the mask, keys and values sit in a flattened feature row."""

    tokens: int
    layers: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, config: PretrainedConfig, tokens: int) -> ReadingLayout:
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(tokens, config.num_hidden_layers, heads, head_dim)

    @classmethod
    def from_width(cls, config: PretrainedConfig, width: int) -> ReadingLayout:
        """The layout of rows ``width`` wide read by the LLM of ``config`` (T follows from the width)."""
        per_token = 1 + 2 * cls.of(config, 1).kv_size
        if width % per_token:
            raise ConfigError(
                f"text features {width} wide are not what this LLM reads ({per_token} per token): "
                "were they extracted with another text_backbone or llm?"
            )
        return cls.of(config, width // per_token)

    @property
    def kv_size(self) -> int:
        """Numbers per token of keys (or of values) over all layers."""
        return self.layers * self.heads * self.head_dim

    @property
    def width(self) -> int:
        return self.tokens * (1 + 2 * self.kv_size)

    def pack(self, mask: Tensor, keys: list[Tensor], values: list[Tensor]) -> Tensor:
        """mask [B, T] and per-layer keys / values [B, H, T, D] -> rows [B, width]."""
        flat = [torch.stack(part, dim=1).flatten(1) for part in (keys, values)]
        return torch.cat([mask.to(flat[0].dtype), *flat], dim=1)

    def unpack(self, rows: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """rows [B, width] -> mask [B, T], keys, values (per layer [B, H, T, D])."""
        shape = (len(rows), self.layers, self.heads, self.tokens, self.head_dim)
        mask, keys, values = rows.split([self.tokens, self.tokens * self.kv_size, self.tokens * self.kv_size], dim=1)
        return mask, list(keys.reshape(shape).unbind(1)), list(values.reshape(shape).unbind(1))


class LLMReader(nn.Module):
    """A frozen causal LM as the text backbone: ``encode`` gives each text's reading (see the module)."""

    def __init__(self, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, max_length: int,
                 batch_size: int):
        super().__init__()
        if tokenizer.bos_token_id is None:
            raise ConfigError(f"text_backbone.name: {LLM_READER} needs an LLM whose tokenizer has a BOS token")
        window = getattr(llm.config, "sliding_window", None)
        if window and max_length >= window:
            raise ConfigError(f"text_backbone.max_length {max_length} must be shorter than the LLM's attention "
                              f"window of {window} tokens")
        self.llm, self.tokenizer, self.batch_size = llm, tokenizer, batch_size
        self.layout = ReadingLayout.of(llm.config, max_length)
        self.dim = self.layout.width
        self.preprocessing_key = f"text|llm-reader|{name}|L{self.layout.layers}|max{max_length}|kv-fp32"

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """BOS + token ids, right-padded to T, and the mask of real tokens; empty texts are refused."""
        rows = []
        for i, text in enumerate(texts):
            if not text or not text.strip():
                raise DataError(f"text {i} of the batch is empty: nothing to encode")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.layout.tokens - 1]
            rows.append([self.tokenizer.bos_token_id, *ids])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), self.layout.tokens), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), self.layout.tokens)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1.0
        return ids, mask

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> Tensor:
        """Feature rows [len(texts), width] in batches of ``batch_size``."""
        if not texts:
            return torch.empty(0, self.dim)
        return torch.cat([self._read(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)])

    def _read(self, texts: list[str]) -> Tensor:
        ids, mask = self.tokenize(texts)
        mask = mask.to(self.llm.device)
        cache = self.llm.base_model(input_ids=ids.to(mask.device), attention_mask=mask.long(), use_cache=True).past_key_values
        real = mask[:, None, :, None]  # padding reads as 0
        keys, values = [layer.keys * real for layer in cache.layers], [layer.values * real for layer in cache.layers]
        return self.layout.pack(mask, keys, values).float()

    def train(self, mode: bool = True) -> LLMReader:
        super().train(mode)
        self.llm.eval()  # frozen: never dropout
        return self


def build_llm_reader(text: TextBackboneConfig, llm_cfg: LLMConfig,
                     loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None) -> LLMReader:
    """The reader of ``llm_cfg``'s LLM, or of ``loaded`` (the same LLM, already in memory)."""
    from medhash.services.backbones.llm import load_causal_lm

    llm, tokenizer = loaded or load_causal_lm(llm_cfg)
    llm.requires_grad_(False)
    return LLMReader(llm, tokenizer, llm_cfg.name, text.max_length, text.batch_size)
