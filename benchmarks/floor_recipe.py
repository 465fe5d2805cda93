"""The label-supervised hash of ``evaluation.md``'s reference floor, as the screening studies train and score it.

Two-layer tanh heads per modality, Adam 1e-3, batch 128, and the loss InfoNCE (tau 0.07) + 50 x pairwise label BCE
+ 0.1 x quantisation. A study swaps one part (the image encoder below the head, the loss, the heads' inputs) and
scores every arm as ``medhash eval --on dev`` scores a run: dev queries against the train split.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from medhash.services.codes import pack_codes
from medhash.services.evaluation.protocols import evaluate
from medhash.services.features.featureset import FeatureSet
from medhash.services.methods.losses import (
    contrastive_loss,
    feature_similarity,
    pairwise_label_loss,
    quantization_loss,
    similarity_preserving_loss,
)

COLUMNS = (("labels", "i2t"), ("labels", "t2i"), ("topic", "i2t"), ("topic", "t2i"), ("pair", "i2t"), ("pair", "t2i"))
BATCH = 128

# a floor loss: (image codes u, text codes v, the batch's rows) -> the loss to minimise
Loss = Callable[[Tensor, Tensor, np.ndarray], Tensor]
# a label term: (image codes u, text codes v, the batch's multi-hot labels) -> its weighted value
LabelTerm = Callable[[Tensor, Tensor, Tensor], Tensor]


def head(dim: int, bits: int) -> nn.Sequential:
    """A two-layer hashing head: features -> relaxed codes in (-1, 1)."""
    return nn.Sequential(nn.Linear(dim, 512), nn.ReLU(), nn.Linear(512, bits), nn.Tanh())


def label_bce(share: int | None = None) -> LabelTerm:
    """The floor's label term, 50 x pairwise label BCE, on the first ``share`` bits only (None: every bit)."""

    def term(u: Tensor, v: Tensor, labels: Tensor) -> Tensor:
        if share is not None:
            u, v = u[:, :share], v[:, :share]
        return 50 * pairwise_label_loss(u, v, labels, scale=5.0)

    return term


def floor_loss(labels: Tensor, label_term: LabelTerm | None = None) -> Loss:
    """The floor recipe's loss over items with multi-hot ``labels`` [N, C]; ``label_term`` (u, v, the batch's labels)
    replaces its label term."""
    label_term = label_term or label_bce()

    def loss(u: Tensor, v: Tensor, rows: np.ndarray) -> Tensor:
        instance = contrastive_loss(u, v, None, tau=0.07, hard_negative_strength=0.0)  # plain InfoNCE
        return instance + label_term(u, v, labels[rows]) + 0.1 * (quantization_loss(u) + quantization_loss(v))

    return loss


def with_similarity(labels: Tensor, pair_space: Tensor, label_term: LabelTerm) -> Loss:
    """The floor's loss with ``label_term``, plus 10 x LSCH's similarity term on ``pair_space`` (pair features):
    the shape of LSCH's loss on the floor's heads."""
    floor = floor_loss(labels, label_term)

    def loss(u: Tensor, v: Tensor, rows: np.ndarray) -> Tensor:
        return floor(u, v, rows) + 10 * similarity_preserving_loss(u, v, feature_similarity(pair_space[rows], 1.5))

    return loss


def train_floor(image_encoder: nn.Module, image_inputs: Tensor, text: Tensor, loss: Loss, train_rows: np.ndarray,
                bits: int, epochs: int, seed: int, encoder_lr: float = 0.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Train the two heads over (``image_encoder`` on ``image_inputs``, ``text``) by ``loss``; the encoder's
    trainable weights train beside them at ``encoder_lr``. Returns the packed image and text codes of every item and
    the seconds per epoch."""
    torch.manual_seed(seed)
    with torch.no_grad():
        image_dim = image_encoder(image_inputs[:1]).shape[1]
    image_head, text_head = head(image_dim, bits), head(text.shape[1], bits)
    groups = [{"params": [*image_head.parameters(), *text_head.parameters()], "lr": 1e-3}]
    trained = [p for p in image_encoder.parameters() if p.requires_grad]
    if trained:
        groups.append({"params": trained, "lr": encoder_lr})
    optimiser = torch.optim.Adam(groups)
    generator = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = generator.permutation(train_rows)
        for first in range(0, len(order), BATCH):
            rows = order[first: first + BATCH]
            value = loss(image_head(image_encoder(image_inputs[rows])), text_head(text[rows]), rows)
            optimiser.zero_grad()
            value.backward()
            optimiser.step()
    per_epoch = (time.perf_counter() - start) / max(epochs, 1)
    with torch.no_grad():
        image = torch.cat([image_head(image_encoder(image_inputs[i: i + BATCH]))
                           for i in range(0, len(image_inputs), BATCH)])
        codes = [pack_codes((m > 0).numpy().astype(np.uint8)) for m in (image, text_head(text))]
    return codes[0], codes[1], per_epoch


def dev_scores(features: FeatureSet, image_codes: np.ndarray, text_codes: np.ndarray) -> list[float]:
    """The :data:`COLUMNS` scores of dev queries against the train split (pair: Recall@10, else MAP@all)."""
    train, dev = features.rows("train"), features.rows("dev")
    result = evaluate("hamming", {"image": image_codes[dev], "text": text_codes[dev]},
                      {"image": image_codes[train], "text": text_codes[train]}, features.labels[dev],
                      features.labels[train], features.label_names, features.groups[dev], directions=("i2t", "t2i"))
    return [result[p][d]["recall@10" if p == "pair" else "map@all"] for p, d in COLUMNS]


def frozen_feature_study(features: FeatureSet, first: str, arms: dict[str, tuple[Loss, tuple[Tensor, Tensor]]],
                         seeds: list[int], epochs: int, bits: int) -> str:
    """Markdown: per arm (its loss, its image and text inputs), the floor's heads trained on the inputs over
    ``seeds``, their dev scores (mean +- std) and the seconds per epoch; ``first`` names the arms' column."""
    train = features.rows("train")
    lines = [f"{features.dataset}, {bits} bits, {epochs} epochs, dev queries against train, seeds {seeds}", "",
             *table_header(first)]
    for arm, (loss, (image_inputs, text_inputs)) in arms.items():
        runs = [train_floor(nn.Identity(), image_inputs, text_inputs, loss, train, bits, epochs, seed) for seed in seeds]
        scores = [dev_scores(features, image_codes, text_codes) for image_codes, text_codes, _ in runs]
        lines.append(table_row(arm, scores, f"{np.mean([run[2] for run in runs]):.2f}"))
    return "\n".join(lines) + "\n"


def table_header(first: str, last: str = "s / epoch") -> list[str]:
    """The two header lines of a markdown table with a ``first`` column, the :data:`COLUMNS` and a ``last``."""
    names = [f"{'pair R@10' if p == 'pair' else p} {d.upper()}" for p, d in COLUMNS]
    return [f"| {first} | " + " | ".join(names) + f" | {last} |", "|---" * (len(COLUMNS) + 2) + "|"]


def table_row(name: str, scores: list[list[float]], last: str) -> str:
    """One markdown row: each column's mean +- std over the seeds' ``scores``."""
    mean, std = np.mean(scores, axis=0), np.std(scores, axis=0)
    return f"| {name} | " + " | ".join(f"{m:.3f} +- {s:.3f}" for m, s in zip(mean, std)) + f" | {last} |"


def study_arguments(description: str) -> argparse.ArgumentParser:
    """A screening's command line: ``--config``, ``--seeds`` (a list of ints), ``--epochs`` and ``--bits``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--seeds", default=[0, 1, 2], type=lambda text: [int(s) for s in text.split(",")],
                        help="comma-separated training seeds")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--bits", type=int, default=64)
    return parser
