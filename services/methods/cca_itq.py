"""CCA-ITQ: regularised CCA between image and text features, then an ITQ rotation per code length.

Gong, Lazebnik, Gordo and Perronnin, "Iterative Quantization: A Procrustean Approach to Learning
Binary Codes for Large-Scale Image Retrieval", IEEE TPAMI 35(12), 2013 (the cross-modal use of
CCA-ITQ as in Gong, Ke, Isard and Lazebnik, IJCV 2014). Unsupervised: the labels are never read.

Closed form (schedule ``["fit"]``), on the whole train split:

1. centre both modalities (the means are buffers);
2. regularised CCA: C_xx + r_x I, C_yy + r_y I, whitened cross-covariance
   M = C_xx^-1/2 C_xy C_yy^-1/2 = U S V^T; the image / text directions are C_xx^-1/2 U_K and
   C_yy^-1/2 V_K for the K = max(bits) largest canonical correlations, each scaled by its
   eigenvalue S_k^2 (the paper's scaling) when ``eigenvalue_scaling``;
3. ITQ per code length b: on the stacked projected image and text rows V_b (first b dims),
   ``itq_iterations`` alternations of B = sign(V_b R) and the orthogonal Procrustes rotation
   R = argmin ||B - V_b R||_F, from a seeded random rotation.

The float embedding is the full K-dim projection; ``hash_probs(v, b)`` rotates its first b dims
by R_b and thresholds at 0.

Hyper-parameters from the paper: ITQ's 50 iterations from a random orthogonal rotation, the
eigenvalue scaling of the canonical directions.

Differences from the paper:

- the ridge is relative: r = ``ridge`` * trace(C) / d per modality (the paper adds a small
  absolute 1e-4). The evaluation notes ("Reference floors", evaluation.md) reports that heavily
  regularised CCA works far better than a small ridge on our MedPix features (MAP .47-.50 vs
  .33-.36): with 1,280 / 384-dim features and ~1,650 training pairs, an almost unregularised CCA
  fits noise. The default 10 (ten times the mean variance, close to the PLS limit) was chosen on
  MedPix dev queries against train (hashed MAP@all 32-128 bits: ridge 1e-4 .31, 0.1 .41, 1 .52,
  3 and 10 .57, 30 .55; without the eigenvalue scaling at most .40);
- code lengths above min(image_dim, text_dim) have fewer canonical directions than bits: the missing
  dimensions are zero and the ITQ rotation spreads the available ones over every bit;
- inputs are frozen backbone features (EfficientNet / MiniLM), not the paper's GIST / tag vectors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from medhash.services.config import MedhashConfig, Section
from medhash.services.methods.base import FIT, HashModel


class CCAITQParams(Section):
    """CCA-ITQ's hyper-parameters (``method_params``): the paper's, but for the ridge."""

    ridge: float = Field(10.0, ge=0)  # covariance ridge, in units of the mean variance trace(C) / d
    eigenvalue_scaling: bool = True  # scale each canonical direction by its eigenvalue (paper)
    itq_iterations: int = Field(50, ge=0)  # paper: 50
    seed: int = 0  # of ITQ's initial random rotation


def inverse_sqrt(c: Tensor) -> Tensor:
    """C^-1/2 of a symmetric positive definite matrix."""
    values, vectors = torch.linalg.eigh(c)
    return vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T


def ridge_covariance(x: Tensor, ridge: float) -> Tensor:
    """Covariance of centred rows ``x`` plus ``ridge`` * trace / d on the diagonal."""
    c = x.T @ x / len(x)
    return c + ridge * torch.trace(c) / len(c) * torch.eye(len(c), dtype=c.dtype, device=c.device)


def cca_directions(x: Tensor, y: Tensor, k: int, ridge: float) -> tuple[Tensor, Tensor, Tensor]:
    """Regularised CCA of centred ``x``, ``y``: directions [dx, k], [dy, k] and correlations [k].

    Where fewer than ``k`` canonical pairs exist, the missing columns (and correlations) are zero.
    """
    wx, wy = inverse_sqrt(ridge_covariance(x, ridge)), inverse_sqrt(ridge_covariance(y, ridge))
    u, s, vt = torch.linalg.svd(wx @ (x.T @ y / len(x)) @ wy, full_matrices=False)
    r = min(k, len(s))
    return F.pad(wx @ u[:, :r], (0, k - r)), F.pad(wy @ vt[:r].T, (0, k - r)), F.pad(s[:r], (0, k - r))


def quantization_error(v: Tensor, rotation: Tensor) -> float:
    """||sign(V R) - V R||_F^2 / n, the ITQ objective (its minimiser R does not depend on the scale of V)."""
    projected = v @ rotation
    return float((torch.where(projected >= 0, 1.0, -1.0) - projected).pow(2).sum() / len(v))


def itq_rotation(v: Tensor, iterations: int, generator: torch.Generator) -> Tensor:
    """Orthogonal R [b, b] minimising ||sign(V R) - V R||_F by alternating sign and Procrustes steps."""
    bits = v.shape[1]
    rotation, _ = torch.linalg.qr(torch.randn(bits, bits, generator=generator, dtype=v.dtype).to(v.device))
    for _ in range(iterations):
        codes = torch.where(v @ rotation >= 0, 1.0, -1.0).to(v.dtype)
        u, _, wt = torch.linalg.svd(v.T @ codes)
        rotation = u @ wt
    return rotation


class CCAITQ(HashModel):
    """Centred features -> top canonical directions (float embedding) -> rotation -> sign, per code length."""

    name = "cca-itq"
    Params = CCAITQParams
    paper = (
        "Gong, Lazebnik, Gordo, Perronnin: Iterative Quantization: A Procrustean Approach to Learning "
        "Binary Codes for Large-Scale Image Retrieval. IEEE TPAMI 2013"
    )

    def __init__(self, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int) -> None:
        super().__init__(cfg, image_dim, text_dim, n_labels)
        dim = max(self.bits)
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.register_buffer("image_projection", torch.zeros(image_dim, dim))
        self.register_buffer("text_projection", torch.zeros(text_dim, dim))
        for bits in self.bits:
            self.register_buffer(f"rotation_{bits}", torch.eye(bits))

    @classmethod
    def schedule(cls, cfg: MedhashConfig) -> list[str]:
        return [FIT]

    def rotation(self, bits: int) -> Tensor:
        return getattr(self, f"rotation_{bits}")

    def embed_image(self, z: Tensor) -> Tensor:
        return (z - self.image_mean) @ self.image_projection

    def embed_text(self, t: Tensor) -> Tensor:
        return (t - self.text_mean) @ self.text_projection

    def hash_probs(self, v: Tensor, bits: int) -> Tensor:
        """1 where the rotated first ``bits`` dims are positive, else 0 (a hard code)."""
        return (v[:, :bits] @ self.rotation(bits) > 0).float()

    @torch.no_grad()
    def fit(self, z: Tensor, t: Tensor, labels: Tensor) -> None:
        """CCA on the centred train pairs, then one ITQ rotation per code length; ``labels`` unused."""
        p = self.params
        z, t = z.double(), t.double()
        self.image_mean.copy_(z.mean(dim=0))
        self.text_mean.copy_(t.mean(dim=0))
        x, y = z - z.mean(dim=0), t - t.mean(dim=0)
        wx, wy, correlations = cca_directions(x, y, max(self.bits), p.ridge)
        if p.eigenvalue_scaling:
            wx, wy = wx * correlations**2, wy * correlations**2
        self.image_projection.copy_(wx)
        self.text_projection.copy_(wy)
        v = torch.cat([x @ wx, y @ wy])
        generator = torch.Generator().manual_seed(p.seed)
        for bits in self.bits:
            self.rotation(bits).copy_(itq_rotation(v[:, :bits], p.itq_iterations, generator))
