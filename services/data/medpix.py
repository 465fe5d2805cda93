"""MedPix 2.0: CT / MR images with captions and case reports, official split by case.

Two layouts are read:
- ``pairs.csv`` + ``images/`` (one row per image, as in ../shared/data/medpix2), or
- the official release (github.com/CHILab1/MedPix-2.0): ``[MedPix-2-0/]splitted_dataset/``
  ``descriptions_<split>.jsonl`` + ``data_<split>.jsonl`` and ``images/<image>.png``.

Item: id = image stem (``MPX1009_synpic46283``), report = the image caption, sections caption /
history / findings / diagnosis / differential, patient = case id, view = plane, labels
``location:<location category>`` and ``topic:<topic category>``. Split: train_1 + train_2 ->
train, dev -> dev, test -> query. An image file that is missing or a caption that is empty keeps
its item (no image / no text, so not a pair) and is reported in ``problems``.
"""
from __future__ import annotations

import json
from pathlib import Path

from medhash.services.data.item import Dataset, Item
from medhash.services.data.text import clean, read_rows, require_columns, summarize
from medhash.services.errors import DataError

OFFICIAL_SPLITS = {"train_1": "train", "train_2": "train", "dev": "dev", "test": "query"}
SECTIONS = {  # section name -> pairs.csv column
    "caption": "caption",
    "history": "case_history",
    "findings": "case_findings",
    "diagnosis": "case_diagnosis",
    "differential": "differential",
}


def read_medpix(root: Path) -> Dataset:
    """All MedPix items under ``root`` (either layout)."""
    if (root / "pairs.csv").is_file():
        rows = read_rows(root / "pairs.csv")
        require_columns(root / "pairs.csv", rows, ("image_file", "case_id", "split", *SECTIONS.values()))
        return _build(root, rows)
    for base in (root, root / "MedPix-2-0"):
        if (base / "splitted_dataset").is_dir():
            return _build(base, _official_rows(base / "splitted_dataset"))
    raise DataError(
        f"{root}: no MedPix 2.0 data (expected pairs.csv or splitted_dataset/); "
        "fetch it with `medhash data download medpix2 --dest DIR` or pass --root"
    )


def _official_rows(folder: Path) -> list[dict[str, str]]:
    """The official jsonl files flattened to pairs.csv rows."""
    rows = []
    for split in OFFICIAL_SPLITS:
        cases = {c["U_id"]: c for c in _jsonl(folder / f"data_{split}.jsonl")}
        for d in _jsonl(folder / f"descriptions_{split}.jsonl"):
            case = cases.get(d.get("U_id"), {})
            details, topic, description = case.get("Case") or {}, case.get("Topic") or {}, d.get("Description") or {}
            rows.append({
                "image_file": f"images/{d.get('image', '')}.png",
                "caption": description.get("Caption") or "",
                "case_history": details.get("History") or "",
                "case_findings": details.get("Findings") or "",
                "case_diagnosis": details.get("Case Diagnosis") or "",
                "differential": details.get("Differential Diagnosis") or "",
                "topic_category": topic.get("Category") or "",
                "case_id": d.get("U_id") or "",
                "plane": description.get("Plane") or "",
                "location_category": d.get("Location Category") or "",
                "split": split,
            })
    return rows


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: file of the official MedPix 2.0 split not found")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid UTF-8 JSON lines ({exc})") from None


def _build(base: Path, rows: list[dict[str, str]]) -> Dataset:
    items, problems, no_image, no_text = [], [], [], []
    for number, row in enumerate(rows, 2):
        image = base / row["image_file"]
        item_id = Path(row["image_file"]).stem
        split = OFFICIAL_SPLITS.get(row["split"].strip())
        if split is None:
            raise DataError(f"MedPix row {number} ({item_id}): unknown split {row['split']!r}")
        sections = {}
        for name, column in SECTIONS.items():
            text, valid = clean(row.get(column) or "")
            if not valid:
                problems.append(f"{item_id}: {name} is not valid UTF-8 (bad bytes replaced)")
            if text:
                sections[name] = text
        if not image.is_file():
            no_image.append(item_id)
        if not sections.get("caption"):
            no_text.append(item_id)
        labels = tuple(
            f"{prefix}:{value.strip()}"
            for prefix, value in (("location", row.get("location_category", "")), ("topic", row.get("topic_category", "")))
            if value.strip()
        )
        items.append(Item(
            id=item_id,
            image_paths=(image,) if image.is_file() else (),
            report=sections.get("caption", ""),
            patient_id=row["case_id"].strip(),
            labels=labels,
            split=split,
            view=row.get("plane", "").strip(),
            sections=sections,
        ))
    if no_image:
        problems.append(summarize(f"images missing under {base / 'images'}", no_image))
    if no_text:
        problems.append(summarize("items with an empty caption", no_text))
    return Dataset("medpix2", items, sorted({l for it in items for l in it.labels}), problems)
