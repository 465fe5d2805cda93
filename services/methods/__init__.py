"""Every hashing method by name, and what runs any of them: build, load a run, embed, hash.

``cfg.method`` picks the method; each is a model class with the interface of
:class:`medhash.services.methods.base.HashModel` (LSCH's :class:`medhash.services.lsch.model.LSCHModel` included), so
the Ray Train loop, evaluation and the Serve deployments never ask which method they run.
"""
from __future__ import annotations

from importlib import import_module

import numpy as np
import torch

from medhash.services.codes import pack_codes
from medhash.services.config import MedhashConfig
from medhash.services.errors import ConfigError
from medhash.services.run_dir import RunDir

METHODS = {  # name -> "module:class"
    "lsch": "medhash.services.lsch.model:LSCHModel",
    "msach": "medhash.services.methods.msach:MSACH",
    "dcmh": "medhash.services.methods.dcmh:DCMH",
    "dchmt": "medhash.services.methods.dchmt:DCHMT",
    "dhaph": "medhash.services.methods.dhaph:DHaPH",
    "ucch": "medhash.services.methods.ucch:UCCH",
    "cca-itq": "medhash.services.methods.cca_itq:CCAITQ",
    "float-dual": "medhash.services.methods.float_dual:FloatDualEncoder",
}


def method_class(name: str) -> type:
    """The model class registered as ``name``; ConfigError for an unknown name."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(import_module(module), cls)


def build_model(cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int) -> torch.nn.Module:
    """The untrained model of ``cfg.method`` (LSCH with its frozen LLM loaded)."""
    if cfg.method == "lsch":
        from medhash.services.lsch.pipeline import build_lsch

        return build_lsch(cfg, image_dim, text_dim, n_labels)
    return method_class(cfg.method)(cfg, image_dim, text_dim, n_labels)


def schedule(cfg: MedhashConfig) -> list[str]:
    """The training stage of every epoch of ``cfg.method``."""
    return method_class(cfg.method).schedule(cfg)


def load_trained(run: RunDir) -> tuple[MedhashConfig, torch.nn.Module]:
    """The configuration and the trained model (eval mode) of a finished run directory."""
    cfg, meta = run.config(), run.meta()
    model = build_model(cfg, meta["image_dim"], meta["text_dim"], len(run.label_names()))
    model.load_state_dict_trainable(run.weights())
    return cfg, model.eval()


@torch.no_grad()
def embed(model: torch.nn.Module, image: np.ndarray, text: np.ndarray, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Float embeddings of every image row and every text row: {"image": [N, d], "text": [M, d]}."""
    was_training = model.training
    model.eval()
    device = next(iter(model.state_dict().values())).device
    out = {
        "image": _batched(model.embed_image, image, batch_size, device),
        "text": _batched(model.embed_text, text, batch_size, device),
    }
    model.train(was_training)
    return out


def hash_codes(model: torch.nn.Module, v: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """Packed codes (np.packbits rows) of each modality's embeddings at one code length."""
    device = next(iter(model.state_dict().values())).device
    return {
        m: pack_codes(model.codes(torch.from_numpy(x).to(device), bits).cpu().numpy().astype(np.uint8))
        for m, x in v.items()
    }


def _batched(fn, rows: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    parts = [
        fn(torch.from_numpy(rows[i : i + batch_size]).to(device)).cpu().numpy()
        for i in range(0, len(rows), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32)
