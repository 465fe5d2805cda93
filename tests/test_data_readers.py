"""Each reader on a small fixture in the official layout of its source, and open_dataset's rules."""
from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from medhash.services.config import DataConfig
from medhash.services.data import dataset_root, open_dataset
from medhash.services.data.mimic import parse_sections
from medhash.services.errors import DataError


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path)
    return path


def write_csv(path: Path, rows: list[dict], encoding_errors: dict[int, bytes] | None = None) -> Path:
    """A CSV of ``rows``; ``encoding_errors`` swaps the text ``@BAD@`` of row i for raw bytes."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8").replace(b"@BAD@", b"caf\xe9 \xff")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# --- MedPix -------------------------------------------------------------------------------------------


def medpix_row(image: str, case: str, split: str, caption: str = "Axial CT shows a mass.") -> dict:
    return {
        "image_file": f"images/{image}.png", "caption": caption, "case_title": "t", "case_history": "History.",
        "case_findings": "Findings.", "case_diagnosis": "Dx", "differential": "DDx", "topic_category": "Vascular",
        "case_id": case, "plane": "Axial", "location_category": "Head", "split": split,
    }


def test_medpix_pairs_csv(tmp_path):
    rows = [
        medpix_row("MPX1_synpic1", "MPX1", "train_1"),
        medpix_row("MPX1_synpic2", "MPX1", "train_2", caption="@BAD@"),
        medpix_row("MPX2_synpic3", "MPX2", "dev", caption="  "),
        medpix_row("MPX3_synpic4", "MPX3", "test"),
    ]
    write_csv(tmp_path / "pairs.csv", rows)
    for row in rows[:3]:
        png(tmp_path / row["image_file"])
    everything = open_dataset(DataConfig(dataset="medpix2", root=tmp_path), pairs_only=False)
    first = everything.items[0]
    assert first.id == "MPX1_synpic1" and first.patient_id == "MPX1" and first.view == "Axial"
    assert first.labels == ("location:Head", "topic:Vascular")
    assert set(first.sections) == {"caption", "history", "findings", "diagnosis", "differential"}
    assert [it.split for it in everything.items] == ["train", "train", "dev", "query"]
    assert everything.items[1].report == "caf\ufffd \ufffd"
    problems = "\n".join(everything.problems)
    assert "MPX1_synpic2: caption is not valid UTF-8" in problems
    assert "1 images missing" in problems and "MPX3_synpic4" in problems
    assert "1 items with an empty caption (first: MPX2_synpic3)" in problems
    pairs = open_dataset(DataConfig(dataset="medpix2", root=tmp_path))
    assert [it.id for it in pairs.items] == ["MPX1_synpic1", "MPX1_synpic2"]
    assert "2 items without an image or report text left out" in pairs.problems[-1]


def test_medpix_official_jsonl_layout(tmp_path):
    folder = tmp_path / "MedPix-2-0" / "splitted_dataset"
    folder.mkdir(parents=True)
    for n, split in enumerate(("train_1", "train_2", "dev", "test")):
        case = {"U_id": f"MPX{n}", "Case": {"History": "h", "Findings": "f", "Case Diagnosis": "d"}, "Topic": {"Category": "Trauma"}}
        description = {"U_id": f"MPX{n}", "image": f"MPX{n}_synpic{n}", "Location Category": "Thorax",
                       "Description": {"Caption": f"caption {n}", "Plane": "Coronal"}}
        (folder / f"data_{split}.jsonl").write_text(json.dumps(case) + "\n")
        (folder / f"descriptions_{split}.jsonl").write_text(json.dumps(description) + "\n")
        png(tmp_path / "MedPix-2-0" / "images" / f"MPX{n}_synpic{n}.png")
    data = open_dataset(DataConfig(dataset="medpix2", root=tmp_path))
    assert [(it.id, it.split, it.report) for it in data.items] == [
        ("MPX0_synpic0", "train", "caption 0"), ("MPX1_synpic1", "train", "caption 1"),
        ("MPX2_synpic2", "dev", "caption 2"), ("MPX3_synpic3", "query", "caption 3"),
    ]
    assert data.label_names == ["location:Thorax", "topic:Trauma"] and data.items[0].sections["diagnosis"] == "d"


# --- COVID --------------------------------------------------------------------------------------------


def test_covid_merges_duplicate_rows_and_patients(tmp_path):
    def row(pid, finding, filename, notes="Bilateral opacities."):
        return {"patientid": pid, "finding": finding, "view": "PA", "clinical_notes": notes, "filename_256": filename}

    write_csv(tmp_path / "metadata.csv", [
        row("1", "COVID-19, ARDS", "a.png"),
        row("1", "COVID-19", "b.png", notes=""),
        row("9", "COVID-19", "a.png"),  # the same image again under another patient id
        row("9", "Pneumonia", "c.png", notes="@BAD@"),
    ])
    for name in "abc":
        png(tmp_path / "images" / f"{name}.png")
    data = open_dataset(DataConfig(dataset="covid-cxr", root=tmp_path), pairs_only=False)
    assert [it.id for it in data.items] == ["a", "b", "c"]
    assert {it.patient_id for it in data.items} == {"1"}  # 9 shares an image with 1
    assert len({it.split for it in data.items}) == 1
    assert data.items[0].labels == ("finding:ARDS", "finding:COVID-19")
    problems = "\n".join(data.problems)
    assert "1 images with several metadata rows, merged into one item (first: a (patients 1, 9))" in problems
    assert "1 images without clinical notes" in problems and "c: clinical notes are not valid UTF-8" in problems
    assert [it.id for it in open_dataset(DataConfig(dataset="covid-cxr", root=tmp_path)).items] == ["a", "c"]


# --- IU X-ray -----------------------------------------------------------------------------------------


def iu_report(uid: str, images: list[str], findings="Heart size normal.", impression="No acute disease.", mesh=("normal",)) -> str:
    abstract = "".join(
        f'<AbstractText Label="{label}">{text}</AbstractText>'
        for label, text in (("COMPARISON", "None."), ("INDICATION", "Cough"), ("FINDINGS", findings), ("IMPRESSION", impression))
        if text
    )
    terms = "".join(f"<major>{m}</major>" for m in mesh)
    parents = "".join(f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>' for i in images)
    return (f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="{uid}"/><MedlineCitation><Article><Abstract>'
            f"{abstract}</Abstract></Article></MedlineCitation><MeSH>{terms}</MeSH>{parents}</eCitation>")


def build_iu(root: Path, as_tgz: bool) -> None:
    reports = {
        "1.xml": iu_report("CXR1", ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
        "2.xml": iu_report("CXR2", ["CXR2_IM-0652-1001"], mesh=("Opacity/lung/base/left/mild", "Cardiomegaly/mild", "Opacity/lung")),
        "3.xml": iu_report("CXR3", ["CXR3_IM-1384-1001"], findings="", impression=""),
        "4.xml": iu_report("CXR4", []),
    }
    root.mkdir(parents=True, exist_ok=True)
    if as_tgz:
        with tarfile.open(root / "NLMCXR_reports.tgz", "w:gz") as tar:
            for name, text in reports.items():
                data = text.encode()
                info = tarfile.TarInfo(f"ecgen-radiology/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        for name, text in reports.items():
            (root / "ecgen-radiology").mkdir(exist_ok=True)
            (root / "ecgen-radiology" / name).write_text(text, encoding="utf-8")
    write_csv(root / "nlmcxr_dicom_metadata.csv.gz", [
        {"imageid": "CXR1_1_IM-0001-3001", "View Position": "PA"}, {"imageid": "CXR1_1_IM-0001-4001", "View Position": "LL"},
    ])


@pytest.mark.parametrize("as_tgz", [True, False])
def test_iu_xray_with_some_images(tmp_path, as_tgz):
    build_iu(tmp_path, as_tgz)
    png(tmp_path / "NLMCXR_png" / "CXR1_1_IM-0001-3001.png")
    png(tmp_path / "NLMCXR_png" / "CXR1_1_IM-0001-4001.png")
    png(tmp_path / "NLMCXR_png" / "CXR3_IM-1384-1001.png")
    data = open_dataset(DataConfig(dataset="iu-xray", root=tmp_path), pairs_only=False)
    by_id = {it.id: it for it in data.items}
    assert list(by_id) == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2", "CXR3_IM-1384-1001", "CXR4"]
    first = by_id["CXR1_1_IM-0001-3001"]
    assert first.patient_id == "CXR1" and first.view == "PA" and by_id["CXR1_1_IM-0001-4001"].view == "LL"
    assert first.report == "Heart size normal.\nNo acute disease." and first.labels == ("mesh:normal",)
    assert set(first.sections) == {"findings", "impression", "indication", "comparison"}
    assert by_id["CXR2"].labels == ("mesh:Cardiomegaly", "mesh:Opacity") and by_id["CXR2"].image_paths == ()
    assert by_id["CXR1_1_IM-0001-3001"].split == by_id["CXR1_1_IM-0001-4001"].split
    problems = "\n".join(data.problems)
    assert "1 referenced images not in" in problems and "CXR2_IM-0652-1001" in problems
    assert "1 reports without findings or impression (no text, not pairs) (first: CXR3)" in problems
    pairs = open_dataset(DataConfig(dataset="iu-xray", root=tmp_path))
    assert [it.id for it in pairs.items] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]


def test_iu_xray_without_images_and_bad_xml(tmp_path):
    build_iu(tmp_path, as_tgz=False)
    (tmp_path / "ecgen-radiology" / "5.xml").write_bytes(iu_report("CXR5", []).encode().replace(b"normal", b"\xff\xfe"))
    data = open_dataset(DataConfig(dataset="iu-xray", root=tmp_path), pairs_only=False)
    assert [it.id for it in data.items] == ["CXR1", "CXR2", "CXR3", "CXR4"]
    assert all(it.image_paths == () for it in data.items)
    assert "no image folder" in data.problems[0] and "--images" in data.problems[0]
    assert any("5.xml: unreadable report XML or not UTF-8" in p for p in data.problems)
    with pytest.raises(DataError, match="no image-report pairs; no image folder"):
        open_dataset(DataConfig(dataset="iu-xray", root=tmp_path))
    images = png(tmp_path / "elsewhere" / "CXR2_IM-0652-1001.png").parent
    pairs = open_dataset(DataConfig(dataset="iu-xray", root=tmp_path, images=images))
    assert [it.id for it in pairs.items] == ["CXR2_IM-0652-1001"]


# --- MIMIC-CXR-JPG ------------------------------------------------------------------------------------

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.

 FINDINGS:
 
 The lungs are clear.  No pleural effusion.
 Heart size is normal.
 
 IMPRESSION:
 
 No acute cardiopulmonary process.
"""


def build_mimic(root: Path) -> None:
    rows = [("d1", "50000001", "10000032", "train"), ("d2", "50000001", "10000032", "train"),
            ("d3", "50000002", "11000011", "validate"), ("d4", "50000003", "12000012", "test"),
            ("d5", "50000004", "13000013", "train")]
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz",
              [{"dicom_id": d, "study_id": st, "subject_id": su, "split": sp} for d, st, su, sp in rows])
    labels = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
              "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]
    chexpert = []
    for _, study, subject, _ in rows[1:]:
        values = {n: "" for n in labels}
        values.update({"Edema": "1.0", "Pneumonia": "-1.0", "Cardiomegaly": "0.0"} if study == "50000001" else {"No Finding": "1.0"})
        chexpert.append({"subject_id": subject, "study_id": study, **values})
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", chexpert)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", [{"dicom_id": d, "subject_id": su, "study_id": st, "ViewPosition": "PA" if d != "d2" else "LATERAL"} for d, st, su, _ in rows])
    for dicom, study, subject, _ in rows[:4]:
        png(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    reports = root / "reports" / "files"
    (reports / "p10" / "p10000032").mkdir(parents=True)
    (reports / "p10" / "p10000032" / "s50000001.txt").write_text(REPORT)
    (reports / "p11" / "p11000011").mkdir(parents=True)
    (reports / "p11" / "p11000011" / "s50000002.txt").write_bytes(b"IMPRESSION: caf\xe9 clear.\n")


def test_mimic_official_layout(tmp_path):
    build_mimic(tmp_path)
    data = open_dataset(DataConfig(dataset="mimic-cxr", root=tmp_path, reports=tmp_path / "reports"), pairs_only=False)
    by_id = {it.id: it for it in data.items}
    assert list(by_id) == ["d1", "d2", "d3", "d4"]
    assert [by_id[d].split for d in by_id] == ["train", "train", "dev", "query"]
    d1 = by_id["d1"]
    assert d1.patient_id == "10000032" and d1.view == "PA" and by_id["d2"].view == "LATERAL"
    assert d1.labels == ("chexpert:Edema",)  # 1.0 only: -1.0 and 0.0 are not positive
    assert d1.report == "The lungs are clear. No pleural effusion. Heart size is normal.\nNo acute cardiopulmonary process."
    assert d1.sections["indication"] == "___ with cough."
    assert by_id["d3"].report == "caf\ufffd clear." and by_id["d4"].report == ""
    problems = "\n".join(data.problems)
    assert "s50000002.txt: report is not valid UTF-8" in problems
    assert "1 images in the split file not under" in problems and "(first: d5)" in problems
    assert "1 study reports not under" in problems and "s50000003" in problems
    assert [it.id for it in open_dataset(DataConfig(dataset="mimic-cxr", root=tmp_path, reports=tmp_path / "reports")).items] == ["d1", "d2", "d3"]


def test_mimic_section_parser():
    assert parse_sections("FINDINGS: a\nb\nIMPRESSION: c") == {"findings": "a b", "impression": "c"}
    assert parse_sections("no headings here") == {}


def test_mimic_missing_tables(tmp_path):
    (tmp_path / "files").mkdir()
    with pytest.raises(DataError, match="mimic-cxr-2.0.0-split.csv"):
        open_dataset(DataConfig(dataset="mimic-cxr", root=tmp_path))


# --- manifest -----------------------------------------------------------------------------------------


def test_manifest_csv_with_split(tmp_path):
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png")
    write_csv(tmp_path / "m.csv", [
        {"image": "img/a.png", "text": "Clear lungs.", "labels": "Edema; finding:COVID-19|Edema", "patient_id": "p1", "split": "train", "view": "PA"},
        {"image": "img/b.png", "text": "@BAD@", "labels": "", "patient_id": "p2", "split": "query", "view": ""},
        {"image": "img/c.png", "text": "", "labels": "x", "patient_id": "p3", "split": "dev", "view": ""},
    ])
    data = open_dataset(DataConfig(dataset="manifest", root=tmp_path / "m.csv"), pairs_only=False)
    assert [(it.id, it.split) for it in data.items] == [("a", "train"), ("b", "query"), ("c", "dev")]
    assert data.items[0].labels == ("finding:COVID-19", "label:Edema") and data.items[0].view == "PA"
    assert data.label_names == ["finding:COVID-19", "label:Edema", "label:x"]
    problems = "\n".join(data.problems)
    assert "b: text is not valid UTF-8" in problems and "1 images missing" in problems and "1 items with empty text" in problems


def test_manifest_jsonl_split_by_patient(tmp_path):
    png(tmp_path / "a.png")
    lines = [{"image": "a.png", "text": "t", "labels": ["A", "B"], "patient_id": "p1", "id": "first"},
             {"image": "a.png", "text": "u", "labels": "A", "patient_id": "p1", "id": "second"}]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    data = open_dataset(DataConfig(dataset="manifest", root=tmp_path))  # a folder holding manifest.jsonl
    assert [it.id for it in data.items] == ["first", "second"] and data.items[0].labels == ("label:A", "label:B")
    assert data.items[0].split == data.items[1].split


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"image": "a.png", "text": "t", "patient_id": "p"}], "missing column\\(s\\) labels"),
        ([{"image": "a.png", "text": "t", "labels": "", "patient_id": "p", "split": "test"}], "split is not train/dev/query"),
        ([{"image": "a.png", "text": "t", "labels": "", "patient_id": "p", "split": "train"},
          {"image": "b.png", "text": "t", "labels": "", "patient_id": "p", "split": ""}], "split column is empty on 1 rows"),
        ([{"image": "a.png", "text": "t", "labels": "", "patient_id": "p"}] * 2, "duplicate id 'a'"),
    ],
)
def test_bad_manifests(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        open_dataset(DataConfig(dataset="manifest", root=write_csv(tmp_path / "m.csv", rows)), pairs_only=False)


# --- roots and split files through open_dataset -------------------------------------------------------


def test_missing_roots_say_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDHASH_DATA", str(tmp_path))
    with pytest.raises(DataError, match=rf"data not found at {tmp_path}/iu_xray; get it with `medhash data download iu-xray"):
        dataset_root(DataConfig(dataset="iu-xray"))
    with pytest.raises(DataError, match="mimic-cxr: data not found at .*mimic-cxr-jpg; get it with or pass --root"):
        open_dataset(DataConfig(dataset="mimic-cxr"))
    with pytest.raises(DataError, match="manifest dataset needs --root"):
        open_dataset(DataConfig(dataset="manifest"))
    (tmp_path / "covid_cxr").mkdir()
    with pytest.raises(DataError, match="metadata.csv: not found"):
        open_dataset(DataConfig(dataset="covid-cxr"))
    (tmp_path / "medpix2").mkdir()
    with pytest.raises(DataError, match="no MedPix 2.0 data"):
        open_dataset(DataConfig(dataset="medpix2"))


def test_split_file_through_open_dataset(tmp_path):
    build_iu(tmp_path / "iu", as_tgz=True)
    png(tmp_path / "iu" / "images" / "CXR2_IM-0652-1001.png")
    split_file = tmp_path / "split.csv"
    split_file.write_text("id,split\nCXR2_IM-0652-1001,query\nCXR1,train\n")  # CXR1 is a left-out report-only item
    data = open_dataset(DataConfig(dataset="iu-xray", root=tmp_path / "iu", split_file=split_file))
    assert [(it.id, it.split) for it in data.items] == [("CXR2_IM-0652-1001", "query")]
    split_file.write_text("id,split\nCXR2_IM-0652-1001,query\nCXR99,train\n")
    with pytest.raises(DataError, match="ids not in iu-xray \\(first: CXR99\\)"):
        open_dataset(DataConfig(dataset="iu-xray", root=tmp_path / "iu", split_file=split_file))
