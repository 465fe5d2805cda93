"""DCHMT, Differentiable Cross-modal Hashing via Multimodal Transformers, on frozen backbone features.

Paper: Junfeng Tu, Xueliang Liu, Zongxiang Lin, Richang Hong and Meng Wang, "Differentiable
Cross-modal Hashing via Multimodal Transformers", ACM Multimedia (MM) 2022.

What we implement (our reading of the paper and its authors' public code):

- **towers**: each modality's feature vector becomes a few tokens
  (:class:`~medhash.services.methods.layers.TokenProjection`), its own small Transformer encoder reads them, and
  the mean-pooled, LayerNorm-ed output is the modality's representation (the paper: CLIP's ViT and
  text Transformer);
- **selection mechanism** (the differentiable hashing layer): per modality and code length, a hidden
  layer (Linear to 128, ReLU) and one 2-way softmax per bit, so bit k of item i is a 2-D vector
  (1 - p_ik, p_ik) instead of a sign; the code selects the larger entry, bit = 1[p_ik > 1/2]
  (+1 / -1 in the paper). Training uses the soft vectors, so no sign() is ever differentiated. Two
  codes as concatenated 2-D vectors are at squared Euclidean distance
  D_ij^2 = sum_k 2 (p_ik - q_jk)^2, which is twice the Hamming distance once the softmaxes saturate;
- **similarity-preserving loss** (S_ij = 1 when items i and j share a label; pairs with an
  unlabelled item are left out): for similar pairs D_ij^2, for dissimilar pairs
  max(0, m - D_ij)^2 with the margin m = sqrt(2 K vartheta), i.e. dissimilar codes should differ in
  at least a share vartheta of their K bits; each a mean over the batch's pairs. The loss is the
  cross-modal term (image vs text) plus the intra-modal terms (image vs image, text vs text), summed
  over the code lengths. No quantisation term: the selection layer has no relaxation to quantise.
- ``embed_image`` / ``embed_text`` return the per-bit logit margins a_ik (p_ik = sigmoid(a_ik), the
  2-way softmax) of every code length side by side; ``hash_probs`` = sigmoid(a), so the code is
  1[hash_probs > 0.5], the selected entry.

Hyper-parameters taken from the paper / its code: vartheta = 0.5, the selection layer's 128-unit
hidden layer, the Euclidean similarity with the squared (L2) loss. Our choices for the small towers:
``d_model`` 256, ``layers`` 2, ``heads`` 4, ``ff_dim`` 512, ``dropout`` 0.1, 4 tokens per modality.

Differences from the paper:

- inputs are frozen feature vectors, not images and captions: the CLIP encoders (fine-tuned in the
  paper) are replaced by the token projection and a small Transformer encoder per modality;
- one model serves every code length (a selection layer per length on the shared towers);
- the optimiser and schedule come from ``train`` (the paper: Adam with warm-up and cosine decay,
  lr 1e-3 for the hash layers, weight decay 0.2, batch 64, 100 epochs).
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from medhash.services.config import MedhashConfig, Section
from medhash.services.errors import ConfigError
from medhash.services.methods.layers import TokenProjection
from medhash.services.methods.base import Batch, HashModel


class DCHMTParams(Section):
    """DCHMT's hyper-parameters (``method_params``): the paper's vartheta and selection layer, our towers."""

    vartheta: float = Field(0.5, gt=0, le=1)  # share of bits dissimilar codes must differ in
    select_hidden: int = Field(128, ge=1)  # hidden width of the selection layer
    d_model: int = Field(256, ge=8)  # width of the tokens and the encoders
    layers: int = Field(2, ge=1)  # Transformer encoder layers per modality
    heads: int = Field(4, ge=1)  # attention heads (must divide d_model)
    ff_dim: int = Field(512, ge=8)  # feed-forward width of each encoder layer
    dropout: float = Field(0.1, ge=0, lt=1)
    image_tokens: int = Field(4, ge=1)  # tokens per image feature vector
    text_tokens: int = Field(4, ge=1)  # tokens per report feature vector


class Tower(nn.Module):
    """Features -> tokens -> Transformer encoder -> mean-pooled, normalised representation [B, d]."""

    def __init__(self, in_dim: int, p: DCHMTParams, n_tokens: int) -> None:
        super().__init__()
        self.tokens = TokenProjection(in_dim, n_tokens, p.d_model, 1.0)
        layer = nn.TransformerEncoderLayer(p.d_model, p.heads, p.ff_dim, p.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, p.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(p.d_model)

    def forward(self, features: Tensor) -> Tensor:
        return self.norm(self.encoder(self.tokens(features)).mean(dim=1))


class SelectionLayer(nn.Module):
    """The selection hash layer: one 2-way softmax per bit; returns each bit's logit margin [B, K]."""

    def __init__(self, in_dim: int, hidden: int, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.hidden = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU())
        self.logits = nn.Linear(hidden, 2 * bits)

    def forward(self, x: Tensor) -> Tensor:
        """l_+ - l_- of every bit: softmax(l_-, l_+) = (1 - sigmoid(a), sigmoid(a))."""
        logits = self.logits(self.hidden(x)).view(len(x), self.bits, 2)
        return logits[..., 1] - logits[..., 0]


def selection_distance2(p: Tensor, q: Tensor) -> Tensor:
    """Squared Euclidean distances [n, m] between codes as concatenated (1 - p, p) vectors."""
    return 2 * (p[:, None, :] - q[None, :, :]).pow(2).sum(dim=-1)


def similarity_loss(p: Tensor, q: Tensor, similarity: Tensor, known: Tensor, vartheta: float) -> Tensor:
    """Mean over ``known`` pairs of S D^2 + (1 - S) max(0, m - D)^2, m = sqrt(2 K vartheta); 0 if none."""
    d2 = selection_distance2(p, q)
    margin = math.sqrt(2 * p.shape[1] * vartheta)
    distance = d2.clamp_min(1e-12).sqrt()
    pair = similarity * d2 + (1 - similarity) * (margin - distance).clamp_min(0).pow(2)
    return (pair * known).sum() / known.sum().clamp_min(1)


def label_similarity(labels: Tensor) -> tuple[Tensor, Tensor]:
    """S [n, n] (1 where two items share a label) and the mask of pairs whose items both have labels."""
    labels = labels.float()
    known = labels.sum(dim=1) > 0
    return (labels @ labels.T > 0).float(), known[:, None] & known[None, :]


class DCHMT(HashModel):
    """Transformer towers -> selection layer per code length -> bit = the selected softmax entry."""

    name = "dchmt"
    Params = DCHMTParams
    paper = (
        "Tu J., Liu X., Lin Z., Hong R., Wang M. Differentiable Cross-modal Hashing via Multimodal "
        "Transformers. ACM MM 2022"
    )

    def __init__(self, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int) -> None:
        super().__init__(cfg, image_dim, text_dim, n_labels)
        p = self.params
        if p.d_model % p.heads:
            raise ConfigError(f"dchmt: d_model {p.d_model} is not divisible by heads {p.heads}")
        self.image_tower = Tower(image_dim, p, p.image_tokens)
        self.text_tower = Tower(text_dim, p, p.text_tokens)
        self.image_select = nn.ModuleDict({str(b): SelectionLayer(p.d_model, p.select_hidden, b) for b in self.bits})
        self.text_select = nn.ModuleDict({str(b): SelectionLayer(p.d_model, p.select_hidden, b) for b in self.bits})

    # --- inference -----------------------------------------------------------------------------
    def embed_image(self, z: Tensor) -> Tensor:
        """Logit margins of every code length, concatenated [B, sum(bits)]."""
        x = self.image_tower(z)
        return torch.cat([self.image_select[str(b)](x) for b in self.bits], dim=1)

    def embed_text(self, t: Tensor) -> Tensor:
        """Logit margins of every code length, concatenated [B, sum(bits)]."""
        x = self.text_tower(t)
        return torch.cat([self.text_select[str(b)](x) for b in self.bits], dim=1)

    def hash_probs(self, v: Tensor, bits: int) -> Tensor:
        """p_ik, the "+1" entry of each bit's softmax: the selected entry is +1 iff ``hash_probs > 0.5``."""
        return torch.sigmoid(self.code_slice(v, bits))

    # --- training ------------------------------------------------------------------------------
    def batch_loss(self, stage: str, batch: Batch, cfg: MedhashConfig) -> tuple[Tensor, dict[str, float]]:
        """Cross-modal + intra-modal similarity-preserving loss on the soft codes, summed over code lengths."""
        if stage != "joint":
            raise ConfigError(f"dchmt has no stage {stage!r} (stages: 'joint')")
        vx, vy = self.embed_image(batch.z), self.embed_text(batch.t)
        similarity, known = label_similarity(batch.labels.to(vx.device))
        vartheta = self.params.vartheta
        terms = {"inter": 0.0, "intra": 0.0}
        for bits in self.bits:
            px, py = self.hash_probs(vx, bits), self.hash_probs(vy, bits)
            terms["inter"] = terms["inter"] + similarity_loss(px, py, similarity, known, vartheta)
            terms["intra"] = terms["intra"] + similarity_loss(px, px, similarity, known, vartheta) + similarity_loss(
                py, py, similarity, known, vartheta
            )
        total = terms["inter"] + terms["intra"]
        parts = {name: float(value.detach()) for name, value in terms.items()}
        parts["total"] = float(total.detach())
        return total, parts
