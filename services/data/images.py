"""Load one medical image (PNG / JPEG / DICOM ...) as an 8-bit PIL image, or fail with a DataError."""
from __future__ import annotations

import io
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medhash.services.errors import DataError

MAX_PIXELS = 100_000_000  # decompression-bomb limit on the padded square: larger images are refused
_PILLOW_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_DICOM_START = (b"\x02\x00", b"\x08\x00", b"\x00\x08")  # first tag group 0002 / 0008 of a file without preamble
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_CHUNK = 1 << 20


def load_image(path: Path) -> Image.Image:
    """The image at ``path`` in mode "L" (grayscale) or "RGB".

    DICOM is decoded with pydicom (any transfer syntax its plugins read): rescale slope / intercept,
    the VOI window when the file has one (else min-max), MONOCHROME1 inverted, palettes and YBR
    turned to RGB, first frame of a multi-frame file. Everything else goes through Pillow; 16-bit
    images are min-max scaled.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: image file is empty (0 bytes)")
    return decode_image(path.read_bytes(), str(path), dicom=path.suffix.lower() in (".dcm", ".dicom"))


def decode_image(data: bytes, name: str, dicom: bool = False, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image encoded in ``data`` (as :func:`load_image`); ``name`` identifies it in errors.

    The content decides: the ``DICM`` magic means DICOM, a PNG / JPEG / GIF / BMP / TIFF / WebP
    signature means Pillow; otherwise DICOM without a header is tried when ``dicom`` is set or the
    bytes start like one. Images whose padded square exceeds ``max_pixels`` are refused from their
    header, before their pixels are decoded.
    """
    if not data:
        raise DataError(f"{name}: image is empty (0 bytes)")
    if data[128:132] == b"DICM":
        return _load_dicom(data, name, max_pixels, headerless=False)
    pillow = data.startswith(_PILLOW_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    if not pillow and (dicom or data.startswith(_DICOM_START)):
        return _load_dicom(data, name, max_pixels, headerless=True)
    return _load_pillow(io.BytesIO(data), name, max_pixels)


def describe_image(data: bytes, name: str, dicom: bool = False,
                   max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, dict[str, str]]:
    """:func:`decode_image` and what a reader checks before searching with it: the file format, and
    for DICOM its modality, body part and window (empty strings when the file does not say)."""
    image = decode_image(data, name, dicom=dicom, max_pixels=max_pixels)
    return image, {"format": image.info.get("format", ""), "modality": image.info.get("modality", ""),
                   "body_part": image.info.get("body_part", ""), "window": image.info.get("window", "")}


def _load_pillow(source: io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is enforced below
            with Image.open(source) as image:
                _check_size(name, image.width, image.height, max_pixels)
                image.load()
                converted = _to_8bit(image)
                converted.info["format"] = image.format or ""
                return converted
    except UnidentifiedImageError:
        raise _not_an_image(name) from None
    except Image.DecompressionBombError:
        raise DataError(f"{name}: the image is too large to search") from None
    except (OSError, SyntaxError, ValueError):
        raise DataError(f"{name}: the image file is truncated or damaged") from None


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    """Refuse an image whose square padding (the backbone's input) exceeds ``max_pixels``."""
    if max(width, height) ** 2 > max_pixels:
        raise DataError(
            f"{name}: a {width:,} x {height:,} image is too large or too thin to search "
            f"(limit {max_pixels:,} pixels after padding to a square)"
        )


def _not_an_image(name: str) -> DataError:
    return DataError(f"{name}: not a PNG, JPEG or DICOM image")


def _to_8bit(image: Image.Image) -> Image.Image:
    if image.mode in ("L", "RGB"):
        return image.copy()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return Image.fromarray(_min_max_uint8(np.asarray(image, dtype=np.float64)), mode="L")
    if image.mode in ("1", "LA"):
        return image.convert("L")
    return image.convert("RGB")


def _min_max_uint8(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return np.round(scaled * 255).astype(np.uint8)


def _load_dicom(data: bytes, name: str, max_pixels: int, headerless: bool) -> Image.Image:
    ds = _open_dicom(data, name, max_pixels, headerless)
    image = _dicom_pixels(ds, name)
    window = _voi_window(ds) if image.mode == "L" else None
    image.info.update(format="DICOM", modality=str(ds.get("Modality") or ""), body_part=str(ds.get("BodyPartExamined") or ""),
                      window=f"center {window[0]:g}, width {window[1]:g}" if window else "")
    return image


def _dicom_pixels(ds: pydicom.Dataset, name: str) -> Image.Image:
    pixels = _first_frame(ds, name)
    if pixels.ndim == 3:  # colour: pydicom has turned YBR, _first_frame a palette, into RGB
        if pixels.dtype != np.uint8:
            pixels = np.round(pixels / (2 ** int(ds.get("BitsStored") or 16) - 1) * 255).clip(0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="RGB")
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope") or 1)
    values += float(ds.get("RescaleIntercept") or 0)
    window = _voi_window(ds)
    if window is not None:
        center, width = window
        values = np.clip((values - (center - width / 2)) / width, 0.0, 1.0) * 255
        gray = np.round(values).astype(np.uint8)
    else:
        gray = _min_max_uint8(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray, mode="L")


def _open_dicom(data: bytes, name: str, max_pixels: int, headerless: bool) -> pydicom.Dataset:
    """The parsed dataset of an image within ``max_pixels``, with a transfer syntax its pixels decode by.

    A file without the DICOM header that does not parse as DICOM is "not an image"; a deflated
    dataset is inflated here, refused when it would exceed 3 bytes a pixel (plus 1 MB).
    """
    try:
        ds = _parse_dicom(data, name, 3 * max_pixels + _CHUNK, headerless)
        if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
            if headerless and "SOPClassUID" not in ds:
                raise _not_an_image(name)
            raise DataError(f"{name}: the DICOM file holds no image")
        rows, columns, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1)
    except DataError:
        raise
    except Exception:  # pydicom raises many kinds for truncated / odd files
        if headerless:
            raise _not_an_image(name) from None
        raise DataError(f"{name}: the DICOM file is truncated or damaged") from None
    _check_size(name, columns, rows, max_pixels)
    if rows * columns * frames > max_pixels:
        raise DataError(
            f"{name}: {frames:,} frames of {columns:,} x {rows:,} pixels are too many to search "
            f"(limit {max_pixels:,} pixels in all)"
        )
    return ds


def _parse_dicom(data: bytes, name: str, inflate_limit: int, headerless: bool) -> pydicom.Dataset:
    source = io.BytesIO(data)
    read_preamble(source, force=headerless)
    meta = read_dataset(source, is_implicit_VR=False, is_little_endian=True, stop_when=lambda tag, *_: tag >> 16 != 2)
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        ds = read_dataset(io.BytesIO(_inflate(data[source.tell():], name, inflate_limit)), False, True)
        ds.file_meta = FileMetaDataset(meta)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the inflated pixels are native
        return ds
    ds = pydicom.dcmread(io.BytesIO(data), force=headerless)
    if "TransferSyntaxUID" not in ds.file_meta:  # no header: the encoding pydicom guessed
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _inflate(deflated: bytes, name: str, limit: int) -> bytes:
    """``deflated`` (raw deflate) inflated, after a first pass that counts its size chunk by chunk."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, chunk = 0, inflater.decompress(deflated, _CHUNK)
    while chunk:
        size += len(chunk)
        if size > limit:
            raise DataError(f"{name}: the compressed DICOM file expands to more than {limit:,} bytes, too large to search")
        chunk = inflater.decompress(inflater.unconsumed_tail, _CHUNK)
    return zlib.decompress(deflated, -zlib.MAX_WBITS)


def _first_frame(ds: pydicom.Dataset, name: str) -> np.ndarray:
    """The first frame's pixels, a palette applied (16-bit palettes to 8-bit RGB).

    A DataError when they are damaged or compressed in a way no installed plugin reads.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    try:
        readable = get_decoder(syntax).is_available
    except NotImplementedError:
        readable = False
    if not readable:
        raise DataError(f"{name}: the DICOM image uses a compression that cannot be read here ({syntax.name})")
    try:
        ds.pixel_array_options(index=0)
        pixels = ds.pixel_array
        if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
            rgb = apply_color_lut(pixels, ds)
            pixels = rgb if rgb.dtype == np.uint8 else (rgb // 256).astype(np.uint8)
        return pixels
    except Exception:  # the plugins raise many kinds for damaged pixel data
        raise DataError(f"{name}: the DICOM file is truncated or damaged") from None


def _voi_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first (center, width) VOI window of the file, if it has a usable one."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = (float(v[0] if isinstance(v, MultiValue) else v) for v in (ds.WindowCenter, ds.WindowWidth))
    return (center, width) if width > 0 else None
