"""`medhash bench speed-index` on a small database: every method's recall is measured against numpy's exact scan."""
from __future__ import annotations

import numpy as np
import pytest

from medhash.benchmarks.index_speed import clustered_codes, format_report, measure_index_speed
from medhash.services.codes import hamming_distances


def test_clustered_codes_lie_near_their_queries():
    database, queries = clustered_codes(5000, 20, 64, seed=1, centres=50)
    assert database.shape == (5000, 8) and queries.shape == (20, 8) and database.dtype == np.uint8
    nearest = hamming_distances(queries, database).min(axis=1)
    assert nearest.max() <= 16  # a query is its item with ~8% of the bits flipped; uniform codes sit ~20 away


@pytest.mark.server
def test_every_method_is_timed_and_exact_methods_have_full_recall(milvus_server):
    pytest.importorskip("faiss", reason="the FAISS anchor comes with the `dev` extra")
    result = measure_index_speed(4000, 5, 64, 10, milvus_uri=milvus_server.uri, nlist=16, nprobes=(1, 16))
    recall = {t.method: t.recall for t in result.timings}
    exact = ["numpy (XOR + bitwise_count, exact)", "FAISS IndexBinaryFlat", "milvus-lite BIN_FLAT",
             "Milvus server BIN_FLAT", "FAISS IndexBinaryIVF nlist 16 nprobe 16",
             "Milvus server BIN_IVF_FLAT nlist 16 nprobe 16"]
    assert all(recall[method] == 1.0 for method in exact), recall
    assert "Milvus server BIN_IVF_FLAT nlist 16 nprobe 1" in recall
    assert all(t.p50_ms > 0 and t.batched_ms > 0 for t in result.timings)
    report = format_report(result)
    assert "| Milvus server BIN_FLAT |" in report and "x FAISS IndexBinaryFlat's p50" in report


def test_an_unknown_server_index_type_is_refused_before_anything_is_measured():
    import argparse

    from medhash.benchmarks.index_speed import register
    from medhash.services.errors import ConfigError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["speed-index", "--n", "100", "--nlist", "4", "--server-index", "BIN_FLAT,HNSW"])
    with pytest.raises(ConfigError, match="--server-index takes BIN_FLAT or BIN_IVF_FLAT"):
        args.func(args)
