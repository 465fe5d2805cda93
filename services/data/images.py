"""Load one medical image (PNG / JPEG / DICOM) as an 8-bit PIL image, or fail with a DataError."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.multival import MultiValue

from medhash.services.errors import DataError

MAX_PIXELS = 100_000_000  # decompression-bomb limit: larger images are refused, not just warned about


def load_image(path: Path) -> Image.Image:
    """The image at ``path`` in mode "L" (grayscale) or "RGB".

    DICOM (``.dcm`` or the ``DICM`` magic) is decoded with pydicom: rescale slope / intercept, the
    VOI window when the file has one (else min-max), MONOCHROME1 inverted, first frame of a
    multi-frame file. Everything else goes through Pillow; 16-bit images are min-max scaled.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: image file is empty (0 bytes)")
    return decode_image(path.read_bytes(), str(path), dicom=path.suffix.lower() in (".dcm", ".dicom"))


def decode_image(data: bytes, name: str, dicom: bool = False, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image encoded in ``data`` (as :func:`load_image`); ``name`` identifies it in errors.

    DICOM when ``dicom`` is set or the bytes carry the ``DICM`` magic; images of more than
    ``max_pixels`` pixels are refused before their pixels are decoded.
    """
    if not data:
        raise DataError(f"{name}: image is empty (0 bytes)")
    if dicom or data[128:132] == b"DICM":
        return _load_dicom(io.BytesIO(data), name, max_pixels)
    return _load_pillow(io.BytesIO(data), name, max_pixels)


def _load_pillow(source: io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is enforced below
            with Image.open(source) as image:
                _check_size(name, image.width * image.height, max_pixels)
                image.load()
                return _to_8bit(image)
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image Pillow or pydicom can read") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{name}: image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: corrupt or truncated image ({exc})") from None


def _check_size(name: str, pixels: int, max_pixels: int) -> None:
    if pixels > max_pixels:
        raise DataError(f"{name}: image has {pixels:,} pixels, more than the {max_pixels:,} limit")


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


def _load_dicom(source: io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    try:
        ds = pydicom.dcmread(source)
        rows, columns = int(ds.Rows), int(ds.Columns)
        _check_size(name, rows * columns * int(getattr(ds, "NumberOfFrames", 1) or 1), max_pixels)
        pixels = ds.pixel_array
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many kinds for truncated / odd files
        raise DataError(f"{name}: unreadable DICOM ({type(exc).__name__}: {exc})") from None
    color = int(getattr(ds, "SamplesPerPixel", 1)) == 3
    if pixels.ndim == (4 if color else 3):
        pixels = pixels[0]
    if color:
        return Image.fromarray(_min_max_uint8(pixels.astype(np.float64)), mode="RGB")
    values = pixels.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1)
    values += float(getattr(ds, "RescaleIntercept", 0) or 0)
    window = _voi_window(ds)
    if window is not None:
        center, width = window
        values = np.clip((values - (center - width / 2)) / width, 0.0, 1.0) * 255
        gray = np.round(values).astype(np.uint8)
    else:
        gray = _min_max_uint8(values)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray, mode="L")


def _voi_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first (center, width) VOI window of the file, if it has a usable one."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center, width = (float(v[0] if isinstance(v, MultiValue) else v) for v in (ds.WindowCenter, ds.WindowWidth))
    return (center, width) if width > 0 else None
