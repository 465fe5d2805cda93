"""Hamming top-k search over N codes: Milvus (milvus-lite, a Milvus server) vs FAISS vs numpy.

The codes are clustered as learned hash codes are (random centres, each bit of an item flipped with
probability ``noise``; each query a database item with its own bit noise): on uniformly random codes
no inverted-file index can prune, and learned codes are not uniform. Every method answers the same
queries one per call (p50 / p90) and all in one call (per query); recall@k counts the hits within the
exact k-th distance (ties at that distance are all correct), against numpy's exact scan. Ratios come
from one run: absolute times are noisy on a shared machine.
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
SERVER_INDEXES = ("BIN_FLAT", "BIN_IVF_FLAT")


@dataclass(frozen=True)
class Timing:
    """One method: build, memory, latency one query per call and per query in one call, recall."""

    method: str
    build_s: float  # insert / add / train, until searchable
    memory_mb: float | None  # resident memory the index added (its own process for Milvus); None: not measured
    p50_ms: float
    p90_ms: float
    batched_ms: float  # per query, every query in one call
    recall: float  # mean recall@k against the exact scan


@dataclass(frozen=True)
class IndexSpeed:
    """One run of :func:`measure_index_speed`."""

    n: int
    queries: int
    bits: int
    k: int
    timings: list[Timing]


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("speed-index", help="Hamming search: Milvus vs FAISS vs numpy, with recall")
    parser.add_argument("--n", type=int, default=1_000_000, help="database codes (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=100, help="queries (default 100)")
    parser.add_argument("--bits", type=int, default=64, choices=[16, 32, 64, 128, 256], help="code length")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--milvus-uri", help="also a Milvus server (BIN_FLAT and BIN_IVF_FLAT), e.g. http://127.0.0.1:19530")
    parser.add_argument("--nlist", type=int, default=1024, help="IVF clusters (FAISS and the server; default 1024)")
    parser.add_argument("--nprobe", default="16,64", help="IVF clusters searched, comma-separated (default 16,64)")
    parser.add_argument("--no-lite", action="store_true", help="skip milvus-lite (its insert is slow at 10 M)")
    parser.add_argument("--server-index", default="BIN_FLAT,BIN_IVF_FLAT",
                        help="the server's index types, comma-separated (default BIN_FLAT,BIN_IVF_FLAT; at 10 M one per "
                             "server start: a dropped collection's memory is not released at once)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medhash.services.errors import ConfigError

    try:
        nprobes = tuple(int(p) for p in args.nprobe.split(","))
    except ValueError:
        raise ConfigError(f"--nprobe takes comma-separated integers, got {args.nprobe!r}") from None
    server_indexes = tuple(args.server_index.split(","))
    if not set(server_indexes) <= set(SERVER_INDEXES):
        raise ConfigError(f"--server-index takes {' or '.join(SERVER_INDEXES)}, comma-separated; got {args.server_index!r}")
    if args.n < args.k or args.queries < 1 or args.nlist < 1 or args.nlist > args.n or min(nprobes) < 1:
        raise ConfigError(f"need --n >= --k, --n >= --nlist >= 1, --queries >= 1 and --nprobe >= 1; got n={args.n} "
                          f"k={args.k} nlist={args.nlist} queries={args.queries} nprobe={args.nprobe}")
    result = measure_index_speed(args.n, args.queries, args.bits, args.k, milvus_uri=args.milvus_uri,
                                 nlist=args.nlist, nprobes=nprobes, lite=not args.no_lite, server_indexes=server_indexes)
    print(format_report(result))
    return 0


def clustered_codes(n: int, queries: int, bits: int, seed: int = 0, centres: int = 4096,
                    noise: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """Packed database and query codes around random centres (bit flips with probability ``noise``)."""
    rng = np.random.default_rng(seed)
    centre_bits = rng.integers(0, 2, (centres, bits), dtype=np.uint8)
    database = np.empty((n, bits // 8), dtype=np.uint8)
    for lo in range(0, n, 1_000_000):  # in chunks: 10 M x 64 unpacked bits would be 640 MB
        rows = min(n, lo + 1_000_000) - lo
        flips = rng.random((rows, bits)) < noise
        database[lo : lo + rows] = np.packbits(centre_bits[rng.integers(0, centres, rows)] ^ flips, axis=1)
    picked = np.unpackbits(database[rng.integers(0, n, queries)], axis=1)
    query_codes = np.packbits(picked ^ (rng.random((queries, bits)) < noise), axis=1)
    return database, query_codes


def measure_index_speed(n: int = 1_000_000, queries: int = 100, bits: int = 64, k: int = 10, seed: int = 0,
                        milvus_uri: str | None = None, nlist: int = 1024, nprobes: tuple[int, ...] = (16, 64),
                        lite: bool = True, server_indexes: tuple[str, ...] = SERVER_INDEXES) -> IndexSpeed:
    """Time and score top-k Hamming search by every method on the same clustered codes."""
    import faiss

    database, query_codes = clustered_codes(n, queries, bits, seed)
    exact_kth = np.array([np.sort(row)[k - 1] for row in _chunked_distances(query_codes, database)])

    def recall(distances: list[np.ndarray]) -> float:
        return float(np.mean([min(k, int(np.sum(d <= exact_kth[q]))) / k for q, d in enumerate(distances)]))

    timings = []

    def numpy_top_k(batch: np.ndarray) -> list[np.ndarray]:
        return [np.sort(row)[:k] for row in _chunked_distances(batch, database)]

    timings.append(_measure("numpy (XOR + bitwise_count, exact)", 0.0, None, numpy_top_k, query_codes, recall))

    rss = _rss_mb()
    start = time.perf_counter()
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(database)
    timings.append(_measure("FAISS IndexBinaryFlat", time.perf_counter() - start, _rss_mb() - rss,
                            lambda batch: list(flat.search(batch, k)[0]), query_codes, recall))
    flat = None  # freed before the IVF index is measured
    rss = _rss_mb()
    start = time.perf_counter()
    ivf = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, nlist)
    ivf.train(database[np.random.default_rng(seed).choice(n, min(n, 256 * nlist), replace=False)])
    ivf.add(database)
    build_s, memory = time.perf_counter() - start, _rss_mb() - rss
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        timings.append(_measure(f"FAISS IndexBinaryIVF nlist {nlist} nprobe {nprobe}", build_s, memory,
                                lambda batch: list(ivf.search(batch, k)[0]), query_codes, recall))
    ivf = None

    if lite:
        with tempfile.TemporaryDirectory(prefix="medhash-bench-") as workdir:
            timings.append(_milvus(str(Path(workdir) / "bench.db"), "bench", "BIN_FLAT", nlist, (0,), database,
                                   query_codes, bits, k, recall, "milvus-lite BIN_FLAT")[0])
    if milvus_uri:
        suffix = f"{bits}_{n}"
        if "BIN_FLAT" in server_indexes:
            timings += _milvus(milvus_uri, f"bench_flat_{suffix}", "BIN_FLAT", nlist, (0,), database, query_codes,
                               bits, k, recall, "Milvus server BIN_FLAT")
        if "BIN_IVF_FLAT" in server_indexes:
            timings += _milvus(milvus_uri, f"bench_ivf{nlist}_{suffix}", "BIN_IVF_FLAT", nlist, nprobes, database,
                               query_codes, bits, k, recall, f"Milvus server BIN_IVF_FLAT nlist {nlist}")
    return IndexSpeed(n, queries, bits, k, timings)


def _milvus(uri: str, prefix: str, index_type: str, nlist: int, nprobes: tuple[int, ...], database: np.ndarray,
            query_codes: np.ndarray, bits: int, k: int, recall, name: str) -> list[Timing]:
    """Insert into a fresh collection (dropped afterwards), flush, then time each nprobe."""
    from medhash.services.index import CodeIndex, IndexRecord

    rss = _milvus_rss_mb(uri)
    index = CodeIndex(uri, [bits], prefix=prefix, index_type=index_type, ivf_nlist=nlist, timeout_s=600)
    timings = []
    try:
        start = time.perf_counter()
        for lo in range(0, len(database), INSERT_BATCH):
            index.upsert(bits, [IndexRecord(str(i), "image", database[i].tobytes())
                                for i in range(lo, min(len(database), lo + INSERT_BATCH))])
        index.flush()
        build_s = time.perf_counter() - start
        memory = None if rss is None else _milvus_rss_mb(uri) - rss
        for nprobe in nprobes:
            searcher = index if not nprobe else CodeIndex(uri, [bits], prefix=prefix, index_type=index_type,
                                                          ivf_nlist=nlist, nprobe=nprobe, timeout_s=600)

            def top_k(batch: np.ndarray) -> list[np.ndarray]:
                return [np.array([h.distance for h in hits]) for hits in searcher.search(bits, batch, k)]

            label = f"{name} nprobe {nprobe}" if nprobe else name
            timings.append(_measure(label, build_s, memory, top_k, query_codes, recall))
    finally:
        if index.is_server:
            index.drop()
        index.close()
    return timings


def _measure(method: str, build_s: float, memory_mb: float | None, top_k: Callable[[np.ndarray], list[np.ndarray]],
             queries: np.ndarray, recall) -> Timing:
    """Latency one query per call (after a warm-up call), per query with all in one call, and recall."""
    top_k(queries[:1])
    latencies, results = [], []
    for q in range(len(queries)):
        start = time.perf_counter()
        results += top_k(queries[q : q + 1])
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    batched = top_k(queries)
    batched_ms = (time.perf_counter() - start) * 1000 / len(queries)
    p50, p90 = np.percentile(latencies, [50, 90]) * 1000
    return Timing(method, build_s, memory_mb, float(p50), float(p90), batched_ms, min(recall(results), recall(batched)))


def _chunked_distances(queries: np.ndarray, database: np.ndarray, rows: int = 2_000_000):
    """Each query's Hamming distances to every database code, computed in database chunks."""
    for query in queries:
        yield np.concatenate([hamming_distances(query[None], database[lo : lo + rows])[0]
                              for lo in range(0, len(database), rows)])


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _milvus_rss_mb(uri: str) -> float | None:
    """Resident memory of the Milvus process serving ``uri`` when it runs on this machine, else None."""
    import psutil

    local = uri.endswith(".db")
    total = 0.0
    for process in psutil.process_iter(["cmdline", "memory_info"]):
        command = " ".join(process.info["cmdline"] or [])
        if (local and "milvus" in command and "lite" in command) or (not local and "milvus run standalone" in command):
            total += process.info["memory_info"].rss / 2**20
    return total or None


def format_report(result: IndexSpeed) -> str:
    """The table, the ratios to FAISS IndexBinaryFlat, and the run's setup."""
    import faiss

    lines = [
        f"{result.n:,} clustered {result.bits}-bit codes, {result.queries} queries, k={result.k}",
        f"machine: {_cpu_name()} ({platform.machine()}, {os.cpu_count()} cores); "
        f"FAISS OpenMP threads: {faiss.omp_get_max_threads()}",
        "",
        f"| method | build s | inserted codes/s | memory MB | p50 ms (1 per call) | p90 ms | ms/query ({result.queries} per call) "
        f"| recall@{result.k} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result.timings:
        rate = f"{result.n / t.build_s:,.0f}" if t.build_s else "-"
        memory = f"{t.memory_mb:,.0f}" if t.memory_mb is not None else "-"
        lines.append(f"| {t.method} | {t.build_s:.1f} | {rate} | {memory} | {t.p50_ms:.2f} | {t.p90_ms:.2f} | "
                     f"{t.batched_ms:.2f} | {t.recall:.3f} |")
    flat = next(t for t in result.timings if t.method == "FAISS IndexBinaryFlat")
    lines.append("")
    for t in result.timings:
        if t is not flat:
            lines.append(f"- {t.method}: {t.p50_ms / flat.p50_ms:.1f}x FAISS IndexBinaryFlat's p50 one per call, "
                         f"{t.batched_ms / flat.batched_ms:.1f}x per query in one call; recall@{result.k} {t.recall:.3f}")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
