"""The pair-recall screening's own parts: the margin label term, the canonical coordinates and its loss recipe."""
import numpy as np
import torch
from torch import nn

from medhash.benchmarks.floor_recipe import label_bce, train_floor, with_similarity
from medhash.benchmarks.pair_tradeoff import canonical_coordinates, margin_label_loss
from medhash.services.methods.losses import pair_features

LABELS = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # the last item's labels are unknown


def test_the_margin_label_term_is_zero_only_when_the_codes_meet_both_margins():
    codes = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1], [1, -1, 1, -1], [-1, -1, -1, -1]])
    assert margin_label_loss(codes, codes, LABELS) == 0  # the unlabelled item's cosines count for nothing
    apart = codes.clone()
    apart[1] = codes[2]  # item 1's report now looks like the other label's
    assert margin_label_loss(codes, apart, LABELS) > 0


def test_canonical_coordinates_find_what_the_two_modalities_share():
    rng = np.random.default_rng(0)
    shared = torch.from_numpy(rng.standard_normal((300, 2))).float()
    image = shared @ torch.randn(2, 20) + 0.1 * torch.randn(300, 20)
    text = shared @ torch.randn(2, 8) + 0.1 * torch.randn(300, 8)
    canonical_image, canonical_text = canonical_coordinates(image, text, np.arange(200))
    assert canonical_image.shape == canonical_text.shape == (300, 128)
    assert torch.corrcoef(torch.stack([canonical_image[200:, 0], canonical_text[200:, 0]]))[0, 1] > 0.9
    assert not canonical_text[:, 8:].any()  # past the text's 8 dimensions there is nothing to correlate


def test_a_recipe_with_the_similarity_term_trains_codes_for_every_item():
    image, text = torch.randn(4, 6), torch.randn(4, 5)
    loss = with_similarity(LABELS, pair_features(image, text), label_bce(share=8))
    image_codes, text_codes, _ = train_floor(nn.Identity(), image, text, loss, np.arange(4), bits=16, epochs=2, seed=0)
    assert image_codes.shape == text_codes.shape == (4, 2)
