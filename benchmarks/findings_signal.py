"""How well the mined findings of each category stand in for a dataset's labels, before any training.

    python -m medhash.benchmarks.findings_signal --config training/configs/medpix2-lsch-label-free.yaml

Over the training split's items: the share of item pairs that share a label among the pairs that share a mined
finding of the category, against the pairs of items with findings of it that share none. A category whose two
shares are close gives a label-free run (``train.supervision: findings``) little to learn from.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medhash.services.config import load_config
from medhash.services.data import open_dataset
from medhash.services.features.featureset import build_featureset
from medhash.services.findings import FindingMiner, findings_matrix
from medhash.training.trainer import with_resolved_data

CATEGORIES = (("anatomy",), ("region",), ("finding",), ("diagnosis",), ("anatomy", "finding", "diagnosis"))


def findings_signal(config: Path) -> str:
    """Markdown: per category, the items with findings and P(shared label | shared finding or not)."""
    cfg = with_resolved_data(load_config(config))
    features = build_featureset(cfg, progress=False)
    reports = {item.id: item.report for item in open_dataset(cfg.data).items}
    texts, train = [reports[i] for i in features.ids], features.rows("train")
    labels = features.labels[train].astype(float)
    shares_label = labels @ labels.T > 0
    others = ~np.eye(len(train), dtype=bool)  # pairs of two different items
    lines = [
        f"{features.dataset}, {len(train)} training items; any two share a label: {shares_label[others].mean():.3f}", "",
        "| mined categories | terms | items with any | P(shared label \\| shared finding) | P(shared label \\| none shared) |",
        "|---|---:|---:|---:|---:|",
    ]
    miner = FindingMiner()
    mined, _ = miner.mine_all(texts)
    for categories in CATEGORIES:
        found, names = findings_matrix(miner, mined, train, categories)
        found = found[train].astype(float)
        has = found.sum(axis=1) > 0
        pairs = others & has[:, None] & has[None, :]
        shared = (found @ found.T > 0)[pairs]
        lines.append(f"| {' + '.join(categories)} | {len(names)} | {has.mean():.3f} | "
                     f"{shares_label[pairs][shared].mean():.3f} | {shares_label[pairs][~shared].mean():.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    print(findings_signal(parser.parse_args().config), flush=True)


if __name__ == "__main__":
    main()
