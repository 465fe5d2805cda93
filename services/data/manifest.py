"""Any image-report collection described by a manifest file (CSV or JSONL).

Columns: ``image`` (path relative to the manifest), ``text``, ``labels`` (separated by ``;`` or
``|``; prefixed ``label:`` unless they already carry a ``prefix:``), ``patient_id``; optional
``split`` (train / dev / query, on every row or on none: then a seeded hash of the patient),
``id`` (default: the image stem; must be unique) and ``view``. JSONL ``labels`` may be a list.
A missing image or empty text keeps the item (not a pair) and is reported in ``problems``.
"""
from __future__ import annotations

import re
from pathlib import Path

from medhash.services.data.item import SPLITS, Dataset, Item
from medhash.services.data.splits import patient_split
from medhash.services.data.text import clean, read_rows, require_columns, summarize
from medhash.services.errors import DataError

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")


def read_manifest(path: Path, seed: int) -> Dataset:
    """Items of the manifest at ``path`` (a file, or a folder holding manifest.csv / manifest.jsonl)."""
    if path.is_dir():
        found = [path / n for n in MANIFEST_NAMES if (path / n).is_file()]
        if not found:
            raise DataError(f"{path}: no {' or '.join(MANIFEST_NAMES)} in this folder")
        path = found[0]
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise DataError(f"{path}: a manifest must be a .csv or .jsonl file")
    rows = read_rows(path)
    require_columns(path, rows, ("image", "text", "labels", "patient_id"))
    has_split = [bool((r.get("split") or "").strip()) for r in rows]
    if any(has_split) and not all(has_split):
        raise DataError(f"{path}: the split column is empty on {has_split.count(False):,} rows; fill it on every row or none")

    items, problems, no_image, no_text, bad_split = [], [], [], [], []
    seen: set[str] = set()
    for number, row in enumerate(rows, 2):
        image = path.parent / row["image"].strip()
        item_id = (row.get("id") or "").strip() or image.stem
        if item_id in seen:
            raise DataError(f"{path}: row {number}: duplicate id {item_id!r} (add an id column)")
        seen.add(item_id)
        patient = (row["patient_id"] or "").strip()
        if not patient:
            raise DataError(f"{path}: row {number} ({item_id}): empty patient_id")
        text, valid = clean(row["text"])
        if not valid:
            problems.append(f"{path}: {item_id}: text is not valid UTF-8 (bad bytes replaced)")
        split = (row.get("split") or "").strip() or patient_split(patient, seed)
        if split not in SPLITS:
            bad_split.append(f"{item_id}={split!r}")
        if not image.is_file():
            no_image.append(item_id)
        if not text:
            no_text.append(item_id)
        items.append(Item(
            id=item_id,
            image_paths=(image,) if image.is_file() else (),
            report=text,
            patient_id=patient,
            labels=parse_labels(row["labels"]),
            split=split,
            view=(row.get("view") or "").strip(),
            sections={},
        ))
    if bad_split:
        raise DataError(f"{path}: " + summarize(f"rows whose split is not {'/'.join(SPLITS)}", bad_split))
    if no_image:
        problems.append(summarize(f"images missing (paths are relative to {path.parent})", no_image))
    if no_text:
        problems.append(summarize("items with empty text (not pairs)", no_text))
    return Dataset(f"manifest:{path.name}", items, sorted({l for it in items for l in it.labels}), problems)


def parse_labels(value: str) -> tuple[str, ...]:
    """``"Edema; finding:COVID-19|x"`` -> ``("finding:COVID-19", "label:Edema", "label:x")``."""
    names = {v.strip() for v in re.split(r"[;|]", value or "") if v.strip()}
    return tuple(sorted(n if re.match(r"^[A-Za-z][\w-]*:\S", n) else f"label:{n}" for n in names))
