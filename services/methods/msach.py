"""MSACH, seed method 001, on frozen backbone features.

Paper: Wu Qianlin, Tang Lun, Liu Qinghai, Xu Liming, Chen Qianbin, "Cross-modal hash retrieval of
medical images based on Transformer semantic alignment" (基于Transformer语义对齐的医学图像跨模态哈希检索),
Journal of Biomedical Engineering (生物医学工程学杂志) 42(1): 156-163, 2025, doi 10.7507/1001-5515.202407034.

Our reading of the method (only the abstract is available to us):

- **segmented training**, stage "features" (``feature_epochs`` epochs): each modality's
  features become a few tokens, a Transformer encoder shared by both modalities does the
  cross-modal semantic learning, and its mean-pooled, normalised output is the low-dimensional
  embedding v. Trained by cross-modal semantic alignment (symmetric InfoNCE between paired v^x,
  v^y, same-label items not pushed apart) plus the manifold-similarity constraint on the cosines of v;
- stage "hash" (``train.epochs`` epochs): the towers are frozen (``requires_grad`` off, so
  they leave :meth:`MSACH.trainable_parameters`; embeddings computed without gradients, dropout
  off) and one hash layer u = tanh(W v) per code length learns from the
  **manifold similarity** constraint on the codes (S_ma: label cosine blended with a kNN graph over
  the batch's frozen features, :func:`~medhash.services.methods.losses.manifold_similarity`), **bit balance**,
  quantisation |u| -> 1 and a **linear classification network** predicting the labels from u;
- the code is sign(u), i.e. ``hash_probs`` = (u + 1) / 2 > 0.5.

Hyper-parameters taken from the paper: none are given in the material we could read (the abstract);
the segmented schedule and the four constraints are the paper's. Our choices: ``d_model`` 256,
``layers`` 2, ``heads`` 4, ``ff_dim`` 512, ``dropout`` 0.1, 4 tokens per modality, ``tau`` 0.1,
loss weights ``manifold_weight`` 1, ``balance_weight`` 0.1, ``quantization_weight`` 0.1,
``classification_weight`` 1, ``knn_k`` 5, ``manifold_label_weight`` 0.8.

Differences from the paper:

- inputs are frozen feature vectors, not images and reports: the CNN / text feature extractors are
  replaced by a linear projection of each feature vector to a few tokens
  (:class:`~medhash.services.methods.layers.TokenProjection`) in front of the shared Transformer encoder;
- the alignment loss of the "features" stage (InfoNCE) and the exact form of each constraint are
  ours (the paper's formulas are not available to us); the manifold term regresses (1 + cosine) / 2
  of v, and (1 + u_i . u_j / K) / 2 of the codes, onto S_ma across and within modalities;
- a learned modality embedding tells the shared encoder which modality its tokens come from.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from medhash.services.config import MedhashConfig, Section
from medhash.services.errors import ConfigError
from medhash.services.methods.base import Batch, HashModel
from medhash.services.methods.layers import TokenProjection
from medhash.services.methods.losses import (
    balance_loss,
    classification_loss,
    contrastive_loss,
    manifold_loss,
    manifold_similarity,
    pair_features,
    quantization_loss,
)

FEATURES, HASH = "features", "hash"


class MSACHParams(Section):
    """MSACH's hyper-parameters (``method_params``); the paper gives none, all are our choices."""

    feature_epochs: int = Field(5, ge=0)  # stage "features" before train.epochs of stage "hash"
    d_model: int = Field(256, ge=8)  # width of the tokens, the encoder and the embedding v
    layers: int = Field(2, ge=1)  # Transformer encoder layers
    heads: int = Field(4, ge=1)  # attention heads (must divide d_model)
    ff_dim: int = Field(512, ge=8)  # feed-forward width of each encoder layer
    dropout: float = Field(0.1, ge=0, lt=1)
    image_tokens: int = Field(4, ge=1)  # tokens per image feature vector
    text_tokens: int = Field(4, ge=1)  # tokens per report feature vector
    tau: float = Field(0.1, gt=0)  # InfoNCE temperature of the "features" stage
    manifold_weight: float = Field(1.0, ge=0)  # manifold-similarity constraint (both stages)
    balance_weight: float = Field(0.1, ge=0)  # bit balance
    quantization_weight: float = Field(0.1, ge=0)  # |u| -> 1
    classification_weight: float = Field(1.0, ge=0)  # linear label classifier on the codes (0: off)
    knn_k: int = Field(5, ge=1)  # neighbours of the feature kNN graph in S_ma
    manifold_label_weight: float = Field(0.8, ge=0, le=1)  # share of label cosine in S_ma where labels exist


class MSACH(HashModel):
    """Features -> tokens -> shared Transformer encoder -> v -> tanh(W v) per code length."""

    name = "msach"
    Params = MSACHParams
    float_stages = (FEATURES,)
    paper = (
        "Wu Q., Tang L., Liu Q., Xu L., Chen Q. Cross-modal hash retrieval of medical images based on "
        "Transformer semantic alignment. Journal of Biomedical Engineering 42(1):156-163, 2025"
    )

    def __init__(self, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int) -> None:
        super().__init__(cfg, image_dim, text_dim, n_labels)
        p = self.params
        if p.d_model % p.heads:
            raise ConfigError(f"msach: d_model {p.d_model} is not divisible by heads {p.heads}")
        self.image_tokens = TokenProjection(image_dim, p.image_tokens, p.d_model, 1.0)
        self.text_tokens = TokenProjection(text_dim, p.text_tokens, p.d_model, 1.0)
        self.modality = nn.Parameter(torch.randn(2, p.d_model) * 0.02)  # image, text
        layer = nn.TransformerEncoderLayer(
            p.d_model, p.heads, p.ff_dim, p.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, p.layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(p.d_model)
        self.heads = nn.ModuleDict({str(b): nn.Linear(p.d_model, b) for b in self.bits})
        use_classifier = n_labels > 0 and p.classification_weight > 0
        self.classifiers = nn.ModuleDict(
            {str(b): nn.Linear(b, n_labels) for b in self.bits} if use_classifier else {}
        )

    # --- inference -----------------------------------------------------------------------------
    def _encode(self, tokens: Tensor, modality: int) -> Tensor:
        """Mean-pooled, normalised encoder output of one modality's tokens [B, m, d]."""
        return self.out_norm(self.encoder(tokens + self.modality[modality]).mean(dim=1))

    def embed_image(self, z: Tensor) -> Tensor:
        return self._encode(self.image_tokens(z), 0)

    def embed_text(self, t: Tensor) -> Tensor:
        return self._encode(self.text_tokens(t), 1)

    def hash_probs(self, v: Tensor, bits: int) -> Tensor:
        """(tanh(W v) + 1) / 2: the code sign(tanh(W v)) is ``hash_probs > 0.5``."""
        return (torch.tanh(self.heads[str(bits)](v)) + 1) / 2

    def tower_parameters(self) -> list[nn.Parameter]:
        """Everything the "features" stage trains and the "hash" stage freezes."""
        hashing = {id(p) for p in [*self.heads.parameters(), *self.classifiers.parameters()]}
        return [p for p in self.parameters() if id(p) not in hashing]

    # --- training ------------------------------------------------------------------------------
    @classmethod
    def schedule(cls, cfg: MedhashConfig) -> list[str]:
        """``feature_epochs`` of "features", then ``train.epochs`` of "hash"."""
        return [FEATURES] * cls.params_of(cfg).feature_epochs + [HASH] * cfg.train.epochs

    def batch_loss(self, stage: str, batch: Batch, cfg: MedhashConfig) -> tuple[Tensor, dict[str, float]]:
        similarity = self._similarity(batch)
        if stage == FEATURES:
            return self._features_loss(batch, similarity)
        if stage == HASH:
            return self._hash_loss(batch, similarity)
        raise ConfigError(f"msach has no stage {stage!r} (stages: {FEATURES!r}, {HASH!r})")

    def _similarity(self, batch: Batch) -> Tensor:
        """S_ma [B, B] of the batch: label cosine blended with the kNN graph of the pair features."""
        feats = pair_features(batch.z, batch.t)
        p = self.params
        return manifold_similarity(batch.labels, batch.labels, feats, feats, p.knn_k, p.manifold_label_weight)

    def _features_loss(self, batch: Batch, similarity: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Cross-modal alignment of v^x, v^y plus the manifold constraint on their cosines."""
        self._freeze_towers(False)
        vx, vy = self.embed_image(batch.z), self.embed_text(batch.t)
        alignment = contrastive_loss(vx, vy, batch.labels, self.params.tau, 0.0)
        # unit vectors scaled by sqrt(d): manifold_loss's u_i . u_j / d is then the cosine
        scale = math.sqrt(vx.shape[1])
        manifold = manifold_loss(F.normalize(vx, dim=1) * scale, F.normalize(vy, dim=1) * scale, similarity)
        total = alignment + self.params.manifold_weight * manifold
        parts = {"alignment": alignment, "manifold_v": manifold, "total": total}
        return total, {name: float(value.detach()) for name, value in parts.items()}

    def _freeze_towers(self, frozen: bool) -> None:
        """Take the towers out of :meth:`trainable_parameters` (so out of gradient averaging) or back in.

        Frozen towers get no gradient at all, so AdamW leaves them alone (no decay, no stale momentum).
        """
        for parameter in self.tower_parameters():
            parameter.requires_grad_(not frozen)

    def _frozen_embeddings(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """v^x, v^y without gradients and without dropout: the towers stay as stage "features" left them."""
        self._freeze_towers(True)
        training = self.training
        self.eval()
        with torch.no_grad():
            vx, vy = self.embed_image(batch.z), self.embed_text(batch.t)
        self.train(training)
        return vx, vy

    def _hash_loss(self, batch: Batch, similarity: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Manifold + bit balance + quantisation + label classification on u = tanh(W v), summed over code lengths."""
        vx, vy = self._frozen_embeddings(batch)
        known = bool(self.classifiers) and bool((batch.labels.sum(dim=1) > 0).any())
        terms = {"manifold": 0.0, "balance": 0.0, "quantization": 0.0}
        if known:
            terms["classification"] = 0.0
        for bits in self.bits:
            ux, uy = 2 * self.hash_probs(vx, bits) - 1, 2 * self.hash_probs(vy, bits) - 1
            terms["manifold"] = terms["manifold"] + manifold_loss(ux, uy, similarity)
            terms["balance"] = terms["balance"] + 0.5 * (balance_loss(ux) + balance_loss(uy))
            terms["quantization"] = terms["quantization"] + 0.5 * (quantization_loss(ux) + quantization_loss(uy))
            if known:
                terms["classification"] = terms["classification"] + classification_loss(
                    self.classifiers[str(bits)], ux, uy, batch.labels
                )
        p = self.params
        total = (
            p.manifold_weight * terms["manifold"]
            + p.balance_weight * terms["balance"]
            + p.quantization_weight * terms["quantization"]
            + p.classification_weight * terms.get("classification", 0.0)
        )
        parts = {name: float(value.detach()) for name, value in terms.items()}
        parts["total"] = float(total.detach())
        return total, parts
