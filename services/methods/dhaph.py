"""DHaPH, Deep Hierarchy-aware Proxy Hashing, on frozen backbone features.

Paper: Yadong Huo, Qibing Qin, Wenfeng Zhang, Lei Huang, Jie Nie, "Deep Hierarchy-aware Proxy Hashing
with Self-paced Learning for Cross-modal Retrieval", IEEE Transactions on Knowledge and Data
Engineering 36(11): 5926-5939, 2024. Our reading follows the paper and its public code (QinLab-WFU,
CLIP-based-Cross-Modal-Hashing, train/DHaPH).

Per code length, on relaxed codes u = tanh(hash layer), summed over the code lengths:

    L = SP(u^x, u^x) + SP(u^y, u^y) + SP(u^x, u^y) + alpha * HP(u^x, u^y)

- **self-paced similarity loss** SP(a, b): for each anchor a_i, -log(sum_pos w e^{s/tau} /
  sum_all w e^{s/tau}) over the cosines s_ij = cos(a_i, b_j), positives = items sharing a label.
  Self-paced weights (detached) w = e^{-(1 + s) delta / 4} for positives and e^{(s - 1) delta} for
  negatives: with delta = 0 every pair counts alike, and as delta grows to 1 the hard pairs (far
  positives, near negatives) count more, from easy to hard. delta ramps as epoch / (E / 3) over the
  first third of the E epochs (stages "pace e/k"), then stays 1 (stage "joint");
- **hierarchy-aware proxy loss** HP: the codes are mapped (LayerNorm, a linear layer, clipping to
  radius 2.3) into a Poincare ball of curvature c = 0.1 that also holds ``proxies`` learnable
  ancestors. Triplets (i, j, k) come from each batch: j is a mutual top-k neighbour of i (by ball
  distance, items sharing a label first), k is not. The lowest common ancestor of {i, j} is the
  proxy nearest to both (hard Gumbel-softmax over -max(d_i, d_j) / tau), that of {i, j, k} the one
  nearest to all three; with margin m, i and j must be closer to LCA(i, j) than to LCA(i, j, k), and
  k closer to LCA(i, j, k) than to LCA(i, j) (HIER, Kim et al., CVPR 2023). The same loss over
  triplets of proxies builds the hierarchy among the ancestors themselves. No label hierarchy is
  needed: the levels are learned from the data ("without prior hierarchy knowledge").

Hyper-parameters taken from the paper's code: tau = 0.3, 500 proxies, margin 0.1, top-k 15, 50
triplets per anchor, alpha = 1, curvature 0.1, clipping radius 2.3, Gumbel temperature 0.1, hash
layer dropout 0.2, the ramp over a third of the epochs with exponents delta / 4 and delta.

Differences from the paper:

- inputs are frozen feature vectors: the fine-tuned CLIP encoders are replaced by one MLP tower per
  modality (feature -> ``hidden``, ReLU -> ``embed_dim``, CLIP ViT-B/32's 512 by default), each
  followed by the paper's hash layer (linear, dropout 0.2, tanh) per code length; one model serves
  every code length (the paper trains one per length);
- the proxy loss reaches the codes: the paper's code detaches the codes before the proxy projection
  (so there only the projection and the proxies learn from it), we let its gradient into the hash
  layers and towers, as the paper's text describes; plain gradients instead of Riemannian ones (the
  proxies are stored in the tangent space at the origin and mapped with expmap0);
- the proxies' own triplet term is computed once per step and counted twice (the code computes it
  once per modality with fresh random triplets); ``proxy_anchors`` can cap its anchors per step
  (default: all, as the paper). Its cost grows as triplets x proxies: with 500 proxies, four code
  lengths and batches of 64, a CPU step takes seconds; fewer ``proxies`` make it cheap;
- items without labels (all-zero rows) are left out of the self-paced loss as anchors and as pairs;
  in the proxy loss they are neighbours by distance alone;
- one optimiser and learning rate (``train``) for everything; the paper gives the proxies and their
  projection their own AdamW at lr 1e-5 and uses BertAdam with warm-up for the rest.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from medhash.services.config import MedhashConfig, Section
from medhash.services.errors import ConfigError
from medhash.services.methods.base import Batch, HashModel

JOINT = "joint"  # delta = 1 (0 when self-pacing is off); the epochs the best model is chosen from
PACE = re.compile(r"pace (\d+)/(\d+)")  # epoch e of a k-epoch ramp: delta = e / k


class DHaPHParams(Section):
    """DHaPH's hyper-parameters (``method_params``), the paper's defaults where it gives them."""

    hidden: int = Field(1024, ge=1)  # width of each modality's MLP tower (ours)
    embed_dim: int = Field(512, ge=1)  # tower output, the hash layers' input (CLIP ViT-B/32 width)
    hash_dropout: float = Field(0.2, ge=0, lt=1)  # dropout before the hash layer's tanh
    tau: float = Field(0.3, gt=0)  # temperature of the self-paced similarity loss
    self_paced: bool = True  # off: delta = 0 throughout (plain multi-positive contrastive loss)
    pace_fraction: float = Field(1 / 3, ge=0, le=1)  # share of the epochs over which delta ramps to 1
    proxies: int = Field(500, ge=2)  # learnable ancestors in the Poincare ball, per code length
    hierarchy_weight: float = Field(1.0, ge=0)  # alpha, weight of the hierarchy-aware proxy loss
    margin: float = Field(0.1, ge=0)  # margin of the LCA triplet loss
    topk: int = Field(15, ge=2)  # neighbours whose mutual ones are a triplet's positives
    triplets_per_anchor: int = Field(50, ge=1)
    proxy_anchors: int | None = Field(None, ge=1)  # anchors of the proxies' own triplets per step (None: all)
    lca_tau: float = Field(0.1, gt=0)  # temperature of the Gumbel-softmax choice of an LCA
    curvature: float = Field(0.1, gt=0)  # c of the Poincare ball
    clip_radius: float = Field(2.3, gt=0)  # tangent vectors are clipped to this norm before expmap0


# --- Poincare ball --------------------------------------------------------------------------------
def to_ball(x: Tensor, c: float, clip_radius: float) -> Tensor:
    """expmap0 of x clipped to norm ``clip_radius``: a point of the Poincare ball of curvature c."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-5)
    x = x * (clip_radius / norm).clamp(max=1.0)
    norm = norm.clamp(max=clip_radius)
    return torch.tanh(math.sqrt(c) * norm) * x / (math.sqrt(c) * norm)


def ball_distance(x: Tensor, y: Tensor, c: float) -> Tensor:
    """Geodesic distances [Nx, Ny]: arcosh(1 + 2c|x - y|^2 / ((1 - c|x|^2)(1 - c|y|^2))) / sqrt(c)."""
    x2, y2 = x.pow(2).sum(dim=1), y.pow(2).sum(dim=1)
    squared = (x2[:, None] + y2[None, :] - 2 * x @ y.T).clamp_min(0)
    scale = (1 - c * x2).clamp_min(1e-5)[:, None] * (1 - c * y2).clamp_min(1e-5)[None, :]
    return torch.acosh((1 + 2 * c * squared / scale).clamp_min(1 + 1e-5)) / math.sqrt(c)


class BallProjection(nn.Module):
    """Relaxed codes -> the Poincare ball: LayerNorm (no affine), a linear layer, clipped expmap0."""

    def __init__(self, bits: int, c: float, clip_radius: float) -> None:
        super().__init__()
        self.c, self.clip_radius = c, clip_radius
        self.norm = nn.LayerNorm(bits, elementwise_affine=False)
        self.linear = nn.Linear(bits, bits)

    def forward(self, u: Tensor) -> Tensor:
        return to_ball(self.linear(self.norm(u)), self.c, self.clip_radius)


# --- losses ---------------------------------------------------------------------------------------
def self_paced_loss(a: Tensor, b: Tensor, labels: Tensor, tau: float, delta: float) -> Tensor:
    """Mean over labelled anchors a_i of -log(sum_pos w e^{s/tau} / sum_all w e^{s/tau}), s = cos(a_i, b_j).

    Positives share a label with a_i (a_i's own pair included); items without labels take no part.
    Detached self-paced weights: log w = -(1 + s) delta / 4 on positives, (s - 1) delta on negatives.
    """
    known = labels.sum(dim=1) > 0
    if not known.any():
        return a.sum() * 0.0
    a, b, labels = a[known], b[known], labels[known].float()
    cosine = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    positive = labels @ labels.T > 0
    log_weight = torch.where(positive, -(1 + cosine) * delta / 4, (cosine - 1) * delta).detach()
    logits = cosine / tau + log_weight
    log_positives = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - log_positives).mean()


def reciprocal_triplets(
    similarity: Tensor, topk: int, per_anchor: int, max_anchors: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Index triplets (i, j, k): j a mutual top-k neighbour of anchor i, k not, ``per_anchor`` each.

    The top-k lists include the item itself (as in the paper's code); anchors need two mutual
    neighbours besides themselves. j and k are drawn uniformly with replacement; with
    ``max_anchors``, a random subset of that many anchors is kept.
    """
    n = len(similarity)
    top = similarity.topk(min(topk, n), dim=1).indices
    near = torch.zeros(n, n, dtype=torch.bool, device=similarity.device).scatter_(1, top, True)
    mutual = near & near.T
    others = ~torch.eye(n, dtype=torch.bool, device=similarity.device)
    positives, negatives = mutual & others, ~mutual & others
    anchors = torch.nonzero((positives.sum(dim=1) > 1) & negatives.any(dim=1)).squeeze(1)
    if max_anchors is not None and len(anchors) > max_anchors:
        anchors = anchors[torch.randperm(len(anchors), device=anchors.device)[:max_anchors]]
    if not len(anchors):
        empty = anchors.new_zeros(0)
        return empty, empty, empty
    j = torch.multinomial(positives[anchors].float(), per_anchor, replacement=True).reshape(-1)
    k = torch.multinomial(negatives[anchors].float(), per_anchor, replacement=True).reshape(-1)
    return anchors.repeat_interleave(per_anchor), j, k


def lca_triplet_loss(dist: Tensor, i: Tensor, j: Tensor, k: Tensor, margin: float, tau: float) -> Tensor:
    """HIER's loss of triplets given the distances [N, P] of the N points to the P proxies.

    LCA(i, j) = the proxy minimising max(d_i, d_j), LCA(i, j, k) the one minimising max(d_i, d_j, d_k)
    (hard Gumbel-softmax, so gradients reach the distances); hinge terms with ``margin`` keep i and j
    nearer LCA(i, j) and k nearer LCA(i, j, k). Triplets whose two LCAs coincide count as zero.
    """
    if not len(i):
        return dist.sum() * 0.0
    d_i, d_j, d_k = dist[i], dist[j], dist[k]
    pair = torch.maximum(d_i, d_j)
    lca_ij = F.gumbel_softmax(-pair / tau, dim=1, hard=True)
    lca_ijk = F.gumbel_softmax(-torch.maximum(pair, d_k) / tau, dim=1, hard=True)

    def gap(d: Tensor, near: Tensor, far: Tensor) -> Tensor:
        return F.relu((d * near).sum(dim=1) - (d * far).sum(dim=1) + margin)

    hinge = gap(d_i, lca_ij, lca_ijk) + gap(d_j, lca_ij, lca_ijk) + gap(d_k, lca_ijk, lca_ij)
    return (hinge * (lca_ij.argmax(dim=1) != lca_ijk.argmax(dim=1))).mean()


# --- model ----------------------------------------------------------------------------------------
class HashLayer(nn.Module):
    """The paper's hash layer: tanh(dropout(linear(e)))."""

    def __init__(self, dim: int, bits: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, bits)
        self.dropout = nn.Dropout(dropout)

    def forward(self, e: Tensor) -> Tensor:
        return torch.tanh(self.dropout(self.linear(e)))


class DHaPH(HashModel):
    """Image / text MLP towers -> one tanh hash layer per modality and code length; hyperbolic proxies."""

    name = "dhaph"
    Params = DHaPHParams
    paper = (
        "Huo Y., Qin Q., Zhang W., Huang L., Nie J. Deep Hierarchy-aware Proxy Hashing with Self-paced "
        "Learning for Cross-modal Retrieval. IEEE TKDE 36(11):5926-5939, 2024"
    )

    def __init__(self, cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int) -> None:
        super().__init__(cfg, image_dim, text_dim, n_labels)
        p = self.params

        def tower(in_dim: int) -> nn.Module:
            return nn.Sequential(nn.Linear(in_dim, p.hidden), nn.ReLU(), nn.Linear(p.hidden, p.embed_dim))

        def hash_layers() -> nn.ModuleDict:
            return nn.ModuleDict({str(b): HashLayer(p.embed_dim, b, p.hash_dropout) for b in self.bits})

        self.image_tower, self.text_tower = tower(image_dim), tower(text_dim)
        self.image_hash, self.text_hash = hash_layers(), hash_layers()
        self.projections = nn.ModuleDict({str(b): BallProjection(b, p.curvature, p.clip_radius) for b in self.bits})
        # ancestors in the tangent space at the origin, inside the clipping radius (the paper's init)
        self.proxies = nn.ParameterDict(
            {str(b): nn.Parameter(torch.randn(p.proxies, b) / math.sqrt(b) * p.clip_radius * 0.9) for b in self.bits}
        )

    # --- inference -----------------------------------------------------------------------------
    def embed_image(self, z: Tensor) -> Tensor:
        """u^x = tanh(hash layer) of every code length, concatenated [B, sum(bits)]."""
        e = self.image_tower(z)
        return torch.cat([self.image_hash[str(b)](e) for b in self.bits], dim=1)

    def embed_text(self, t: Tensor) -> Tensor:
        """u^y of every code length, concatenated [B, sum(bits)]."""
        e = self.text_tower(t)
        return torch.cat([self.text_hash[str(b)](e) for b in self.bits], dim=1)

    def hash_probs(self, v: Tensor, bits: int) -> Tensor:
        """(u + 1) / 2: the code sign(u) is ``hash_probs > 0.5``."""
        return (self.code_slice(v, bits) + 1) / 2

    # --- training ------------------------------------------------------------------------------
    @classmethod
    def schedule(cls, cfg: MedhashConfig) -> list[str]:
        """Ramp epochs "pace e/k" (e = 1 .. k-1, k = ``pace_fraction`` of the epochs), then "joint"."""
        p = cls.params_of(cfg)
        epochs = cfg.train.epochs
        ramp = int(epochs * p.pace_fraction) if p.self_paced else 0
        stages = [f"pace {e}/{ramp}" for e in range(1, ramp)]
        return stages + [JOINT] * (epochs - len(stages))

    def pace(self, stage: str) -> float:
        """delta of the self-paced weights in ``stage``."""
        if stage == JOINT:
            return 1.0 if self.params.self_paced else 0.0
        match = PACE.fullmatch(stage)
        if match is None:
            raise ConfigError(f"dhaph has no stage {stage!r} (stages: 'pace e/k', {JOINT!r})")
        return int(match[1]) / int(match[2])

    def batch_loss(self, stage: str, batch: Batch, cfg: MedhashConfig) -> tuple[Tensor, dict[str, float]]:
        """Self-paced similarity losses (image, text, cross-modal) + alpha * proxy loss, over code lengths."""
        delta = self.pace(stage)
        vx = batch.gather(self.embed_image(batch.z[batch.local]))
        vy = batch.gather(self.embed_text(batch.t[batch.local]))
        labels = batch.labels.to(vx.device)
        p = self.params
        terms = {"self_paced": 0.0, "hierarchy": 0.0}
        for bits in self.bits:
            ux, uy = self.code_slice(vx, bits), self.code_slice(vy, bits)
            terms["self_paced"] = terms["self_paced"] + sum(
                self_paced_loss(a, b, labels, p.tau, delta) for a, b in ((ux, ux), (uy, uy), (ux, uy))
            )
            terms["hierarchy"] = terms["hierarchy"] + self.hierarchy_loss(ux, uy, labels, bits)
        total = terms["self_paced"] + p.hierarchy_weight * terms["hierarchy"]
        parts = {name: float(value.detach()) for name, value in terms.items()}
        parts.update(delta=delta, total=float(total.detach()))
        return total, parts

    def hierarchy_loss(self, ux: Tensor, uy: Tensor, labels: Tensor, bits: int) -> Tensor:
        """HP: LCA triplets of each modality's points with the proxies, plus the proxies' own (counted twice)."""
        p = self.params
        proxies = to_ball(self.proxies[str(bits)], p.curvature, p.clip_radius)
        between = ball_distance(proxies, proxies, p.curvature)
        triplets = reciprocal_triplets(torch.exp(-between.detach()), p.topk, p.triplets_per_anchor, p.proxy_anchors)
        loss = 2 * lca_triplet_loss(between, *triplets, p.margin, p.lca_tau)
        shared = (labels @ labels.T > 0).float()
        for u in (ux, uy):
            points = self.projections[str(bits)](u)
            similarity = torch.exp(-ball_distance(points, points, p.curvature).detach()) + shared
            triplets = reciprocal_triplets(similarity, p.topk, p.triplets_per_anchor)
            to_proxies = ball_distance(points, proxies, p.curvature)
            loss = loss + lca_triplet_loss(to_proxies, *triplets, p.margin, p.lca_tau)
        return loss
