"""The load generation and statistics of `medhash bench speed-serve` (no Serve start: a tiny local HTTP server)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medhash.benchmarks.serve_speed import format_report, post_all, summarize


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
        posts = [{"json": {"text": f"query {i}"}} for i in range(20)] + [{"json": {"text": ""}}] * 3
        latencies, errors, wall_s = post_all(url, posts, concurrency=4, timeout_s=10)
    finally:
        server.shutdown()
        server.server_close()
    assert len(latencies) == 20 and errors == 3
    assert all(0 < latency <= wall_s for latency in latencies)
    assert sorted(body["text"] for body in Handler.bodies if body["text"]) == sorted(f"query {i}" for i in range(20))
