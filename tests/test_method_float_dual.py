"""The float dual encoder on synthetic clusters: its float embedding beats random, its LSH is fixed (codes: test_methods.py)."""
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
    model, _, history, (z, t, labels) = kit.trained("float-dual")
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


def test_lsh_projection_is_fixed(model_and_data):
    model, *_ = model_and_data
    fresh = FloatDualEncoder(model.cfg, kit.IMAGE_DIM, kit.TEXT_DIM, kit.CLASSES)
    assert all(torch.equal(getattr(fresh, f"lsh_{b}"), getattr(model, f"lsh_{b}")) for b in model.bits)
    assert all(not getattr(model, f"lsh_{b}").requires_grad for b in model.bits)
