"""Retrieval metrics against plain loop references, hand-computed cases and the real MedPix labels."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from medhash.services.codes import hamming_distances, pack_codes
from medhash.services.evaluation.metrics import (
    cosine_distance,
    hamming_metrics,
    label_relevance,
    pair_recall,
    pr_curve_by_radius,
    protocol_relevance,
    rank_by_distance,
    retrieval_metrics,
)


# ---- plain reference implementations: one query at a time, loops only -------------------------

def ref_ranking(row):
    return sorted(range(len(row)), key=lambda j: (row[j], j))


def ref_metrics(dist, relevant, ks):
    aps, aprs, pks = [], [], {k: [] for k in ks}
    for row, rel in zip(dist, relevant):
        ranked = [bool(rel[j]) for j in ref_ranking(row)]
        n_rel = sum(ranked)
        if n_rel == 0:
            continue
        found, ap, apr = 0, 0.0, 0.0
        for i, hit in enumerate(ranked, start=1):
            if hit:
                found += 1
                ap += found / i
                if i <= n_rel:
                    apr += found / i
        aps.append(ap / n_rel)
        aprs.append(apr / n_rel)
        for k in ks:
            pks[k].append(sum(ranked[:k]) / k)
    out = {"map@all": np.mean(aps), "map@r": np.mean(aprs), "queries": len(aps)}
    out.update({f"p@{k}": np.mean(v) for k, v in pks.items()})
    return out


def ref_pr(dist, relevant, n_bits):
    precision, recall = [], []
    for r in range(n_bits + 1):
        ps, rs = [], []
        for row, rel in zip(dist, relevant):
            if not rel.any():
                continue
            retrieved = [j for j in range(len(row)) if row[j] <= r]
            hits = sum(bool(rel[j]) for j in retrieved)
            rs.append(hits / rel.sum())
            if retrieved:
                ps.append(hits / len(retrieved))
        precision.append(np.mean(ps) if ps else np.nan)
        recall.append(np.mean(rs))
    return np.array(precision), np.array(recall)


def ref_pair(dist, ks, groups):
    out = {}
    for k in ks:
        top = [ref_ranking(row)[:k] for row in dist]
        out[f"recall@{k}"] = np.mean([i in t for i, t in enumerate(top)])
        out[f"same_group@{k}"] = np.mean([any(groups[j] == groups[i] for j in t) for i, t in enumerate(top)])
    return out


def random_case(seed, n_query=13, n_db=17, n_bits=3, n_labels=3):
    rng = np.random.default_rng(seed)
    q_bits = rng.integers(0, 2, size=(n_query, n_bits))
    d_bits = rng.integers(0, 2, size=(n_db, n_bits))
    dist = hamming_distances(pack_codes(q_bits), pack_codes(d_bits))
    q_labels = rng.integers(0, 2, size=(n_query, n_labels))
    relevant = label_relevance(q_labels, rng.integers(0, 2, size=(n_db, n_labels)))
    return q_bits, d_bits, dist, relevant


# ---- hand-computed cases -----------------------------------------------------------------------

def test_average_precision_by_hand():
    dist = np.array([[0.1, 0.2, 0.3]])  # ranking 0, 1, 2 with relevance 1, 0, 1
    relevant = np.array([[True, False, True]])
    m = retrieval_metrics(dist, relevant, ks=(1, 2, 3))
    assert m["map@all"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["map@r"] == pytest.approx(1 / 2)  # R = 2: only rank 1 counts, divided by 2
    assert (m["p@1"], m["p@2"], m["p@3"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert m["queries"] == 1


def test_ties_are_broken_by_database_index():
    dist = np.array([[1, 0, 1, 0]])
    np.testing.assert_array_equal(rank_by_distance(dist), [[1, 3, 0, 2]])
    # relevant items at indices 0 and 2 sit behind the tied irrelevant ones 1 and 3
    m = retrieval_metrics(dist, np.array([[True, False, True, False]]), ks=(1,))
    assert m["map@all"] == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_queries_without_relevant_items_are_left_out():
    dist = np.array([[0, 1], [0, 1]])
    m = retrieval_metrics(dist, np.array([[False, True], [False, False]]), ks=(1,))
    assert m["queries"] == 1 and m["map@all"] == 0.5 and m["p@1"] == 0.0
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics(dist, np.zeros((2, 2), bool), ks=(1,))


def test_bad_shapes_and_ks_are_refused():
    with pytest.raises(ValueError, match="differ or are not 2-D"):
        retrieval_metrics(np.zeros((2, 3)), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match=r"1\.\.3"):
        retrieval_metrics(np.zeros((2, 3)), np.ones((2, 3), bool), ks=(5,))


# ---- against the references on tiny random codes with many ties ---------------------------------

@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n_bits", [2, 4])
def test_retrieval_metrics_match_reference(seed, n_bits):
    _, _, dist, relevant = random_case(seed, n_bits=n_bits)
    ks = (1, 5, 10, 17)
    got, expected = retrieval_metrics(dist, relevant, ks), ref_metrics(dist, relevant, ks)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key


@pytest.mark.parametrize("seed", range(6))
def test_pr_curve_matches_reference(seed):
    n_bits = 4
    _, _, dist, relevant = random_case(seed, n_bits=n_bits)
    relevant[0] = False  # a query with nothing relevant is left out
    radii, precision, recall = pr_curve_by_radius(dist, relevant, n_bits)
    ref_precision, ref_recall = ref_pr(dist, relevant, n_bits)
    np.testing.assert_array_equal(radii, np.arange(n_bits + 1))
    np.testing.assert_allclose(precision, ref_precision)
    np.testing.assert_allclose(recall, ref_recall)
    assert recall[-1] == 1.0 and np.all(np.diff(recall) >= 0)


def test_pr_curve_precision_is_nan_where_nothing_is_retrieved():
    dist = np.array([[2, 3], [3, 2]])
    radii, precision, recall = pr_curve_by_radius(dist, np.array([[True, False], [True, True]]), n_bits=3)
    assert np.isnan(precision[:2]).all() and not np.isnan(precision[2:]).any()
    np.testing.assert_allclose(precision[2:], [(1 + 1) / 2, (0.5 + 1) / 2])
    np.testing.assert_allclose(recall, [0, 0, (1 + 0.5) / 2, 1])
    with pytest.raises(ValueError, match="0..2"):
        pr_curve_by_radius(dist, np.ones((2, 2), bool), n_bits=2)


@pytest.mark.parametrize("seed", range(6))
def test_pair_recall_matches_reference(seed):
    rng = np.random.default_rng(seed)
    dist = hamming_distances(pack_codes(rng.integers(0, 2, (15, 3))), pack_codes(rng.integers(0, 2, (15, 3))))
    groups = [f"MPX{g}" for g in rng.integers(0, 5, 15)]
    got = pair_recall(dist, ks=(1, 3, 10), groups=groups)
    expected = ref_pair(dist, (1, 3, 10), groups)
    assert got == pytest.approx(expected)
    assert all(got[f"same_group@{k}"] >= got[f"recall@{k}"] for k in (1, 3, 10))
    assert set(pair_recall(dist, ks=(1,))) == {"recall@1"}


def test_pair_recall_by_hand():
    dist = np.array([[0, 0, 1], [0, 1, 0], [0, 1, 0]])  # own item ranks 1, 3 (last), 2 (tie: 0 first)
    assert pair_recall(dist, ks=(1, 2, 3)) == {"recall@1": 1 / 3, "recall@2": 2 / 3, "recall@3": 1.0}
    with pytest.raises(ValueError, match="square"):
        pair_recall(np.zeros((2, 3)))


# ---- relevance, protocols and wrappers --------------------------------------------------------

def test_label_relevance_and_protocols():
    names = ["location:Head", "location:Thorax", "topic:Glioma", "topic:Fracture"]
    q = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=np.uint8)
    d = np.array([[1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(protocol_relevance("labels", q, d, names), [[1, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(protocol_relevance("topic", q, d, names), [[0, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="topic:"):
        protocol_relevance("topic", q, d, ["location:a", "location:b", "finding:c", "finding:d"])
    with pytest.raises(ValueError, match="unknown relevance protocol"):
        protocol_relevance("pair", q, d, names)


def test_label_relevance_does_not_overflow_on_many_shared_labels():
    ones = np.ones((1, 256), dtype=np.uint8)  # uint8 @ uint8 would wrap 256 to 0
    assert label_relevance(ones, ones)[0, 0]


def test_hamming_metrics_and_cosine_wrappers():
    q_bits, d_bits, dist, relevant = random_case(3, n_bits=4)
    assert hamming_metrics(pack_codes(q_bits), pack_codes(d_bits), relevant, ks=(1, 5)) == retrieval_metrics(
        dist, relevant, ks=(1, 5)
    )
    # +-1 codes: cosine distance is an affine map of Hamming distance, so the ranking is the same
    cos = cosine_distance(2.0 * q_bits - 1, 2.0 * d_bits - 1)
    np.testing.assert_allclose(cos, 2 * dist / 4)
    expected = retrieval_metrics(dist, relevant, ks=(1, 5))
    assert retrieval_metrics(cos, relevant, ks=(1, 5)) == pytest.approx(expected)


def test_random_codes_score_the_relevant_fraction():
    rng = np.random.default_rng(0)
    labels_q, labels_d = rng.random((300, 6)) < 0.12, rng.random((1500, 6)) < 0.12
    relevant = label_relevance(labels_q, labels_d)
    codes_q, codes_d = pack_codes(rng.integers(0, 2, (300, 32))), pack_codes(rng.integers(0, 2, (1500, 32)))
    m = hamming_metrics(codes_q, codes_d, relevant)
    scored = relevant.any(axis=1)
    fraction = relevant[scored].mean()
    assert m["map@all"] == pytest.approx(fraction, abs=0.02)
    assert m["p@50"] == pytest.approx(fraction, abs=0.02)


# ---- the real MedPix labels: the floors and oracles stated in docs/evaluation.md -------------------

@pytest.fixture(scope="module")
def medpix_labels(shared_data):
    with open(shared_data / "medpix2" / "pairs.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    item_labels = [(f"location:{r['location_category']}", f"topic:{r['topic_category']}") for r in rows]
    names = sorted({name for pair in item_labels for name in pair})
    column = {n: j for j, n in enumerate(names)}
    labels = np.zeros((len(rows), len(names)), dtype=np.uint8)
    for i, pair in enumerate(item_labels):
        labels[i, [column[name] for name in pair]] = 1
    query = np.array([r["split"] == "test" for r in rows])
    cases = np.array([r["case_id"] for r in rows])
    return labels[query], labels[~query], names, cases[query]


@pytest.mark.real
def test_medpix_random_codes_and_oracles(medpix_labels):
    q_labels, d_labels, names, q_cases = medpix_labels
    assert len(q_labels) == 200 and len(d_labels) == 1850
    rng = np.random.default_rng(0)
    codes_q, codes_d = pack_codes(rng.integers(0, 2, (200, 64))), pack_codes(rng.integers(0, 2, (1850, 64)))
    labels_rel = protocol_relevance("labels", q_labels, d_labels, names)
    topic_rel = protocol_relevance("topic", q_labels, d_labels, names)
    assert hamming_metrics(codes_q, codes_d, labels_rel)["map@all"] == pytest.approx(0.29, abs=0.02)
    assert hamming_metrics(codes_q, codes_d, topic_rel)["map@all"] == pytest.approx(0.05, abs=0.02)

    location = [j for j, n in enumerate(names) if n.startswith("location:")]
    same_location = label_relevance(q_labels[:, location], d_labels[:, location])
    assert retrieval_metrics(1.0 - same_location, labels_rel)["map@all"] == pytest.approx(0.94, abs=0.01)
    assert retrieval_metrics(1.0 - topic_rel, labels_rel)["map@all"] == pytest.approx(0.46, abs=0.01)
    assert retrieval_metrics(1.0 - topic_rel, topic_rel)["map@all"] == 1.0

    pair = pair_recall(hamming_distances(codes_q, codes_q[rng.permutation(200)]), ks=(10,), groups=q_cases)
    assert pair["recall@10"] == pytest.approx(0.05, abs=0.04)
    assert pair["same_group@10"] == pytest.approx(0.19, abs=0.08)
