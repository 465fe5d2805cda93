"""load_image on real files, DICOMs built with pydicom, and every kind of bad input."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medhash.services.data.images import MAX_PIXELS, load_image
from medhash.services.errors import DataError


def write_dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", **attributes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


RAMP = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (8, 1))  # 8 x 100, values 0..990


def test_png_and_jpeg_keep_gray_or_rgb(tmp_path):
    Image.new("L", (20, 10), 7).save(tmp_path / "g.png")
    Image.new("RGB", (20, 10), (1, 2, 3)).save(tmp_path / "c.jpg")
    Image.new("RGBA", (4, 4), (9, 9, 9, 128)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "g.png").mode == "L"
    assert load_image(tmp_path / "c.jpg").mode == "RGB"
    assert load_image(tmp_path / "a.png").mode == "RGB"


def test_16_bit_png_is_min_max_scaled(tmp_path):
    Image.fromarray(RAMP.astype(np.uint16)).save(tmp_path / "deep.png")
    image = np.asarray(load_image(tmp_path / "deep.png"))
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255


def test_dicom_without_window_is_min_max(tmp_path):
    image = load_image(write_dicom(tmp_path / "a.dcm", RAMP))
    assert image.mode == "L" and image.size == (100, 8)
    row = np.asarray(image)[0]
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row.astype(int)) >= 0)


def test_dicom_rescale_and_window(tmp_path):
    # stored 0..990 -> HU -1000..-10; window center -500 width 200 spans stored 400..600
    path = write_dicom(tmp_path / "ct.dcm", RAMP, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=-500, WindowWidth=200)
    row = np.asarray(load_image(path))[0]
    assert row[:40].max() == 0 and row[61:].min() == 255  # clipped outside the window
    assert 100 < row[50] < 155  # stored 500 -> HU -500, the window centre


def test_monochrome1_is_inverted(tmp_path):
    normal = np.asarray(load_image(write_dicom(tmp_path / "m2.dcm", RAMP)))
    inverted = np.asarray(load_image(write_dicom(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1")))
    assert np.array_equal(inverted, 255 - normal)


def test_dicom_found_by_magic_without_suffix(tmp_path):
    path = write_dicom(tmp_path / "image.dcm", RAMP)
    renamed = path.rename(tmp_path / "image_no_suffix")
    assert load_image(renamed).size == (100, 8)


def test_truncated_dicom(tmp_path):
    path = write_dicom(tmp_path / "t.dcm", RAMP)
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(DataError, match="t.dcm: unreadable DICOM"):
        load_image(path)


def test_missing_empty_non_image(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: image file is empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("not an image at all\n" * 20)
    with pytest.raises(DataError, match="notes.png: not an image"):
        load_image(tmp_path / "notes.png")


def test_corrupt_and_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png: corrupt or truncated"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "bad.png").write_bytes(data[:8] + b"\x00" * 100)
    with pytest.raises(DataError, match="bad.png"):
        load_image(tmp_path / "bad.png")


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (valid CRCs): a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header(11_000, 10_000))  # 110 M pixels: over our limit, under Pillow's
    with pytest.raises(DataError, match="more than the 100,000,000 limit"):
        load_image(tmp_path / "bomb.png")
    assert MAX_PIXELS == 100_000_000


def test_huge_dicom_is_refused_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "big.dcm", RAMP)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 20_000, 20_000
    ds.save_as(path)
    with pytest.raises(DataError, match="big.dcm: image has 400,000,000 pixels"):
        load_image(path)


@pytest.mark.real
def test_real_images_load(shared_data):
    for path in sorted((shared_data / "medpix2" / "images").glob("*.png"))[:5]:
        image = load_image(path)
        assert image.mode in ("L", "RGB") and max(image.size) == 256
