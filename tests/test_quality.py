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


def test_every_method_is_registered_and_compared_by_default():
    assert set(DEFAULT_METHODS) == set(method_names())


@pytest.mark.real
def test_every_method_trains_through_ray_train_on_tiny_data_and_beats_random_codes(shared_data, tmp_path):
    import ray

    raw = yaml.safe_load((CONFIGS / "medpix2-baselines.yaml").read_text())
    raw["data"]["root"] = str(shared_data / "medpix2")
    raw["train"].update(limit_items=60, batch_size=16, epochs=20)
    raw["method_params"]["msach"]["feature_epochs"] = 4
    (tmp_path / "baselines.yaml").write_text(yaml.safe_dump(raw))
    methods = [m for m in DEFAULT_METHODS if m != "lsch"]  # LSCH's own Ray Train tests are in test_training.py
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        report = compare(methods, (16, 32), (0,), {"lsch": None, "baselines": tmp_path / "baselines.yaml"}, tmp_path / "q")
    finally:
        ray.shutdown()
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
