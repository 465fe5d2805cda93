"""UCCH: label blindness and the two losses by hand (retrieval: test_methods.py)."""
from __future__ import annotations

import math

import pytest
import torch

from methods_testkit import CLASSES, IMAGE_DIM, TEXT_DIM, config, synthetic, train_in_process
from medhash.services.errors import ConfigError
from medhash.services.methods.base import Batch
from medhash.services.methods.ucch import UCCH, binary_contrastive_loss, cross_modal_ranking_loss

SMALL = dict(hidden=256)


def train(labels: torch.Tensor) -> UCCH:
    torch.manual_seed(0)
    z, t, _ = synthetic()
    cfg = config("ucch", epochs=20, **SMALL)
    model = UCCH(cfg, IMAGE_DIM, TEXT_DIM, CLASSES)
    train_in_process(model, cfg, z, t, labels)
    return model


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    z, t, labels = synthetic()
    yield train(labels), (z, t, labels)
    torch.set_num_threads(threads)


def test_labels_are_never_read(trained):
    model, (z, t, labels) = trained
    shuffled = train(labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))])
    blank = train(torch.zeros_like(labels))
    for bits in (16, 32):
        for other in (shuffled, blank):
            assert torch.equal(model.codes(model.embed_image(z), bits), other.codes(other.embed_image(z), bits))
            assert torch.equal(model.codes(model.embed_text(t), bits), other.codes(other.embed_text(t), bits))


def test_losses_by_hand():
    ux = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    uy = torch.tensor([[1.0, 0.5], [-1.0, -1.0]])
    # binary codes b = sign(ux + uy) = [[1, 1], [0, -1]]; logits u_i . b_j / (T sqrt(2)), unit-length u
    t = 0.9
    nx, ny = ux / ux.norm(dim=1, keepdim=True), uy / uy.norm(dim=1, keepdim=True)
    b = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    expected = sum(
        -torch.log_softmax(u @ b.T / (t * math.sqrt(2)), dim=1).diagonal().mean() for u in (nx, ny)
    )
    assert binary_contrastive_loss(ux, uy, t).item() == pytest.approx(expected.item(), rel=1e-5)
    # CRL: s = cos(ux_i, uy_j); scores more than the margin below the positive drop by shift
    s = (nx @ ny.T).tolist()
    margin, shift = 0.2, 1.0

    def lowered(score: float, positive: float) -> float:
        return score - shift if score < positive - margin else score

    rows = [math.log(sum(math.exp(lowered(s[i][j], s[i][i])) for j in range(2))) - s[i][i] for i in range(2)]
    cols = [math.log(sum(math.exp(lowered(s[i][j], s[j][j])) for i in range(2))) - s[j][j] for j in range(2)]
    expected = sum(rows) / 2 + sum(cols) / 2 + 2 * margin
    assert cross_modal_ranking_loss(ux, uy, margin, shift).item() == pytest.approx(expected, rel=1e-5)


def test_codes_are_signs_and_unknown_stage_refused(trained):
    model, (z, t, labels) = trained
    v = model.embed_text(t[:8])
    assert v.shape == (8, 16 + 32)
    assert torch.allclose(model.code_slice(v, 16).norm(dim=1), torch.ones(8))
    assert torch.equal(model.codes(v, 16), model.code_slice(v, 16) > 0)
    with pytest.raises(ConfigError):
        model.batch_loss("hash", Batch(z[:8], t[:8], labels[:8], slice(None), lambda x: x), model.cfg)
