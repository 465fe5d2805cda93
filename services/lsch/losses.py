"""LSCH training losses (our reading of method.md), on relaxed codes u = 2 p(h | v) - 1.

Per code length K, summed over the model's code lengths:

    L = contrastive(u^x, u^y) + alpha * manifold(u^x, u^y; S_ma) + beta * (quantisation + balance)

- **contrastive** — symmetric InfoNCE over cosine(u^x_i, u^y_j) / tau, the pair (i, i) positive.
  Items that count as false negatives of i (``false_negatives``: any shared label, the identical
  label set, or none) are masked out, so same-class pairs are not pushed apart. **Hard negative mining** re-weights the remaining negatives by their difficulty
  (Robinson et al. 2021): w_ij = N_i * softmax_j(strength * logit_ij) over i's N_i negatives, so
  the weights average 1 and the most similar negatives count most; strength 0 (ablation off) gives
  plain InfoNCE with the same false-negative masking.
- **manifold** — S_ma in [0, 1] from labels (cosine of multi-hot vectors) where both items have
  labels, blended with a cross-modal kNN graph over the frozen features (and the graph alone where
  labels are unknown); code inner products u_i . u_j / K, mapped to [0, 1], regress onto S_ma
  across modalities plus, at half weight each, within each modality.
- **quantisation** |u| -> 1 and **bit balance** (each bit's batch mean -> 0).
- **classification** (weight gamma, ``classification_weight``; off by default): a linear classifier
  per code length predicts each item's labels from u^x and u^y (binary cross-entropy over items with
  labels), as MSACH's linear classification constraint: every label, however rare, shapes the codes.

Defaults alpha = 0.5, beta = 0.8 are the paper's small-set I2T pair; our terms are not the paper's
(unpublished) ones, so they are a starting point, not a reproduction.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from medhash.services.config import LSCHConfig

if TYPE_CHECKING:
    from medhash.services.lsch.model import LSCHModel


def false_negative_mask(labels: torch.Tensor | None, n: int, policy: str) -> torch.Tensor:
    """bool [n, n]: pairs the contrastive term must not push apart, by ``policy``.

    "shared_label": at least one label in common; "same_labels": the identical, non-empty label set;
    "none": no pair. Items with unknown labels (None or a zero row) are never false negatives.
    """
    if labels is None or policy == "none":
        return torch.zeros(n, n, dtype=torch.bool)
    labels = labels.float()
    shared = labels @ labels.T
    if policy == "shared_label":
        return shared > 0
    counts = labels.sum(dim=1)
    return (shared == counts[:, None]) & (shared == counts[None, :]) & (counts[:, None] > 0)


def hard_negative_weights(logits: torch.Tensor, negatives: torch.Tensor, strength: float) -> torch.Tensor:
    """Importance weights of each row's negatives, w_ij = N_i * softmax_j(strength * logit_ij).

    Zero off the negatives, mean 1 over each row's negatives, detached (weights, not a path for
    gradients). ``strength`` 0 gives weight 1 to every negative.
    """
    scores = (strength * logits.detach()).masked_fill(~negatives, float("-inf"))
    weights = torch.softmax(scores, dim=1).nan_to_num(0.0)  # a row without negatives: all zero
    return weights * negatives.sum(dim=1, keepdim=True)


def _info_nce_rows(logits: torch.Tensor, negatives: torch.Tensor, strength: float) -> torch.Tensor:
    """Mean over rows of -log(e^{l_ii} / (e^{l_ii} + sum_j w_ij e^{l_ij})) over the negatives j."""
    weights = hard_negative_weights(logits, negatives, strength)
    log_weights = torch.where(negatives, weights.clamp_min(1e-12).log(), float("-inf"))
    log_weights = log_weights.fill_diagonal_(0.0)  # the positive keeps weight 1
    return (torch.logsumexp(logits + log_weights, dim=1) - logits.diagonal()).mean()


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    labels: torch.Tensor | None,
    tau: float,
    hard_negative_strength: float,
    false_negatives: str = "shared_label",
) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` with label masking and hard-negative weights."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau
    n = len(logits)
    masked = false_negative_mask(labels, n, false_negatives).to(logits.device)
    negatives = ~torch.eye(n, dtype=torch.bool, device=logits.device) & ~masked
    return 0.5 * (
        _info_nce_rows(logits, negatives, hard_negative_strength)
        + _info_nce_rows(logits.T, negatives.T, hard_negative_strength)
    )


def knn_graph(feats_a: torch.Tensor, feats_b: torch.Tensor, k: int) -> torch.Tensor:
    """Binary kNN graph [Na, Nb] by cosine: 1 where b_j is among a_i's k nearest or a_i among b_j's."""
    cosine = F.normalize(feats_a.float(), dim=1) @ F.normalize(feats_b.float(), dim=1).T
    graph = torch.zeros_like(cosine)
    graph.scatter_(1, cosine.topk(min(k, cosine.shape[1]), dim=1).indices, 1.0)
    graph.scatter_(0, cosine.topk(min(k, cosine.shape[0]), dim=0).indices, 1.0)
    return graph


def manifold_similarity(
    labels_a: torch.Tensor | None,
    labels_b: torch.Tensor | None,
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    k: int,
    label_weight: float,
) -> torch.Tensor:
    """S_ma [Na, Nb] in [0, 1]: label cosine blended with the feature kNN graph.

    Where both items have labels (a non-zero multi-hot row): ``label_weight * cos(labels) +
    (1 - label_weight) * knn``; elsewhere the kNN graph alone. ``labels_*`` None means no labels.
    For cross-modal pairs pass pair features ``[z / |z|, t / |t|]`` (see :func:`pair_features`), so
    neighbours are items close in both modalities.
    """
    graph = knn_graph(feats_a, feats_b, k)
    if labels_a is None or labels_b is None:
        return graph
    la, lb = labels_a.float().to(graph.device), labels_b.float().to(graph.device)
    label_cosine = F.normalize(la, dim=1) @ F.normalize(lb, dim=1).T
    known = (la.sum(dim=1) > 0)[:, None] & (lb.sum(dim=1) > 0)[None, :]
    return torch.where(known, label_weight * label_cosine + (1 - label_weight) * graph, graph)


def pair_features(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[z / |z|, t / |t|]: its cosine is the mean of the image and the text cosines."""
    return torch.cat([F.normalize(z.float(), dim=1), F.normalize(t.float(), dim=1)], dim=1)


def manifold_loss(ux: torch.Tensor, uy: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """MSE of (1 + u_i . u_j / K) / 2 against S_ma: cross-modal, plus half of each within-modal term."""
    bits = ux.shape[1]

    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((1 + a @ b.T / bits) / 2 - similarity).pow(2).mean()

    return mse(ux, uy) + 0.5 * (mse(ux, ux) + mse(uy, uy))


def quantization_loss(u: torch.Tensor) -> torch.Tensor:
    """Mean of (|u| - 1)^2: relaxed codes pushed towards +-1."""
    return (u.abs() - 1).pow(2).mean()


def balance_loss(u: torch.Tensor) -> torch.Tensor:
    """Mean over bits of the squared batch mean: each bit on for half the items."""
    return u.mean(dim=0).pow(2).mean()


def classification_loss(
    classifier: torch.nn.Module, ux: torch.Tensor, uy: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean BCE of ``classifier(u)`` against the multi-hot labels, both modalities, rows with labels only."""
    rows = labels.sum(dim=1) > 0
    target = labels[rows].float()
    return 0.5 * (
        F.binary_cross_entropy_with_logits(classifier(ux[rows]), target)
        + F.binary_cross_entropy_with_logits(classifier(uy[rows]), target)
    )


def lsch_loss(
    model: LSCHModel, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, cfg: LSCHConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The joint loss of one batch: :func:`hashing_loss` of its embeddings.

    ``z`` image features [B, image_dim], ``t`` text features [B, text_dim] of the paired report
    (or an augmented view of it), ``labels`` multi-hot [B, C] (zero rows or None: unknown).
    """
    return hashing_loss(model, model.embed_image(z), model.embed_text(t), pair_features(z, t), labels, cfg)


def hashing_loss(
    model: LSCHModel,
    vx: torch.Tensor,
    vy: torch.Tensor,
    pair_feats: torch.Tensor,
    labels: torch.Tensor | None,
    cfg: LSCHConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The joint loss summed over the model's code lengths; ``parts`` holds each term's value.

    Takes the embeddings v^x, v^y and the frozen pair features rather than the raw batch, so data
    parallel training can gather them from every worker and score the whole global batch.
    """
    strength = cfg.hard_negative_strength if cfg.hard_negative_mining else 0.0
    similarity = manifold_similarity(
        labels, labels, pair_feats, pair_feats, cfg.knn_k, cfg.manifold_label_weight
    ).to(vx.device)
    terms = {"contrastive": 0.0, "manifold": 0.0, "quantization": 0.0, "balance": 0.0}
    if model.classifiers:
        terms["classification"] = 0.0
    known = labels is not None and bool(model.classifiers) and bool((labels.sum(dim=1) > 0).any())
    for bits in model.bits:
        ux, uy = 2 * model.hash_probs(vx, bits) - 1, 2 * model.hash_probs(vy, bits) - 1
        terms["contrastive"] = terms["contrastive"] + contrastive_loss(
            ux, uy, labels, cfg.tau, strength, cfg.false_negatives
        )
        terms["manifold"] = terms["manifold"] + manifold_loss(ux, uy, similarity)
        terms["quantization"] = terms["quantization"] + 0.5 * (quantization_loss(ux) + quantization_loss(uy))
        terms["balance"] = terms["balance"] + 0.5 * (balance_loss(ux) + balance_loss(uy))
        if known:
            terms["classification"] = terms["classification"] + classification_loss(
                model.classifiers[str(bits)], ux, uy, labels
            )
    total = (
        terms["contrastive"]
        + cfg.alpha * terms["manifold"]
        + cfg.beta * (terms["quantization"] + terms["balance"])
        + cfg.classification_weight * terms.get("classification", 0.0)
    )
    parts = {name: float(value) for name, value in terms.items()}
    parts["total"] = float(total.detach())
    return total, parts


def alignment_loss(
    model: LSCHModel, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, cfg: LSCHConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Float-level alignment before hashing: :func:`embedding_alignment_loss` of one batch."""
    return embedding_alignment_loss(model.embed_image(z), model.embed_text(t), labels, cfg)


def embedding_alignment_loss(
    vx: torch.Tensor, vy: torch.Tensor, labels: torch.Tensor | None, cfg: LSCHConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The contrastive loss on v^x, v^y themselves (heads untouched)."""
    strength = cfg.hard_negative_strength if cfg.hard_negative_mining else 0.0
    loss = contrastive_loss(vx, vy, labels, cfg.tau, strength, cfg.false_negatives)
    return loss, {"contrastive_v": float(loss.detach()), "total": float(loss.detach())}
