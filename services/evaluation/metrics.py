"""Retrieval metrics for the three protocols (labels, topic, pair), from one distance matrix.

Everything starts from ``dist`` of shape (queries, database): Hamming distances of binary codes
or cosine distances of float embeddings. Rankings sort each row by distance with ties broken by
database index (a stable sort), so every number is reproducible.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from medhash.services.codes import hamming_distances

TOPIC_PREFIX = "topic:"


def rank_by_distance(dist: np.ndarray) -> np.ndarray:
    """Database indices of each query ordered by distance, ties by index: int64 (Q, D)."""
    return np.argsort(dist, axis=1, kind="stable")


def retrieval_metrics(
    dist: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10, 50)
) -> dict[str, float]:
    """MAP@all, MAP@R and P@k of the ranking that ``dist`` induces, given ``relevant`` (bool, Q x D).

    With rel_i = 1 when the item at rank i is relevant and P@i the precision of the top i items,
    for a query with R >= 1 relevant items:

    - AP@all = sum_{i<=D} P@i * rel_i / R (mean precision at the ranks of the relevant items);
    - AP@R   = sum_{i<=R} P@i * rel_i / R (the same sum truncated at rank R, still divided by R,
      so it is 1 only when the R relevant items fill the top R ranks).

    Every value is the mean over the queries with at least one relevant item (``queries``);
    queries with none are left out. Keys: ``map@all``, ``map@r``, ``p@k`` for each k, ``queries``.
    """
    dist, relevant = np.asarray(dist), np.asarray(relevant, dtype=bool)
    if dist.ndim != 2 or dist.shape != relevant.shape:
        raise ValueError(f"distance {dist.shape} and relevance {relevant.shape} differ or are not 2-D")
    n_db = dist.shape[1]
    if any(not 1 <= k <= n_db for k in ks):
        raise ValueError(f"every k in {tuple(ks)} must lie in 1..{n_db} (the database size)")
    n_relevant = relevant.sum(axis=1)
    scored = n_relevant > 0
    if not scored.any():
        raise ValueError("no query has a relevant database item")
    dist, relevant, n_relevant = dist[scored], relevant[scored], n_relevant[scored]

    hits = np.take_along_axis(relevant, rank_by_distance(dist), axis=1)
    ranks = np.arange(1, n_db + 1)
    precision_at = np.cumsum(hits, axis=1) / ranks
    gains = precision_at * hits
    within_r = ranks[None, :] <= n_relevant[:, None]
    result = {
        "map@all": float(np.mean(gains.sum(axis=1) / n_relevant)),
        "map@r": float(np.mean((gains * within_r).sum(axis=1) / n_relevant)),
    }
    result.update({f"p@{k}": float(precision_at[:, k - 1].mean()) for k in ks})
    result["queries"] = int(scored.sum())
    return result


def pr_curve_by_radius(
    hamming_dist: np.ndarray, relevant: np.ndarray, n_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of "retrieve everything within Hamming radius r", for r = 0..n_bits.

    Per query, precision = relevant retrieved / retrieved and recall = relevant retrieved / relevant.
    Only queries with at least one relevant item count. Recall is averaged over all of them (0
    when nothing is retrieved). Precision is undefined for a query that retrieves nothing at that
    radius: it is averaged over the queries that retrieve something, and is NaN at a radius where
    no query retrieves anything.
    """
    hamming_dist, relevant = np.asarray(hamming_dist), np.asarray(relevant, dtype=bool)
    if hamming_dist.shape != relevant.shape or hamming_dist.ndim != 2:
        raise ValueError(f"distance {hamming_dist.shape} and relevance {relevant.shape} differ or are not 2-D")
    if hamming_dist.size and not 0 <= hamming_dist.min() <= hamming_dist.max() <= n_bits:
        raise ValueError(f"Hamming distances must lie in 0..{n_bits}")
    scored = relevant.any(axis=1)
    if not scored.any():
        raise ValueError("no query has a relevant database item")
    hamming_dist, relevant = hamming_dist[scored].astype(np.int64), relevant[scored]
    n_queries, n_radii = len(hamming_dist), n_bits + 1

    # Per query, how many items (and relevant items) sit at each distance, accumulated over radii.
    slot = (hamming_dist + n_radii * np.arange(n_queries)[:, None]).ravel()
    retrieved = np.bincount(slot, minlength=n_queries * n_radii).reshape(n_queries, n_radii).cumsum(axis=1)
    hits = np.bincount(slot, weights=relevant.ravel(), minlength=n_queries * n_radii)
    hits = hits.reshape(n_queries, n_radii).cumsum(axis=1)

    recall = (hits / relevant.sum(axis=1, keepdims=True)).mean(axis=0)
    answered = retrieved > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(answered, hits / retrieved, 0.0).sum(axis=0) / answered.sum(axis=0)
    return np.arange(n_radii), precision, recall


def pair_recall(
    dist: np.ndarray, ks: Sequence[int] = (1, 5, 10), groups: Sequence[Hashable] | None = None
) -> dict[str, float]:
    """Instance-level recall: query i's one right answer is database item i (``dist`` is Q x Q).

    ``recall@k`` = share of queries whose own item ranks in the top k. With ``groups`` (e.g. case
    ids, one per item), ``same_group@k`` = share of queries with an item of their own group in
    the top k (the own item counts, so it is never below ``recall@k``).
    """
    dist = np.asarray(dist)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"pair recall needs a square distance matrix, got {dist.shape}")
    n = len(dist)
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"every k in {tuple(ks)} must lie in 1..{n}")
    order = rank_by_distance(dist)
    own_rank = np.argmax(order == np.arange(n)[:, None], axis=1)
    result = {f"recall@{k}": float(np.mean(own_rank < k)) for k in ks}
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError(f"{len(groups)} groups for {n} queries")
        same = groups[order] == groups[:, None]
        result.update({f"same_group@{k}": float(same[:, :k].any(axis=1).mean()) for k in ks})
    return result


def label_relevance(q_labels: np.ndarray, d_labels: np.ndarray) -> np.ndarray:
    """Relevant when a query and a database item share at least one label: bool (Q, D)."""
    q_labels, d_labels = np.asarray(q_labels), np.asarray(d_labels)
    if q_labels.ndim != 2 or d_labels.ndim != 2 or q_labels.shape[1] != d_labels.shape[1]:
        raise ValueError(f"label matrices do not match: {q_labels.shape} vs {d_labels.shape}")
    return (q_labels.astype(np.float32) @ d_labels.astype(np.float32).T) > 0


def protocol_relevance(
    protocol: str, q_labels: np.ndarray, d_labels: np.ndarray, label_names: Sequence[str]
) -> np.ndarray:
    """Relevance under a label protocol: ``labels`` (all label columns) or ``topic`` (``topic:*`` only).

    The third protocol, ``pair``, has no label relevance: use :func:`pair_recall`.
    """
    if protocol == "labels":
        return label_relevance(q_labels, d_labels)
    if protocol == "topic":
        columns = [j for j, name in enumerate(label_names) if str(name).startswith(TOPIC_PREFIX)]
        if not columns:
            raise ValueError(f"the topic protocol needs '{TOPIC_PREFIX}' labels; this dataset has none")
        return label_relevance(np.asarray(q_labels)[:, columns], np.asarray(d_labels)[:, columns])
    raise ValueError(f"unknown relevance protocol {protocol!r}: expected 'labels' or 'topic'")


def hamming_metrics(
    q_codes_packed: np.ndarray,
    d_codes_packed: np.ndarray,
    relevant: np.ndarray,
    ks: Sequence[int] = (1, 5, 10, 50),
) -> dict[str, float]:
    """:func:`retrieval_metrics` of packed binary codes ranked by Hamming distance."""
    return retrieval_metrics(hamming_distances(q_codes_packed, d_codes_packed), relevant, ks)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cosine similarity of every row of ``a`` to every row of ``b``: float64 (len(a), len(b))."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return 1.0 - a @ b.T
