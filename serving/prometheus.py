"""Prometheus metrics of the HTTP ingress (prometheus_client), served on its `/metrics`.

Every metric is recorded in the ingress replica that handled the request, so `/metrics` shows
that replica's totals: with one ingress replica (the default) that is the whole service; with
more, scrape Ray's own metrics instead. Stage latencies are timed at the ingress around each call
to a deployment, so they include queueing and dynamic batching. Ray itself exports `ray_serve_*`
metrics (requests, latencies, replica counts per deployment) on each node's metrics export port
(`ray start --metrics-export-port=...`), listed for Prometheus in
`/tmp/ray/prom_metrics_service_discovery.json`.

Labels carry routes (templates such as `/items/{item_id}`), stages, kinds and code lengths only:
never ids, patient data or text.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("encode_image", "encode_text", "hash", "search", "explain", "insert")

REGISTRY = CollectorRegistry()
REQUESTS = Counter("medhash_requests_total", "HTTP requests by route and status", ["route", "status"], registry=REGISTRY)
REQUEST_LATENCY = Histogram(
    "medhash_request_latency_seconds", "HTTP request latency by route", ["route"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STAGE_LATENCY = Histogram(
    "medhash_stage_latency_seconds", "Latency of one pipeline stage as seen by the ingress", ["stage"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "medhash_batch_size", "Size of the dynamic batch each request was encoded in (per request)", ["encoder"],
    registry=REGISTRY, buckets=(1, 2, 4, 8, 16, 32, 64),
)
INDEX_SIZE = Gauge("medhash_index_records", "Records in the index by code length", ["bits"], registry=REGISTRY)
ERRORS = Counter("medhash_errors_total", "Refused or failed requests by kind", ["kind"], registry=REGISTRY)

for _stage in STAGES:  # export every stage from the start, not only after its first request
    STAGE_LATENCY.labels(_stage)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time one pipeline stage into STAGE_LATENCY."""
    started = time.perf_counter()
    try:
        yield
    finally:
        STAGE_LATENCY.labels(name).observe(time.perf_counter() - started)


def exposition() -> bytes:
    """The Prometheus text format of every medhash metric."""
    return generate_latest(REGISTRY)
