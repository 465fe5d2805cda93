"""`medhash data summary` and `medhash data download`."""
from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from medhash.services.config import DATASETS, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect or download datasets")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    summary = commands.add_parser("summary", help="counts, splits, labels and problems of a dataset")
    summary.add_argument("--config", type=Path, help="YAML config (its data section); flags override it")
    summary.add_argument("--dataset", choices=DATASETS)
    summary.add_argument("--root", type=Path, help="dataset folder (manifest: the manifest file)")
    summary.add_argument("--images", type=Path, help="image folder, where apart from the reports")
    summary.add_argument("--reports", type=Path, help="report folder, where apart from the images (MIMIC-CXR)")
    summary.add_argument("--split-file", type=Path, help="CSV id,split overriding the dataset's split")
    summary.add_argument("--seed", type=int, help="seed of the patient-level split")
    summary.set_defaults(func=run_summary)

    download = commands.add_parser("download", help="fetch a public dataset (needs internet; resumable)")
    download.add_argument("name", choices=["iu-xray", "medpix2"])
    download.add_argument("--dest", type=Path, required=True, help="folder to download into")
    download.set_defaults(func=run_download)


def run_summary(args: argparse.Namespace) -> int:
    from medhash.services.data import open_dataset

    fields = {f"data.{k}": getattr(args, k) for k in ("dataset", "root", "images", "reports", "split_file", "seed")}
    cfg = load_config(args.config, fields).data
    print("\n".join(summary_lines(open_dataset(cfg, pairs_only=False))))
    return 0


def summary_lines(dataset, top: int = 20) -> list[str]:
    """The summary report: counts, per-split counts, label frequencies, problems."""
    from medhash.services.data import SPLITS, is_pair

    items = dataset.items
    patients = {it.patient_id for it in items}
    images = {p for it in items for p in it.image_paths}
    reports = {(it.patient_id, it.report) for it in items}
    lines = [
        f"dataset: {dataset.name}",
        f"items: {len(items):,}",
        f"image-report pairs: {sum(map(is_pair, items)):,}",
        f"images: {len(images):,}",
        f"patients/cases: {len(patients):,}",
        f"reports (distinct texts per patient): {len(reports):,}",
        f"items with report text: {sum(1 for it in items if it.report):,}",
        "splits:",
    ]
    for split in SPLITS:
        in_split = [it for it in items if it.split == split]
        lines.append(
            f"  {split:<6} {len(in_split):>7,} items {sum(map(is_pair, in_split)):>7,} pairs "
            f"{len({it.patient_id for it in in_split}):>6,} patients"
        )
    frequencies = Counter(label for it in items for label in it.labels)
    lines.append(f"labels: {len(frequencies):,} distinct; top {min(top, len(frequencies))}:")
    lines += [f"  {count:>7,}  {label}" for label, count in frequencies.most_common(top)]
    lines.append(f"problems: {len(dataset.problems) or 'none'}")
    lines += [f"  - {problem}" for problem in dataset.problems]
    return lines


def run_download(args: argparse.Namespace) -> int:
    from medhash.services.data.download import download

    for line in download(args.name, args.dest):
        print(line)
    return 0
