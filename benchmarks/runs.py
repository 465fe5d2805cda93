"""Train-and-evaluate one configuration into a run folder, skipping what an earlier (interrupted) study finished."""
from __future__ import annotations

import json
from pathlib import Path

from medhash.services.config import MedhashConfig
from medhash.services.features.featureset import FeatureSet, build_featureset
from medhash.services.run_dir import RunDir
from medhash.services.evaluation.run import evaluate_run
from medhash.training.trainer import train


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def trained_results(
    cfg: MedhashConfig, run_path: Path, on: str = "query", features: FeatureSet | None = None
) -> tuple[dict, float]:
    """(results.json of the run evaluated on ``on``, training wall seconds); trains and evaluates if needed."""
    eval_path = run_path / f"eval-{on}"
    if not RunDir(run_path).is_complete():
        train(cfg, run_path, features or build_featureset(cfg, progress=False))
    results_file = eval_path / "results.json"
    results = (
        json.loads(results_file.read_text()) if results_file.is_file()
        else evaluate_run(run_path, eval_path, on=on, features=features)
    )
    return results, RunDir(run_path).meta()["wall_time_s"]
