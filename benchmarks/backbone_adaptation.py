"""Does training the last blocks of the image backbone pay? A screening study on the dev split.

    python -m medhash.benchmarks.backbone_adaptation --config training/configs/medpix2-lsch-ablation.yaml --seeds 0,1,2

Every method hashes frozen ImageNet features. Here the label-supervised hash of ``evaluation.md``'s floor recipe
(two-layer heads, InfoNCE + 50 x pairwise label BCE + 0.1 x quantisation, Adam 1e-3, batch 128) trains twice per
seed: once on the frozen backbone, once with the backbone's last ``--blocks`` blocks and its head convolution
trained beside the heads (``--backbone-lr``; batch norm keeps its ImageNet statistics). The activations that enter
those blocks depend on no trained weight, so they are computed once per item; an epoch runs only the top of the
backbone. Both arms are scored as ``medhash eval --on dev`` scores a run (dev queries against train) after the
same number of epochs. EfficientNet-Lite backbones only.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medhash.services.backbones.image import EfficientNetLiteBackbone, build_image_backbone
from medhash.services.codes import pack_codes
from medhash.services.config import load_config
from medhash.services.data import open_dataset
from medhash.services.data.images import load_image
from medhash.services.errors import ConfigError
from medhash.services.evaluation.protocols import evaluate
from medhash.services.features.featureset import build_featureset
from medhash.services.methods.losses import contrastive_loss, pairwise_label_loss, quantization_loss
from medhash.training.trainer import with_resolved_data

COLUMNS = (("labels", "i2t"), ("labels", "t2i"), ("topic", "i2t"), ("topic", "t2i"), ("pair", "i2t"), ("pair", "t2i"))


class ImageTop(nn.Module):
    """The last blocks of an EfficientNet-Lite, its head convolution and pooling: activations -> unit features.

    ``trainable`` False keeps every weight frozen (the features the methods hash). The backbone comes in eval mode
    and is never put in training mode, so batch norm keeps its ImageNet statistics."""

    def __init__(self, backbone: EfficientNetLiteBackbone, blocks: int, trainable: bool):
        super().__init__()
        model = backbone.backbone
        self.blocks = nn.ModuleList(model._blocks[len(model._blocks) - blocks:])
        self.conv_head, self.bn, self.swish = model._conv_head, model._bn1, model._swish
        self.requires_grad_(trainable)

    def forward(self, activations: Tensor) -> Tensor:
        x = activations
        for block in self.blocks:
            x = block(x)
        return F.normalize(self.swish(self.bn(self.conv_head(x))).mean(dim=(2, 3)), dim=1)


def cut_activations(backbone: EfficientNetLiteBackbone, image_paths: list[tuple[Path, ...]], blocks: int,
                    batch_size: int = 32) -> Tensor:
    """Per item, the activations that enter the backbone's last ``blocks`` blocks (the mean over its images)."""
    model = backbone.backbone
    early = model._blocks[: len(model._blocks) - blocks]
    per_item = []
    with torch.inference_mode():
        for start in range(0, len(image_paths), batch_size):
            chunk = image_paths[start: start + batch_size]
            pixels = [backbone.preprocess(load_image(path)) for paths in chunk for path in paths]
            x = model._swish(model._bn0(model._conv_stem(torch.stack(pixels))))
            for block in early:
                x = block(x)
            per_item.extend(part.mean(dim=0) for part in x.split([len(paths) for paths in chunk]))
    return torch.stack(per_item)


def head(dim: int, bits: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 512), nn.ReLU(), nn.Linear(512, bits), nn.Tanh())


def train_floor(top: ImageTop, activations: Tensor, text: Tensor, labels: Tensor, train_rows: np.ndarray,
                bits: int, epochs: int, seed: int, backbone_lr: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The floor recipe over (``top`` on ``activations``, ``text``): packed image and text codes of every item and
    the seconds per epoch."""
    torch.manual_seed(seed)
    image_head, text_head = head(top.conv_head.out_channels, bits), head(text.shape[1], bits)
    groups = [{"params": [*image_head.parameters(), *text_head.parameters()], "lr": 1e-3}]
    trained = [p for p in top.parameters() if p.requires_grad]
    if trained:
        groups.append({"params": trained, "lr": backbone_lr})
    optimiser = torch.optim.Adam(groups)
    text = F.normalize(text, dim=1)
    generator = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = generator.permutation(train_rows)
        for first in range(0, len(order), 128):
            rows = order[first: first + 128]
            u, v = image_head(top(activations[rows])), text_head(text[rows])
            instance = contrastive_loss(u, v, None, tau=0.07, hard_negative_strength=0.0)  # plain InfoNCE
            label = pairwise_label_loss(u, v, labels[rows], scale=5.0)
            loss = instance + 50 * label + 0.1 * (quantization_loss(u) + quantization_loss(v))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    per_epoch = (time.perf_counter() - start) / max(epochs, 1)
    with torch.no_grad():
        image = torch.cat([image_head(top(activations[i: i + 128])) for i in range(0, len(activations), 128)])
        codes = [pack_codes((m > 0).numpy().astype(np.uint8)) for m in (image, text_head(text))]
    return codes[0], codes[1], per_epoch


def adaptation_study(config: Path, seeds: list[int], blocks: int, epochs: int, bits: int, backbone_lr: float) -> str:
    """Markdown: per arm, the dev scores (mean +- std over ``seeds``) and the seconds per epoch."""
    cfg = with_resolved_data(load_config(config))
    backbone = build_image_backbone(cfg.image_backbone)
    if not isinstance(backbone, EfficientNetLiteBackbone):
        raise ConfigError(f"image_backbone.kind {cfg.image_backbone.kind!r}: this study reads EfficientNet-Lite blocks")
    if not 1 <= blocks <= len(backbone.backbone._blocks):
        raise ConfigError(f"--blocks {blocks}: expected 1..{len(backbone.backbone._blocks)}")
    features = build_featureset(cfg, progress=False)
    paths = {item.id: item.image_paths for item in open_dataset(cfg.data).items}
    activations = cut_activations(backbone, [paths[i] for i in features.ids], blocks)
    text, labels = torch.from_numpy(features.text), torch.from_numpy(features.labels.astype(np.float32))
    train, dev = features.rows("train"), features.rows("dev")
    arms = {"frozen backbone (the features every method hashes)": False,
            f"last {blocks} block(s) and head convolution trained, lr {backbone_lr:g}": True}
    lines = [f"{features.dataset}, {bits} bits, {epochs} epochs, dev queries against train, seeds {seeds}", "",
             "| image backbone | " + " | ".join(f"{'pair R@10' if p == 'pair' else p} {d.upper()}" for p, d in COLUMNS)
             + " | s / epoch |", "|---" * (len(COLUMNS) + 2) + "|"]
    for arm, trainable in arms.items():
        scores, seconds = [], []
        for seed in seeds:
            top = ImageTop(copy.deepcopy(backbone), blocks, trainable)  # fresh ImageNet weights per run
            image, text_codes, per_epoch = train_floor(top, activations, text, labels, train, bits, epochs, seed,
                                                       backbone_lr)
            result = evaluate("hamming", {"image": image[dev], "text": text_codes[dev]},
                              {"image": image[train], "text": text_codes[train]}, features.labels[dev],
                              features.labels[train], features.label_names, features.groups[dev],
                              directions=("i2t", "t2i"))
            scores.append([result[p][d]["recall@10" if p == "pair" else "map@all"] for p, d in COLUMNS])
            seconds.append(per_epoch)
        mean, std = np.mean(scores, axis=0), np.std(scores, axis=0)
        lines.append(f"| {arm} | " + " | ".join(f"{m:.3f} +- {s:.3f}" for m, s in zip(mean, std))
                     + f" | {np.mean(seconds):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--blocks", type=int, default=1, help="how many of the backbone's last blocks train")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--backbone-lr", type=float, default=1e-4)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(adaptation_study(args.config, seeds, args.blocks, args.epochs, args.bits, args.backbone_lr), flush=True)


if __name__ == "__main__":
    main()
