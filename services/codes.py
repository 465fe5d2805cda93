"""Binary hash codes: packing, Hamming distances, and the `.npz` file that carries a run's codes.

Codes are packed along each row with :func:`numpy.packbits` (big-endian bit order: bit 0 of a
code is the most significant bit of its first byte), so a K-bit code takes ceil(K/8) bytes, the
layout FAISS ``IndexBinaryFlat`` and Milvus ``BINARY_VECTOR`` expect.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from collections.abc import Sequence

import numpy as np

from medhash.services.errors import DataError

CODE_KEYS = ("query_img", "query_txt", "db_img", "db_txt")
NPZ_KEYS = (*CODE_KEYS, "query_ids", "db_ids", "query_labels", "db_labels", "label_names")
_CHUNK_BYTES = 64 * 2**20  # XOR buffer per chunk of queries in hamming_distances


def pack_codes(bits01: np.ndarray) -> np.ndarray:
    """Pack {0,1} (or bool) codes of shape (N, K) into uint8 of shape (N, ceil(K/8))."""
    bits = np.asarray(bits01)
    if bits.ndim != 2:
        raise ValueError(f"codes must be 2-D (items, bits), got shape {bits.shape}")
    if bits.dtype != bool and not np.isin(bits, (0, 1)).all():
        raise ValueError("codes must hold only 0 and 1")
    return np.packbits(bits.astype(np.uint8), axis=1)


def unpack_codes(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 {0,1} of shape (N, n_bits)."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=1, count=n_bits)


def code_health(image_packed: np.ndarray, text_packed: np.ndarray, n_bits: int) -> dict[str, int]:
    """Bits that tell no items apart: constant over every image or every text code, and split by modality
    (on for most images and off for most texts, or the reverse: |mean difference| > 0.5), which adds about
    the same distance between any image and any text."""
    image, text = unpack_codes(image_packed, n_bits), unpack_codes(text_packed, n_bits)
    if not len(image) or not len(text):
        return {"constant_image": 0, "constant_text": 0, "modality_split": 0}
    return {
        "constant_image": int((image.min(axis=0) == image.max(axis=0)).sum()),
        "constant_text": int((text.min(axis=0) == text.max(axis=0)).sum()),
        "modality_split": int((np.abs(image.mean(axis=0) - text.mean(axis=0)) > 0.5).sum()),
    }


def _as_words(packed: np.ndarray) -> np.ndarray:
    """View packed codes as uint64 words (zero-padded: padding adds nothing to a XOR popcount)."""
    packed = np.asarray(packed, dtype=np.uint8)
    pad = -packed.shape[1] % 8
    return np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad)))).view(np.uint64)


def hamming_distances(query_packed: np.ndarray, db_packed: np.ndarray) -> np.ndarray:
    """Hamming distance of every query code to every database code, int32 of shape (Q, D)."""
    if query_packed.ndim != 2 or db_packed.ndim != 2 or query_packed.shape[1] != db_packed.shape[1]:
        raise ValueError(f"packed code shapes do not match: {query_packed.shape} vs {db_packed.shape}")
    queries, database = _as_words(query_packed), _as_words(db_packed)
    out = np.empty((len(queries), len(database)), dtype=np.int32)
    step = max(1, _CHUNK_BYTES // max(1, database.nbytes))
    for start in range(0, len(queries), step):
        xor = queries[start : start + step, None, :] ^ database[None, :, :]
        out[start : start + step] = np.bitwise_count(xor).sum(axis=2, dtype=np.int32)
    return out


def save_codes_npz(
    path: Path | str,
    *,
    query_img: np.ndarray,
    query_txt: np.ndarray,
    db_img: np.ndarray,
    db_txt: np.ndarray,
    query_ids: Sequence[str],
    db_ids: Sequence[str],
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    label_names: Sequence[str],
) -> Path:
    """Write one run's packed codes, ids and multi-hot labels (atomically) to ``path``."""
    arrays = {
        "query_img": np.asarray(query_img, dtype=np.uint8),
        "query_txt": np.asarray(query_txt, dtype=np.uint8),
        "db_img": np.asarray(db_img, dtype=np.uint8),
        "db_txt": np.asarray(db_txt, dtype=np.uint8),
        "query_ids": np.asarray(query_ids, dtype=str),
        "db_ids": np.asarray(db_ids, dtype=str),
        "query_labels": np.asarray(query_labels, dtype=np.uint8),
        "db_labels": np.asarray(db_labels, dtype=np.uint8),
        "label_names": np.asarray(label_names, dtype=str),
    }
    _check_consistent(arrays, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(tmp, path)
    return path


def load_codes_npz(path: Path | str) -> dict[str, np.ndarray]:
    """Read a file written by :func:`save_codes_npz`.

    A missing, unreadable, incomplete or inconsistent file raises DataError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"codes file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable codes .npz file: {exc}") from exc
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise DataError(f"{path}: missing arrays {', '.join(missing)}")
    _check_consistent(arrays, str(path))
    return {key: arrays[key] for key in NPZ_KEYS}


def _check_consistent(arrays: dict[str, np.ndarray], where: str) -> None:
    """Raise DataError unless rows, code widths and label columns agree across the arrays."""
    problems = []
    width = arrays["query_img"].shape[1] if arrays["query_img"].ndim == 2 else None
    for side in ("query", "db"):
        n = len(arrays[f"{side}_ids"])
        for key in (f"{side}_img", f"{side}_txt", f"{side}_labels"):
            if arrays[key].ndim != 2 or len(arrays[key]) != n:
                problems.append(f"{key} has shape {arrays[key].shape}, expected {n} rows")
        for key in (f"{side}_img", f"{side}_txt"):
            if arrays[key].ndim == 2 and arrays[key].shape[1] != width:
                problems.append(f"{key} is {arrays[key].shape[1]} bytes wide, query_img {width}")
        labels = arrays[f"{side}_labels"]
        if labels.ndim == 2 and labels.shape[1] != len(arrays["label_names"]):
            n_names = len(arrays["label_names"])
            problems.append(f"{side}_labels has {labels.shape[1]} columns for {n_names} label names")
    if problems:
        raise DataError(f"{where}: inconsistent codes: {'; '.join(problems)}")
