"""The Ray Train worker loop of every hashing method (LSCH: align, GBRBM pre-training, joint fine-tuning).

The method's model says which stage each epoch runs (``schedule``) and scores each global batch
(``batch_loss``); a closed-form method has the one stage "fit" on the whole train split. Every
worker holds the same model (same seed) and draws the same global batches; gradients are averaged
across workers after each backward pass, so 1 or N workers follow the same schedule.
Rank 0 scores each epoch on the dev split and writes the checkpoint: the latest state (to resume)
and the best state on dev (the model a run publishes). The query split is never looked at.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from medhash.services.config import MedhashConfig
from medhash.services.evaluation.protocols import evaluate
from medhash.services.features.featureset import FeatureSet
from medhash.services.methods import build_model, embed, hash_codes
from medhash.services.methods.base import FIT, Batch

STATE_FILE = "state.pt"
log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint holds besides the optimizer."""

    epoch: int = 0
    best_score: float = -1.0
    best_epoch: int = -1
    best_model: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)  # epochs a restart (failure, re-run) resumed from
    worker_nodes: list[list[str]] = field(default_factory=list)  # Ray node id of each rank, per (re)start


def train_loop(config: dict) -> None:
    """Ray Train entry point; ``config`` holds the validated config dict and the FeatureSet."""
    cfg = MedhashConfig.model_validate(config["cfg"])
    data: FeatureSet = config["features"]
    _quiet_ray_train()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)

    device = ray.train.torch.get_device()  # a GPU when the worker has one
    model = build_model(cfg, data.image.shape[1], data.text.shape[1], data.labels.shape[1]).to(device)
    parameters = model.trainable_parameters()
    optimizer = (
        torch.optim.AdamW(parameters, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay) if parameters else None
    )
    state = _restore(model, optimizer)
    state.worker_nodes.append(_node_of_each_rank(world))
    stages = model.schedule(cfg)
    train_rows, dev_rows = data.rows("train"), data.rows("dev")

    for epoch in range(state.epoch, len(stages)):
        stage = stages[epoch]
        rng = np.random.default_rng(cfg.train.seed * 1000 + epoch)
        if stage == FIT:
            losses = _fit(model, data, train_rows, device)
        else:
            losses = _run_epoch(model, optimizer, data, rng.permutation(train_rows), stage, cfg, rng, rank, world)
        record = {"epoch": epoch, "stage": stage, **losses}
        if rank == 0:
            record.update(dev_scores(model, data, train_rows, dev_rows, stage, cfg))
            if stage == stages[-1] and record["dev_map"] > state.best_score:
                state.best_score, state.best_epoch = record["dev_map"], epoch
                state.best_model = {k: v.clone() for k, v in model.state_dict_trainable().items()}
        state.history.append(record)
        state.epoch = epoch + 1
        if rank == 0:
            log.info(_progress_line(record, len(stages)))
        _report(record, state, model, optimizer, rank)


def _node_of_each_rank(world: int) -> list[str]:
    """The Ray node every worker runs on, by rank (where a spread placement put them)."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not dist.is_initialized():
        return [node]
    nodes = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _run_epoch(model, optimizer, data, order, stage, cfg, rng, rank, world) -> dict[str, float]:
    """One pass over the shuffled train rows; returns the mean of each loss term.

    Every worker draws the same global batches and augmented views; the model may embed only this
    worker's share and gather the embeddings (see medhash.services.methods.base.Batch). With gradients
    averaged afterwards, N workers take exactly the step one worker would.
    """
    batch = cfg.train.batch_size
    batches = [order[i : i + batch] for i in range(0, len(order) - batch // 2, batch)] or [order]
    if cfg.train.max_steps_per_epoch:
        batches = batches[: cfg.train.max_steps_per_epoch]
    sums: dict[str, float] = {}
    device = next(iter(model.state_dict().values())).device
    for rows in batches:
        rows = rows[: len(rows) - len(rows) % world]
        text = _text_views(data, rows, cfg, rng)
        # the global batch in the order the gathered shards come back: rank 0's rows, rank 1's, ...
        shards = [np.arange(r, len(rows), world) for r in range(world)]
        rows, text = rows[np.concatenate(shards)], text[np.concatenate(shards)]
        global_batch = Batch(
            z=torch.from_numpy(data.image[rows]).to(device),
            t=torch.from_numpy(text).to(device),
            labels=torch.from_numpy(data.labels[rows].astype(np.float32)).to(device),
            local=slice(rank * len(shards[0]), (rank + 1) * len(shards[0])),
            gather=lambda local: _gather_rows(local, world),
        )
        loss, parts = model.batch_loss(stage, global_batch, cfg)
        optimizer.zero_grad()
        loss.backward()
        _average_gradients(model, world)
        optimizer.step()
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value / len(batches)
    return {f"loss_{k}": v for k, v in sums.items()}


def _fit(model, data: FeatureSet, rows: np.ndarray, device) -> dict[str, float]:
    """Closed-form training on every train row (each worker computes the same fit)."""
    model.fit(
        torch.from_numpy(data.image[rows]).to(device),
        torch.from_numpy(data.text[rows]).to(device),
        torch.from_numpy(data.labels[rows].astype(np.float32)).to(device),
    )
    return {}


class _GatherRows(torch.autograd.Function):
    """All workers' rows concatenated by rank; backward returns this worker's share of the
    gradient summed over every worker's copy of the loss (as torch.distributed.nn's all_gather)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, world: int) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.rows, ctx.rank = len(local), dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def _gather_rows(local: torch.Tensor, world: int) -> torch.Tensor:
    return local if world == 1 else _GatherRows.apply(local, world)


def _text_views(data: FeatureSet, rows: np.ndarray, cfg: MedhashConfig, rng: np.random.Generator) -> np.ndarray:
    """The report's features, or with probability ``view_prob`` one of its augmented views."""
    text = data.text[rows].copy()
    if data.views.shape[1] and cfg.augment.use_views:
        swap = rng.random(len(rows)) < cfg.train.view_prob
        picks = rng.integers(0, data.views.shape[1], len(rows))
        text[swap] = data.views[rows[swap], picks[swap]]
    return text


def _average_gradients(model, world: int) -> None:
    """Mean of each gradient over the workers; parameters without a gradient this step (a stage that
    does not train them) are skipped on every worker alike, so the optimizer leaves them alone."""
    if world == 1:
        return
    for p in model.trainable_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def dev_scores(model, data: FeatureSet, db_rows, query_rows, stage: str, cfg: MedhashConfig) -> dict[str, float]:
    """``dev_map``: mean I2T / T2I MAP@all (labels protocol) of dev queries against the train items, the
    selection score; ``dev_pair``: mean I2T / T2I pair Recall@10 within the dev items (@n for n < 10 items),
    for the record.

    Hash codes at the middle code length once heads are trained; float embeddings in the model's
    ``float_stages`` (LSCH's alignment), where the codes are not trained yet.
    """
    v_db = embed(model, data.image[db_rows], data.text[db_rows])
    v_query = embed(model, data.image[query_rows], data.text[query_rows])
    if stage in getattr(model, "float_stages", ()):
        kind, query, db = "cosine", v_query, v_db
    else:
        bits = sorted(model.bits)[len(model.bits) // 2]
        kind, query, db = "hamming", hash_codes(model, v_query, bits), hash_codes(model, v_db, bits)
    scores = evaluate(
        kind, query, db, data.labels[query_rows], data.labels[db_rows], data.label_names, directions=("i2t", "t2i")
    )
    return {
        "dev_map": float(np.mean([scores["labels"][d]["map@all"] for d in ("i2t", "t2i")])),
        "dev_pair": float(np.mean([_top_recall(scores["pair"][d]) for d in ("i2t", "t2i")])),
    }


def _top_recall(pair: dict[str, float]) -> float:
    """Recall@k at the largest k the pair protocol reached (10, or fewer on a tiny dev split)."""
    k = max(int(name.split("@")[1]) for name in pair if name.startswith("recall@"))
    return pair[f"recall@{k}"]


def _progress_line(record: dict, n_epochs: int) -> str:
    losses = " ".join(f"{k[5:]}={v:.3f}" for k, v in record.items() if k.startswith("loss_"))
    return f"epoch {record['epoch'] + 1}/{n_epochs} [{record['stage']}] {losses} dev_map={record['dev_map']:.3f} dev_pair={record['dev_pair']:.3f}"


def _quiet_ray_train() -> None:
    """Ray Train logs a line per checkpoint and per report at INFO; the epoch line already says it."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:  # its logger is named by its file path, outside "ray.train"
        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _restore(model, optimizer: torch.optim.Optimizer | None) -> TrainState:
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return TrainState()
    with checkpoint.as_directory() as folder:
        saved = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)
    model.load_state_dict_trainable(saved["model"])
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    state: TrainState = saved["state"]
    state.resumed_at.append(state.epoch)
    log.info("resuming from the checkpoint of epoch %d", state.epoch - 1)
    return state


def _report(record: dict, state: TrainState, model, optimizer, rank: int) -> None:
    metrics = {k: v for k, v in record.items() if k != "stage"}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            torch.save(
                {"model": model.state_dict_trainable(), "optimizer": optimizer and optimizer.state_dict(), "state": state},
                os.path.join(folder, STATE_FILE),
            )
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
