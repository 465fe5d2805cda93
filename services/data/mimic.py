"""MIMIC-CXR-JPG (credentialed; PhysioNet), read from the official layout.

Under ``root`` (images root ``cfg.images``, default ``root``):
``files/pXX/p<subject>/s<study>/<dicom_id>.jpg``, ``mimic-cxr-2.0.0-split.csv[.gz]``,
``mimic-cxr-2.0.0-chexpert.csv[.gz]``, ``mimic-cxr-2.0.0-metadata.csv[.gz]``. Reports (from
MIMIC-CXR's ``mimic-cxr-reports.zip``, extracted): ``files/pXX/p<subject>/s<study>.txt`` under
``cfg.reports`` (default: the images root).

One item per image on disk: id = dicom_id, report = FINDINGS + IMPRESSION sections, patient =
subject_id, view = ViewPosition, labels ``chexpert:<label>`` for each of the 14 CheXpert labels
that is positive (1.0). Split: the official split CSV (train / validate / test -> train / dev /
query). Images not on disk (partial downloads) are counted in ``problems``; a report that is
missing, not UTF-8 or without FINDINGS / IMPRESSION leaves its items without text (not pairs).
"""
from __future__ import annotations

import re
from pathlib import Path

from medhash.services.data.item import Dataset, Item
from medhash.services.data.text import decode, read_rows, require_columns, summarize
from medhash.services.errors import DataError

PREFIX = "mimic-cxr-2.0.0"
CHEXPERT = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
OFFICIAL_SPLITS = {"train": "train", "validate": "dev", "test": "query"}
HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]*[A-Z)]):", re.MULTILINE)


def read_mimic(root: Path, images: Path | None, reports: Path | None) -> Dataset:
    images, reports = images or root, reports or images or root
    split_rows = read_rows(_table(root, "split"))
    require_columns(_table(root, "split"), split_rows, ("dicom_id", "study_id", "subject_id", "split"))
    labels = _chexpert(root)
    views = {r["dicom_id"]: (r.get("ViewPosition") or "").strip() for r in read_rows(_table(root, "metadata"))}

    items, problems, absent, no_report, no_text = [], [], [], [], []
    texts: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    for row in split_rows:
        subject, study, dicom = row["subject_id"].strip(), row["study_id"].strip(), row["dicom_id"].strip()
        split = OFFICIAL_SPLITS.get(row["split"].strip())
        if split is None:
            raise DataError(f"{_table(root, 'split')}: {dicom}: unknown split {row['split']!r}")
        study_dir = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        image = images / study_dir / f"{dicom}.jpg"
        if not image.is_file():
            absent.append(dicom)
            continue
        if (subject, study) not in texts:
            report = reports / study_dir.with_suffix(".txt")
            texts[subject, study] = _report(report, problems) if report.is_file() else ("", {})
            if not report.is_file():
                no_report.append(f"s{study}")
            elif not texts[subject, study][0]:
                no_text.append(f"s{study}")
        text, sections = texts[subject, study]
        items.append(Item(dicom, (image,), text, subject, labels.get((subject, study), ()), split, views.get(dicom, ""), sections))
    if absent:
        problems.append(summarize(f"images in the split file not under {images / 'files'}", absent))
    if no_report:
        problems.append(summarize(f"study reports not under {reports / 'files'} (not pairs)", no_report))
    if no_text:
        problems.append(summarize("studies without a FINDINGS or IMPRESSION report (not pairs)", no_text))
    if not items:
        raise DataError(f"{images / 'files'}: none of the {len(split_rows):,} MIMIC-CXR-JPG images found; pass --images")
    return Dataset("mimic-cxr", items, sorted({l for it in items for l in it.labels}), problems)


def _table(root: Path, kind: str) -> Path:
    for name in (f"{PREFIX}-{kind}.csv.gz", f"{PREFIX}-{kind}.csv"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: {PREFIX}-{kind}.csv[.gz] not found (MIMIC-CXR-JPG layout); pass --root")


def _chexpert(root: Path) -> dict[tuple[str, str], tuple[str, ...]]:
    path = _table(root, "chexpert")
    rows = read_rows(path)
    require_columns(path, rows, ("subject_id", "study_id", *CHEXPERT))
    return {
        (r["subject_id"].strip(), r["study_id"].strip()): tuple(f"chexpert:{n}" for n in CHEXPERT if _positive(r[n]))
        for r in rows
    }


def _positive(value: str) -> bool:
    try:
        return float(value) == 1.0
    except ValueError:
        return False


def _report(path: Path, problems: list[str]) -> tuple[str, dict[str, str]]:
    """Report text (findings + impression) and its sections; the text is "" when it has neither."""
    text, valid = decode(path.read_bytes())
    if not valid:
        problems.append(f"{path}: report is not valid UTF-8 (bad bytes replaced)")
    sections = parse_sections(text)
    return "\n".join(sections[s] for s in ("findings", "impression") if s in sections), sections


def parse_sections(text: str) -> dict[str, str]:
    """``{"findings": ..., "impression": ..., ...}`` from a report's ``HEADING:`` lines, whitespace collapsed."""
    headings = list(HEADING.finditer(text))
    sections = {}
    for heading, following in zip(headings, headings[1:] + [None]):
        body = " ".join(text[heading.end(): following.start() if following else len(text)].split())
        if body:
            sections[heading.group(1).strip().lower()] = body
    return sections
