"""`medhash ui` (the front end against a running API) and `medhash demo` (the whole system on one machine).

The demo runs the other parts as the commands a user would type, in child processes:
`medhash index` (the run's dataset into a milvus-lite file), then `medhash serve`, and starts the UI
once the API answers; stopping the demo (Ctrl-C) stops the service too. Like the rest of ``ui``, it
imports nothing from the other medhash packages.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from medhash.ui.config import UIConfig, UIError, load_ui_config

API_START_TIMEOUT_S = 600.0  # Ray start, model loads and the first replicas on a busy 2-core machine


def register(subparsers: argparse._SubParsersAction) -> None:
    ui = subparsers.add_parser("ui", help="the Gradio front end for a running search API (blocks)")
    _ui_arguments(ui)
    ui.add_argument("--api-url", help="the serving API (default: ui.api_url, http://127.0.0.1:8000)")
    ui.set_defaults(func=_reported(run_ui))

    demo = subparsers.add_parser("demo", help="index a dataset, serve it and open the UI, on this machine (blocks)")
    _ui_arguments(demo)
    demo.add_argument("--run", type=Path, required=True, help="run directory written by `medhash train`")
    demo.add_argument("--dataset", help="dataset to index (default: the run's)")
    demo.add_argument("--root", type=Path, help="dataset folder (default: the run's)")
    demo.add_argument("--limit", type=int, help="index only the first N items")
    demo.add_argument("--milvus-uri", help="index file or server (default: <medhash cache>/demo/<run>.db)")
    demo.add_argument("--api-port", type=int, default=8000, help="port of the search API (default 8000)")
    demo.set_defaults(func=_reported(run_demo))


def _ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of UI settings (api_url, users_env, port, ...)")
    parser.add_argument("--host", help="address the UI binds (default: ui.host)")
    parser.add_argument("--port", type=int, help="port of the UI (default: ui.port, 7860)")
    parser.add_argument("--open", action="store_true", help="open the UI in a browser")


def _reported(command):
    """``command`` with its UIError printed as medhash prints any user error (exit status 2)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except UIError as exc:
            print(f"medhash: error: {exc}", file=sys.stderr)
            return 2

    return run


def ui_config(args: argparse.Namespace, **fields) -> UIConfig:
    return load_ui_config(args.config, host=args.host, port=args.port, **fields)


def run_ui(args: argparse.Namespace) -> int:
    from medhash.ui.app import launch

    cfg = ui_config(args, api_url=args.api_url)
    print(f"medhash UI on http://{cfg.host}:{cfg.port} for the API at {cfg.api_url}; Ctrl-C stops", flush=True)
    launch(cfg, os.environ.get(cfg.api_token_env) or None, open_browser=args.open)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from medhash.ui.app import launch, users_from

    if args.limit is not None and args.limit < 1:
        raise UIError("--limit must be at least 1")
    run = args.run.resolve()
    if not (run / "config.yaml").is_file():
        raise UIError(f"{run}: not a run directory (no config.yaml); train one with `medhash train`")
    uri = args.milvus_uri or str(demo_index_path(run))
    cfg = ui_config(args, api_url=f"http://127.0.0.1:{args.api_port}")
    try:
        users_from(cfg)
    except UIError:  # nobody configured: one demo user with a fresh password
        password = secrets.token_urlsafe(9)
        os.environ[cfg.users_env] = f"demo:{password}"
        print(f"UI login: user 'demo', password '{password}' (set ${cfg.users_env} to choose your own)")

    index = [sys.executable, "-m", "medhash.services.cli", "index", "--run", str(run), "--milvus-uri", uri]
    index += ["--dataset", args.dataset] if args.dataset else []
    index += ["--root", str(args.root)] if args.root else []
    index += ["--limit", str(args.limit)] if args.limit else []
    subprocess.run(index, check=True)

    serve = subprocess.Popen(
        [sys.executable, "-m", "medhash.services.cli", "serve", "--run", str(run), "--milvus-uri", uri,
         "--host", "127.0.0.1", "--port", str(args.api_port)],
        start_new_session=True,
    )
    try:
        wait_for_api(cfg.api_url, serve)
        print(f"medhash demo: UI on http://{cfg.host}:{cfg.port}, API on {cfg.api_url} (docs at /docs); Ctrl-C stops both", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        launch(cfg, None, open_browser=args.open)
    finally:
        stop(serve)
    return 0


def demo_index_path(run: Path) -> Path:
    """One milvus-lite file per run directory: codes of different models never share collections.
    It lives in the medhash cache (``MEDHASH_CACHE``, as the other commands read it)."""
    cache = Path(os.environ.get("MEDHASH_CACHE", Path.home() / ".cache" / "medhash"))
    return cache / "demo" / f"{run.name}-{hashlib.sha1(str(run).encode()).hexdigest()[:8]}.db"


def wait_for_api(url: str, process: subprocess.Popen, timeout_s: float = API_START_TIMEOUT_S) -> None:
    """Return once ``url``/healthz answers; UIError if the service process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UIError(f"`medhash serve` exited with status {process.returncode} before the API answered")
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(2)
    raise UIError(f"the API at {url} did not answer within {timeout_s:.0f} s")


def stop(process: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the service (it shuts Serve down), then SIGKILL its process group if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
