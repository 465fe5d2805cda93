"""DCMH: its likelihood term and its alternation of towers (retrieval: test_methods.py)."""
from __future__ import annotations

import math

import pytest
import torch

import methods_testkit as kit
from methods_testkit import CLASSES, IMAGE_DIM, TEXT_DIM, config, synthetic
from medhash.services.methods.base import Batch
from medhash.services.methods.dcmh import DCMH, label_similarity, likelihood_loss


def test_training_alternates_the_towers():
    _, _, history, _ = kit.trained("dcmh")
    assert [h["stage"] for h in history[:3]] == ["image", "text", "image"]


def test_likelihood_term_on_a_hand_computed_pair():
    f = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    g = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    # theta = F G^T / 2 = [[1, 0], [0, -1]]; items 0 and 1 share no label, so S = I
    similarity, known = label_similarity(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert similarity.tolist() == [[1.0, 0.0], [0.0, 1.0]] and bool(known.all())
    expected = ((math.log(1 + math.e) - 1) + 2 * math.log(2) + (math.log(1 + math.exp(-1)) + 1)) / 4
    assert float(likelihood_loss(f, g, similarity, known)) == pytest.approx(expected, rel=1e-6)
    # an unlabelled item leaves the likelihood: only pair (0, 0) counts
    similarity, known = label_similarity(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert float(likelihood_loss(f, g, similarity, known)) == pytest.approx(math.log(1 + math.e) - 1, rel=1e-6)


def test_each_stage_trains_only_its_tower():
    z, t, labels = synthetic(n=16)
    cfg = config("dcmh", epochs=2, image_hidden=8, text_hidden=8)
    model = DCMH(cfg, IMAGE_DIM, TEXT_DIM, CLASSES)
    batch = Batch(z, t, labels, slice(None), lambda x: x)
    towers = {"image": (model.image_tower, model.text_tower), "text": (model.text_tower, model.image_tower)}
    for stage, (tower, other) in towers.items():
        model.zero_grad(set_to_none=True)
        loss, parts = model.batch_loss(stage, batch, cfg)
        loss.backward()
        assert all(p.grad is not None for p in tower.parameters())
        assert all(p.grad is None for p in other.parameters())
        assert set(parts) == {"likelihood", "quantization", "balance", "total"}
