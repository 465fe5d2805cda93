"""Datasets: every source read into one interface (:class:`Item`, :class:`Dataset`).

``open_dataset(cfg)`` is the entry point; the readers live one per source in this package.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from medhash.services.config import DataConfig
from medhash.services.data.item import SPLITS, Dataset, Item
from medhash.services.errors import DataError

__all__ = ["SPLITS", "Dataset", "Item", "dataset_root", "is_pair", "open_dataset"]

DEFAULT_FOLDERS = {"medpix2": "medpix2", "covid-cxr": "covid_cxr", "iu-xray": "iu_xray", "mimic-cxr": "mimic-cxr-jpg"}


def dataset_root(cfg: DataConfig) -> Path:
    """``cfg.root``, or ``$MEDHASH_DATA/<folder>`` (MEDHASH_DATA defaults to ./data); it must exist."""
    if cfg.root is not None:
        root = Path(cfg.root).expanduser()
    elif cfg.dataset == "manifest":
        raise DataError("the manifest dataset needs --root pointing at a manifest .csv / .jsonl file")
    else:
        root = Path(os.environ.get("MEDHASH_DATA", "./data")) / DEFAULT_FOLDERS[cfg.dataset]
    if not root.exists():
        fix = {
            "iu-xray": f"`medhash data download iu-xray --dest {root}`, ",
            "medpix2": f"`medhash data download medpix2 --dest {root}`, ",
        }.get(cfg.dataset, "")
        raise DataError(f"{cfg.dataset}: data not found at {root}; get it with {fix}or pass --root (or set MEDHASH_DATA)")
    return root


def is_pair(item: Item) -> bool:
    """Whether the item has both an image and report text."""
    return bool(item.image_paths) and bool(item.report.strip())


def open_dataset(cfg: DataConfig, *, pairs_only: bool = True) -> Dataset:
    """The dataset ``cfg`` names, split by its own rule or by ``cfg.split_file``.

    With ``pairs_only`` (the default, what training and evaluation need) items without an image
    or without report text are left out, counted in ``problems``, and a dataset with no pair at
    all is a DataError; ``pairs_only=False`` keeps every item (e.g. IU X-ray reports without images).
    """
    from medhash.services.data.covid import read_covid
    from medhash.services.data.iu_xray import read_iu_xray
    from medhash.services.data.manifest import read_manifest
    from medhash.services.data.medpix import read_medpix
    from medhash.services.data.mimic import read_mimic
    from medhash.services.data.splits import apply_split_file

    root = dataset_root(cfg)
    readers = {
        "medpix2": lambda: read_medpix(root),
        "covid-cxr": lambda: read_covid(root, cfg.seed),
        "iu-xray": lambda: read_iu_xray(root, cfg.images, cfg.seed),
        "mimic-cxr": lambda: read_mimic(root, cfg.images, cfg.reports),
        "manifest": lambda: read_manifest(root, cfg.seed),
    }
    dataset = readers[cfg.dataset]()
    left_out: frozenset[str] = frozenset()
    if pairs_only:
        pairs = [item for item in dataset.items if is_pair(item)]
        if not pairs:
            raise DataError(f"{cfg.dataset} at {root}: no image-report pairs; " + " | ".join(dataset.problems))
        left_out = frozenset(item.id for item in dataset.items if not is_pair(item))
        problems = list(dataset.problems)
        if left_out:
            problems.append(f"{len(left_out):,} items without an image or report text left out (pairs only)")
        labels = sorted({label for item in pairs for label in item.labels})
        dataset = replace(dataset, items=pairs, label_names=labels, problems=problems)
    if cfg.split_file is not None:
        dataset = apply_split_file(dataset, Path(cfg.split_file), left_out)
    return dataset
