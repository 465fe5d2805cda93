"""`medhash train`: features from the cache, a Ray Train TorchTrainer, and a run directory."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from medhash.services.config import MedhashConfig
from medhash.services.errors import ConfigError
from medhash.services.features.featureset import FeatureSet, build_featureset
from medhash.services.methods import schedule
from medhash.training.loop import STATE_FILE, train_loop
from medhash.training.plots import plot_history
from medhash.services.run_dir import RunDir

log = logging.getLogger(__name__)


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one on this machine's cores."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)


def train(cfg: MedhashConfig, out: Path, features: FeatureSet | None = None) -> RunDir:
    """Train ``cfg.method`` as ``cfg`` says and write the run directory ``out`` (resuming an interrupted run)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run = RunDir(out)
    if run.is_complete():
        raise ConfigError(f"{out} already holds a finished run; choose another --out")
    if not schedule(cfg):
        raise ConfigError(f"train: the {cfg.method} schedule of this config has no epochs, nothing to train")
    started = time.time()
    features = features or build_featureset(cfg)
    for split in ("train", "dev"):
        if not len(features.rows(split)):
            raise ConfigError(f"{features.dataset}: the {split} split is empty; model selection needs train and dev")

    init_ray()
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "features": features},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(run.ray_storage.resolve()),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        saved = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
    state = saved["state"]
    run.write(
        cfg,
        state.best_model or saved["model"],
        features.label_names,
        state.history,
        {
            "dataset": features.dataset,
            "items": {s: int(len(features.rows(s))) for s in ("train", "dev", "query")},
            "image_dim": int(features.image.shape[1]),
            "text_dim": int(features.text.shape[1]),
            "selected_epoch": state.best_epoch,
            "resumed_at_epochs": state.resumed_at,
            "dev_map": state.best_score,
            "workers": cfg.train.workers,
            "use_gpu": bool(use_gpu),
            "wall_time_s": round(time.time() - started, 1),
        },
    )
    plot_history(state.history, run.path / "loss.png")
    log.info("run directory written: %s (selected epoch %d, dev MAP %.3f)", out, state.best_epoch, state.best_score)
    return run
