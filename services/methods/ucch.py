"""UCCH, Unsupervised Contrastive Cross-modal Hashing, on frozen backbone features.

Paper: Peng Hu, Hongyuan Zhu, Jie Lin, Dezhong Peng, Yin-Ping Zhao, Xi Peng, "Unsupervised Contrastive
Cross-modal Hashing", IEEE Transactions on Pattern Analysis and Machine Intelligence, published
online 26 May 2022, doi 10.1109/TPAMI.2022.3177356. Our reading follows the paper and
its public code (penghu-cs/UCCH). Unsupervised: labels are never read.

Each modality's network ends in a tanh layer per code length; its output u, normalised to unit
length, is the relaxed code and sign(u) the hash code. Per code length, summed over the lengths:

    L = alpha * (Lc(u^x) + Lc(u^y)) + (1 - alpha) * CRL(u^x, u^y)

- **contrastive hashing** Lc (the paper's "momentum optimizer" view): the contrast is with binary
  codes, not with continuous outputs. The pair i's binary code b_i = sign(u^x_i + u^y_i) (detached)
  is u^x_i's and u^y_i's positive, the other items' codes b_j its negatives; Lc is the cross-entropy
  of softmax_j(u_i . b_j / (T sqrt(K))), i.e. of the cosines to the K-bit codes at temperature T.
  Gradients reach u, never b, so no binary-continuous relaxation of the codes is needed;
- **cross-modal ranking learning** CRL: with s_ij = cos(u^x_i, u^y_j), every item j of row i with
  s_ij >= s_ii - margin keeps its score and the others are lowered by ``shift``;
  CRL = mean_i (logsumexp_j(s'_ij) - s_ii + margin), the same over columns (text to image), summed.
  Every negative takes part, weighted by its softmax share, rather than only the hardest one, so a
  few false negatives (items of the same class) cannot dominate.

Hyper-parameters taken from the paper's code: alpha = 0.9, T = 0.9, margin 0.2, shift 1, hidden
width 8192, two hidden layers in the image network and one in the text network (the code's
``num_hiden_layers`` [3, 2] counts the hash layer too), the CRL temperature 1.

Differences from the paper:

- inputs are frozen feature vectors: the image network is the paper's MLP for precomputed features
  (the paper's VGG variant also ends in it), the text network the paper's MLP on the report feature
  in place of bag-of-words; one model serves every code length: the hidden layers are shared and
  only the hash layers are per code length (the paper trains one network per length);
- **in-batch negatives, no memory bank**: the paper keeps a momentum memory (momentum 0.4) of every
  training item's code and contrasts each output with its own memory entry against K = 4096 sampled
  entries. Our training batches carry no item identities, so a per-item memory cannot be kept; we
  use the paper's own first-epoch (momentum 0) form for the whole training: the positive is the
  pair's current code and the negatives are the batch's other pairs' codes;
- one optimiser and learning rate from ``train`` (the paper: Adam, lr 1e-4, batch 256, 100 epochs,
  gradient norm clipped to 1, which our shared training loop does not do);
- ``embed_image`` / ``embed_text`` return the unit-length u of every code length side by side (the
  float rows compare them by cosine); ``hash_probs`` = (u + 1) / 2, so the code is sign(u).
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

JOINT = "joint"


class UCCHParams(Section):
    """UCCH's hyper-parameters (``method_params``), the paper's defaults."""

    hidden: int = Field(8192, ge=1)  # width of every hidden layer
    image_layers: int = Field(2, ge=0)  # hidden Linear + ReLU layers of the image network
    text_layers: int = Field(1, ge=0)  # hidden Linear + ReLU layers of the text network
    alpha: float = Field(0.9, ge=0, le=1)  # weight of the contrastive term (1 - alpha: CRL)
    temperature: float = Field(0.9, gt=0)  # T of the contrast with binary codes
    margin: float = Field(0.2, ge=0)  # CRL: negatives within this margin of the positive keep their score
    shift: float = Field(1.0, ge=0)  # CRL: how far the other negatives' scores are lowered


def mlp(in_dim: int, hidden: int, layers: int) -> nn.Sequential:
    """``layers`` x (Linear, ReLU) of width ``hidden`` (no layer at all for 0)."""
    dims = [in_dim] + [hidden] * layers
    return nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])


def binary_contrastive_loss(ux: Tensor, uy: Tensor, temperature: float) -> Tensor:
    """Cross-entropy of each u^x_i and u^y_i against the batch's binary codes b_j, b_i the positive.

    Logits u_i . b_j / (T sqrt(K)) of the unit-length outputs, b = sign(u^x + u^y) detached.
    """
    ux, uy = F.normalize(ux, dim=1), F.normalize(uy, dim=1)
    codes = torch.sign(ux + uy).detach()
    scale = temperature * math.sqrt(ux.shape[1])
    pairs = torch.arange(len(ux), device=ux.device)
    return F.cross_entropy(ux @ codes.T / scale, pairs) + F.cross_entropy(uy @ codes.T / scale, pairs)


def cross_modal_ranking_loss(ux: Tensor, uy: Tensor, margin: float, shift: float) -> Tensor:
    """CRL over the cosines s = cos(u^x_i, u^y_j): rows (image to text) plus columns (text to image).

    Scores more than ``margin`` below the positive s_ii are lowered by ``shift``; each direction is
    mean_i(logsumexp_j(s'_ij) - s_ii + margin).
    """
    scores = F.normalize(ux, dim=1) @ F.normalize(uy, dim=1).T
    positive = scores.diagonal()
    near_rows = (scores >= positive[:, None] - margin).detach()
    near_cols = (scores >= positive[None, :] - margin).detach()
    rows = torch.where(near_rows, scores, scores - shift).logsumexp(dim=1)
    cols = torch.where(near_cols, scores, scores - shift).logsumexp(dim=0)
    return (rows - positive + margin).mean() + (cols - positive + margin).mean()


class UCCH(HashModel):
    """Image / text MLPs -> tanh hash layer per modality and code length; code = sign(u)."""

    name = "ucch"
    Params = UCCHParams
    paper = (
        "Hu P., Zhu H., Lin J., Peng D., Zhao Y.-P., Peng X. Unsupervised Contrastive Cross-modal "
        "Hashing. IEEE TPAMI, 2022, doi 10.1109/TPAMI.2022.3177356"
    )

    def __init__(self, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int) -> None:
        super().__init__(cfg, image_dim, text_dim, n_labels)
        p = self.params
        self.image_net = mlp(image_dim, p.hidden, p.image_layers)
        self.text_net = mlp(text_dim, p.hidden, p.text_layers)
        image_out = p.hidden if p.image_layers else image_dim
        text_out = p.hidden if p.text_layers else text_dim
        self.image_hash = nn.ModuleDict({str(b): nn.Linear(image_out, b) for b in self.bits})
        self.text_hash = nn.ModuleDict({str(b): nn.Linear(text_out, b) for b in self.bits})

    # --- inference -----------------------------------------------------------------------------
    @staticmethod
    def _codes(hidden: Tensor, heads: nn.ModuleDict, bits: tuple[int, ...]) -> Tensor:
        return torch.cat([F.normalize(torch.tanh(heads[str(b)](hidden)), dim=1) for b in bits], dim=1)

    def embed_image(self, z: Tensor) -> Tensor:
        """Unit-length u^x of every code length, concatenated [B, sum(bits)]."""
        return self._codes(self.image_net(z), self.image_hash, self.bits)

    def embed_text(self, t: Tensor) -> Tensor:
        """Unit-length u^y of every code length, concatenated [B, sum(bits)]."""
        return self._codes(self.text_net(t), self.text_hash, self.bits)

    def hash_probs(self, v: Tensor, bits: int) -> Tensor:
        """(u + 1) / 2 in [0, 1]: the code sign(u) is ``hash_probs > 0.5``."""
        return (self.code_slice(v, bits) + 1) / 2

    # --- training ------------------------------------------------------------------------------
    def batch_loss(self, stage: str, batch: Batch, cfg: MedhashConfig) -> tuple[Tensor, dict[str, float]]:
        """alpha * contrastive hashing + (1 - alpha) * CRL over the code lengths; ``batch.labels`` unread."""
        if stage != JOINT:
            raise ConfigError(f"ucch has no stage {stage!r} (stages: {JOINT!r})")
        vx = batch.gather(self.embed_image(batch.z[batch.local]))
        vy = batch.gather(self.embed_text(batch.t[batch.local]))
        p = self.params
        terms = {"contrastive": 0.0, "ranking": 0.0}
        for bits in self.bits:
            ux, uy = self.code_slice(vx, bits), self.code_slice(vy, bits)
            terms["contrastive"] = terms["contrastive"] + binary_contrastive_loss(ux, uy, p.temperature)
            terms["ranking"] = terms["ranking"] + cross_modal_ranking_loss(ux, uy, p.margin, p.shift)
        total = p.alpha * terms["contrastive"] + (1 - p.alpha) * terms["ranking"]
        parts = {name: float(value.detach()) for name, value in terms.items()}
        parts["total"] = float(total.detach())
        return total, parts
