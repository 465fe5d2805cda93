"""Prompt-tuned LLM alignment (LSCH stage 3): a frozen causal LM reads prompt + content embeddings.

Each sequence is ``[BOS] + soft prompt + hard prompt(modality) + content tokens``:

- BOS always comes first: Gemma-style LMs put an attention sink on it and give degenerate hidden
  states without it, so it stays even when both prompts are switched off;
- the soft prompt is ``n_virtual`` learned vectors shared by both modalities (prompt tuning,
  Lester et al. 2021), initialised from the embeddings of random vocabulary tokens. It is our own
  ``nn.Parameter`` rather than peft's PromptTuning wrapper because we call the decoder body with
  ``inputs_embeds`` directly (no LM head over the 262k vocabulary), which peft's wrapper does not do;
- the hard prompt is the token embeddings of a fixed instruction text per modality, computed once
  from the frozen embedding table;
- the content tokens are the x (image) or y (report) tokens from the encoding layers.

The LLM weights are frozen (``requires_grad`` False) and the LLM stays in eval mode (no dropout);
only the soft prompt (and optional LoRA adapters, peft, off by default) train. Every sequence of a
batch has the same length, so no padding or attention mask is needed.

With ``text_backbone.name: llm`` the report side is read the other way round (:meth:`PromptedLLM.read`):
``[BOS] + report tokens + soft prompt + hard prompt("text")``, the frozen LLM having read the report once
(:mod:`~medhash.services.backbones.reader`, its keys and values cached per text); only the prompt runs per
step, and v^y is pooled over the prompt positions, the only ones that have seen the report.

The prefix (BOS + prompts) is the same for every item, and under causal attention it never sees
the content: it runs once per call, its keys and values (KV cache, still differentiable, so the
soft prompt gets its gradient) are repeated over the batch, and only the m content tokens run per
item. This is the full-sequence computation exactly, (prefix + m) / m times cheaper.

v is pooled from the last hidden state over the content positions: ``"mean"`` (default) averages
them, ``"last"`` takes the final position. Under causal attention every content position has seen
the whole prompt, and the mean over several positions is a steadier summary from a base (not
instruction-tuned) LM than one position; ``"last"`` is the only position that has seen all content.
"""
from __future__ import annotations

from typing import Literal

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from medhash.services.backbones.reader import ReadingLayout
from medhash.services.errors import ConfigError

Pooling = Literal["mean", "last"]


class PromptedLLM(nn.Module):
    """Frozen causal LM wrapped with BOS + soft prompt + per-modality hard prompt; returns pooled v."""

    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        hard_prompts: dict[str, str],
        n_virtual_tokens: int,
        pooling: Pooling = "mean",
        lora_rank: int = 0,
        seed: int = 0,
    ) -> None:
        """``hard_prompts`` maps a modality name to its instruction ("" = no hard prompt);
        ``n_virtual_tokens`` = 0 switches the soft prompt off. The LLM is frozen in place."""
        super().__init__()
        llm.requires_grad_(False)
        if lora_rank > 0:
            inject_adapter_in_model(
                LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=["q_proj", "v_proj"]), llm
            )
        self.llm, self.tokenizer = llm.eval(), tokenizer
        self.pooling = pooling
        table = llm.get_input_embeddings()
        weight = table.weight.detach()
        if weight.is_meta:
            self.token_scale = float("nan")
        else:
            embed_scale = float(getattr(table, "embed_scale", 1.0))  # Gemma scales embeddings by sqrt(d)
            self.token_scale = float(weight.float().pow(2).mean().sqrt()) * embed_scale
        """RMS of one coordinate of an input embedding: the scale content tokens are brought to (NaN
        for an LLM built without weights, which cannot embed)."""

        def embed(ids: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return table(torch.tensor(ids, dtype=torch.long, device=weight.device)).detach()

        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.register_buffer("bos", embed(bos), persistent=False)
        self.modalities = tuple(hard_prompts)
        for modality, text in hard_prompts.items():
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            self.register_buffer(f"hard_{modality}", embed(ids), persistent=False)
        self.soft_prompt: nn.Parameter | None = None
        if n_virtual_tokens > 0:
            generator = torch.Generator().manual_seed(seed)
            ids = torch.randint(len(weight), (n_virtual_tokens,), generator=generator).tolist()
            self.soft_prompt = nn.Parameter(embed(ids).clone())

    @property
    def hidden_size(self) -> int:
        return self.llm.config.hidden_size

    def prefix(self, modality: str) -> torch.Tensor:
        """The embeddings before the content: BOS, soft prompt, hard prompt; [P, d]."""
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; expected one of {self.modalities}")
        parts = [self.bos] + ([self.soft_prompt] if self.soft_prompt is not None else [])
        return torch.cat(parts + [getattr(self, f"hard_{modality}")], dim=0)

    def read(self, readings: torch.Tensor) -> torch.Tensor:
        """Texts the frozen LLM has read (:class:`~medhash.services.backbones.reader.LLMReader` rows [B, width])
        -> v [B, d]: soft and hard prompt ("text") run after each text, attending to its cached keys and values."""
        layout = ReadingLayout.from_width(self.llm.config, readings.shape[1])
        prompt = self.prefix("text")[len(self.bos):].to(readings.dtype)  # BOS is the text's first token
        if not len(prompt):
            raise ConfigError("an LLM reading the report needs a soft or a hard prompt to read it with")
        window = getattr(self.llm.config, "sliding_window", None)
        if window and layout.tokens + len(prompt) > window:
            raise ConfigError(f"text_backbone.max_length {layout.tokens} + {len(prompt)} prompt tokens exceed the "
                              f"LLM's attention window of {window}")
        mask, keys, values = layout.unpack(readings)
        cache = DynamicCache(config=self.llm.config)
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.update(k, v, layer)
        batch, steps = len(readings), torch.arange(len(prompt), device=readings.device)
        hidden = self.llm.base_model(
            inputs_embeds=prompt.expand(batch, -1, -1),
            attention_mask=torch.cat([mask, mask.new_ones(batch, len(prompt))], dim=1).long(),
            position_ids=mask.sum(dim=1).long()[:, None] + steps,  # each prompt follows its own text
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        return hidden.mean(dim=1) if self.pooling == "mean" else hidden[:, -1]

    def forward(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        """Content tokens [B, m, d] in the LLM's input-embedding space -> pooled v [B, d]."""
        body = self.llm.base_model  # the decoder without the LM head
        prefix = self.prefix(modality).to(tokens.dtype)
        cache = None
        if len(prefix):  # empty only for a tokenizer without BOS and both prompts off
            cache = body(inputs_embeds=prefix[None], use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(tokens))
        content = body(inputs_embeds=tokens, past_key_values=cache, use_cache=cache is not None).last_hidden_state
        return content.mean(dim=1) if self.pooling == "mean" else content[:, -1]

    def train(self, mode: bool = True) -> PromptedLLM:
        """Switch the trainable parts only: the frozen LLM always stays in eval mode."""
        super().train(mode)
        self.llm.eval()
        return self

