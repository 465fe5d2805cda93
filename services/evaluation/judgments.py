"""Scoring a run against users' relevance judgments (`medhash eval --judgments FILE`).

A judgment names its query by fingerprint (services/judgments.py). A query is scored when its
fingerprint is a dataset item's image file or report text (a radiologist searched with a case of
the dataset); other queries are counted as unresolved. Per query and hit, each user's latest
verdict counts once and the majority decides (a tie is not relevant).

For each direction (I2T: image queries, judged reports; T2I: text queries, judged images), every
item of the hit modality is ranked by Hamming distance to the query's code:

- ``map@judged``: MAP over the judged hits only (the ranking condensed to what someone judged),
  for queries with at least one relevant hit; unjudged items do not count either way;
- ``p@k``: precision of the top k of the whole ranking, an unjudged item counted as not relevant
  (a lower bound until more is judged).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import numpy as np

from medhash.services.codes import hamming_distances
from medhash.services.judgments import Judgment

KS = (1, 5, 10)
DIRECTIONS = {"i2t": ("image", "text"), "t2i": ("text", "image")}


def judged_relevance(judgments: Iterable[Judgment]) -> dict[tuple[str, str, str, str], bool]:
    """(query modality, query sha256, item id, item modality) -> relevant, by majority of each user's latest verdict."""
    latest: dict[tuple, Judgment] = {}
    for j in sorted(judgments, key=lambda j: j.judged_at):
        latest[(j.user, j.query_modality, j.query_sha256, j.item_id, j.item_modality)] = j
    votes: dict[tuple, Counter] = defaultdict(Counter)
    for (_, *hit), j in latest.items():
        votes[tuple(hit)][j.verdict] += 1
    return {hit: count["relevant"] > count["not_relevant"] for hit, count in votes.items()}


def score_judgments(
    judgments: list[Judgment],
    fingerprints: Mapping[tuple[str, str], int],
    ids: np.ndarray,
    codes: Mapping[str, np.ndarray],
) -> dict:
    """Metrics per direction of packed ``codes`` (modality -> [N, bytes], rows as ``ids``) against ``judgments``.

    ``fingerprints`` maps (modality, sha256) of each item's image bytes / report text to its row.
    """
    relevance = judged_relevance(judgments)
    row_of = {str(item_id): row for row, item_id in enumerate(ids)}
    queries = {(qm, qs) for qm, qs, _, _ in relevance}
    resolved = {q for q in queries if q in fingerprints}
    result: dict = {"judgments": len(judgments), "judged_hits": len(relevance),
                    "queries": {"resolved": len(resolved), "unresolved": len(queries - resolved)}, "directions": {}}
    for direction, (query_modality, hit_modality) in DIRECTIONS.items():
        judged: dict[int, dict[int, bool]] = defaultdict(dict)
        for (qm, qs, item_id, im), relevant in relevance.items():
            if qm == query_modality and im == hit_modality and (qm, qs) in resolved and item_id in row_of:
                judged[fingerprints[(qm, qs)]][row_of[item_id]] = relevant
        scored = [(q, hits) for q, hits in judged.items() if any(hits.values())]
        if not scored:
            continue
        rows = np.array([q for q, _ in scored])
        distances = hamming_distances(codes[query_modality][rows], codes[hit_modality])
        aps, precision = [], {k: [] for k in KS}
        for (_, hits), dist in zip(scored, distances):
            order = np.argsort(dist, kind="stable")  # ties by row, as every protocol ranks
            ranked = [hits[i] for i in order if i in hits]  # the ranking condensed to judged hits
            found = np.cumsum(ranked)
            aps.append(float(np.sum(found / np.arange(1, len(ranked) + 1) * ranked) / found[-1]))
            for k in KS:
                precision[k].append(sum(hits.get(int(i), False) for i in order[:k]) / k)
        result["directions"][direction] = {"queries": len(scored), "map@judged": float(np.mean(aps)),
                                           **{f"p@{k}": float(np.mean(v)) for k, v in precision.items()}}
    return result
