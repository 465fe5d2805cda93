"""The float dual encoder on synthetic clusters: its float embedding and its LSH codes beat random."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import methods_testkit as kit
from medhash.services.evaluation.protocols import evaluate
from medhash.services.methods.float_dual import FloatDualEncoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_and_data():
    z, t, labels = kit.synthetic()
    cfg = kit.config("float-dual")
    model = FloatDualEncoder(cfg, kit.IMAGE_DIM, kit.TEXT_DIM, kit.CLASSES)
    history = kit.train_in_process(model, cfg, z, t, labels)
    return model, z, t, labels, history


def float_map(model, z, t, labels) -> float:
    """Mean I2T / T2I cosine MAP@all of the float embeddings, the first rows as queries."""
    with torch.no_grad():
        v = {"image": model.embed_image(z).numpy(), "text": model.embed_text(t).numpy()}
    labels = labels.numpy().astype(np.uint8)
    q, db = kit.QUERIES, slice(kit.QUERIES, None)
    scores = evaluate(
        "cosine",
        {m: x[:q] for m, x in v.items()},
        {m: x[db] for m, x in v.items()},
        labels[:q],
        labels[db],
        [f"class:{i}" for i in range(labels.shape[1])],
        directions=("i2t", "t2i"),
    )
    return float(np.mean([scores["labels"][d]["map@all"] for d in ("i2t", "t2i")]))


def test_loss_decreases(model_and_data):
    *_, history = model_and_data
    assert history[-1]["contrastive"] < history[0]["contrastive"]


def test_float_embedding_beats_random(model_and_data):
    model, z, t, labels, _ = model_and_data
    assert float_map(model, z, t, labels) > kit.random_map(labels, 32) + 0.4


@pytest.mark.parametrize("bits", [16, 32])
def test_lsh_codes_beat_random(model_and_data, bits):
    model, z, t, labels, _ = model_and_data
    assert kit.hashed_map(model, z, t, labels, bits) > kit.random_map(labels, bits) + 0.15


def test_lsh_projection_is_fixed(model_and_data):
    model, *_ = model_and_data
    fresh = FloatDualEncoder(model.cfg, kit.IMAGE_DIM, kit.TEXT_DIM, kit.CLASSES)
    assert all(torch.equal(getattr(fresh, f"lsh_{b}"), getattr(model, f"lsh_{b}")) for b in model.bits)
    assert all(not getattr(model, f"lsh_{b}").requires_grad for b in model.bits)
