"""`medhash train` and `medhash eval`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a hashing method with Ray Train and write a run directory")
    train.add_argument("--config", type=Path, help="YAML config (training/configs/<dataset>-<method>.yaml)")
    train.add_argument("--method", help="hashing method (overrides the config's method, default lsch)")
    train.add_argument("--root", type=Path, help="dataset folder (overrides data.root)")
    train.add_argument("--split-file", type=Path, help="CSV id,split overriding the dataset's split")
    train.add_argument("--workers", type=int, help="Ray Train workers (overrides train.workers)")
    train.add_argument("--bits", type=lambda s: tuple(int(b) for b in s.split(",")), help="e.g. 32,64,128")
    train.add_argument("--out", type=Path, required=True, help="run directory (re-run to resume)")
    train.set_defaults(func=_train)

    evaluate = subparsers.add_parser("eval", help="evaluate a run directory by the three retrieval protocols")
    evaluate.add_argument("--run", type=Path, required=True, help="run directory written by `medhash train`")
    evaluate.add_argument("--root", type=Path, help="dataset folder, if it moved since training")
    evaluate.add_argument("--split-file", type=Path, help="CSV id,split: evaluate under another split")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for results.json, codes, plots")
    evaluate.add_argument(
        "--on", choices=("query", "dev"), default="query",
        help="query: the held-out queries against train+dev (to publish); dev: dev against train (to tune)",
    )
    evaluate.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from medhash.services.config import load_config
    from medhash.training.trainer import train

    cfg = load_config(
        args.config,
        data={"root": args.root, "split_file": args.split_file},
        train={"workers": args.workers},
        lsch={"bits": args.bits},
    )
    if args.method:
        cfg = cfg.model_copy(update={"method": args.method})
    run = train(cfg, args.out)
    print(json.dumps(run.meta(), indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from medhash.training.evaluate import evaluate_run, results_table

    results = evaluate_run(args.run, args.out, args.split_file, root=args.root, on=args.on)
    print(results_table(results))
    return 0
