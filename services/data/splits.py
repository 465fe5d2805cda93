"""Splits: the deterministic patient-level hash split and user split files (`id,split`)."""
from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from medhash.services.data.item import SPLITS, Dataset
from medhash.services.data.text import summarize
from medhash.services.errors import DataError

FRACTIONS = {"train": 0.7, "dev": 0.1, "query": 0.2}


def patient_split(patient_id: str, seed: int) -> str:
    """The split of a patient: a seeded hash, so it never depends on which other patients exist.

    About 70 / 10 / 20 % of patients go to train / dev / query.
    """
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for split, fraction in FRACTIONS.items():
        cumulative += fraction
        if position < cumulative:
            return split
    return "query"


def read_split_file(path: Path) -> dict[str, str]:
    """``{id: split}`` from a CSV with header ``id,split``; splits must be train / dev / query."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"split file {path}: cannot read ({exc})") from None
    if not {"id", "split"} <= header:
        raise DataError(f"split file {path}: expected a CSV with header 'id,split'")
    splits: dict[str, str] = {}
    bad_names, duplicates = [], []
    for row in rows:
        item_id, split = (row["id"] or "").strip(), (row["split"] or "").strip()
        if split not in SPLITS:
            bad_names.append(f"{item_id}={split!r}")
        if item_id in splits:
            duplicates.append(item_id)
        splits[item_id] = split
    if bad_names:
        raise DataError(f"split file {path}: " + summarize(f"rows with a split other than {'/'.join(SPLITS)}", bad_names))
    if duplicates:
        raise DataError(f"split file {path}: " + summarize("ids listed twice", duplicates))
    return splits


def apply_split_file(dataset: Dataset, path: Path, left_out: frozenset[str] = frozenset()) -> Dataset:
    """``dataset`` with every item's split taken from the file; every id must be in it and vice versa.

    ``left_out``: ids of the source that ``dataset`` does not hold (e.g. items without a pair),
    which the file may list too.

    A patient whose items land in more than one split is reported in ``problems`` (not refused:
    the user chose the file).
    """
    splits = read_split_file(path)
    ids = {item.id for item in dataset.items}
    unknown = sorted(set(splits) - ids - left_out)
    missing = sorted(ids - set(splits))
    if unknown:
        raise DataError(f"split file {path}: " + summarize(f"ids not in {dataset.name}", unknown))
    if missing:
        raise DataError(f"split file {path}: " + summarize(f"{dataset.name} ids missing from the file", missing))
    items = [replace(item, split=splits[item.id]) for item in dataset.items]
    problems = list(dataset.problems)
    leaking = mixed_patients(items)
    if leaking:
        problems.append(f"split file {path}: " + summarize("patients in more than one split", leaking))
    return replace(dataset, items=items, problems=problems)


def mixed_patients(items) -> list[str]:
    """Patients whose items are in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for item in items:
        seen[item.patient_id].add(item.split)
    return sorted(p for p, s in seen.items() if len(s) > 1)
