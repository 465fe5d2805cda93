"""DCHMT: its selection layer and margin loss (retrieval: test_methods.py)."""
from __future__ import annotations

import math

import pytest
import torch

from medhash.services.methods.dchmt import SelectionLayer, selection_distance2, similarity_loss

SMALL = {"d_model": 64, "ff_dim": 128, "layers": 1}  # small towers: the test runs on one core


def test_selection_layer_is_a_softmax_per_bit():
    torch.manual_seed(0)
    layer = SelectionLayer(8, 16, bits=4)
    x = torch.randn(3, 8)
    logits = layer.logits(layer.hidden(x)).view(3, 4, 2)
    assert torch.allclose(torch.sigmoid(layer(x)), torch.softmax(logits, dim=-1)[..., 1], atol=1e-6)


def test_margin_loss_on_saturated_codes():
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # Hamming 1 from a
    c = torch.tensor([[0.0, 0.0, 1.0, 1.0]])  # Hamming 2 from a
    assert selection_distance2(a, torch.cat([a, b, c])).tolist() == [[0.0, 2.0, 4.0]]  # twice the Hamming distance
    similar, dissimilar, known = torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)
    # K = 4, vartheta = 0.5: margin sqrt(2 * 4 * 0.5) = 2, i.e. dissimilar codes should differ in 2 bits
    assert float(similarity_loss(a, b, similar, known, 0.5)) == pytest.approx(2.0)
    assert float(similarity_loss(a, b, dissimilar, known, 0.5)) == pytest.approx((2 - math.sqrt(2)) ** 2)
    assert float(similarity_loss(a, c, dissimilar, known, 0.5)) == 0.0
    assert float(similarity_loss(a, b, similar, ~known, 0.5)) == 0.0  # unlabelled pairs are left out
