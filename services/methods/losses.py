"""Loss terms shared by several methods, on relaxed codes or float embeddings.

- :func:`contrastive_loss`, symmetric InfoNCE with false-negative masking (:func:`false_negative_mask`)
  and hard-negative re-weighting (:func:`hard_negative_weights`, Robinson et al. 2021);
- :func:`manifold_similarity` (label cosine blended with a feature kNN graph) and :func:`manifold_loss`;
- :func:`label_similarity` and :func:`pairwise_label_loss` (every cross-modal pair scored against its labels);
- :func:`feature_similarity` and :func:`similarity_preserving_loss` (code cosines regress onto the frozen
  features' joint cosine, which needs no labels);
- :func:`quantization_loss`, :func:`balance_loss` and :func:`classification_loss`.

How a method combines them is the method's own (e.g. :mod:`medhash.services.methods.lsch`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def _regression_loss(score, ux: torch.Tensor, uy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE of ``score(a, b)`` [n, n] against ``target``: cross-modal, plus half of each within-modal term."""

    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (score(a, b) - target).pow(2).mean()

    return mse(ux, uy) + 0.5 * (mse(ux, ux) + mse(uy, uy))


def manifold_loss(ux: torch.Tensor, uy: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """MSE of (1 + u_i . u_j / K) / 2 against S_ma: cross-modal, plus half of each within-modal term."""
    bits = ux.shape[1]
    return _regression_loss(lambda a, b: (1 + a @ b.T / bits) / 2, ux, uy, similarity)


def label_similarity(labels: torch.Tensor, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [n, n] in [0, 1], known [n, n] bool) from multi-hot labels [n, C].

    ``target`` "shared": S_ij = 1 when i and j share any label, else 0; "graded": S_ij = the cosine of
    their label vectors, so items that share every label rank above items that share a body region
    only. ``known`` marks the pairs where both rows have labels (a zero row: unknown).
    """
    labels = labels.float()
    has = labels.sum(dim=1) > 0
    known = has[:, None] & has[None, :]
    if target == "shared":
        return (labels @ labels.T > 0).float(), known
    unit = F.normalize(labels, dim=1)
    return (unit @ unit.T).clamp(0, 1), known


def pairwise_label_loss(
    a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor | None, scale: float, target: str = "shared",
    balanced: bool = False,
) -> torch.Tensor:
    """Mean BCE of sigmoid(scale * cos(a_i, b_j)) against S_ij (:func:`label_similarity`) over every
    pair of rows whose labels are known; zero when no pair is.
    ``balanced``: the related and the unrelated pairs weigh half each, whatever their share of the batch
    (each pair counts S_ij towards the related half and 1 - S_ij towards the unrelated one).

    Unlike a false-negative mask, this pulls label-sharing items together and pushes the rest apart
    across the whole batch (the label-supervised term of the evaluation notes' reference floor).
    """
    if labels is None:
        return a.new_zeros(())
    similarity, known = label_similarity(labels.to(a.device), target)
    if not known.any():
        return a.new_zeros(())
    logits = (scale * (F.normalize(a, dim=1) @ F.normalize(b, dim=1).T))[known]
    target = similarity[known]
    related, unrelated = target.sum(), (1 - target).sum()
    if not balanced or related == 0 or unrelated == 0:
        return F.binary_cross_entropy_with_logits(logits, target)
    return 0.5 * (
        (target * F.softplus(-logits)).sum() / related + ((1 - target) * F.softplus(logits)).sum() / unrelated
    )


def feature_similarity(pair_feats: torch.Tensor, scale: float) -> torch.Tensor:
    """S [n, n] in [-1, 1]: ``scale`` times the cosine of the batch-centred pair features, clipped.

    Pair features (:func:`pair_features`) make it the joint image-and-text similarity of DJSRH (Su et al.
    2019); centring over the batch removes the share every backbone feature has in common (ReLU features
    are all positive, so their raw cosines are all high).
    """
    centred = pair_feats.float() - pair_feats.float().mean(dim=0, keepdim=True)
    unit = F.normalize(centred, dim=1)
    return (scale * unit @ unit.T).clamp(-1, 1)


def similarity_preserving_loss(ux: torch.Tensor, uy: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
    """MSE of the code cosines against ``similarity``: cross-modal, plus half of each within-modal term."""
    return _regression_loss(lambda a, b: F.normalize(a, dim=1) @ F.normalize(b, dim=1).T, ux, uy, similarity)


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
