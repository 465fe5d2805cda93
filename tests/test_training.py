"""LSCH trained end to end through Ray Train on a real local cluster, on real MedPix features.

The fast tests use a tiny random LLM (the alignment path is the same code); the README's main
command, run as written, uses Gemma-3-270M. Recovery is tested by killing a real worker process and
by interrupting a real `medhash train` process and running it again.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ctrl_c_enabled, registered_checkpoints, start_local_ray, wait_for
from medhash.services.codes import hamming_distances, load_codes_npz, unpack_codes
from medhash.services.config import load_config
from medhash.services.errors import ConfigError
from medhash.services.evaluation.protocols import evaluate
from medhash.services.features.featureset import build_featureset
from medhash.services.methods.lsch import LSCH
from medhash.services.evaluation.metrics import label_relevance, retrieval_metrics
from medhash.services.evaluation.run import evaluate_run
from medhash.services.run_dir import RunDir
from medhash.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"


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

    start_local_ray(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1")  # Ray Train's State API queries need it
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_worker_run(shared_data, tiny_features, ray_cluster, tmp_path_factory) -> Path:
    """The tiny LSCH config trained once on one Ray Train worker (two tests read it)."""
    path = tmp_path_factory.mktemp("one-worker") / "run"
    train(tiny_config(shared_data), path, tiny_features)
    return path


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
def test_tiny_lsch_trains_on_ray_and_beats_random_codes(shared_data, tiny_features, one_worker_run, tmp_path):
    run = RunDir(one_worker_run)
    for name in ("config.yaml", "model.safetensors", "labels.json", "history.json", "loss.png", "meta.json"):
        assert (one_worker_run / name).is_file(), name
    meta = run.meta()
    assert meta["items"] == {"train": 100, "dev": 100, "query": 100}
    assert len(meta["git_commit"]) in (40, len("unknown"))
    assert run.config().data.root == (shared_data / "medpix2").resolve()  # eval / index / demo need no MEDHASH_DATA

    results = evaluate_run(one_worker_run, tmp_path / "eval", features=tiny_features)
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
    health = results["code_health"]["32"]  # the saved database codes agree with the counts
    image, text = unpack_codes(saved["db_img"], 32), unpack_codes(saved["db_txt"], 32)
    assert health["constant_image"] == int((np.ptp(image, axis=0) == 0).sum())
    assert health["modality_split"] == int((np.abs(image.mean(axis=0) - text.mean(axis=0)) > 0.5).sum())
    assert "Bits constant over the database" in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.real
def test_label_free_lsch_trains_on_mined_findings_and_beats_random_codes(shared_data, tiny_features, ray_cluster, tmp_path):
    path = tmp_path / "label-free"
    train(tiny_config(shared_data, supervision="findings", findings_neighbours=5), path, tiny_features)
    names = RunDir(path).label_names()  # what it trained on: mined findings, not one of the dataset's labels
    assert names and all(n.split(":")[0] in ("diagnosis", "finding", "anatomy") for n in names)
    assert not set(names) & set(tiny_features.label_names)
    results = evaluate_run(path, tmp_path / "eval", features=tiny_features)  # scored with the dataset's labels
    baseline = random_code_map(tiny_features, 32)
    for direction in ("i2t", "t2i"):
        assert results["bits"]["32"]["labels"][direction]["map@all"] > baseline + 0.03  # measured: +0.093 (i2t), 5 random seeds


@pytest.mark.real
def test_lsch_reading_the_reports_trains_on_ray_and_beats_random_codes(shared_data, ray_cluster, tmp_path):
    """The LLM reads each caption's own tokens (text_backbone.name: llm) instead of a sentence vector."""
    cfg = load_config(CONFIGS / "medpix2-lsch-tiny.yaml", {
        "data.root": shared_data / "medpix2", "llm.name": "tiny-random", "text_backbone.name": "llm",
        "text_backbone.max_length": 48, "method_params.lsch.text_prompt": "Report:",  # the tiny LLM's window is 64
    })
    features = build_featureset(cfg, progress=False)
    train(cfg, tmp_path / "run", features)
    results = evaluate_run(tmp_path / "run", tmp_path / "eval", features=features)
    baseline = random_code_map(features, 32)
    for direction in ("i2t", "t2i"):  # measured: +0.17 (i2t), +0.09 (t2i)
        assert results["bits"]["32"]["labels"][direction]["map@all"] > baseline + 0.05


@pytest.mark.real
def test_one_and_two_workers_reach_the_same_map(shared_data, tiny_features, one_worker_run, tmp_path):
    train(tiny_config(shared_data, workers=2), tmp_path / "run2", tiny_features)
    maps = {}
    for workers, run in ((1, one_worker_run), (2, tmp_path / "run2")):
        results = evaluate_run(run, tmp_path / f"eval{workers}", features=tiny_features)
        maps[workers] = np.mean([results["bits"]["32"]["labels"][d]["map@all"] for d in ("i2t", "t2i")])
    assert abs(maps[1] - maps[2]) < 0.06, maps


def test_a_finished_run_is_reused_for_the_same_config_and_refused_for_another(tmp_path, monkeypatch, caplog):
    """No training: a finished run directory written by hand, then `train` asked for it again."""
    import torch

    data = tmp_path / "data" / "medpix2"
    data.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("MEDHASH_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    tiny = CONFIGS / "medpix2-lsch-tiny.yaml"
    run = RunDir(tmp_path / "run")
    run.write(load_config(tiny, {"data.root": data}), {"w": torch.zeros(1)}, ["a"], [], {"dataset": "medpix2"})

    caplog.set_level("INFO", logger="medhash.training.trainer")
    for same in (load_config(tiny), load_config(tiny, {"data.root": "data/medpix2", "method_params.lsch.alpha": 0.0})):
        assert train(same, run.path).path == run.path  # the root through MEDHASH_DATA or relative; a default spelt out
    assert "reusing it" in caplog.text

    for overrides, field in [
        ({"train.epochs": 9}, "train.epochs"), ({"method_params.lsch.alpha": 1}, "method_params.lsch.alpha"),
        ({"data.root": "elsewhere"}, "data.root"), ({"codes.bits": [32]}, "codes.bits"),
    ]:
        with pytest.raises(ConfigError, match="choose another --out") as refused:
            train(load_config(tiny, overrides), run.path)
        assert field in str(refused.value) and "train.lr" not in str(refused.value)


def readme_main_commands() -> tuple[str, str]:
    """The `medhash train ...` and `medhash eval ...` steps of the README's main command, as written there."""
    line = next(
        (row.strip() for row in (REPO / "README.md").read_text(encoding="utf-8").splitlines()
         if row.strip().startswith("pip install torch") and "medhash train" in row),
        None,
    )
    assert line, "README.md has no `pip install torch ... medhash train ...` command line"
    steps = [step.strip() for step in line.split("&&")]
    train_step = next(step for step in steps if re.search(r"(^|\s)medhash train\s", step))
    eval_step = next(step for step in steps if re.search(r"(^|\s)medhash eval\s", step))
    return train_step, eval_step


@pytest.mark.real
def test_the_readme_main_command_trains_evaluates_and_reruns(shared_data, tmp_path):
    """The README's train and eval steps verbatim (the shipped -tiny config: real Gemma-3-270M, real MedPix,
    Ray Train), from a folder laid out like the checkout (`training/`, `../shared/data`), run twice."""
    import ray

    ray.shutdown()  # the commands start their own local cluster
    train_step, eval_step = readme_main_commands()
    work = tmp_path / "work"
    work.mkdir()
    (work / "training").symlink_to(REPO / "training", target_is_directory=True)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MEDHASH_DATA", "RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"

    def run(step: str) -> tuple[str, float]:
        started = time.time()
        done = subprocess.run(step, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"`{step}` failed:\n{output[-3000:]}"
        assert "PlacementGroupCleaner" not in output, f"`{step}`: Ray's placement-group cleaner complained"
        return output, time.time() - started

    run(train_step)
    stored = yaml.safe_load((work / "runs" / "medpix2-tiny" / "config.yaml").read_text())
    assert stored["data"]["root"] == str((shared_data / "medpix2").resolve())
    run(eval_step)  # no MEDHASH_DATA: the run knows its data folder
    results = json.loads((work / "runs" / "medpix2-tiny" / "eval" / "results.json").read_text())
    # above the model-free one-list label prior (a model that learned label frequencies only) by a clear margin
    prior = results["references"]["labels"]["label_prior"]
    assert prior > results["references"]["labels"]["random"]
    for direction in ("i2t", "t2i"):
        assert results["bits"]["32"]["labels"][direction]["map@all"] > prior + 0.08, (direction, prior)

    again, seconds = run(train_step)
    assert "reusing it" in again and seconds < 90, (seconds, again[-2000:])
    run(eval_step)
    assert (work / "runs" / "medpix2-tiny" / "eval" / "results.json").is_file()


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


@pytest.mark.real
def test_a_killed_worker_is_replaced_and_training_resumes(shared_data, tiny_features, ray_cluster, tmp_path):
    cfg = tiny_config(shared_data, epochs=20)  # under 1 s each: the kill lands mid-run
    run_path = tmp_path / "run"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("run", train(cfg, run_path, tiny_features)))
    thread.start()
    wait_for(lambda: registered_checkpoints(run_path) >= 2, 300, "two registered checkpoints")
    pids = _worker_pids()
    assert pids, "no Ray Train worker process found"
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=600)
    meta = outcome["run"].meta()
    assert meta["resumed_at_epochs"], "the run did not restart from a checkpoint"
    history = json.loads((run_path / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(len(history)))  # every epoch once, in order
    assert len(history) == len(LSCH.schedule(cfg))  # every stage's epochs, none twice


@pytest.mark.real
def test_an_interrupted_run_resumes_when_started_again(shared_data, tiny_features, tmp_path):
    import ray

    ray.shutdown()  # the command starts its own local cluster
    raw = yaml.safe_load((CONFIGS / "medpix2-lsch-tiny.yaml").read_text())
    raw["data"]["root"] = str(shared_data / "medpix2")
    raw["llm"]["name"] = "tiny-random"
    raw["train"]["epochs"] = 20  # under 1 s each: the interruption lands mid-run
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "medhash.services.cli", "train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             preexec_fn=ctrl_c_enabled)
    wait_for(lambda: registered_checkpoints(tmp_path / "run") >= 2, 300, "two registered checkpoints")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) != 0
    assert not (tmp_path / "run" / "meta.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["resumed_at_epochs"] and meta["resumed_at_epochs"][0] >= 2
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == len(LSCH.schedule(load_config(tmp_path / "cfg.yaml")))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.codes.bits and cfg.train.epochs >= 1
