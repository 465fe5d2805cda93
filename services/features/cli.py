"""`medhash features`: compute (or read back) the cached backbone features of a dataset."""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

from medhash.services.config import DATASETS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "features", help="extract and cache image / report features with the configured backbones"
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", help="dataset folder (or manifest file)")
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument("--modality", choices=("image", "text", "both"), default="both")
    parser.add_argument("--limit", type=int, help="only the first N items")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medhash.services.config import load_config
    from medhash.services.data import open_dataset
    from medhash.services.backbones.image import build_image_backbone
    from medhash.services.backbones.text import build_text_backbone
    from medhash.services.features.cache import FeatureCache, extract_image_features, extract_text_features

    cfg = load_config(args.config, {"data.dataset": args.dataset, "data.root": args.root})
    dataset = open_dataset(cfg.data)
    if args.limit is not None:
        dataset = replace(dataset, items=dataset.items[: args.limit])
    print(f"{dataset.name}: {len(dataset)} items")
    if args.modality in ("image", "both"):
        encoder = build_image_backbone(cfg.image_backbone)
        cache = FeatureCache.for_encoder(dataset.name, encoder, "image")
        before, start = len(cache.load()), time.perf_counter()
        ids, features = extract_image_features(dataset, encoder, cache, cfg.image_backbone.batch_size)
        _report("image", cache, ids, features, len(cache.load()) - before, time.perf_counter() - start)
    if args.modality in ("text", "both"):
        encoder = build_text_backbone(cfg.text_backbone, cfg.llm)
        cache = FeatureCache.for_encoder(dataset.name, encoder, "report")
        before, start = len(cache.load()), time.perf_counter()
        ids, features = extract_text_features(
            [item.id for item in dataset.items], [item.report for item in dataset.items], encoder, cache
        )
        _report("text", cache, ids, features, len(cache.load()) - before, time.perf_counter() - start)
    return 0


def _report(kind: str, cache, ids: list[str], features, encoded: int, seconds: float) -> None:
    rate = f", {encoded / seconds:.1f} {kind}s/s" if encoded else ""
    print(f"{kind} features: {features.shape[0]:,} x {features.shape[1]:,} in {cache.dir}")
    print(f"  {encoded:,} encoded, {len(ids) - encoded:,} from cache, {seconds:.1f} s{rate}")
