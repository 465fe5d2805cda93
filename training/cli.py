"""`medhash train`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medhash.services.cli import code_lengths


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a hashing method with Ray Train and write a run directory")
    train.add_argument("--config", type=Path, help="YAML config (training/configs/<dataset>-<method>.yaml)")
    train.add_argument("--method", help="hashing method (overrides the config's method, default lsch)")
    train.add_argument("--root", type=Path, help="dataset folder (overrides data.root)")
    train.add_argument("--split-file", type=Path, help="CSV id,split overriding the dataset's split")
    train.add_argument("--workers", type=int, help="Ray Train workers (overrides train.workers)")
    train.add_argument("--bits", type=code_lengths, help="code lengths, e.g. 32,64,128 (overrides codes.bits)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="any config value, e.g. --set train.lr=0.01 --set method_params.lsch.alpha=1 (repeatable)")
    train.add_argument("--out", type=Path, required=True, help="run directory (re-run to resume)")
    train.set_defaults(func=_train)



def _train(args: argparse.Namespace) -> int:
    from medhash.services.config import load_config, parse_assignments
    from medhash.training.trainer import train

    cfg = load_config(args.config, {
        "data.root": args.root, "data.split_file": args.split_file, "train.workers": args.workers,
        "codes.bits": args.bits, "method": args.method, **parse_assignments(args.set),
    })
    run = train(cfg, args.out)
    print(json.dumps(run.meta(), indent=1))
    return 0
