"""Does training the last blocks of the image backbone pay? A screening study on the dev split.

    python -m medhash.benchmarks.backbone_adaptation --config training/configs/medpix2-lsch-ablation.yaml --seeds 0,1,2

Every method hashes frozen ImageNet features. Here the label-supervised hash of ``evaluation.md``'s floor recipe
(:mod:`medhash.benchmarks.floor_recipe`) trains twice per seed: once on the frozen backbone, once with the
backbone's last ``--blocks`` blocks and its head convolution trained beside the heads (``--backbone-lr``; batch norm
keeps its ImageNet statistics). The activations that enter those blocks depend on no trained weight, so they are
computed once per item; an epoch runs only the top of the backbone. Both arms are scored on dev after the same
number of epochs. EfficientNet-Lite backbones only.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medhash.benchmarks.floor_recipe import (
    dev_scores,
    floor_loss,
    study_arguments,
    table_header,
    table_row,
    train_floor,
)
from medhash.services.backbones.image import EfficientNetLiteBackbone, build_image_backbone
from medhash.services.config import load_config
from medhash.services.data import open_dataset
from medhash.services.data.images import load_image
from medhash.services.errors import ConfigError
from medhash.services.features.featureset import build_featureset
from medhash.training.trainer import with_resolved_data


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
    text = F.normalize(torch.from_numpy(features.text), dim=1)
    loss = floor_loss(torch.from_numpy(features.labels.astype(np.float32)))
    arms = {"frozen backbone (the features every method hashes)": False,
            f"last {blocks} block(s) and head convolution trained, lr {backbone_lr:g}": True}
    lines = [f"{features.dataset}, {bits} bits, {epochs} epochs, dev queries against train, seeds {seeds}", "",
             *table_header("image backbone")]
    for arm, trainable in arms.items():
        scores, seconds = [], []
        for seed in seeds:
            top = ImageTop(copy.deepcopy(backbone), blocks, trainable)  # fresh ImageNet weights per run
            image, text_codes, per_epoch = train_floor(top, activations, text, loss, features.rows("train"), bits,
                                                       epochs, seed, backbone_lr)
            scores.append(dev_scores(features, image, text_codes))
            seconds.append(per_epoch)
        lines.append(table_row(arm, scores, f"{np.mean(seconds):.1f}"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = study_arguments(__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1, help="how many of the backbone's last blocks train")
    parser.add_argument("--backbone-lr", type=float, default=1e-4)
    args = parser.parse_args()
    print(adaptation_study(args.config, args.seeds, args.blocks, args.epochs, args.bits, args.backbone_lr), flush=True)


if __name__ == "__main__":
    main()
