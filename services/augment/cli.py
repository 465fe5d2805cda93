"""`medhash augment`: generate (or complete) the cached augmentation texts of a dataset."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from medhash.services.config import DATASETS, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "augment", help="LSCH stage 1: text views of each item from the three prompt templates (cached)"
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", type=Path, help="dataset folder (manifest: the manifest file)")
    parser.add_argument("--config", type=Path, help="YAML config (its data, augment and llm sections)")
    parser.add_argument("--generator", choices=["extractive", "local", "openai"], help="overrides augment.generator")
    parser.add_argument("--endpoint", help="OpenAI-compatible server URL, for --generator openai")
    parser.add_argument("--model", help="model name the server serves, for --generator openai")
    parser.add_argument("--limit", type=int, help="only the first N items (a trial run)")
    parser.set_defaults(func=run_augment)


def run_augment(args: argparse.Namespace) -> int:
    from medhash.services.augment import run_augmentation
    from medhash.services.data import open_dataset
    from medhash.services.errors import ConfigError

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    cfg = load_config(args.config, {
        "data.dataset": args.dataset, "data.root": args.root,
        "augment.generator": args.generator, "augment.endpoint": args.endpoint, "augment.model": args.model,
    })
    dataset = open_dataset(cfg.data, pairs_only=False)
    if args.limit is not None:
        dataset = replace(dataset, items=dataset.items[: args.limit])
    run = run_augmentation(dataset, cfg.augment, cfg.llm)
    print(f"{dataset.name}: {len(run.texts):,} items, {run.generated:,} texts generated, "
          f"{run.cached:,} from cache ({cfg.augment.generator}: {', '.join(cfg.augment.templates)})")
    print(f"cache: {run.cache_path}")
    for name, grounding in run.grounding.items():
        print(f"grounding: {grounding.line(name)}")
    for problem in run.problems:
        print(f"problem: {problem}")
    return 0
