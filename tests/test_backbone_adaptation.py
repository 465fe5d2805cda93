"""The backbone-adaptation study: the cached-activation path equals the backbone, and only its trained arm moves it."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medhash.benchmarks.backbone_adaptation import ImageTop, cut_activations
from medhash.benchmarks.floor_recipe import floor_loss, train_floor
from medhash.services.backbones.image import build_image_backbone
from medhash.services.config import ImageBackboneConfig


def scans(tmp_path, count: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = tmp_path / f"scan{i}.png"
        Image.fromarray(rng.integers(0, 256, (60 + 10 * i, 80), dtype=np.uint8)).save(path)
        paths.append((path,))
    return paths


def test_cached_activations_then_the_top_give_the_backbone_features(tmp_path):
    backbone = build_image_backbone(ImageBackboneConfig())
    paths = scans(tmp_path, 3)
    activations = cut_activations(backbone, paths, blocks=2)
    with torch.inference_mode():
        cached = ImageTop(backbone, blocks=2, trainable=False)(activations)
        whole = backbone(torch.stack([backbone.preprocess(Image.open(p[0])) for p in paths]))
    assert torch.allclose(cached, F.normalize(whole, dim=1), atol=1e-5)


def test_only_the_trained_arm_changes_the_backbone(tmp_path):
    config = ImageBackboneConfig()
    activations = cut_activations(build_image_backbone(config), scans(tmp_path, 8), blocks=1)
    text, labels = torch.randn(8, 16), torch.from_numpy(np.eye(2, dtype=np.float32)[[0, 1] * 4])
    original = build_image_backbone(config).backbone._blocks[-1].state_dict()
    for trainable in (False, True):
        top = ImageTop(build_image_backbone(config), blocks=1, trainable=trainable)
        image, text_codes, per_epoch = train_floor(top, activations, text, floor_loss(labels), np.arange(8), bits=16,
                                                   epochs=2, seed=0, encoder_lr=1e-2)
        assert image.shape == text_codes.shape == (8, 2) and per_epoch > 0
        moved = any(not torch.equal(weight, original[name]) for name, weight in top.blocks[-1].state_dict().items())
        assert moved == trainable
