"""The three retrieval protocols of docs/evaluation.md over any representation (codes or floats).

A representation maps a modality ("image", "text") to one row per item: packed binary codes
(ranked by Hamming distance) or float embeddings (ranked by cosine distance), so the cost of
hashing is measured with the same code as the hashing itself.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from medhash.services.codes import hamming_distances
from medhash.services.evaluation.metrics import TOPIC_PREFIX, cosine_distance, pair_recall, protocol_relevance, retrieval_metrics

Kind = Literal["hamming", "cosine"]
DIRECTIONS = {"i2t": ("image", "text"), "t2i": ("text", "image"), "i2i": ("image", "image"), "t2t": ("text", "text")}
CROSS_MODAL = ("i2t", "t2i")


def distances(kind: Kind, query: np.ndarray, db: np.ndarray) -> np.ndarray:
    return hamming_distances(query, db) if kind == "hamming" else cosine_distance(query, db)


def label_protocols(label_names: Sequence[str]) -> tuple[str, ...]:
    """``labels`` always; ``topic`` where the dataset has ``topic:`` labels."""
    has_topic = any(str(n).startswith(TOPIC_PREFIX) for n in label_names)
    return ("labels", "topic") if has_topic else ("labels",)


def evaluate(
    kind: Kind,
    query: dict[str, np.ndarray],
    db: dict[str, np.ndarray],
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    label_names: Sequence[str],
    query_groups: Sequence[str] | None = None,
    directions: Sequence[str] = tuple(DIRECTIONS),
    ks: Sequence[int] = (1, 5, 10, 50),
) -> dict[str, dict[str, dict[str, float]]]:
    """protocol -> direction -> metric -> value, for the label protocols and the pair protocol.

    The pair protocol ranks, within the query set, each image's own report (and each report's own
    image); ``query_groups`` (case / patient ids) add the looser "same group" hit.
    """
    ks = [k for k in ks if k <= len(next(iter(db.values())))]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for protocol in label_protocols(label_names):
        relevant = protocol_relevance(protocol, query_labels, db_labels, label_names)
        results[protocol] = {
            name: retrieval_metrics(distances(kind, query[a], db[b]), relevant, ks)
            for name, (a, b) in DIRECTIONS.items()
            if name in directions
        }
    pair_ks = [k for k in (1, 5, 10) if k <= len(query_labels)]
    results["pair"] = {
        name: pair_recall(distances(kind, query[a], query[b]), pair_ks, query_groups)
        for name, (a, b) in DIRECTIONS.items()
        if name in directions and name in CROSS_MODAL
    }
    return results


def reference_maps(
    query_labels: np.ndarray, db_labels: np.ndarray, train_labels: np.ndarray, label_names: Sequence[str], seed: int = 0
) -> dict[str, dict[str, float]]:
    """Floors that need no model, per label protocol (MAP@all of the cross-modal directions):

    - ``random``: a random ranking (the mean of 5 draws), what random codes score on average;
    - ``label_prior``: one list for every query, database items whose labels are most frequent in
      the training split first (on a dataset dominated by one label this is a high floor).
    """
    rng = np.random.default_rng(seed)
    frequency = train_labels.sum(axis=0)
    prior_score = (db_labels * frequency[None, :]).max(axis=1).astype(np.float64)
    prior_dist = np.broadcast_to(-prior_score, (len(query_labels), len(db_labels)))
    floors = {}
    for protocol in label_protocols(label_names):
        relevant = protocol_relevance(protocol, query_labels, db_labels, label_names)
        randoms = [
            retrieval_metrics(rng.random((len(query_labels), len(db_labels))), relevant, ks=(1,))["map@all"]
            for _ in range(5)
        ]
        floors[protocol] = {
            "random": float(np.mean(randoms)),
            "label_prior": retrieval_metrics(prior_dist, relevant, ks=(1,))["map@all"],
        }
    return floors
