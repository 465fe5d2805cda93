"""Indiana University chest X-rays (OpenI), read from the official file layout.

Reports: ``<root>/NLMCXR_reports.tgz`` (read in place) or an extracted ``<root>/ecgen-radiology/``.
Images: the OpenI PNGs, ``<parentImage id>.png``, in ``cfg.images`` or else ``<root>/images`` or
``<root>/NLMCXR_png``. Views: ``View Position`` of ``<root>/nlmcxr_dicom_metadata.csv[.gz]`` when present.

One item per image found on disk: id = OpenI image id, report = findings + impression, sections
findings / impression / indication / comparison, patient = report uid (``CXR1``), labels
``mesh:<MeSH major heading>`` (the heading before any ``/`` qualifier; ``mesh:normal``).
Split: seeded hash of the report uid.

A report none of whose images is on disk (or that references none) becomes one report-only item
(id = uid, no image_paths), so every report stays countable; it is not a pair, and
``open_dataset`` leaves it out unless asked for everything. Referenced images missing from an
existing folder, a missing image folder, unreadable XML and reports without findings or
impression are reported in ``problems``.
"""
from __future__ import annotations

import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from medhash.services.data.item import Dataset, Item
from medhash.services.data.splits import patient_split
from medhash.services.data.text import read_rows, summarize
from medhash.services.errors import DataError

REPORTS_TGZ = "NLMCXR_reports.tgz"
REPORTS_DIR = "ecgen-radiology"
SECTIONS = ("findings", "impression", "indication", "comparison")


def read_iu_xray(root: Path, images: Path | None, seed: int) -> Dataset:
    problems: list[str] = []
    image_dir = _image_dir(root, images)
    on_disk = set(os.listdir(image_dir)) if image_dir else set()
    if image_dir is None:
        looked = [str(images)] if images else [str(root / "images"), str(root / "NLMCXR_png")]
        problems.append(
            f"no image folder (looked in {', '.join(looked)}): no image-report pairs, every report is "
            "report-only; pass --images DIR with the OpenI PNGs (NLMCXR_png.tgz, `medhash data download iu-xray`)"
        )
    views = _views(root)
    items, missing, empty, seen_ids = [], [], [], set()
    for name, data in _report_files(root):
        try:
            report = ET.fromstring(data)
        except ET.ParseError as exc:
            problems.append(f"{name}: unreadable report XML or not UTF-8 ({exc}); report skipped")
            continue
        uid_node = report.find("uId")
        uid = uid_node.get("id") if uid_node is not None else ""
        if not uid or uid in seen_ids:
            problems.append(f"{name}: {'no' if not uid else 'duplicate'} report uid {uid!r}; report skipped")
            continue
        seen_ids.add(uid)
        sections = {
            node.get("Label", "").lower(): " ".join((node.text or "").split())
            for node in report.iter("AbstractText")
            if node.get("Label", "").lower() in SECTIONS and (node.text or "").strip()
        }
        text = "\n".join(sections[s] for s in ("findings", "impression") if s in sections)
        if not text:
            empty.append(uid)
        labels = tuple(sorted({
            f"mesh:{node.text.split('/')[0].strip()}" for node in report.findall("MeSH/major") if (node.text or "").strip()
        }))
        split = patient_split(uid, seed)
        image_ids = [node.get("id") for node in report.findall("parentImage") if node.get("id")]
        present = [i for i in image_ids if f"{i}.png" in on_disk]
        if image_dir:
            missing += [i for i in image_ids if f"{i}.png" not in on_disk]
        for image_id in present:
            items.append(Item(image_id, (image_dir / f"{image_id}.png",), text, uid, labels, split, views.get(image_id, ""), sections))
        if not present:
            items.append(Item(uid, (), text, uid, labels, split, "", sections))
    if not seen_ids:
        raise DataError(f"{root}: no IU X-ray reports found in {REPORTS_TGZ} or {REPORTS_DIR}/")
    if missing:
        problems.append(summarize(f"referenced images not in {image_dir}", missing))
    if empty:
        problems.append(summarize("reports without findings or impression (no text, not pairs)", empty))
    return Dataset("iu-xray", items, sorted({l for it in items for l in it.labels}), problems)


def _image_dir(root: Path, images: Path | None) -> Path | None:
    candidates = [images] if images else [root / "images", root / "NLMCXR_png"]
    return next((c for c in candidates if c.is_dir()), None)


def _report_files(root: Path) -> Iterator[tuple[str, bytes]]:
    """(name, XML bytes) of every report, in report-number order."""
    folder, bundle = root / REPORTS_DIR, root / REPORTS_TGZ
    if folder.is_dir():
        for path in sorted(folder.glob("*.xml"), key=_number):
            yield str(path), path.read_bytes()
    elif bundle.is_file():
        try:
            with tarfile.open(bundle) as tar:  # read in archive order: seeking back in a .tgz is slow
                files = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile() and m.name.endswith(".xml")]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{bundle}: unreadable report bundle ({exc})") from None
        for name, data in sorted(files, key=lambda f: _number(Path(f[0]))):
            yield f"{bundle.name}:{name}", data
    else:
        raise DataError(
            f"{root}: no IU X-ray reports ({REPORTS_TGZ} or {REPORTS_DIR}/); "
            "fetch them with `medhash data download iu-xray --dest DIR` or pass --root"
        )


def _number(path: Path) -> tuple[int, str]:
    match = re.fullmatch(r"\d+", path.stem)
    return (int(path.stem) if match else 10**9, path.stem)


def _views(root: Path) -> dict[str, str]:
    for name in ("nlmcxr_dicom_metadata.csv.gz", "nlmcxr_dicom_metadata.csv"):
        if (root / name).is_file():
            rows = read_rows(root / name)
            return {r["imageid"]: (r.get("View Position") or "").strip() for r in rows if "imageid" in r}
    return {}
