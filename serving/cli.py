"""`medhash serve` (the Ray Serve application, blocking) and `medhash index` (bulk ingestion)."""
from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from medhash.serving.config import ServingConfig, load_serving_config
from medhash.services.config import DATASETS, override, parse_assignments, read_yaml
from medhash.services.errors import ConfigError
from medhash.services.run_dir import RunDir


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve a trained run over HTTP with Ray Serve (blocks)")
    serve.add_argument("--run", type=Path, required=True, help="run directory written by `medhash train`")
    serve.add_argument("--milvus-uri", help="milvus-lite file or Milvus server URI (default: index.uri)")
    serve.add_argument("--config", type=Path, help="a Serve config (deploy/serve.yaml) or a serving YAML (serve, index)")
    serve.add_argument("--host", help="address to bind (default: serve.host)")
    serve.add_argument("--port", type=int, help="HTTP port (default: serve.port)")
    serve.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="any serving setting, e.g. --set serve.max_k=50 (repeatable)")
    serve.set_defaults(func=run_serve)

    index = subparsers.add_parser("index", help="bulk-ingest a dataset's codes into the index (idempotent)")
    index.add_argument("--run", type=Path, required=True, help="run directory written by `medhash train`")
    index.add_argument("--dataset", choices=DATASETS, help="dataset to index (default: the run's)")
    index.add_argument("--root", type=Path, help="dataset folder (manifest: the manifest file)")
    index.add_argument("--milvus-uri", help="milvus-lite file or Milvus server URI (default: index.uri)")
    index.add_argument("--config", type=Path, help="serving YAML (its index section; default: the run's)")
    index.add_argument("--limit", type=int, help="index only the first N items")
    index.set_defaults(func=run_index)


def read_serve_config(path: Path | None) -> tuple[ServingConfig, dict, dict]:
    """(serving settings, Serve options by deployment name, app args) from ``path``.

    A file with ``applications:`` is a Serve config: its first application's ``args`` (``config``
    names a serving YAML) and ``deployments`` and its ``http_options`` apply. Any other file is a
    serving YAML; no file gives the defaults.
    """
    raw = read_yaml(path)
    if "applications" not in raw:
        return load_serving_config(path), {}, {}
    if not raw["applications"]:
        raise ConfigError(f"{path}: no application under 'applications'")
    application = raw["applications"][0]
    app_args = application.get("args") or {}
    http = {f"serve.{k}": v for k, v in (raw.get("http_options") or {}).items() if k in ("host", "port")}
    settings = load_serving_config(app_args.get("config"), http)
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application.get("deployments") or []}
    return settings, options, app_args


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from medhash.serving.app import build_app

    run = RunDir(args.run)
    settings, options, app_args = read_serve_config(args.config)
    settings = override(settings, {"serve.host": args.host, "serve.port": args.port, **parse_assignments(args.set)})
    application = build_app(run.path, args.milvus_uri or app_args.get("milvus_uri"), settings, options, host=settings.serve.host)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    serve.run(application, name="medhash", route_prefix="/")
    print(f"medhash serving {run.path} on http://{settings.serve.host}:{settings.serve.port} (docs at /docs); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # `docker stop` / `kill` / Ctrl-C: the same clean shutdown
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("medhash serve: shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


def run_index(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from medhash.serving.ingest import ingest_dataset
    from medhash.services.data import open_dataset
    from medhash.serving.app import index_settings
    from medhash.services.index import open_index

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    run = RunDir(args.run)
    run_cfg = run.config()
    index_cfg = load_serving_config(args.config).index if args.config else None
    dataset = open_dataset(run.data_config(args.dataset, args.root))
    if args.limit:
        dataset = replace(dataset, items=dataset.items[: args.limit])
    index = open_index(index_settings(index_cfg or run_cfg.index, args.milvus_uri), run_cfg.codes.bits)
    try:
        indexed = ingest_dataset(run, index, dataset)
        counts = ", ".join(f"{bits}-bit: {index.count(bits):,}" for bits in run_cfg.codes.bits)
    finally:
        index.close()
    print(f"indexed {indexed:,} items of {dataset.name} ({counts} records)")
    return 0
