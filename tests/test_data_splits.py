"""The patient-level hash split and split files."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from medhash.services.data.item import Dataset, Item
from medhash.services.data.splits import apply_split_file, mixed_patients, patient_split, read_split_file
from medhash.services.errors import DataError


def test_patient_split_is_deterministic_and_about_70_10_20():
    patients = [f"p{i}" for i in range(20_000)]
    first = [patient_split(p, seed=0) for p in patients]
    assert first == [patient_split(p, seed=0) for p in patients]
    shares = {s: n / len(patients) for s, n in Counter(first).items()}
    assert abs(shares["train"] - 0.7) < 0.02 and abs(shares["dev"] - 0.1) < 0.02 and abs(shares["query"] - 0.2) < 0.02
    other_seed = [patient_split(p, seed=1) for p in patients]
    assert sum(a != b for a, b in zip(first, other_seed)) > 5_000


def _dataset(*patients: str) -> Dataset:
    items = [Item(f"i{n}", (), "text", p, ("label:x",), "train") for n, p in enumerate(patients)]
    return Dataset("toy", items, ["label:x"])


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "split.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_split_file_applies(tmp_path):
    data = apply_split_file(_dataset("a", "b", "c"), _write(tmp_path, "id,split\ni0,train\ni1,dev\ni2,query\n"))
    assert [it.split for it in data.items] == ["train", "dev", "query"]
    assert data.problems == []


def test_split_file_reports_patients_in_two_splits(tmp_path):
    data = apply_split_file(_dataset("a", "a"), _write(tmp_path, "id,split\ni0,train\ni1,query\n"))
    assert mixed_patients(data.items) == ["a"]
    assert "patients in more than one split (first: a)" in data.problems[0]


@pytest.mark.parametrize(
    "text, message",
    [
        ("id,split\ni0,train\ni1,test\ni2,val\n", r"2 rows with a split other than train/dev/query \(first: i1='test', i2='val'\)"),
        ("name,fold\ni0,train\n", "expected a CSV with header 'id,split'"),
        ("id,split\ni0,train\ni0,dev\n", "ids listed twice"),
    ],
)
def test_bad_split_files(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        read_split_file(_write(tmp_path, text))


def test_split_file_ids_must_match(tmp_path):
    with pytest.raises(DataError, match=r"1 ids not in toy \(first: zz\)"):
        apply_split_file(_dataset("a", "b"), _write(tmp_path, "id,split\ni0,train\ni1,dev\nzz,dev\n"))
    with pytest.raises(DataError, match=r"1 toy ids missing from the file \(first: i1\)"):
        apply_split_file(_dataset("a", "b"), _write(tmp_path, "id,split\ni0,train\n"))
    with pytest.raises(DataError, match="cannot read"):
        read_split_file(tmp_path / "absent.csv")
