"""Shared by the method tests: clustered synthetic features, an in-process training loop, hashed MAP,
and every registered method trained once on them (:func:`trained`)."""
from __future__ import annotations

from functools import cache

import numpy as np
import torch

from medhash.services.config import MedhashConfig, load_config
from medhash.services.evaluation.protocols import evaluate
from medhash.services.methods import build_model
from medhash.services.methods.base import FIT, Batch, HashModel

IMAGE_DIM, TEXT_DIM, CLASSES = 32, 16, 4
QUERIES = 40
# Every registered method's test settings: towers small enough for one core, 20 epochs of its main stage.
TEST_PARAMS = {
    "lsch": {"llm.name": "tiny-random", "method_params.lsch": {
        "align_epochs": 3, "rbm_epochs": 1, "n_virtual_tokens": 4, "m_img_tokens": 2, "m_txt_tokens": 2}},
    "msach": {},
    "dcmh": {"method_params.dcmh": {"image_hidden": 256, "text_hidden": 256}},
    "dchmt": {"method_params.dchmt": {"d_model": 64, "ff_dim": 128, "layers": 1}},
    "dhaph": {"method_params.dhaph": {"hidden": 128, "embed_dim": 64, "proxies": 32}},
    "ucch": {"method_params.ucch": {"hidden": 256}},
    "cca-itq": {},
    "float-dual": {},
}


def synthetic(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paired features of ``CLASSES`` clusters (a different random centre per class and modality)."""
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % CLASSES
    image_centres, text_centres = torch.randn(CLASSES, IMAGE_DIM, generator=g), torch.randn(CLASSES, TEXT_DIM, generator=g)
    z = image_centres[classes] + 0.8 * torch.randn(n, IMAGE_DIM, generator=g)
    t = text_centres[classes] + 0.8 * torch.randn(n, TEXT_DIM, generator=g)
    return z, t, torch.nn.functional.one_hot(classes, CLASSES).float()


def config(method: str, epochs: int = 20, bits=(16, 32), **params) -> MedhashConfig:
    """The test configuration of ``method`` with ``params`` (its ``method_params``) over the defaults."""
    return load_config(None, {
        "method": method, "method_params": {method: params},
        "codes.bits": bits, "train.epochs": epochs, "train.batch_size": 32, "train.lr": 1e-3,
    })


@cache
def trained(method: str) -> tuple[HashModel, MedhashConfig, list[dict], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(model, config, history, (z, t, labels)): ``method`` with its TEST_PARAMS trained once per test session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        z, t, labels = synthetic()
        overrides = {"method": method, "codes.bits": (16, 32), "train.epochs": 20, "train.batch_size": 32,
                     "train.lr": 1e-3, **TEST_PARAMS[method]}
        cfg = load_config(None, overrides)
        model = build_model(cfg, IMAGE_DIM, TEXT_DIM, CLASSES)
        return model, cfg, train_in_process(model, cfg, z, t, labels), (z, t, labels)
    finally:
        torch.set_num_threads(threads)


def train_in_process(model, cfg: MedhashConfig, z, t, labels, seed: int = 0) -> list[dict]:
    """Run the model's schedule on the rows after the queries, one worker; returns each epoch's loss parts."""
    torch.manual_seed(seed)
    z, t, labels = z[QUERIES:], t[QUERIES:], labels[QUERIES:]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr) if model.trainable_parameters() else None
    history = []
    for stage in model.schedule(cfg):
        if stage == FIT:
            model.fit(z, t, labels)
            history.append({"stage": stage})
            continue
        order = torch.randperm(len(z))
        for start in range(0, len(z), cfg.train.batch_size):
            rows = order[start : start + cfg.train.batch_size]
            batch = Batch(z[rows], t[rows], labels[rows], slice(None), lambda x: x)
            loss, parts = model.batch_loss(stage, batch, cfg)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append({"stage": stage, **parts})
    return history


@torch.no_grad()
def hashed_map(model, z, t, labels, bits: int) -> float:
    """Mean I2T / T2I MAP@all (labels protocol) of the first rows as queries against the rest."""
    from medhash.services.codes import pack_codes

    model.eval()
    codes = {
        "image": pack_codes(model.codes(model.embed_image(z), bits).numpy()),
        "text": pack_codes(model.codes(model.embed_text(t), bits).numpy()),
    }
    return _map(codes, labels, "hamming")


def random_map(labels, bits: int, seed: int = 0) -> float:
    """The same MAP for random codes."""
    from medhash.services.codes import pack_codes

    rng = np.random.default_rng(seed)
    codes = {m: pack_codes(rng.integers(0, 2, (len(labels), bits))) for m in ("image", "text")}
    return _map(codes, labels, "hamming")


def _map(codes: dict, labels, kind: str) -> float:
    labels = np.asarray(labels, dtype=np.uint8)
    query = {m: c[:QUERIES] for m, c in codes.items()}
    db = {m: c[QUERIES:] for m, c in codes.items()}
    names = [f"class:{i}" for i in range(labels.shape[1])]
    scores = evaluate(kind, query, db, labels[:QUERIES], labels[QUERIES:], names, directions=("i2t", "t2i"))
    return float(np.mean([scores["labels"][d]["map@all"] for d in ("i2t", "t2i")]))
