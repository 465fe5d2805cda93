"""The float upper bound: a dual MLP encoder trained with a label-masked contrastive loss, no hashing.

Not a hashing method: its real output is the float embedding, compared by cosine (evaluation
reports its float MAP, and that is the row the results use: what the towers reach without the
binary bottleneck). Its codes exist only to satisfy the :class:`HashModel` interface and are an
LSH reference: per code length, the sign of a fixed random Gaussian projection of the embedding
(SimHash, Charikar, "Similarity Estimation Techniques from Rounding Algorithms", STOC 2002), whose
Hamming distance approximates the embeddings' angle.

Training objective: the symmetric InfoNCE of CLIP (Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", ICML 2021) between image and text embeddings of a
batch, the pair (i, i) positive, with items that share a label masked out of the negatives
(:func:`medhash.services.methods.losses.contrastive_loss`, as in LSCH; items with unknown labels stay negatives).

Hyper-parameters: the towers of the deep baselines (feature -> ``hidden``, ReLU -> ``embed_dim``,
1024 / 512 as DHaPH's), LSCH's temperature 0.1 and false-negative policy.

Differences from the paper (CLIP):

- inputs are frozen feature vectors: the image and text encoders are one MLP tower each on the
  backbone features, trained from scratch; the temperature is fixed, not learned;
- label-sharing pairs are not treated as negatives (supervised), where CLIP has no labels.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from medhash.services.config import MedhashConfig, Section
from medhash.services.methods.losses import contrastive_loss
from medhash.services.methods.base import Batch, HashModel


class FloatDualParams(Section):
    """FloatDualEncoder's hyper-parameters (``method_params``)."""

    hidden: int = Field(1024, ge=1)  # width of each modality's MLP tower
    embed_dim: int = Field(512, ge=1)  # the float embedding
    tau: float = Field(0.1, gt=0)  # InfoNCE temperature (LSCH's)
    false_negatives: Literal["shared_label", "same_labels", "none"] = "shared_label"
    lsh_seed: int = 0  # of the fixed random projections behind the codes


class FloatDualEncoder(HashModel):
    """Image / text MLP towers -> float embeddings; codes = sign of a fixed random projection (LSH)."""

    name = "float-dual"
    Params = FloatDualParams
    paper = (
        "Radford et al.: Learning Transferable Visual Models From Natural Language Supervision. ICML 2021 "
        "(contrastive dual encoder); Charikar: Similarity Estimation Techniques from Rounding Algorithms. "
        "STOC 2002 (LSH codes)"
    )

    def __init__(self, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int) -> None:
        super().__init__(cfg, image_dim, text_dim, n_labels)
        p = self.params

        def tower(in_dim: int) -> nn.Module:
            return nn.Sequential(nn.Linear(in_dim, p.hidden), nn.ReLU(), nn.Linear(p.hidden, p.embed_dim))

        self.image_tower, self.text_tower = tower(image_dim), tower(text_dim)
        generator = torch.Generator().manual_seed(p.lsh_seed)
        for bits in self.bits:
            self.register_buffer(f"lsh_{bits}", torch.randn(p.embed_dim, bits, generator=generator))

    def embed_image(self, z: Tensor) -> Tensor:
        return self.image_tower(z)

    def embed_text(self, t: Tensor) -> Tensor:
        return self.text_tower(t)

    def hash_probs(self, v: Tensor, bits: int) -> Tensor:
        """1 where the fixed random projection of ``v`` is positive, else 0 (a hard LSH code)."""
        return (v @ getattr(self, f"lsh_{bits}") > 0).float()

    def batch_loss(self, stage: str, batch: Batch, cfg: MedhashConfig) -> tuple[Tensor, dict[str, float]]:
        """Symmetric InfoNCE between the batch's image and text embeddings, label-sharing pairs masked."""
        p = self.params
        vx = batch.gather(self.embed_image(batch.z[batch.local]))
        vy = batch.gather(self.embed_text(batch.t[batch.local]))
        loss = contrastive_loss(vx, vy, batch.labels, p.tau, 0.0, p.false_negatives)
        return loss, {"contrastive": float(loss.detach()), "total": float(loss.detach())}
