"""Search through Ray Serve vs the same pipeline in-process: latency percentiles and sustained requests/s.

The dataset's codes go into a milvus-lite file or a Milvus server (reused when it already holds every item). The same
query-split reports (and query images) are searched first in this process (``Pipeline`` + ``CodeIndex``)
and then over HTTP through the Serve application on a local Ray cluster, the HTTP load coming from a
separate process. Both run one query at a time and with a thread pool of ``concurrency`` workers;
the ratios come from the same run (absolute times are noisy on a shared machine). The Serve
replicas' resident memory is read at start-up, after the measurements and through an optional soak
(mixed text and image searches for ``--soak-minutes``). Where a one-client search's time goes is read
from the ingress's own Prometheus histograms (route and per-stage latency) around the one-client pass.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from medhash.services.config import DATASETS
from medhash.services.data.item import Dataset
from medhash.services.run_dir import RunDir

K = 10
HOST = "127.0.0.1"
WARMUP = 3  # requests sent before timing each path
SOAK_SAMPLE_S = 60.0  # replica memory is read this often during a soak
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Timing:
    """Latency and throughput of one batch of requests on one path."""

    path: str  # "in-process" | "Ray Serve"
    query: str  # "text" | "image"
    concurrency: int
    requests: int
    errors: int  # failed requests (exceptions or non-2xx answers), left out of the latencies
    p50_ms: float
    p99_ms: float
    requests_per_s: float  # completed requests / wall time of the whole batch
    mean_ms: float = float("nan")


STAGES_OF = {"text": ("/search/text", "encode_text"), "image": ("/search/image", "encode_image")}  # route, encoder stage


@dataclass(frozen=True)
class Breakdown:
    """Mean milliseconds per search of one query kind at one client: the client's whole request, and
    what the ingress timed (its route, the encoder call with the Hasher hop, the Index call, the findings)."""

    query: str
    client_ms: float
    ingress_ms: float
    encode_ms: float
    search_ms: float
    explain_ms: float


def summarize(path: str, query: str, concurrency: int, latencies_s: Sequence[float], errors: int,
              wall_s: float) -> Timing:
    """A :class:`Timing` of successful request latencies (seconds) and the batch's wall time."""
    p50, p99 = np.percentile(latencies_s, [50, 99]) if len(latencies_s) else (float("nan"), float("nan"))
    return Timing(path, query, concurrency, len(latencies_s) + errors, errors, p50 * 1000, p99 * 1000,
                  len(latencies_s) / wall_s if wall_s > 0 else float("nan"),
                  float(np.mean(latencies_s)) * 1000 if len(latencies_s) else float("nan"))


def latency_totals(metrics: str) -> dict[str, tuple[float, float]]:
    """(seconds, observations) of each route's and stage's latency histogram in the ingress's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(metrics):
        if family.name in ("medhash_request_latency_seconds", "medhash_stage_latency_seconds"):
            for sample in family.samples:
                key = sample.labels.get("route") or sample.labels.get("stage")
                if sample.name.endswith(("_sum", "_count")):
                    totals.setdefault(key, [0.0, 0.0])[sample.name.endswith("_count")] += sample.value
    return {key: (seconds, count) for key, (seconds, count) in totals.items()}


def breakdown(query: str, timing: Timing, before: dict, after: dict) -> Breakdown:
    """The :class:`Breakdown` of ``timing`` (one client) from the ingress's totals before and after it."""
    def mean_ms(key: str) -> float:
        (s0, n0), (s1, n1) = before.get(key, (0.0, 0.0)), after.get(key, (0.0, 0.0))
        return (s1 - s0) / (n1 - n0) * 1000 if n1 > n0 else float("nan")

    route, encode = STAGES_OF[query]
    return Breakdown(query, timing.mean_ms, mean_ms(route), mean_ms(encode), mean_ms("search"), mean_ms("explain"))


def format_breakdown(rows: list[Breakdown]) -> str:
    """Where a one-client search's time goes (means, ms); the rest of the ingress is its own work (HTTP
    parsing, checks, JSON), outside it are the client, the connection and Serve's HTTP proxy."""
    lines = ["| query | client | in the ingress | encoder + Hasher call | Index call | findings | rest of the ingress "
             "| outside the ingress |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rest = r.ingress_ms - r.encode_ms - r.search_ms - r.explain_ms
        lines.append(f"| {r.query} | {r.client_ms:.1f} | {r.ingress_ms:.1f} | {r.encode_ms:.1f} | {r.search_ms:.1f} | "
                     f"{r.explain_ms:.1f} | {rest:.1f} | {r.client_ms - r.ingress_ms:.1f} |")
    return "\n".join(lines)


def fire(call: Callable[[object], object], payloads: Sequence, concurrency: int,
         seconds: float | None = None) -> tuple[list[float], int, float]:
    """Run ``call`` on every payload with ``concurrency`` threads: (latencies of successes, errors, wall seconds).

    With ``seconds``, each thread cycles through its share of the payloads until that much time has passed.
    """

    def timed(payload) -> float | None:
        start = time.perf_counter()
        try:
            call(payload)
        except Exception:
            return None
        return time.perf_counter() - start

    def until_deadline(worker: int) -> list[float | None]:
        share, results = payloads[worker::concurrency] or payloads, []
        while time.perf_counter() < deadline:
            results.append(timed(share[len(results) % len(share)]))
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        if seconds is None:
            results = list(pool.map(timed, payloads))
        else:
            deadline = start + seconds
            results = [r for share in pool.map(until_deadline, range(concurrency)) for r in share]
    wall_s = time.perf_counter() - start
    latencies = [r for r in results if r is not None]
    return latencies, len(results) - len(latencies), wall_s


def post_all(posts: Sequence[tuple[str, dict]], concurrency: int, timeout_s: float = REQUEST_TIMEOUT_S,
             seconds: float | None = None) -> tuple[list[float], int, float]:
    """POST each of ``posts`` (URL, ``requests.post`` keyword arguments): :func:`fire` over HTTP.

    Run it in a separate process so the client's work does not share the server's interpreter.
    """
    import requests

    with requests.Session() as session:
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

        def post(request: tuple[str, dict]) -> None:
            url, kwargs = request
            session.post(url, timeout=timeout_s, **kwargs).raise_for_status()

        return fire(post, posts, concurrency, seconds)


def replica_processes(app: str = "medhash") -> dict[str, list]:
    """This machine's Serve replica processes of ``app`` by deployment (psutil), found by the process
    title Ray gives them (``ray::ServeReplica:<app>:<deployment>``), so no Ray dashboard is needed."""
    import psutil

    prefix = f"ray::ServeReplica:{app}:"
    found: dict[str, list] = {}
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith(prefix):
            found.setdefault(title[len(prefix):].split(".")[0].split()[0], []).append(process)
    return dict(sorted(found.items()))


def replica_memory_mb(app: str = "medhash") -> dict[str, float]:
    """Resident memory (MB, with child processes such as milvus-lite) of ``app``'s replicas, per deployment."""
    import psutil

    def rss(process) -> int:
        try:
            return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0

    return {name: sum(map(rss, processes)) / 2**20 for name, processes in replica_processes(app).items()}


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("speed-serve", help="search latency and req/s: Ray Serve over HTTP vs in-process")
    parser.add_argument("--run", type=Path, required=True, help="run directory written by `medhash train`")
    parser.add_argument("--dataset", choices=DATASETS, help="dataset to index and query (default: the run's)")
    parser.add_argument("--root", type=Path, help="dataset folder (manifest: the manifest file)")
    parser.add_argument("--requests", type=int, default=200, help="text searches per measurement (default 200)")
    parser.add_argument("--image-requests", type=int, default=50, help="image searches per measurement (default 50; 0: none)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads of the concurrent runs (default 8)")
    parser.add_argument("--milvus-uri", help="milvus-lite file or Milvus server (default: <medhash cache>/bench/speed-serve.db)")
    parser.add_argument("--soak-minutes", type=float, default=0.0,
                        help="then mixed text and image searches at --concurrency clients for this long (default 0: none)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve app on 127.0.0.1 (default 8000)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medhash.services.config import cache_root
    from medhash.services.errors import ConfigError

    if args.requests < 1 or args.image_requests < 0 or args.concurrency < 1 or args.soak_minutes < 0:
        raise ConfigError("need --requests >= 1, --image-requests >= 0, --concurrency >= 1 and --soak-minutes >= 0")
    uri = args.milvus_uri or str(cache_root() / "bench" / "speed-serve.db")
    _check_port_free(args.port)
    timings, memory, rows = measure_serve_speed(RunDir(args.run), _dataset(args), uri, args.requests,
                                                args.image_requests, args.concurrency, args.port, args.soak_minutes)
    print(format_report(timings))
    print("\nOne client through Serve, where a search's time goes (mean ms per request):\n")
    print(format_breakdown(rows))
    print("\nResident memory of the Serve replicas (with their child processes):\n")
    print(format_memory(memory))
    return 0


def measure_serve_speed(run: RunDir, dataset: Dataset, uri: str, requests: int = 200, image_requests: int = 50,
                        concurrency: int = 8, port: int = 8000,
                        soak_minutes: float = 0.0) -> tuple[list[Timing], list[tuple[str, dict[str, float]]], list[Breakdown]]:
    """Index ``dataset``, then time text (and image) searches in-process and through Serve (and soak it):
    the timings, the Serve replicas' memory over the run and the one-client breakdowns."""
    queries = [item for item in dataset.items if item.split == "query"] or dataset.items
    texts = [queries[i % len(queries)].report for i in range(requests)]
    images = [_png_bytes(queries[i % len(queries)].image_paths[0]) for i in range(image_requests)]
    _ensure_indexed(run, dataset, uri)
    timings = _in_process(run, uri, texts, images, concurrency)
    served, memory, rows = _through_serve(run, uri, texts, images, concurrency, port, soak_minutes * 60)
    return timings + served, memory, rows


def _dataset(args: argparse.Namespace) -> Dataset:
    from medhash.services.data import open_dataset

    return open_dataset(RunDir(args.run).data_config(args.dataset, args.root))


def _open(run: RunDir, uri: str):
    from medhash.serving.app import index_settings
    from medhash.services.index import open_index

    cfg = run.config()
    return open_index(index_settings(cfg.index, uri), cfg.codes.bits)


def _ensure_indexed(run: RunDir, dataset: Dataset, uri: str) -> None:
    """Every item of ``dataset`` in the index at ``uri`` (both modalities, every code length)."""
    from medhash.serving.ingest import ingest_dataset

    index = _open(run, uri)
    try:
        bits = run.config().codes.bits
        if any(index.count(b) < 2 * len(dataset) for b in bits):
            ingest_dataset(run, index, dataset)
    finally:
        index.close()


def _in_process(run: RunDir, uri: str, texts: list[str], images: list[bytes], concurrency: int) -> list[Timing]:
    """The query path in this process: Pipeline codes, then CodeIndex search (as the Serve defaults ask)."""
    import torch

    from medhash.serving.config import ServeConfig
    from medhash.serving.pipeline import Pipeline

    settings = ServeConfig()  # the defaults the Serve app runs with
    torch.set_num_threads(settings.torch_threads)  # as each Serve replica has
    pipeline = Pipeline.load(run, settings.max_image_pixels, settings.max_text_chars)
    bits = pipeline.hasher.bits[-1]
    index = _open(run, uri)
    try:
        cases = [("text", texts, lambda text: index.search(bits, pipeline.text_codes([text], bits), K, modality="image")),
                 ("image", images, lambda png: index.search(bits, pipeline.image_codes([png], bits), K, modality="text"))]
        timings = []
        for query, payloads, search in cases:
            if not payloads:
                continue
            for payload in payloads[:WARMUP]:
                search(payload)
            for workers in dict.fromkeys((1, concurrency)):
                timings.append(summarize("in-process", query, workers, *fire(search, payloads, workers)))
        return timings
    finally:
        index.close()  # only one process may own a milvus-lite file


def _through_serve(run: RunDir, uri: str, texts: list[str], images: list[bytes], concurrency: int, port: int,
                   soak_s: float = 0.0) -> tuple[list[Timing], list[tuple[str, dict[str, float]]], list[Breakdown]]:
    """The same queries over HTTP through the Serve app (one replica per deployment), sent from another process;
    then, with ``soak_s``, text and image searches mixed at ``concurrency`` clients for that long.

    Also the one-client breakdowns (:func:`breakdown`) and the replicas' memory: (moment, MB per deployment)
    after start-up, after the measurements and every :data:`SOAK_SAMPLE_S` of the soak.
    """
    import ray
    import requests
    from ray import serve

    from medhash.serving.app import build_app
    from medhash.serving.config import load_serving_config

    settings = load_serving_config(None, {"serve.host": HOST, "serve.port": port})
    one_replica = {"num_replicas": 1}
    options = {name: one_replica for name in ("ImageEncoder", "TextEncoder", "Hasher", "Index", "Ingress")}
    url = f"http://{HOST}:{port}"
    cases = [("text", [(url + "/search/text", {"json": {"text": text, "k": K}}) for text in texts]),
             ("image", [(url + "/search/image", {"files": {"file": ("query.png", png)}, "data": {"k": K}}) for png in images])]
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": HOST, "port": port})
        serve.run(build_app(run.path, uri, settings, options, host=HOST), name="medhash", route_prefix="/")
        memory = [("after start-up", replica_memory_mb())]
        timings, rows = [], []
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as client:
            for query, posts in cases:
                if not posts:
                    continue
                client.submit(post_all, posts[:WARMUP], 1).result(timeout=600)
                for workers in dict.fromkeys((1, concurrency)):
                    before = latency_totals(requests.get(url + "/metrics", timeout=30).text)
                    measured = client.submit(post_all, posts, workers).result(timeout=3600)
                    timings.append(summarize("Ray Serve", query, workers, *measured))
                    if workers == 1:
                        after = latency_totals(requests.get(url + "/metrics", timeout=30).text)
                        rows.append(breakdown(query, timings[-1], before, after))
            memory.append(("after the measurements", replica_memory_mb()))
            if soak_s > 0:
                mixed = [post for pair in zip(*(posts for _, posts in cases if posts)) for post in pair]
                soak = client.submit(post_all, mixed, concurrency, REQUEST_TIMEOUT_S, soak_s)
                started = time.monotonic()
                while not wait([soak], timeout=SOAK_SAMPLE_S).done:
                    memory.append((f"soak, {(time.monotonic() - started) / 60:.1f} min", replica_memory_mb()))
                timings.append(summarize("Ray Serve soak", "text+image", concurrency, *soak.result()))
        return timings, memory, rows
    finally:
        serve.shutdown()
        ray.shutdown()


def format_memory(memory: list[tuple[str, dict[str, float]]]) -> str:
    """Replica memory per deployment (columns) at each moment (rows)."""
    names = sorted({name for _, row in memory for name in row})
    lines = ["| moment | " + " | ".join(f"{n} MB" for n in names) + " | total MB |",
             "|---|" + "---:|" * (len(names) + 1)]
    lines += [f"| {moment} | " + " | ".join(f"{row.get(n, 0):.0f}" for n in names) + f" | {sum(row.values()):.0f} |"
              for moment, row in memory]
    return "\n".join(lines)


def format_report(timings: list[Timing]) -> str:
    """The timing table and the Serve / in-process ratios of each (query, concurrency)."""
    lines = [
        f"k={K}, longest code length, default directions (text -> images, image -> reports); "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end",
        "",
        "| path | query | concurrency | requests | errors | p50 ms | p99 ms | req/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {t.path} | {t.query} | {t.concurrency} | {t.requests} | {t.errors} | {t.p50_ms:.1f} | "
              f"{t.p99_ms:.1f} | {t.requests_per_s:.1f} |" for t in timings]
    lines += ["", "| query | concurrency | Serve p50 / in-process p50 | Serve req/s / in-process req/s |",
              "|---|---:|---:|---:|"]
    local = {(t.query, t.concurrency): t for t in timings if t.path == "in-process"}
    for t in timings:
        ref = local.get((t.query, t.concurrency))
        if t.path == "Ray Serve" and ref:
            lines.append(f"| {t.query} | {t.concurrency} | {t.p50_ms / ref.p50_ms:.2f} | "
                         f"{t.requests_per_s / ref.requests_per_s:.2f} |")
    return "\n".join(lines)


def _png_bytes(path: Path) -> bytes:
    """The image file as PNG bytes (PNG files as they are)."""
    if path.suffix.lower() == ".png":
        return path.read_bytes()
    from medhash.services.data.images import load_image

    buffer = io.BytesIO()
    load_image(path).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_port_free(port: int) -> None:
    from medhash.services.errors import ConfigError

    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise ConfigError(f"port {port} on {HOST} is in use ({exc.strerror}): pass another --port") from exc
