"""DHaPH: the self-paced loss and schedule, the Poincare-ball geometry (retrieval: test_methods.py)."""
from __future__ import annotations

import math

import pytest
import torch

import methods_testkit as kit
from methods_testkit import CLASSES, config
from medhash.services.errors import ConfigError
from medhash.services.methods.base import Batch
from medhash.services.methods.dhaph import DHaPH, ball_distance, reciprocal_triplets, self_paced_loss, to_ball

SMALL = dict(hidden=128, embed_dim=64, proxies=32)


@pytest.fixture(scope="module")
def trained():
    return kit.trained("dhaph")


def test_schedule_ramps_delta_over_a_third_of_the_epochs(trained):
    model, cfg, history, _ = trained
    stages = model.schedule(cfg)
    assert stages == [f"pace {e}/6" for e in range(1, 6)] + ["joint"] * 15
    assert [row["stage"] for row in history] == stages
    assert [row["delta"] for row in history[:7]] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1])
    assert DHaPH.schedule(config("dhaph", epochs=4, self_paced=False)) == ["joint"] * 4
    with pytest.raises(ConfigError):
        model.pace("hash")


def test_self_paced_loss_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # the third item has no labels
    cos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau, delta = 0.5, 0.6
    # each labelled anchor: its only positive is itself (s = 1), its only negative the other (s = 0)
    pos = math.exp(1 / tau) * math.exp(-(1 + cos[0, 0].item()) * delta / 4)
    neg = math.exp(0 / tau) * math.exp((0 - 1) * delta)
    expected = -math.log(pos / (pos + neg))
    assert self_paced_loss(a, a, labels, tau, delta).item() == pytest.approx(expected, rel=1e-5)
    assert self_paced_loss(a, a, torch.zeros(3, 2), tau, delta).item() == 0.0


def test_ball_distance_is_the_poincare_distance():
    torch.manual_seed(0)
    c = 0.1
    x, y = to_ball(torch.randn(5, 8) * 3, c, 2.3), to_ball(torch.randn(4, 8), c, 2.3)
    assert (x.norm(dim=1) < 1 / math.sqrt(c)).all()
    # 2 / sqrt(c) * artanh(sqrt(c) |(-x) (+)_c y|), the Moebius-addition form
    xy, x2, y2 = x @ y.T, x.pow(2).sum(1)[:, None], y.pow(2).sum(1)[None, :]
    num = (1 - 2 * c * xy + c * y2)[..., None] * -x[:, None, :] + (1 - c * x2)[..., None] * y[None, :, :]
    mobius = num / (1 - 2 * c * xy + c**2 * x2 * y2)[..., None]
    expected = 2 / math.sqrt(c) * torch.atanh(math.sqrt(c) * mobius.norm(dim=-1))
    assert torch.allclose(ball_distance(x, y, c), expected, atol=1e-3)


def test_triplets_are_mutual_neighbours_and_outsiders():
    torch.manual_seed(0)
    blocks = torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)) + 0.01 * torch.rand(8, 8)
    i, j, k = reciprocal_triplets(blocks, topk=4, per_anchor=10)
    assert len(i) == 80 and (i != j).all() and (i != k).all()
    assert ((i // 4) == (j // 4)).all() and ((i // 4) != (k // 4)).all()


def test_unknown_labels_and_hash_probs(trained):
    model, cfg, _, (z, t, labels) = trained
    model.eval()
    v = model.embed_text(t[:8])
    assert v.shape == (8, 16 + 32)
    assert torch.equal(model.codes(v, 32), model.code_slice(v, 32) > 0)
    model.train()
    loss, parts = model.batch_loss("joint", Batch(z[:8], t[:8], torch.zeros(8, CLASSES), slice(None), lambda x: x), cfg)
    assert torch.isfinite(loss) and parts["self_paced"] == 0.0
