"""Every registered hashing method: built by the registry, trained, saved and loaded through a run directory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import methods_testkit as kit
from medhash.services.config import load_config
from medhash.services.errors import ConfigError
from medhash.services.methods import load_trained
from medhash.services.methods.base import HashModel
from medhash.services.registry import method_class, method_names
from medhash.services.run_dir import RunDir

METHODS = method_names()


def test_every_registered_method_has_test_settings():
    assert set(METHODS) == set(kit.TEST_PARAMS)


@pytest.mark.parametrize("method", METHODS)
def test_registry_builds_a_hash_model_with_typed_params(method):
    cls = method_class(method)
    assert issubclass(cls, HashModel) and cls.name == method
    model, cfg, _, _ = kit.trained(method)
    assert type(model) is cls and model.params == cls.params_of(cfg) and model.bits == (16, 32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [16, 32])
def test_trained_codes_beat_random_codes(method, bits):
    model, _, _, (z, t, labels) = kit.trained(method)
    assert kit.hashed_map(model, z, t, labels, bits) > kit.random_map(labels, bits) + 0.15


@pytest.mark.parametrize("method", METHODS)
def test_codes_survive_a_run_directory(method, tmp_path):
    model, cfg, history, (z, t, labels) = kit.trained(method)
    meta = {"image_dim": kit.IMAGE_DIM, "text_dim": kit.TEXT_DIM}
    run = RunDir(tmp_path / "run")
    run.write(cfg, model.state_dict_trainable(), [f"class:{i}" for i in range(kit.CLASSES)], history, meta)
    loaded_cfg, loaded = load_trained(run)
    _, hashing_only = load_trained(run, frozen_weights=False)  # what the Hasher deployment loads
    assert loaded_cfg == cfg
    with torch.no_grad():
        for bits in model.bits:
            for embed in ("embed_image", "embed_text"):
                rows = z if embed == "embed_image" else t
                v = getattr(model.eval(), embed)(rows)
                before = model.codes(v, bits)
                assert torch.equal(before, loaded.codes(getattr(loaded, embed)(rows), bits)), (bits, embed)
                assert torch.equal(before, hashing_only.codes(v, bits)), (bits, embed)


@pytest.mark.parametrize("method", METHODS)
def test_wrong_params_are_refused_when_the_config_loads(method):
    with pytest.raises(ConfigError, match=f"method_params.{method}.no_such_param"):
        load_config(None, {"method": method, f"method_params.{method}.no_such_param": 1})


def test_unknown_methods_and_code_lengths_are_refused():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        load_config(None, {"method": "nope"})
    for bad in ((), (12,), (64, 64), (2048,)):
        with pytest.raises(ConfigError, match="codes.bits"):
            load_config(None, {"codes.bits": bad})
    assert load_config(None, {"codes.bits": (64, 32)}).codes.bits == (32, 64)
    assert np.isclose(load_config(None, {"method_params.lsch.alpha": 2}).method_params["lsch"]["alpha"], 2)
