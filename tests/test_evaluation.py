"""The protocol runner and the model-free floors, on small hand-made label sets."""
import numpy as np
import pytest

from medhash.services.codes import pack_codes
from medhash.services.evaluation.protocols import evaluate, reference_maps


def test_one_list_prior_is_the_high_floor_of_a_one_label_dataset():
    rng = np.random.default_rng(0)
    dominant = (rng.random(400) < 0.8).astype(np.uint8)
    labels = np.stack([dominant, 1 - dominant], axis=1)  # 80 % "a", 20 % "b"
    floors = reference_maps(labels[:100], labels[100:], labels[100:], ["finding:a", "finding:b"])
    assert set(floors) == {"labels"}  # no topic labels, no topic protocol
    relevant_share = (labels[:100] @ labels[100:].T > 0).mean()
    assert floors["labels"]["random"] == pytest.approx(relevant_share, abs=0.03)
    assert floors["labels"]["label_prior"] > floors["labels"]["random"] + 0.05


def test_evaluate_reports_every_protocol_and_direction():
    rng = np.random.default_rng(1)
    labels = np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 60)]
    names = ["topic:a", "topic:b", "location:c", "location:d"]
    codes = {m: pack_codes(rng.integers(0, 2, (60, 16))) for m in ("image", "text")}
    # identical image and text codes: every pair is found at distance 0
    codes["text"] = codes["image"]
    result = evaluate("hamming", {m: c[:20] for m, c in codes.items()}, {m: c[20:] for m, c in codes.items()},
                      labels[:20], labels[20:], names, query_groups=[str(i) for i in range(20)])
    assert set(result) == {"labels", "topic", "pair"}
    assert set(result["labels"]) == {"i2t", "t2i", "i2i", "t2t"}
    assert set(result["pair"]) == {"i2t", "t2i"}
    assert result["pair"]["i2t"]["recall@10"] == 1.0
