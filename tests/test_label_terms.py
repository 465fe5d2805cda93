"""The label-terms screening's own parts: LSCH's label term at its weight, and the multi-positive arm."""
import numpy as np
import torch
from torch import nn

from medhash.benchmarks.floor_recipe import label_bce, train_floor, with_similarity
from medhash.benchmarks.label_terms import lsch_label_term, with_multi_positive, with_shared_within
from medhash.services.methods.losses import pair_features

LABELS = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # the last item's labels are unknown


def test_lschs_cross_modal_label_term_is_the_floors():
    u, v = torch.randn(4, 16), torch.randn(4, 16)
    assert torch.isclose(lsch_label_term(0.0)(u, v, LABELS), label_bce()(u, v, LABELS))
    assert lsch_label_term(0.5)(u, v, LABELS) > lsch_label_term(0.0)(u, v, LABELS)
    assert torch.isclose(with_shared_within(0.0)(u, v, LABELS), label_bce()(u, v, LABELS))


def test_the_multi_positive_term_is_lower_when_label_groups_are_together():
    together = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [-1, -1, -1, -1], [1, -1, 1, -1]])
    apart = together.clone()
    apart[1] = together[2]  # item 1 now sits with the other label
    term = with_multi_positive(5.0)
    assert term(together, together, LABELS) < term(apart, apart, LABELS)


def test_a_screening_arm_trains_codes_for_every_item():
    image, text = torch.randn(4, 6), torch.randn(4, 5)
    loss = with_similarity(LABELS, pair_features(image, text), lsch_label_term(0.5))
    image_codes, text_codes, _ = train_floor(nn.Identity(), image, text, loss, np.arange(4), bits=16, epochs=2, seed=0)
    assert image_codes.shape == text_codes.shape == (4, 2)
