"""Hamming top-k search over N random codes: Milvus (milvus-lite BIN_FLAT) vs FAISS vs numpy.

Every method answers the same queries one at a time; the table gives the median latency per query
and the codes scanned per second, and the ratios between methods come from the same run (absolute
times are noisy on a shared machine). The top-k distances of the three methods are checked to agree.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhash.services.codes import hamming_distances

INSERT_BATCH = 50_000


@dataclass(frozen=True)
class Timing:
    """Latency of one method, per query."""

    method: str
    p50_ms: float
    p90_ms: float
    codes_per_s: float  # database codes scanned per second at the median latency


@dataclass(frozen=True)
class IndexSpeed:
    """One run of :func:`measure_index_speed`."""

    n: int
    queries: int
    bits: int
    k: int
    timings: list[Timing]
    milvus_insert_s: float
    distances_agree: bool  # all methods found the same top-k distances for every query


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("speed-index", help="Hamming search: Milvus vs FAISS vs numpy on random codes")
    parser.add_argument("--n", type=int, default=1_000_000, help="database codes (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=100, help="queries, answered one at a time (default 100)")
    parser.add_argument("--bits", type=int, default=64, choices=[16, 32, 64, 128, 256], help="code length")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medhash.services.errors import ConfigError

    if args.n < args.k or args.queries < 1:
        raise ConfigError(f"need --n >= --k and --queries >= 1, got n={args.n} k={args.k} queries={args.queries}")
    print(format_report(measure_index_speed(args.n, args.queries, args.bits, args.k)))
    return 0


def measure_index_speed(n: int = 1_000_000, queries: int = 100, bits: int = 64, k: int = 10, seed: int = 0) -> IndexSpeed:
    """Time top-k Hamming search by numpy, FAISS ``IndexBinaryFlat`` and Milvus on the same random codes."""
    import faiss

    from medhash.services.index import CodeIndex, IndexRecord

    rng = np.random.default_rng(seed)
    database = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    query_codes = rng.integers(0, 256, (queries, bits // 8), dtype=np.uint8)

    def numpy_top_k(query: np.ndarray) -> np.ndarray:
        distances = hamming_distances(query[None], database)[0]
        nearest = np.argpartition(distances, k - 1)[:k]
        return np.sort(distances[nearest])

    flat = faiss.IndexBinaryFlat(bits)
    flat.add(database)

    def faiss_top_k(query: np.ndarray) -> np.ndarray:
        return flat.search(query[None], k)[0][0]

    with tempfile.TemporaryDirectory(prefix="medhash-bench-") as workdir:
        index = CodeIndex(str(Path(workdir) / "bench.db"), [bits], prefix="bench")
        try:
            start = time.perf_counter()
            for lo in range(0, n, INSERT_BATCH):
                index.upsert(bits, [IndexRecord(str(i), "image", database[i].tobytes())
                                    for i in range(lo, min(n, lo + INSERT_BATCH))])
            insert_s = time.perf_counter() - start

            def milvus_top_k(query: np.ndarray) -> np.ndarray:
                return np.array([hit.distance for hit in index.search(bits, query[None], k)[0]])

            timings, results = [], {}
            for method, top_k in [("numpy (XOR + bitwise_count)", numpy_top_k),
                                  ("FAISS IndexBinaryFlat", faiss_top_k),
                                  ("Milvus BIN_FLAT (milvus-lite)", milvus_top_k)]:
                timing, results[method] = _time_queries(method, top_k, query_codes, n)
                timings.append(timing)
            start = time.perf_counter()
            batched = index.search(bits, query_codes, k)
            per_query_ms = (time.perf_counter() - start) * 1000 / queries
            timings.append(Timing(f"Milvus, all {queries} queries in one call", per_query_ms, per_query_ms,
                                  n / per_query_ms * 1000))
            results["batched"] = [np.array([hit.distance for hit in hits]) for hits in batched]
        finally:
            index.close()
    reference = results[timings[0].method]
    agree = all(np.array_equal(np.sort(ref), np.sort(other[q]))
                for other in results.values() for q, ref in enumerate(reference))
    return IndexSpeed(n, queries, bits, k, timings, insert_s, agree)


def _time_queries(method: str, top_k: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
                  n: int) -> tuple[Timing, list[np.ndarray]]:
    """Median and 90th-percentile latency of ``top_k`` over the queries (after one warm-up call)."""
    top_k(queries[0])
    latencies, results = [], []
    for query in queries:
        start = time.perf_counter()
        results.append(top_k(query))
        latencies.append(time.perf_counter() - start)
    p50, p90 = np.percentile(latencies, [50, 90])
    return Timing(method, p50 * 1000, p90 * 1000, n / p50), results


def format_report(result: IndexSpeed) -> str:
    """The timing table, the ratios between methods, and the run's setup."""
    import faiss

    lines = [
        f"{result.n:,} random {result.bits}-bit codes, {result.queries} queries one at a time, k={result.k}",
        f"machine: {_cpu_name()} ({platform.machine()}, {os.cpu_count()} cores); "
        f"FAISS OpenMP threads: {faiss.omp_get_max_threads()}",
        f"Milvus insert: {result.milvus_insert_s:.1f} s ({result.n / result.milvus_insert_s:,.0f} codes/s)",
        "",
        "| method | p50 ms/query | p90 ms/query | codes scanned/s (p50) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {t.method} | {t.p50_ms:.2f} | {t.p90_ms:.2f} | {t.codes_per_s / 1e6:,.0f} M |" for t in result.timings]
    numpy_t, faiss_t, milvus_t, batched_t = result.timings
    lines += [
        "",
        _ratio("FAISS", faiss_t, "numpy", numpy_t),
        _ratio("Milvus", milvus_t, "FAISS", faiss_t),
        _ratio("Milvus", milvus_t, "numpy", numpy_t),
        _ratio(f"Milvus with {result.queries} queries per call", batched_t, "one query per call", milvus_t),
        f"top-{result.k} distances agree across methods: {'yes' if result.distances_agree else 'NO'}",
    ]
    return "\n".join(lines)


def _ratio(name: str, timing: Timing, other_name: str, other: Timing) -> str:
    """ "<name> is N.Nx faster (or slower) than <other_name>" by median latency."""
    if timing.p50_ms <= other.p50_ms:
        return f"{name} is {other.p50_ms / timing.p50_ms:.1f}x faster than {other_name}"
    return f"{name} is {timing.p50_ms / other.p50_ms:.1f}x slower than {other_name}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
