"""DCMH, Deep Cross-Modal Hashing, on frozen backbone features.

Paper: Qing-Yuan Jiang and Wu-Jun Li, "Deep Cross-Modal Hashing", CVPR 2017.

The paper's objective over n training pairs, with F = image-network outputs, G = text-network
outputs (c bits each), S_ij = 1 when items i and j share a label, theta_ij = F_i . G_j / 2 and
B in {-1, +1}:

    J = -sum_ij (S_ij theta_ij - log(1 + e^theta_ij))       (negative log-likelihood of S)
        + gamma (||B - F||^2 + ||B - G||^2)                   (quantisation)
        + eta (||F 1||^2 + ||G 1||^2)                         (bit balance)

minimised by alternating: the image network with G and B fixed, the text network with F and B
fixed, then B = sign(gamma (F + G)). The code of a new item is sign(F) or sign(G).

Our minibatch version, per code length, summed over the code lengths:

- J restricted to the batch's n items, divided by the n^2 cross pairs: the likelihood term is a mean
  over pairs (pairs with an unlabelled item, an all-zero label row, left out), quantisation is
  (||B - F||^2 + ||B - G||^2) / n^2 and balance is the sum over bits of the squared batch mean;
- B = sign(F + G) of the batch, recomputed each step and detached (sign(0) taken as +1);
- **alternating stages**: epochs alternate "image" (only the image tower learns, G is detached) and
  "text" (only the text tower learns, F is detached) within ``train.epochs``, starting with
  "image", as the paper alternates its two networks;
- ``embed_image`` / ``embed_text`` return F / G of every code length side by side (the float rows
  compare them by cosine); ``hash_probs`` = sigmoid(F), so the code 1[hash_probs > 0.5] is sign(F).

Hyper-parameters taken from the paper: gamma = eta = 1, the text network's 8192-unit hidden layer,
and the image network's 4096-unit fc7 in front of its hash layer (CNN-F).

Differences from the paper:

- inputs are frozen feature vectors, not pixels and bag-of-words vectors: the image tower is an MLP
  (feature -> 4096, ReLU -> one hash layer per code length) in place of CNN-F, the text tower the
  paper's MLP (feature -> 8192, ReLU -> one hash layer per code length) on the report feature;
- one model serves every code length: the hidden layers are shared and only the hash layers are
  per length (the paper trains one model per length);
- minibatch objective on the batch's pairs and a per-batch B instead of the paper's pairs of a batch
  against the whole training set and B updated once per epoch; the optimiser and learning rate come
  from ``train`` (the paper: SGD, batch 128, 500 epochs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from medhash.services.config import MedhashConfig, Section
from medhash.services.errors import ConfigError
from medhash.services.methods.base import Batch, HashModel

IMAGE, TEXT = "image", "text"


class DCMHParams(Section):
    """DCMH's hyper-parameters (``method_params``), the paper's defaults."""

    gamma: float = Field(1.0, ge=0)  # quantisation weight
    eta: float = Field(1.0, ge=0)  # bit-balance weight
    image_hidden: int = Field(4096, ge=1)  # image tower width (CNN-F fc7)
    text_hidden: int = Field(8192, ge=1)  # text tower width (the paper's text network)


def label_similarity(labels: Tensor) -> tuple[Tensor, Tensor]:
    """S [n, n] (1 where two items share a label) and the mask of pairs whose items both have labels."""
    labels = labels.float()
    known = labels.sum(dim=1) > 0
    return (labels @ labels.T > 0).float(), known[:, None] & known[None, :]


def likelihood_loss(f: Tensor, g: Tensor, similarity: Tensor, known: Tensor) -> Tensor:
    """Mean over the ``known`` pairs of log(1 + e^theta_ij) - S_ij theta_ij, theta = F G^T / 2; 0 if none."""
    theta = 0.5 * f @ g.T
    nll = F.softplus(theta) - similarity * theta
    return (nll * known).sum() / known.sum().clamp_min(1)


def quantization_loss(b: Tensor, u: Tensor) -> Tensor:
    """||B - U||^2 / n^2 for a batch of n outputs U."""
    return (b - u).pow(2).sum() / len(u) ** 2


def balance_loss(u: Tensor) -> Tensor:
    """||U^T 1||^2 / n^2: the squared batch mean of every bit, summed over bits."""
    return u.mean(dim=0).pow(2).sum()


class DCMH(HashModel):
    """Image / text MLP towers -> F / G per code length; the code is sign(F) / sign(G)."""

    name = "dcmh"
    Params = DCMHParams
    paper = "Jiang Q.-Y., Li W.-J. Deep Cross-Modal Hashing. CVPR 2017"

    def __init__(self, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int) -> None:
        super().__init__(cfg, image_dim, text_dim, n_labels)
        p = self.params
        self.image_tower = nn.Sequential(nn.Linear(image_dim, p.image_hidden), nn.ReLU())
        self.text_tower = nn.Sequential(nn.Linear(text_dim, p.text_hidden), nn.ReLU())
        self.image_heads = nn.ModuleDict({str(b): nn.Linear(p.image_hidden, b) for b in self.bits})
        self.text_heads = nn.ModuleDict({str(b): nn.Linear(p.text_hidden, b) for b in self.bits})

    # --- inference -----------------------------------------------------------------------------
    def embed_image(self, z: Tensor) -> Tensor:
        """F of every code length, concatenated [B, sum(bits)]."""
        hidden = self.image_tower(z)
        return torch.cat([self.image_heads[str(b)](hidden) for b in self.bits], dim=1)

    def embed_text(self, t: Tensor) -> Tensor:
        """G of every code length, concatenated [B, sum(bits)]."""
        hidden = self.text_tower(t)
        return torch.cat([self.text_heads[str(b)](hidden) for b in self.bits], dim=1)

    def hash_probs(self, v: Tensor, bits: int) -> Tensor:
        """sigmoid(F): the code sign(F) is ``hash_probs > 0.5``."""
        return torch.sigmoid(self.code_slice(v, bits))

    # --- training ------------------------------------------------------------------------------
    @classmethod
    def schedule(cls, cfg: MedhashConfig) -> list[str]:
        """``train.epochs`` epochs alternating "image", "text", "image", ..."""
        return [(IMAGE, TEXT)[epoch % 2] for epoch in range(cfg.train.epochs)]

    def batch_loss(self, stage: str, batch: Batch, cfg: MedhashConfig) -> tuple[Tensor, dict[str, float]]:
        """The batch objective of the tower ``stage`` trains, the other tower's outputs fixed."""
        if stage not in (IMAGE, TEXT):
            raise ConfigError(f"dcmh has no stage {stage!r} (stages: {IMAGE!r}, {TEXT!r})")
        vx, vy = self.embed_image(batch.z), self.embed_text(batch.t)
        if stage == IMAGE:
            vy = vy.detach()
        else:
            vx = vx.detach()
        similarity, known = label_similarity(batch.labels.to(vx.device))
        terms = {"likelihood": 0.0, "quantization": 0.0, "balance": 0.0}
        for bits in self.bits:
            f, g = self.code_slice(vx, bits), self.code_slice(vy, bits)
            trained = f if stage == IMAGE else g
            b = torch.where(f + g >= 0, 1.0, -1.0).detach()
            terms["likelihood"] = terms["likelihood"] + likelihood_loss(f, g, similarity, known)
            terms["quantization"] = terms["quantization"] + quantization_loss(b, trained)
            terms["balance"] = terms["balance"] + balance_loss(trained)
        p = self.params
        total = terms["likelihood"] + p.gamma * terms["quantization"] + p.eta * terms["balance"]
        parts = {name: float(value.detach()) for name, value in terms.items()}
        parts["total"] = float(total.detach())
        return total, parts
