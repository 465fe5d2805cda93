"""`medhash bench`: the speed benchmarks and the quality comparison, one subcommand each.

Each benchmark module has a ``register(commands)`` that adds its subcommand to the ``bench`` group;
add a new benchmark by calling its ``register`` below.
"""
from __future__ import annotations

import argparse

from medhash.benchmarks import index_speed, ingest_speed, quality, serve_speed


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: speed (ratios measured in one run) and retrieval quality")
    commands = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    index_speed.register(commands)
    ingest_speed.register(commands)
    serve_speed.register(commands)
    quality.register(commands)
