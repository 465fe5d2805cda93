"""LSCH trained end to end through Ray Train on a real local cluster, on real MedPix features.

The fast tests use a tiny random LLM (the alignment path is the same code); the `real` test uses
Gemma-3-270M. Recovery is tested by killing a real worker process and by interrupting a real
`medhash train` process and running it again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from medhash.services.codes import hamming_distances, load_codes_npz
from medhash.services.config import load_config
from medhash.services.evaluation.protocols import evaluate
from medhash.services.features.featureset import build_featureset
from medhash.services.evaluation.metrics import label_relevance, retrieval_metrics
from medhash.services.evaluation.run import evaluate_run
from medhash.training.trainer import train

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def tiny_config(shared_data: Path, **train_overrides):
    return load_config(CONFIGS / "medpix2-lsch-tiny.yaml", {
        "data.root": shared_data / "medpix2", "llm.name": "tiny-random",
        **{f"train.{k}": v for k, v in train_overrides.items()},
    })


@pytest.fixture(scope="module")
def tiny_features(shared_data):
    return build_featureset(tiny_config(shared_data), progress=False)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def random_code_map(features, bits: int, seeds: int = 5) -> float:
    """MAP@all (labels, I2T) of random codes on the same query / database items."""
    query, db = features.rows("query"), np.flatnonzero(features.splits != "query")
    maps = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        codes = {m: np.packbits(rng.integers(0, 2, (len(features), bits)).astype(np.uint8), axis=1) for m in ("image", "text")}
        result = evaluate(
            "hamming", {m: c[query] for m, c in codes.items()}, {m: c[db] for m, c in codes.items()},
            features.labels[query], features.labels[db], features.label_names, directions=("i2t",),
        )
        maps.append(result["labels"]["i2t"]["map@all"])
    return float(np.mean(maps))


@pytest.mark.real
def test_tiny_lsch_trains_on_ray_and_beats_random_codes(shared_data, tiny_features, ray_cluster, tmp_path):
    cfg = tiny_config(shared_data)
    run = train(cfg, tmp_path / "run", tiny_features)
    for name in ("config.yaml", "model.safetensors", "labels.json", "history.json", "loss.png", "meta.json"):
        assert (tmp_path / "run" / name).is_file(), name
    meta = run.meta()
    assert meta["items"] == {"train": 100, "dev": 100, "query": 100}
    assert len(meta["git_commit"]) in (40, len("unknown"))

    results = evaluate_run(tmp_path / "run", tmp_path / "eval", features=tiny_features)
    baseline = random_code_map(tiny_features, 32)
    for direction in ("i2t", "t2i"):
        assert results["bits"]["32"]["labels"][direction]["map@all"] > baseline + 0.08
    assert set(results["bits"]["32"]) == {"labels", "topic", "pair"}
    assert results["float"]["labels"]["i2t"]["map@all"] > baseline + 0.08

    # The saved codes reproduce the published number with independent code.
    saved = load_codes_npz(tmp_path / "eval" / "codes_32.npz")
    dist = hamming_distances(saved["query_img"], saved["db_txt"])
    recomputed = retrieval_metrics(dist, label_relevance(saved["query_labels"], saved["db_labels"]))
    assert recomputed["map@all"] == pytest.approx(results["bits"]["32"]["labels"]["i2t"]["map@all"])
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["queries"] == 100


@pytest.mark.real
def test_one_and_two_workers_reach_the_same_map(shared_data, tiny_features, ray_cluster, tmp_path):
    maps = {}
    for workers in (1, 2):
        cfg = tiny_config(shared_data, workers=workers)
        train(cfg, tmp_path / f"run{workers}", tiny_features)
        results = evaluate_run(tmp_path / f"run{workers}", tmp_path / f"eval{workers}", features=tiny_features)
        maps[workers] = np.mean([results["bits"]["32"]["labels"][d]["map@all"] for d in ("i2t", "t2i")])
    assert abs(maps[1] - maps[2]) < 0.06, maps


@pytest.mark.real
def test_tiny_config_with_the_real_gemma_trains_and_beats_random_codes(shared_data, ray_cluster, tmp_path):
    """The shipped -tiny configuration as it is: real Gemma-3-270M (2 layers), real features, Ray Train."""
    cfg = load_config(CONFIGS / "medpix2-lsch-tiny.yaml", {"data.root": shared_data / "medpix2"})
    assert cfg.llm.name == "gemma-3-270m"
    features = build_featureset(cfg, progress=False)
    train(cfg, tmp_path / "run", features)
    results = evaluate_run(tmp_path / "run", tmp_path / "eval", features=features)
    baseline = random_code_map(features, 32)
    for direction in ("i2t", "t2i"):
        assert results["bits"]["32"]["labels"][direction]["map@all"] > baseline + 0.08


def _worker_pids() -> list[int]:
    """Process ids of the Ray Train workers of the cluster this test process started."""
    import psutil

    pids = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                pids.append(process.pid)
        except psutil.Error:  # it exited meanwhile
            pass
    return pids


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _registered_checkpoints(run: Path) -> int:
    """Checkpoints the Ray Train controller has registered (a restart resumes from the latest)."""
    snapshot = run / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.real
def test_a_killed_worker_is_replaced_and_training_resumes(shared_data, tiny_features, ray_cluster, tmp_path):
    cfg = tiny_config(shared_data, epochs=6)
    run_path = tmp_path / "run"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("run", train(cfg, run_path, tiny_features)))
    thread.start()
    _wait_for(lambda: _registered_checkpoints(run_path) >= 2, 300, "two registered checkpoints")
    pids = _worker_pids()
    assert pids, "no Ray Train worker process found"
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=600)
    meta = outcome["run"].meta()
    assert meta["resumed_at_epochs"], "the run did not restart from a checkpoint"
    history = json.loads((run_path / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(len(history)))  # every epoch once, in order
    assert len(history) == 3 + 1 + 6


@pytest.mark.real
def test_an_interrupted_run_resumes_when_started_again(shared_data, tiny_features, tmp_path):
    import ray

    ray.shutdown()  # the command starts its own local cluster
    raw = yaml.safe_load((CONFIGS / "medpix2-lsch-tiny.yaml").read_text())
    raw["data"]["root"] = str(shared_data / "medpix2")
    raw["llm"]["name"] = "tiny-random"
    raw["train"]["epochs"] = 8
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "medhash.services.cli", "train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: _registered_checkpoints(tmp_path / "run") >= 2, 300, "two registered checkpoints")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) != 0
    assert not (tmp_path / "run" / "meta.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["resumed_at_epochs"] and meta["resumed_at_epochs"][0] >= 2
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 3 + 1 + 8
