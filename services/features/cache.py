"""The feature cache: backbone features computed once per (dataset, item, backbone, preprocessing).

Layout: ``cache_root()/features/<dataset>/<key hash>/`` holds ``key.txt`` (the full key) and one
``<shard>.npy`` + ``<shard>.json`` (the row keys) per encoded batch. The JSON file is written
last, atomically, so it marks a complete shard: an interrupted run keeps every finished batch
and the next run encodes only what is missing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medhash.services.config import cache_root
from medhash.services.data.images import load_image
from medhash.services.data.item import Dataset, Item
from medhash.services.backbones.image import ImageBackbone
from medhash.services.backbones.reader import LLMReader
from medhash.services.backbones.text import TextBackbone
from medhash.services.errors import DataError

log = logging.getLogger(__name__)


class FeatureCache:
    """Feature rows of one dataset under one key (view + backbone + preprocessing), sharded on disk."""

    def __init__(self, dataset_name: str, key: str, root: Path | None = None):
        self.key = key
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        self.dir = (root or cache_root()) / "features" / dataset_name / digest
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "key.txt").write_text(key + "\n", encoding="utf-8")

    @classmethod
    def for_encoder(cls, dataset_name: str, encoder: ImageBackbone | TextBackbone | LLMReader, view: str) -> "FeatureCache":
        """The cache of ``encoder`` features of one view ("image", "report", an augmented text view)."""
        return cls(dataset_name, f"{view}|{encoder.preprocessing_key}")

    def load(self) -> dict[str, np.ndarray]:
        """Every cached row by its key; unreadable shards are skipped with a warning."""
        rows: dict[str, np.ndarray] = {}
        for index_file in sorted(self.dir.glob("*.json")):
            try:
                keys = json.loads(index_file.read_text(encoding="utf-8"))
                matrix = np.load(index_file.with_suffix(".npy"))
            except (OSError, ValueError) as exc:
                log.warning("skipping unreadable feature shard %s: %s", index_file, exc)
                continue
            if len(keys) != len(matrix):
                log.warning("skipping feature shard %s: %d keys for %d rows", index_file, len(keys), len(matrix))
                continue
            rows.update(zip(keys, matrix))
        return rows

    def write(self, keys: list[str], features: np.ndarray) -> None:
        """Add one shard: the rows first, then their keys (the commit), both by atomic rename."""
        if not keys:
            return
        name = f"{time.time_ns()}-{os.getpid()}"
        _atomic_write(self.dir / f"{name}.npy", lambda f: np.save(f, features.astype(np.float32)))
        _atomic_write(self.dir / f"{name}.json", lambda f: f.write(json.dumps(keys).encode()))


def _atomic_write(path: Path, write) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as f:
        write(f)
    partial.replace(path)


def extract_image_features(
    dataset: Dataset, encoder: ImageBackbone, cache: FeatureCache, batch_size: int = 16, progress: bool = True
) -> tuple[list[str], np.ndarray]:
    """Pooled image features of every item (the mean over its images), served from ``cache``.

    Items with an unreadable image are reported one line each and left out: the returned ids say
    which items have features, in dataset order.
    """
    cached = cache.load()
    pending = [item for item in dataset.items if item.id not in cached]
    with tqdm(total=len(pending), unit="img", desc=f"{dataset.name} images", disable=not progress) as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            ids, features = _encode_images(chunk, encoder)
            cache.write(ids, features)
            cached.update(zip(ids, features))
            bar.update(len(chunk))
    return _in_order([item.id for item in dataset.items], cached, encoder.dim)


def _encode_images(items: list[Item], encoder: ImageBackbone) -> tuple[list[str], np.ndarray]:
    ids, pixels, counts = [], [], []
    for item in items:
        try:
            if not item.image_paths:
                raise DataError("no image file")
            tensors = [encoder.preprocess(load_image(path)) for path in item.image_paths]
        except DataError as exc:
            tqdm.write(f"skipped item {item.id}: {exc}", file=sys.stderr)
            continue
        ids.append(item.id)
        pixels.extend(tensors)
        counts.append(len(tensors))
    if not ids:
        return [], np.empty((0, encoder.dim), np.float32)
    with torch.inference_mode():
        per_image = encoder(torch.stack(pixels))
    per_item = [part.mean(dim=0) for part in per_image.split(counts)]
    return ids, torch.stack(per_item).numpy()


def extract_text_features(
    ids: list[str], texts: list[str], encoder: TextBackbone | LLMReader, cache: FeatureCache, progress: bool = True
) -> tuple[list[str], np.ndarray]:
    """Text embeddings of ``texts`` (one per id), served from ``cache``.

    Rows are keyed by id and a digest of the text, so an edited text is re-encoded. Empty texts are
    reported one line each and left out.
    """
    if len(ids) != len(texts):
        raise DataError(f"{len(ids)} ids but {len(texts)} texts")
    row_keys = {i: f"{i}#{hashlib.sha1(t.encode()).hexdigest()[:16]}" for i, t in zip(ids, texts)}
    cached = cache.load()
    pending = []
    for item_id, text in zip(ids, texts):
        if not text.strip():
            tqdm.write(f"skipped item {item_id}: empty text", file=sys.stderr)
        elif row_keys[item_id] not in cached:
            pending.append((item_id, text))
    batch = encoder.batch_size
    with tqdm(total=len(pending), unit="text", desc="texts", disable=not progress) as bar:
        for start in range(0, len(pending), batch):
            chunk = pending[start : start + batch]
            keys = [row_keys[item_id] for item_id, _ in chunk]
            features = encoder.encode([text for _, text in chunk]).cpu().numpy()
            cache.write(keys, features)
            cached.update(zip(keys, features))
            bar.update(len(chunk))
    found = [i for i in ids if row_keys[i] in cached]
    _, matrix = _in_order([row_keys[i] for i in found], cached, encoder.dim)
    return found, matrix


def _in_order(keys: list[str], rows: dict[str, np.ndarray], dim: int) -> tuple[list[str], np.ndarray]:
    present = [k for k in keys if k in rows]
    matrix = np.stack([rows[k] for k in present]).astype(np.float32) if present else np.empty((0, dim), np.float32)
    return present, matrix
