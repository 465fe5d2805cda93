"""What runs any hashing method: build, load a run, embed, hash.

``cfg.method`` picks the method from the registry (:mod:`medhash.services.registry`); each is a
:class:`~medhash.services.methods.base.HashModel` (LSCH included), so the Ray Train loop, evaluation
and the Serve deployments never ask which method they run. The modules here are the methods, the
layers and losses several of them share (``layers``, ``losses``, ``gbrbm``) and LSCH's prompted LLM.
"""
from __future__ import annotations

import numpy as np
import torch

from medhash.services.codes import pack_codes
from medhash.services.config import MedhashConfig
from medhash.services.methods.base import HashModel
from medhash.services.registry import method_class
from medhash.services.run_dir import RunDir

def build_model(cfg: MedhashConfig, image_dim: int, text_dim: int, n_labels: int) -> HashModel:
    """The untrained model of ``cfg.method`` (LSCH with its frozen LLM loaded)."""
    return method_class(cfg.method).build(cfg, image_dim, text_dim, n_labels)


def schedule(cfg: MedhashConfig) -> list[str]:
    """The training stage of every epoch of ``cfg.method``."""
    return method_class(cfg.method).schedule(cfg)


def load_trained(run: RunDir, frozen_weights: bool = True) -> tuple[MedhashConfig, HashModel]:
    """The configuration and the trained model (eval mode) of a finished run directory.

    ``frozen_weights=False``: without the frozen pretrained weights (e.g. LSCH's LLM), a model that
    can hash embeddings (``codes``) but not embed features.
    """
    cfg, meta = run.config(), run.meta()
    model = method_class(cfg.method).build(cfg, meta["image_dim"], meta["text_dim"], len(run.label_names()), frozen_weights)
    model.load_state_dict_trainable(run.weights(), assign=True)
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
