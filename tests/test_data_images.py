"""load_image on real files, pydicom's test files, DICOMs built with pydicom, and every kind of bad input."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from medhash.services.data.images import MAX_PIXELS, decode_image, load_image
from medhash.services.errors import DataError


def write_dicom(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", syntax=ExplicitVRLittleEndian, **attributes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
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


def pydicom_file(name: str) -> Path:
    """One of pydicom's bundled test files; the test is skipped when it is not installed."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom's test data (it is only downloaded on demand)")
    return Path(path)


def decode_in_fresh_python(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[str, float]:
    """Decode ``path`` in a new interpreter: the DataError message (or "decoded") and the rise of peak memory in MB."""
    script = """if True:
        import resource, sys
        from pathlib import Path
        from medhash.services.data.images import decode_image
        from medhash.services.errors import DataError
        data = Path(sys.argv[1]).read_bytes()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_image(data, Path(sys.argv[1]).name, max_pixels=int(sys.argv[2]))
            message = "decoded"
        except DataError as exc:
            message = str(exc)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        print(message)
    """
    out = subprocess.run([sys.executable, "-c", script, str(path), str(max_pixels)], capture_output=True, text=True, check=True)
    rise, message = out.stdout.splitlines()
    return message, float(rise)


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
    with pytest.raises(DataError, match="t.dcm: the DICOM file is truncated or damaged"):
        load_image(path)


def test_missing_empty_non_image(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty.png: image file is empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.png").write_text("not an image at all\n" * 20)
    with pytest.raises(DataError, match="notes.png: not a PNG, JPEG or DICOM image"):
        load_image(tmp_path / "notes.png")


def test_corrupt_and_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png: the image file is truncated or damaged"):
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
    with pytest.raises(DataError, match=r"bomb.png: a 11,000 x 10,000 image .* \(limit 100,000,000 pixels after padding"):
        load_image(tmp_path / "bomb.png")
    assert MAX_PIXELS == 100_000_000


def test_huge_dicom_is_refused_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "big.dcm", RAMP)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 20_000, 20_000
    ds.save_as(path)
    with pytest.raises(DataError, match="big.dcm: a 20,000 x 20,000 image is too large"):
        load_image(path)


def test_thin_png_is_refused_from_its_header(tmp_path):
    # 157 bytes, 40,000 pixels, but padded to a square for the backbone it is 1.6 G pixels
    Image.new("L", (1, 40_000)).save(tmp_path / "thin.png")
    assert (tmp_path / "thin.png").stat().st_size < 1_000
    with pytest.raises(DataError, match=r"thin.png: a 1 x 40,000 image is too large or too thin to search \(limit"):
        load_image(tmp_path / "thin.png")
    message, rise_mb = decode_in_fresh_python(tmp_path / "thin.png")
    assert "too large or too thin" in message and rise_mb < 50


def test_thin_or_many_frame_dicom_is_refused(tmp_path):
    path = write_dicom(tmp_path / "thin.dcm", RAMP)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 40_000, 1
    ds.save_as(path)
    with pytest.raises(DataError, match="thin.dcm: a 1 x 40,000 image is too large or too thin"):
        load_image(path)
    path = write_dicom(tmp_path / "frames.dcm", RAMP, NumberOfFrames=200_000)  # 8 x 100 frames: 160 M pixels in all
    with pytest.raises(DataError, match=r"frames.dcm: 200,000 frames of 100 x 8 pixels are too many to search \(limit"):
        load_image(path)


def test_deflated_dicom_decodes_and_its_bomb_is_refused(tmp_path):
    plain = load_image(write_dicom(tmp_path / "plain.dcm", RAMP))
    deflated = load_image(write_dicom(tmp_path / "deflated.dcm", RAMP, syntax=DeflatedExplicitVRLittleEndian))
    assert np.array_equal(np.asarray(plain), np.asarray(deflated))
    # 32 MB of pixels deflate to 32 KB; with room for 100,000 pixels the cap is 1.3 MB
    bomb = write_dicom(tmp_path / "bomb.dcm", np.zeros((4000, 4000)), syntax=DeflatedExplicitVRLittleEndian)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(DataError, match="bomb.dcm: the compressed DICOM file expands to more than 1,348,576 bytes"):
        decode_image(bomb.read_bytes(), "bomb.dcm", max_pixels=100_000)
    message, rise_mb = decode_in_fresh_python(bomb, max_pixels=100_000)
    assert "expands to more than" in message and rise_mb < 10


def test_dicom_without_header_decodes(tmp_path):
    data = pydicom_file("CT_small.dcm").read_bytes()
    headerless = data[data.index(b"\x08\x00\x05\x00CS"):]  # the dataset alone, from (0008,0005) on
    expected = np.asarray(decode_image(data, "ct.dcm"))
    assert np.array_equal(np.asarray(decode_image(headerless, "ct.dcm", dicom=True)), expected)
    assert np.array_equal(np.asarray(decode_image(headerless, "ct")), expected)  # sniffed from its first tag
    (tmp_path / "scan.dcm").write_text("not a scan at all\n" * 20)
    with pytest.raises(DataError, match="scan.dcm: not a PNG, JPEG or DICOM image"):
        load_image(tmp_path / "scan.dcm")


def test_content_decides_over_the_name(tmp_path):
    Image.new("RGB", (20, 10), (200, 30, 30)).save(tmp_path / "photo.dcm", format="JPEG")
    assert load_image(tmp_path / "photo.dcm").size == (20, 10)
    write_dicom(tmp_path / "scan.png", RAMP)
    assert load_image(tmp_path / "scan.png").size == (100, 8)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_compressed_dicom_matches_the_uncompressed(name):
    assert np.array_equal(np.asarray(load_image(pydicom_file(name))), np.asarray(load_image(pydicom_file("MR_small.dcm"))))


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm"])
def test_ybr_dicom_becomes_rgb(name):
    expected = np.asarray(load_image(pydicom_file("SC_rgb_rle.dcm")), dtype=int)  # the same colour bars, stored as RGB
    assert np.abs(np.asarray(load_image(pydicom_file(name)), dtype=int) - expected).mean() < 2


PYDICOM_CASES = {  # file: (mode, size) it decodes to, or the error it gets
    "CT_small.dcm": ("L", (128, 128)),
    "MR_small.dcm": ("L", (64, 64)),
    "MR_small_jpeg_ls_lossless.dcm": ("L", (64, 64)),  # JPEG-LS
    "JPGExtended.dcm": ("L", (256, 1024)),  # 12-bit JPEG Extended
    "JPEG-lossy.dcm": "JPEG-lossy.dcm: the DICOM file is truncated or damaged",  # its JPEG stream is broken
    "JPEG2000.dcm": ("L", (256, 1024)),
    "examples_jpeg2k.dcm": ("RGB", (640, 480)),
    "examples_palette.dcm": ("RGB", (800, 350)),
    "examples_ybr_color.dcm": ("RGB", (320, 240)),  # first of 30 JPEG frames
    "image_dfl.dcm": ("L", (512, 512)),  # deflated
    "MR_truncated.dcm": "MR_truncated.dcm: the DICOM file is truncated or damaged",
    "rtplan.dcm": "rtplan.dcm: the DICOM file holds no image",
    # CT_small's dataset, but starting with a stray byte of the cut-off header: it parses as one unknown element
    "no_meta.dcm": "no_meta.dcm: not a PNG, JPEG or DICOM image",
}


@pytest.mark.parametrize("name", PYDICOM_CASES)
def test_pydicom_test_files(name):
    expected, path = PYDICOM_CASES[name], pydicom_file(name)
    if isinstance(expected, str):
        with pytest.raises(DataError, match=f"^{expected}$"):
            decode_image(path.read_bytes(), name, dicom=True)
        return
    image = decode_image(path.read_bytes(), name, dicom=True)
    pixels = np.asarray(image)
    assert (image.mode, image.size) == expected and pixels.min() < pixels.max()
    if image.mode == "RGB":
        assert (pixels[..., 0] != pixels[..., 2]).mean() > 0.01  # in colour, not grey


@pytest.mark.real
def test_real_images_load(shared_data):
    for path in sorted((shared_data / "medpix2" / "images").glob("*.png"))[:5]:
        image = load_image(path)
        assert image.mode in ("L", "RGB") and max(image.size) == 256


def test_describe_image_names_the_format_and_the_dicom_modality(tmp_path):
    from medhash.services.data.images import describe_image

    image, about = describe_image(pydicom_file("CT_small.dcm").read_bytes(), "CT_small.dcm")
    assert image.size == (128, 128) and about["format"] == "DICOM" and about["modality"] == "CT"
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buffer, format="JPEG")
    image, about = describe_image(buffer.getvalue(), "photo")
    assert image.size == (30, 20) and about == {"format": "JPEG", "modality": "", "body_part": "", "window": ""}
