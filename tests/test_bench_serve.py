"""The load generation and statistics of `medhash bench speed-serve` (no Serve start: a tiny local HTTP server)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medhash.benchmarks.serve_speed import (
    breakdown, format_breakdown, format_memory, format_report, latency_totals, post_all, summarize,
)


def test_summary_of_known_latencies():
    latencies = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    timing = summarize("in-process", "text", 4, latencies, errors=2, wall_s=2.0)
    assert timing.requests == 102 and timing.errors == 2
    assert timing.p50_ms == pytest.approx(50.5)
    assert timing.p99_ms == pytest.approx(99.01)
    assert timing.requests_per_s == pytest.approx(50.0)  # successes per wall second


def test_report_gives_serve_over_in_process_ratios():
    local = summarize("in-process", "text", 8, [0.010] * 10, 0, 0.5)  # 20 req/s
    served = summarize("Ray Serve", "text", 8, [0.030] * 10, 0, 1.0)  # 10 req/s
    report = format_report([local, served])
    assert "| text | 8 | 3.00 | 0.50 |" in report


def test_the_one_client_breakdown_reads_the_ingress_histograms_between_two_scrapes():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    registry = CollectorRegistry()
    route = Histogram("medhash_request_latency_seconds", "", ["route"], registry=registry)
    stage = Histogram("medhash_stage_latency_seconds", "", ["stage"], registry=registry)
    route.labels("/search/text").observe(5.0)  # before the measured pass: left out
    before = latency_totals(generate_latest(registry).decode())
    for _ in range(4):  # four searches: 80 ms in the ingress, of which 50 encoding, 12 searching, 3 findings
        route.labels("/search/text").observe(0.080)
        stage.labels("encode_text").observe(0.050)
        stage.labels("search").observe(0.012)
        stage.labels("explain").observe(0.003)
    after = latency_totals(generate_latest(registry).decode())
    timing = summarize("Ray Serve", "text", 1, [0.088, 0.090, 0.092], 0, 1.0)
    row = breakdown("text", timing, before, after)
    assert (row.client_ms, row.ingress_ms, row.encode_ms, row.search_ms, row.explain_ms) == pytest.approx((90, 80, 50, 12, 3))
    assert "| text | 90.0 | 80.0 | 50.0 | 12.0 | 3.0 | 15.0 | 10.0 |" in format_breakdown([row])


class Handler(BaseHTTPRequestHandler):
    """200 for a JSON body with a text, 400 otherwise; records every body it got."""

    bodies: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.bodies.append(body)
        self.send_response(200 if body.get("text") else 400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_post_all_against_a_local_server_counts_successes_and_errors():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/search/text"
        posts = [(url, {"json": {"text": f"query {i}"}}) for i in range(20)] + [(url, {"json": {"text": ""}})] * 3
        latencies, errors, wall_s = post_all(posts, concurrency=4, timeout_s=10)
    finally:
        server.shutdown()
        server.server_close()
    assert len(latencies) == 20 and errors == 3
    assert all(0 < latency <= wall_s for latency in latencies)
    assert sorted(body["text"] for body in Handler.bodies if body["text"]) == sorted(f"query {i}" for i in range(20))


def test_post_all_for_a_time_cycles_through_the_posts_until_the_deadline():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Handler.bodies = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/search/text"
        posts = [(url, {"json": {"text": "a"}}), (url, {"json": {"text": ""}})]
        latencies, errors, wall_s = post_all(posts, concurrency=2, timeout_s=10, seconds=0.5)
    finally:
        server.shutdown()
        server.server_close()
    assert 0.5 <= wall_s < 5
    assert len(latencies) > 2 and errors > 2  # each thread went round its share more than once
    assert len(Handler.bodies) == len(latencies) + errors


def test_memory_table_has_a_column_per_deployment_and_a_total():
    table = format_memory([("after start-up", {"Hasher": 100.0, "Index": 50.0}), ("soak, 1.0 min", {"Hasher": 101.0, "Index": 52.4})])
    assert "| moment | Hasher MB | Index MB | total MB |" in table
    assert "| soak, 1.0 min | 101 | 52 | 153 |" in table
