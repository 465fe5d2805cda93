"""MSACH: retrieval on synthetic clusters, the segmented schedule, frozen towers in the "hash" stage."""
from __future__ import annotations

import pytest
import torch

import methods_testkit as kit
from methods_testkit import CLASSES, IMAGE_DIM, TEXT_DIM, config, synthetic, train_in_process
from medhash.services.errors import ConfigError
from medhash.services.methods.base import Batch
from medhash.services.methods.msach import MSACH


def with_epochs(features: int, hashing: int):
    return config("msach", epochs=hashing, feature_epochs=features)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def unchanged(before: list[torch.Tensor], params) -> bool:
    return all(torch.equal(b, p) for b, p in zip(before, params, strict=True))


@pytest.fixture(scope="module")
def trained():
    return kit.trained("msach")


def test_schedule_is_features_then_hash(trained):
    model, cfg, history, _ = trained
    expected = ["features"] * model.params.feature_epochs + ["hash"] * cfg.train.epochs
    assert model.schedule(cfg) == expected
    assert [row["stage"] for row in history] == expected
    assert MSACH.schedule(with_epochs(3, 7)) == ["features"] * 3 + ["hash"] * 7
    assert {"alignment", "manifold_v"} <= set(history[0]) and "classification" in history[-1]


def test_hash_stage_freezes_towers_and_features_stage_leaves_heads():
    torch.manual_seed(0)
    z, t, labels = synthetic(n=80)
    model = MSACH(with_epochs(2, 0), IMAGE_DIM, TEXT_DIM, CLASSES)
    hashing = [*model.heads.parameters(), *model.classifiers.parameters()]
    heads_before = snapshot(hashing)
    train_in_process(model, with_epochs(2, 0), z, t, labels)
    assert unchanged(heads_before, hashing)

    towers_before, heads_before = snapshot(model.tower_parameters()), snapshot(hashing)
    train_in_process(model, with_epochs(0, 2), z, t, labels)
    assert unchanged(towers_before, model.tower_parameters())
    assert not unchanged(heads_before, hashing)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in hashing}  # frozen towers are out of the optimiser's and all-reduce's way


def test_hash_probs_is_tanh_code_and_unknown_stage_refused(trained):
    model, cfg, _, (z, t, labels) = trained
    v = model.embed_image(z[:8])
    probs = model.hash_probs(v, 16)
    assert torch.allclose(2 * probs - 1, torch.tanh(model.heads["16"](v)))
    with pytest.raises(ConfigError):
        model.batch_loss("joint", Batch(z[:8], t[:8], labels[:8], slice(None), lambda x: x), cfg)
