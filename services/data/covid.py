"""COVID-19 chest X-ray collection (Cohen et al.): X-rays with clinical notes, split by patient.

Layout: ``metadata.csv`` + ``images/`` (``filename_256`` names the file; the original repository's
``filename`` column is used when ``filename_256`` is absent).

One item per image file: rows that name the same file are merged (in the June 2020 fork, 5 images
have two rows, because patients 339 and 340 repeat patients 285 and 287), and patient ids that
share an image are taken to be one patient (the first seen), so the split cannot separate them.
Item: id = file stem, report = clinical notes (an item without notes is kept, image only, and
counted in ``problems``), patient = patientid, view, labels ``finding:<value>`` from the
comma-separated ``finding``. Split: seeded hash of the patient (splits.patient_split).
"""
from __future__ import annotations

from pathlib import Path

from medhash.services.data.item import Dataset, Item
from medhash.services.data.splits import patient_split
from medhash.services.data.text import clean, read_rows, require_columns, summarize
from medhash.services.errors import DataError


def read_covid(root: Path, seed: int) -> Dataset:
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise DataError(f"{metadata}: not found (COVID-CXR needs metadata.csv and images/); pass --root")
    rows = read_rows(metadata)
    require_columns(metadata, rows, ("patientid", "finding", "view", "clinical_notes"))
    column = "filename_256" if "filename_256" in rows[0] else "filename"
    by_file: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_file.setdefault(row[column].strip(), []).append(row)
    same_patient = _patient_groups(by_file.values())

    items, problems, no_image, no_text, merged = [], [], [], [], []
    for filename, file_rows in by_file.items():
        item_id = Path(filename).stem
        if len(file_rows) > 1:
            merged.append(f"{item_id} (patients {', '.join(r['patientid'] for r in file_rows)})")
        row = file_rows[0]
        notes, valid = clean(row["clinical_notes"])
        if not valid:
            problems.append(f"{item_id}: clinical notes are not valid UTF-8 (bad bytes replaced)")
        image = root / "images" / filename
        if not image.is_file():
            no_image.append(item_id)
        if not notes:
            no_text.append(item_id)
        patient = same_patient[row["patientid"].strip()]
        labels = {f"finding:{f.strip()}" for r in file_rows for f in r["finding"].split(",") if f.strip()}
        items.append(Item(
            id=item_id,
            image_paths=(image,) if image.is_file() else (),
            report=notes,
            patient_id=patient,
            labels=tuple(sorted(labels)),
            split=patient_split(patient, seed),
            view=row["view"].strip(),
            sections={"clinical_notes": notes} if notes else {},
        ))
    if merged:
        problems.append(summarize("images with several metadata rows, merged into one item", merged))
    if no_image:
        problems.append(summarize(f"images missing under {root / 'images'}", no_image))
    if no_text:
        problems.append(summarize("images without clinical notes (image only, not pairs)", no_text))
    return Dataset("covid-cxr", items, sorted({l for it in items for l in it.labels}), problems)


def _patient_groups(rows_per_file) -> dict[str, str]:
    """Each patient id -> the first id of the group of ids linked by a shared image."""
    parent: dict[str, str] = {}

    def root_of(pid: str) -> str:
        while parent.setdefault(pid, pid) != pid:
            pid = parent[pid]
        return pid

    for file_rows in rows_per_file:
        first = root_of(file_rows[0]["patientid"].strip())
        for row in file_rows[1:]:
            other = root_of(row["patientid"].strip())
            if other != first:
                parent[other] = first
    return {pid: root_of(pid) for pid in list(parent)}
