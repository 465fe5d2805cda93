"""`medhash serve` (the Ray Serve application, blocking) and `medhash index` (bulk ingestion)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from medhash.services.config import DataConfig, MedhashConfig, load_config
from medhash.services.errors import ConfigError
from medhash.services.run_dir import RunDir


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve a trained run over HTTP with Ray Serve (blocks)")
    serve.add_argument("--run", type=Path, required=True, help="run directory written by `medhash train`")
    serve.add_argument("--milvus-uri", help="milvus-lite file or Milvus server URI (default: index.uri)")
    serve.add_argument("--config", type=Path, help="a Serve config (deploy/serve.yaml) or a medhash YAML config")
    serve.add_argument("--host", help="address to bind (default: serve.host)")
    serve.add_argument("--port", type=int, help="HTTP port (default: serve.port)")
    serve.set_defaults(func=run_serve)

    index = subparsers.add_parser("index", help="bulk-ingest a dataset's codes into the index (idempotent)")
    index.add_argument("--run", type=Path, required=True, help="run directory written by `medhash train`")
    index.add_argument("--dataset", required=True, choices=["medpix2", "covid-cxr", "iu-xray", "mimic-cxr", "manifest"])
    index.add_argument("--root", type=Path, help="dataset folder (manifest: the manifest file)")
    index.add_argument("--milvus-uri", help="milvus-lite file or Milvus server URI (default: index.uri)")
    index.add_argument("--config", type=Path, help="medhash YAML config (its index section; default: the run's)")
    index.add_argument("--limit", type=int, help="index only the first N items")
    index.set_defaults(func=run_index)


def read_serve_config(path: Path | None, defaults: MedhashConfig) -> tuple[MedhashConfig, dict, dict]:
    """(medhash settings, Serve options by deployment name, app args) from ``path``.

    A file with ``applications:`` is a Serve config: its first application's ``args`` and
    ``deployments`` and its ``http_options`` apply. Any other file is a medhash config. ``defaults``
    (the run's config) stands where no medhash config is named.
    """
    if path is None:
        return defaults, {}, {}
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    if not isinstance(raw, dict) or "applications" not in raw:
        return load_config(path), {}, {}
    if not raw["applications"]:
        raise ConfigError(f"{path}: no application under 'applications'")
    application = raw["applications"][0]
    app_args = application.get("args") or {}
    settings = load_config(app_args["config"]) if app_args.get("config") else defaults
    http = {k: v for k, v in (raw.get("http_options") or {}).items() if k in ("host", "port")}
    settings = settings.model_copy(update={"serve": settings.serve.model_copy(update=http)})
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application.get("deployments") or []}
    return settings, options, app_args


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from medhash.serving.app import build_app

    run = RunDir(args.run)
    settings, options, app_args = read_serve_config(args.config, run.config())
    http = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update={"serve": settings.serve.model_copy(update=http)})
    application = build_app(run.path, args.milvus_uri or app_args.get("milvus_uri"), settings, options)
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
    serve.run(application, name="medhash", route_prefix="/")
    print(f"medhash serving {run.path} on http://{settings.serve.host}:{settings.serve.port} (docs at /docs); Ctrl-C stops")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `docker stop` / `kill`: shut Serve down cleanly too
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()


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
    settings = load_config(args.config) if args.config else run_cfg
    data_cfg = run_cfg.data if args.dataset == run_cfg.data.dataset else DataConfig(dataset=args.dataset)
    if args.root is not None:
        data_cfg = data_cfg.model_copy(update={"root": args.root})
    dataset = open_dataset(data_cfg)
    if args.limit:
        dataset = replace(dataset, items=dataset.items[: args.limit])
    index = open_index(index_settings(settings, args.milvus_uri), run_cfg.lsch.bits)
    try:
        indexed = ingest_dataset(run, index, dataset)
        counts = ", ".join(f"{bits}-bit: {index.count(bits):,}" for bits in sorted(run_cfg.lsch.bits))
    finally:
        index.close()
    print(f"indexed {indexed:,} items of {dataset.name} ({counts} records)")
    return 0
