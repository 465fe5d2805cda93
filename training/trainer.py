"""`medhash train`: features from the cache, a Ray Train TorchTrainer, and a run directory."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from medhash.services import registry
from medhash.services.config import MedhashConfig, override
from medhash.services.data import dataset_root, open_dataset
from medhash.services.errors import ConfigError, DataError
from medhash.services.features.featureset import FeatureSet, build_featureset, supervised_by_findings
from medhash.services.methods import schedule
from medhash.training.loop import STATE_FILE, train_loop
from medhash.training.plots import plot_history
from medhash.services.run_dir import RunDir

log = logging.getLogger(__name__)

# Each ray.train.report waits until the Train controller next polls its workers, every 2 s by default,
# so a run of short epochs mostly waits. Polling every 0.2 s took the README's train step from 94.6 s to
# 73.3 s (docs/benchmarks.md, "Ray Train: how often the controller polls its workers").
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one on this machine's cores.

    A local cluster inherits ``LOCAL_RAY_ENV`` (unless the environment sets those variables).

    The local cluster runs Ray's dashboard process, bound to 127.0.0.1 only: it serves the Ray State
    API, and Ray Train v2 needs that API. Each run starts a detached ``PlacementGroupCleaner`` actor
    that asks the State API every second whether the train controller is still alive (to free the
    workers' placement group if the controller dies). Without the dashboard every query fails and
    the actor logs "Failed to query Ray Train Controller actor state" once a second for the whole
    run; Ray has no setting that turns the cleaner off. The dashboard's packages come with
    ``ray[serve]``. (Joining an existing cluster, these arguments are ignored: that cluster's head
    decides.)
    """
    import ray

    if not ray.is_initialized():
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(
            address=os.environ.get("RAY_ADDRESS"), include_dashboard=True, dashboard_host="127.0.0.1",
            log_to_driver=True,
        )


def with_resolved_data(cfg: MedhashConfig) -> MedhashConfig:
    """``cfg`` with the dataset folder training reads (``data.root``, or ``$MEDHASH_DATA/<folder>``)
    and the other data paths it names made absolute, so the run reopens its data from any directory
    without MEDHASH_DATA; DataError when the folder does not exist."""
    paths = {"data.root": dataset_root(cfg.data).resolve()}
    for name in ("images", "reports", "split_file"):
        if getattr(cfg.data, name) is not None:
            paths[f"data.{name}"] = Path(getattr(cfg.data, name)).expanduser().resolve()
    return override(cfg, paths)


def config_differences(stored: MedhashConfig, requested: MedhashConfig) -> list[str]:
    """The dotted fields where two configurations differ, ``"train.epochs (run: 8, requested: 9)"``;
    the parameters of every method either names are compared with their defaults filled in."""
    methods = sorted({stored.method, requested.method, *stored.method_params, *requested.method_params})
    old, new = _flat_config(stored, methods), _flat_config(requested, methods)
    return [
        f"{key} (run: {old.get(key)!r}, requested: {new.get(key)!r})"
        for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)
    ]


def _flat_config(cfg: MedhashConfig, methods: list[str]) -> dict:
    """``cfg`` as ``{"train.epochs": 8, "method_params.lsch.alpha": 0.5, ...}``."""
    raw = cfg.model_dump(mode="json")
    raw["method_params"] = {
        name: registry.method_class(name).Params.model_validate(cfg.method_params.get(name, {})).model_dump(mode="json")
        for name in methods
    }
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            flat[prefix] = value

    walk("", raw)
    return flat


def finished_run(run: RunDir, cfg: MedhashConfig) -> RunDir:
    """The finished run in ``run`` if it was trained with ``cfg``; ConfigError naming what differs otherwise."""
    stored = run.config()
    try:
        stored = with_resolved_data(stored)  # a run written before roots were stored: read through MEDHASH_DATA
    except DataError:
        pass  # its data moved: the roots differ and are named below
    differences = config_differences(stored, cfg)
    if differences:
        raise ConfigError(
            f"{run.path} already holds a finished run of another configuration (it differs in "
            + "; ".join(differences) + f"); choose another --out, or delete {run.path} to train it again"
        )
    log.info("%s already holds a finished run of this configuration: reusing it, nothing to train", run.path)
    return run


def train(cfg: MedhashConfig, out: Path, features: FeatureSet | None = None) -> RunDir:
    """Train ``cfg.method`` as ``cfg`` says and write the run directory ``out`` (resuming an interrupted run).

    A finished run in ``out`` trained with the same configuration is returned as it is; one trained
    with another configuration is refused. The run's config.yaml holds the absolute data paths read.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = with_resolved_data(cfg)
    run = RunDir(out)
    if run.is_complete():
        return finished_run(run, cfg)
    if not schedule(cfg):
        raise ConfigError(f"train: the {cfg.method} schedule of this config has no epochs, nothing to train")
    started = time.time()
    features = features or build_featureset(cfg)
    if cfg.train.supervision == "findings":
        features = supervised_by_findings(features, open_dataset(cfg.data), cfg.train.findings_categories,
                                          cfg.train.findings_neighbours)
    for split in ("train", "dev"):
        if not len(features.rows(split)):
            raise ConfigError(f"{features.dataset}: the {split} split is empty; model selection needs train and dev")

    init_ray()
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "features": features},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.train.cpus_per_worker},
            placement_strategy=cfg.train.placement,
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
            "worker_nodes": state.worker_nodes,
            "dev_map": state.best_score,
            "workers": cfg.train.workers,
            "use_gpu": bool(use_gpu),
            "wall_time_s": round(time.time() - started, 1),
        },
    )
    plot_history(state.history, run.path / "loss.png")
    log.info("run directory written: %s (selected epoch %d, dev MAP %.3f)", out, state.best_epoch, state.best_score)
    return run
