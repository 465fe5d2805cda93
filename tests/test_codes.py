"""Packing, Hamming distances and the codes .npz file."""
from __future__ import annotations

import numpy as np
import pytest

from medhash.services.codes import (
    NPZ_KEYS,
    code_health,
    hamming_distances,
    load_codes_npz,
    pack_codes,
    save_codes_npz,
    unpack_codes,
)
from medhash.services.errors import DataError


@pytest.mark.parametrize("n_bits", [1, 7, 8, 13, 64, 70, 128])
def test_pack_unpack_round_trip(n_bits):
    bits = np.random.default_rng(n_bits).integers(0, 2, size=(9, n_bits), dtype=np.uint8)
    packed = pack_codes(bits)
    assert packed.dtype == np.uint8 and packed.shape == (9, -(-n_bits // 8))
    np.testing.assert_array_equal(unpack_codes(packed, n_bits), bits)


def test_pack_is_big_endian_and_accepts_bool():
    packed = pack_codes(np.array([[True, False, False, False, False, False, False, True, True]]))
    np.testing.assert_array_equal(packed, [[0b10000001, 0b10000000]])


def test_pack_refuses_non_binary_values():
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_codes(np.array([[0, 2, 1]]))
    with pytest.raises(ValueError, match="2-D"):
        pack_codes(np.array([0, 1]))


@pytest.mark.parametrize("n_bits", [3, 16, 40, 64, 128])
def test_hamming_matches_bitwise_reference(n_bits, monkeypatch):
    rng = np.random.default_rng(n_bits)
    q = rng.integers(0, 2, size=(11, n_bits), dtype=np.uint8)
    d = rng.integers(0, 2, size=(23, n_bits), dtype=np.uint8)
    expected = np.array([[int((qi != dj).sum()) for dj in d] for qi in q])
    monkeypatch.setattr("medhash.services.codes._CHUNK_BYTES", 1)  # one query per chunk: exercises the loop
    dist = hamming_distances(pack_codes(q), pack_codes(d))
    assert dist.dtype == np.int32 and dist.shape == (11, 23)
    np.testing.assert_array_equal(dist, expected)


def test_code_health_counts_constant_and_modality_split_bits():
    image = np.array([[1, 0, 1, 0, 1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 1, 0, 1, 0, 0, 1], [1, 0, 0, 0, 1, 1, 1, 1, 0, 1]])
    text = image.copy()
    text[:, 0] = 0  # bit 0: on for every image, off for every text
    text[:2, 1] = 1  # bit 1: a third of the images, two thirds of the texts: not split
    health = code_health(pack_codes(image), pack_codes(text), 10)
    # constant image bits 0, 3, 4, 6, 8, 9 (padding bits never count); text bits 0, 3, 4, 6, 8, 9
    assert health == {"constant_image": 6, "constant_text": 6, "modality_split": 1}
    empty = code_health(pack_codes(image[:0]), pack_codes(text[:0]), 10)
    assert empty == {"constant_image": 0, "constant_text": 0, "modality_split": 0}


def test_hamming_refuses_different_widths():
    with pytest.raises(ValueError, match="do not match"):
        hamming_distances(np.zeros((2, 4), np.uint8), np.zeros((3, 8), np.uint8))


def _codes_run(rng, n_query=5, n_db=12, n_bits=32, n_labels=4):
    def codes(n):
        return pack_codes(rng.integers(0, 2, size=(n, n_bits)))

    return dict(
        query_img=codes(n_query), query_txt=codes(n_query), db_img=codes(n_db), db_txt=codes(n_db),
        query_ids=[f"q{i}" for i in range(n_query)], db_ids=[f"MPX{i}_synpic{i}" for i in range(n_db)],
        query_labels=rng.integers(0, 2, size=(n_query, n_labels)),
        db_labels=rng.integers(0, 2, size=(n_db, n_labels)),
        label_names=["location:Head", "location:Thorax", "topic:Glioma", "topic:Fracture"],
    )


def test_npz_round_trip(tmp_path):
    run = _codes_run(np.random.default_rng(0))
    path = save_codes_npz(tmp_path / "sub" / "codes.npz", **run)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(NPZ_KEYS)
    loaded = load_codes_npz(path)
    for key in NPZ_KEYS:
        np.testing.assert_array_equal(loaded[key], np.asarray(run[key]))
    assert loaded["db_img"].dtype == np.uint8 and loaded["db_labels"].dtype == np.uint8
    assert loaded["db_ids"].dtype.kind == "U" and loaded["label_names"][2] == "topic:Glioma"


def test_npz_refuses_inconsistent_arrays(tmp_path):
    run = _codes_run(np.random.default_rng(1))
    run["db_txt"] = run["db_txt"][:-1]
    with pytest.raises(DataError, match="db_txt has shape"):
        save_codes_npz(tmp_path / "bad.npz", **run)
    assert not (tmp_path / "bad.npz").exists()


def test_load_reports_missing_unreadable_and_incomplete_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_codes_npz(tmp_path / "absent.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="garbage.npz"):
        load_codes_npz(garbage)
    partial = tmp_path / "partial.npz"
    np.savez(partial, query_img=np.zeros((1, 4), np.uint8))
    with pytest.raises(DataError, match="missing arrays .*db_img"):
        load_codes_npz(partial)
