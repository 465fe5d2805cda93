"""`medhash bench quality`: every method through the Ray Train entry point on tiny real data, and its tables."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from medhash.benchmarks.quality import DEFAULT_METHODS, compare, tables
from medhash.services.registry import method_names
from medhash.services.run_dir import RunDir

from conftest import start_local_ray

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def fake_results(value: float) -> dict:
    by_protocol = {p: {d: {"map@all": value, "recall@10": value / 2} for d in ("i2t", "t2i")} for p in ("labels", "pair")}
    return {"float": by_protocol, "bits": {"32": by_protocol, "64": by_protocol}}


def test_tables_report_mean_std_gain_and_wall_time():
    rows = [("lsch", 0, fake_results(0.6), 10.0), ("lsch", 1, fake_results(0.7), 12.0),
            ("dcmh", 0, fake_results(0.5), 3.0), ("dcmh", 1, fake_results(0.5), 5.0),
            ("float-dual", 0, fake_results(0.9), 1.0), ("float-dual", 1, fake_results(0.9), 1.0)]
    report = tables(rows, (32, 64), ["lsch", "dcmh", "float-dual"])
    assert "| lsch | 0.650 +- 0.071 | 0.650 +- 0.071 |" in report
    assert "| float-dual (float, cosine) | 0.900 +- 0.000" in report
    assert "I2T 32: +30.0% vs dcmh" in report  # the float upper bound is not a hashing baseline
    assert "pair protocol: recall@10" in report and "| dcmh | 0.250 +- 0.000" in report
    assert "lsch 11 s, dcmh 4 s, float-dual 1 s" in report


def test_a_gain_inside_the_seed_spread_is_reported_as_no_difference():
    rows = [("lsch", 0, fake_results(0.60), 1.0), ("lsch", 1, fake_results(0.70), 1.0),
            ("dcmh", 0, fake_results(0.62), 1.0), ("dcmh", 1, fake_results(0.64), 1.0)]
    report = tables(rows, (32,), ["lsch", "dcmh"])
    assert "I2T 32: +3.2% vs dcmh (within the seed spread: no difference)" in report


def test_every_method_is_registered_and_compared_by_default():
    assert set(DEFAULT_METHODS) == set(method_names())


def swapped_split_file(config: Path, path: Path) -> Path:
    """The dataset's official split with dev and query swapped, as a split file."""
    from medhash.services.config import load_config
    from medhash.services.data import open_dataset

    swap = {"dev": "query", "query": "dev"}
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "split"])
        writer.writerows((item.id, swap.get(item.split, item.split)) for item in open_dataset(load_config(config).data).items)
    return path


@pytest.mark.real
def test_every_method_trains_through_ray_train_on_tiny_data_and_beats_random_codes(shared_data, tmp_path):
    import ray

    raw = yaml.safe_load((CONFIGS / "medpix2-baselines-tiny.yaml").read_text())
    raw["data"]["root"] = str(shared_data / "medpix2")
    raw["train"]["limit_items"] = 60  # CI's time
    raw["train"]["epochs"] = 8
    (tmp_path / "baselines.yaml").write_text(yaml.safe_dump(raw))
    split_file = swapped_split_file(tmp_path / "baselines.yaml", tmp_path / "split.csv")  # an evaluator's own split
    methods = [m for m in DEFAULT_METHODS if m != "lsch"]  # LSCH's own Ray Train tests are in test_training.py
    start_local_ray(num_cpus=2, include_dashboard=False)
    try:
        report = compare(methods, (16, 32), (0,), {"lsch": None, "baselines": tmp_path / "baselines.yaml"},
                         tmp_path / "q", split_file=split_file)
    finally:
        ray.shutdown()
    assert RunDir(tmp_path / "q" / "dcmh" / "seed0").config().data.split_file == split_file
    with (tmp_path / "q" / "quality.csv").open() as file:
        rows = [r for r in csv.DictReader(file) if r["protocol"] == "labels" and r["metric"] == "map@all"]
    assert (tmp_path / "q" / "map_vs_bits.png").stat().st_size > 0 and "### labels protocol" in report
    scores = {}
    for method in methods:
        codes = "float" if method == "float-dual" else "32"  # the upper bound is its float embeddings
        scores[method] = np.mean([float(r["value"]) for r in rows if r["method"] == method and r["codes"] == codes])
    results = json.loads((tmp_path / "q" / "dcmh" / "seed0" / "eval-query" / "results.json").read_text())
    random = results["references"]["labels"]["random"]
    losers = {m: round(v, 3) for m, v in scores.items() if v <= random + 0.08}
    assert not losers, f"labels MAP@all not clearly above random codes ({random:.3f}): {losers}; all: {scores}"
