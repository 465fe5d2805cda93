"""CCA-ITQ on synthetic clusters: closed form, ITQ lowers the quantisation error, labels unused (retrieval: test_methods.py)."""
from __future__ import annotations

import pytest
import torch

from medhash.services.methods.cca_itq import CCAITQ, quantization_error
import methods_testkit as kit

torch.set_num_threads(1)


def fitted(labels: torch.Tensor | None = None) -> tuple[CCAITQ, torch.Tensor, torch.Tensor, torch.Tensor]:
    z, t, true_labels = kit.synthetic()
    cfg = kit.config("cca-itq")
    model = CCAITQ(cfg, kit.IMAGE_DIM, kit.TEXT_DIM, kit.CLASSES)
    kit.train_in_process(model, cfg, z, t, true_labels if labels is None else labels)
    return model, z, t, true_labels


@pytest.fixture(scope="module")
def model_and_data():
    return fitted()


def test_schedule_is_closed_form(model_and_data):
    model, *_ = model_and_data
    assert model.schedule(model.cfg) == ["fit"]
    assert model.trainable_parameters() == []


@pytest.mark.parametrize("bits", [16, 32])
def test_itq_lowers_quantization_error(model_and_data, bits):
    model, z, t, _ = model_and_data
    v = torch.cat([model.embed_image(z[kit.QUERIES :]), model.embed_text(t[kit.QUERIES :])])[:, :bits]
    v = v * (bits / v.pow(2).sum(dim=1).mean()).sqrt()  # unit mean square per bit, the scale of the codes
    assert quantization_error(v, model.rotation(bits)) < 0.5 * quantization_error(v, torch.eye(bits))


def test_labels_are_not_read(model_and_data):
    model, z, t, labels = model_and_data
    shuffled, *_ = fitted(labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))])
    for bits in model.bits:
        assert torch.equal(model.codes(model.embed_image(z), bits), shuffled.codes(shuffled.embed_image(z), bits))
        assert torch.equal(model.codes(model.embed_text(t), bits), shuffled.codes(shuffled.embed_text(t), bits))

