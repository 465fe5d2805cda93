"""The readers and `medhash data summary` on the real data in ../shared/data."""
from __future__ import annotations

import argparse

import pytest

from medhash.services.config import DataConfig
from medhash.services.data import open_dataset
from medhash.services.data.cli import register
from medhash.services.data.splits import mixed_patients

pytestmark = pytest.mark.real
FOLDERS = {"medpix2": "medpix2", "covid-cxr": "covid_cxr", "iu-xray": "iu_xray"}
PREFIXES = {"medpix2": ("location:", "topic:"), "covid-cxr": ("finding:",), "iu-xray": ("mesh:",)}


@pytest.fixture(scope="module")
def everything(shared_data):
    return {name: open_dataset(DataConfig(dataset=name, root=shared_data / folder), pairs_only=False) for name, folder in FOLDERS.items()}


def test_counts(everything):
    medpix, covid, iu = everything["medpix2"], everything["covid-cxr"], everything["iu-xray"]
    assert len(medpix) == 2050 and len({it.patient_id for it in medpix.items}) == 671
    assert dict(medpix.split_counts()) == {"train": 1653, "dev": 197, "query": 200}
    assert len(covid) == 570 and len({p for it in covid.items for p in it.image_paths}) == 570
    assert sum(1 for it in covid.items if it.report) == 459
    assert len(iu) == 3955 and len({it.patient_id for it in iu.items}) == 3955
    assert iu.label_names.count("mesh:normal") == 1 and len(iu.label_names) == 122
    assert sum(1 for it in iu.items if "mesh:normal" in it.labels) == 1391
    assert {it.id for it in medpix.items} >= {"MPX1009_synpic46283"}


@pytest.mark.parametrize("name", list(FOLDERS))
def test_splits_are_patient_disjoint_and_labels_prefixed(everything, name):
    dataset = everything[name]
    assert mixed_patients(dataset.items) == []
    assert set(dataset.split_counts()) == {"train", "dev", "query"}
    assert all(label.startswith(PREFIXES[name]) for label in dataset.label_names)
    assert len({it.id for it in dataset.items}) == len(dataset)
    dataset.label_matrix()  # every item label is in label_names


def test_covid_split_shares_and_seed(shared_data):
    patients = {}
    for seed in (0, 1):
        data = open_dataset(DataConfig(dataset="covid-cxr", root=shared_data / "covid_cxr", seed=seed), pairs_only=False)
        patients[seed] = {it.patient_id: it.split for it in data.items}
    shares = {s: list(patients[0].values()).count(s) / len(patients[0]) for s in ("train", "dev", "query")}
    assert 0.6 < shares["train"] < 0.8 and 0.05 < shares["dev"] < 0.16 and 0.13 < shares["query"] < 0.27
    assert patients[0] != patients[1]


def test_pairs_only_default(shared_data):
    covid = open_dataset(DataConfig(dataset="covid-cxr", root=shared_data / "covid_cxr"))
    assert len(covid) == 459 and all(it.report and it.image_paths for it in covid.items)


def _summary(capsys, *argv: str) -> str:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "summary", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_summary_command(shared_data, capsys):
    out = _summary(capsys, "--dataset", "medpix2", "--root", str(shared_data / "medpix2"))
    assert "images: 2,050\n" in out and "patients/cases: 671\n" in out and "  query      200 items" in out
    assert "      884  location:Head" in out and "labels: 75 distinct; top 20:" in out
    out = _summary(capsys, "--dataset", "covid-cxr", "--root", str(shared_data / "covid_cxr"))
    assert "images: 570\n" in out and "5 images with several metadata rows, merged" in out
    out = _summary(capsys, "--dataset", "iu-xray", "--root", str(shared_data / "iu_xray"))
    assert "reports (distinct texts per patient): 3,955\n" in out and "image-report pairs: 0\n" in out
    assert "no image folder" in out
