"""`medhash eval`: a run directory scored by the three retrieval protocols."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate a run directory by the three retrieval protocols")
    evaluate.add_argument("--run", type=Path, required=True, help="run directory written by `medhash train`")
    evaluate.add_argument("--root", type=Path, help="dataset folder, if it moved since training")
    evaluate.add_argument("--split-file", type=Path, help="CSV id,split: evaluate under another split")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for results.json, codes, plots")
    evaluate.add_argument(
        "--on", choices=("query", "dev"), default="query",
        help="query: the held-out queries against train+dev (to publish); dev: dev against train (to tune)",
    )
    evaluate.add_argument("--judgments", type=Path,
                          help="relevance judgments (the service's SQLite file or its GET /judgments CSV) to score as well")
    evaluate.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from medhash.services.evaluation.run import evaluate_run, results_table

    results = evaluate_run(args.run, args.out, args.split_file, root=args.root, on=args.on, judgments=args.judgments)
    print(results_table(results))
    return 0
