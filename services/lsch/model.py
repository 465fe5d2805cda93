"""The LSCH model, stages 2-4 of method.md, on frozen cached backbone features.

Our reading of the method:

- inputs are frozen backbone features: image Z [B, image_dim] (EfficientNet-Lite0 pooled) and
  text features [B, text_dim] (MiniLM, for reports and their augmented views);
- **structured encoding layer** (image, stage 2): Z -> X, ``m_img_tokens`` tokens in the LLM's
  input-embedding space: LayerNorm, one linear map to m * d, reshape, learned token-position
  embeddings, then a LayerNorm scaled to the RMS of the LLM's own input embeddings, so X looks
  like a short "sentence" to the LLM. Ablation off: one plain linear map Z -> one token;
- **LLM encoding layer** (text): text features -> Y, ``m_txt_tokens`` tokens, the same structure;
- **prompt-tuned LLM alignment** (stage 3, :class:`~medhash.services.lsch.prompts.PromptedLLM`): the frozen
  LLM reads [BOS, soft prompt, hard prompt, x or y tokens]; v^x / v^y = its pooled last hidden
  state. Ablation "LLM off": v = a linear map of the mean of the x / y tokens;
- **GBRBM hashing** (stage 4): v is standardised by a learned LayerNorm (the Gaussian visible units
  expect unit-scale data), then one GBRBM per code length gives p(h | v); code = 1[p(h | v) > 0.5].
  Ablation "GBRBM off": p = sigmoid(linear(v)), i.e. code = sign of a linear layer, relaxed
  during training as u = 2p - 1 = tanh(linear(v) / 2).

Only projections, prompts and heads train; :meth:`LSCHModel.state_dict_trainable` holds exactly
those (never the frozen LLM), for the run directory's safetensors file.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medhash.services.config import LSCHConfig, MedhashConfig
from medhash.services.errors import ConfigError, WeightsError
from medhash.services.hashing.gbrbm import GBRBM
from medhash.services.lsch.losses import embedding_alignment_loss, hashing_loss, pair_features
from medhash.services.lsch.prompts import PromptedLLM

LLM_PREFIX = "prompted.llm."


class TokenProjection(nn.Module):
    """Features [B, in] -> m tokens [B, m, d] at the scale ``token_scale`` per coordinate."""

    def __init__(self, in_dim: int, n_tokens: int, dim: int, token_scale: float) -> None:
        super().__init__()
        self.n_tokens, self.dim, self.token_scale = n_tokens, dim, token_scale
        self.norm_in = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, n_tokens * dim)
        self.position = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(self.norm_in(features)).view(len(features), self.n_tokens, self.dim)
        return self.norm_out(tokens + self.position) * self.token_scale


class LinearToken(nn.Module):
    """The "structured encoding off" ablation: one plain linear map to a single token [B, 1, d]."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features).unsqueeze(1)


class LSCHModel(nn.Module):
    """Image / text features -> v^x / v^y -> p(h | v) per code length -> binary codes."""

    float_stages = ("align",)  # stages before the hashing heads train (dev scores use float v)

    def __init__(
        self,
        cfg: LSCHConfig,
        image_dim: int,
        text_dim: int,
        llm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        n_labels: int = 0,
    ) -> None:
        """``llm`` and ``tokenizer`` are needed when ``cfg.use_llm``; the LLM is frozen in place.

        With ``cfg.classification_weight`` > 0 and ``n_labels`` labels, each code length gets a linear
        label classifier on its relaxed codes (a training-time constraint; codes never depend on it).
        """
        super().__init__()
        self.cfg = cfg
        self.bits = tuple(cfg.bits)
        self.prompted: PromptedLLM | None = None
        if cfg.use_llm:
            if llm is None or tokenizer is None:
                raise ConfigError("lsch.use_llm needs a causal LM and its tokenizer (or set lsch.use_llm: false)")
            self.prompted = PromptedLLM(
                llm,
                tokenizer,
                hard_prompts={
                    "image": cfg.image_prompt if cfg.use_hard_prompt else "",
                    "text": cfg.text_prompt if cfg.use_hard_prompt else "",
                },
                n_virtual_tokens=cfg.n_virtual_tokens if cfg.use_soft_prompt else 0,
                pooling=cfg.pooling,
                lora_rank=cfg.lora_rank,
            )
            dim, token_scale = self.prompted.hidden_size, self.prompted.token_scale
        else:
            dim, token_scale = cfg.embed_dim, 1.0
            self.pool_proj = nn.Linear(dim, dim)
        self.dim = dim
        self.image_tokens = (
            TokenProjection(image_dim, cfg.m_img_tokens, dim, token_scale)
            if cfg.use_structured_encoding
            else LinearToken(image_dim, dim)
        )
        self.text_tokens = TokenProjection(text_dim, cfg.m_txt_tokens, dim, token_scale)
        self.visible_norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict(
            {str(b): GBRBM(dim, b) if cfg.use_gbrbm else nn.Linear(dim, b) for b in self.bits}
        )
        self.classifiers = nn.ModuleDict(
            {str(b): nn.Linear(b, n_labels) for b in self.bits} if cfg.classification_weight > 0 and n_labels else {}
        )

    def _pool(self, tokens: torch.Tensor, modality: str) -> torch.Tensor:
        if self.prompted is not None:
            return self.prompted(tokens, modality)
        return self.pool_proj(tokens.mean(dim=1))

    def embed_image(self, z: torch.Tensor) -> torch.Tensor:
        """v^x [B, d] from image features z [B, image_dim]."""
        return self._pool(self.image_tokens(z), "image")

    def embed_text(self, t: torch.Tensor) -> torch.Tensor:
        """v^y [B, d] from text features t [B, text_dim]."""
        return self._pool(self.text_tokens(t), "text")

    def _head(self, bits: int) -> nn.Module:
        if str(bits) not in self.heads:
            raise ConfigError(f"no {bits}-bit head: this model has {self.bits}")
        return self.heads[str(bits)]

    def visible(self, v: torch.Tensor) -> torch.Tensor:
        """v standardised for the hashing heads (the GBRBM's visible units)."""
        return self.visible_norm(v)

    def hash_probs(self, v: torch.Tensor, bits: int) -> torch.Tensor:
        """p(h = 1 | v) [B, bits]: GBRBM hidden probabilities, or sigmoid of the linear head."""
        head = self._head(bits)
        if isinstance(head, GBRBM):
            return head.hidden_probs(self.visible(v))
        return torch.sigmoid(head(self.visible(v)))

    def codes(self, v: torch.Tensor, bits: int) -> torch.Tensor:
        """Binary codes 1[p(h | v) > 0.5], bool [B, bits]."""
        with torch.no_grad():
            return self.hash_probs(v, bits) > 0.5

    def gbrbm_pretrain_loss(self, v: torch.Tensor) -> torch.Tensor:
        """CD-k surrogate summed over the GBRBM heads, on standardised and detached v (the data)."""
        if not self.cfg.use_gbrbm:
            raise ConfigError("GBRBM pre-training needs lsch.use_gbrbm: true")
        data = self.visible(v).detach()
        return sum(self.heads[str(b)].cd_loss(data, self.cfg.gbrbm_cd_k) for b in self.bits)

    @classmethod
    def schedule(cls, cfg: MedhashConfig) -> list[str]:
        """Stage A "align", B "rbm" (only with GBRBM heads), C "joint": the stage of every epoch."""
        rbm_epochs = cfg.train.rbm_epochs if cfg.lsch.use_gbrbm else 0
        return ["align"] * cfg.train.align_epochs + ["rbm"] * rbm_epochs + ["joint"] * cfg.train.joint_epochs

    def batch_loss(self, stage: str, batch, cfg: MedhashConfig) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one global batch (a medhash.services.methods.base.Batch) in ``stage``.

        This worker embeds its share of the batch; the embeddings are gathered so every worker
        scores the whole global batch. The GBRBM stage needs no gathering (CD on local v).
        """
        z, t = batch.z[batch.local], batch.t[batch.local]
        if stage == "rbm":
            with torch.no_grad():
                v = torch.cat([self.embed_image(z), self.embed_text(t)])
            loss = self.gbrbm_pretrain_loss(v)
            with torch.no_grad():
                visible = self.visible(v)
                error = sum(float(self.heads[str(b)].reconstruction_error(visible)) for b in self.bits) / len(self.bits)
            return loss, {"cd": loss.item(), "reconstruction": error, "total": loss.item()}
        vx, vy = batch.gather(self.embed_image(z)), batch.gather(self.embed_text(t))
        if stage == "align":
            return embedding_alignment_loss(vx, vy, batch.labels, cfg.lsch)
        return hashing_loss(self, vx, vy, pair_features(batch.z, batch.t), batch.labels, cfg.lsch)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Projections, soft prompt, heads (and LoRA adapters if on): never the frozen LLM."""
        return [p for p in self.parameters() if p.requires_grad]

    def state_dict_trainable(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen LLM's weights (LoRA adapters, if any, are kept)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {
            name: tensor.detach()
            for name, tensor in self.state_dict().items()
            if name in trainable or not name.startswith(LLM_PREFIX)
        }

    def load_state_dict_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`state_dict_trainable` saved; refuse missing, extra or reshaped tensors."""
        expected = self.state_dict_trainable()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or reshaped:
            raise WeightsError(
                "LSCH weights do not match this configuration: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {reshaped[:5]}"
            )
        self.load_state_dict(state, strict=False)

