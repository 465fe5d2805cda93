"""The query path in one process: image bytes / report text -> v -> packed binary codes.

The Serve deployments wrap these classes one each (ImageEncoder, TextEncoder, Hasher); tests,
benchmarks and bulk ingestion call them directly, so every path runs the same code.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from medhash.services.codes import pack_codes
from medhash.services.config import MedhashConfig, check_code_length
from medhash.services.data.images import MAX_PIXELS, decode_image
from medhash.services.errors import DataError
from medhash.services.methods import load_trained
from medhash.services.run_dir import RunDir


class ImageEmbedder:
    """Image bytes -> v^x: decode, the run's image backbone, the method's image branch (on ``device``)."""

    def __init__(self, cfg: MedhashConfig, model: torch.nn.Module, max_pixels: int = MAX_PIXELS, device: str = "cpu"):
        from medhash.services.backbones.image import build_image_backbone

        self.encoder = build_image_backbone(cfg.image_backbone).eval().to(device)
        self.model = model.to(device)
        self.max_pixels = max_pixels
        self.device = device

    def preprocess(self, data: bytes, name: str) -> Tensor:
        """One image as the backbone's input tensor; DataError for anything that is not a usable image."""
        image = decode_image(data, name, dicom=name.lower().endswith((".dcm", ".dicom")), max_pixels=self.max_pixels)
        return self.encoder.preprocess(image)

    @torch.inference_mode()
    def embed(self, pixels: list[Tensor]) -> np.ndarray:
        """v^x [B, d] of preprocessed images."""
        return self.model.embed_image(self.encoder(torch.stack(pixels).to(self.device))).cpu().numpy().astype(np.float32)

    def __call__(self, images: list[bytes], names: list[str] | None = None) -> np.ndarray:
        names = names or [f"image {i}" for i in range(len(images))]
        return self.embed([self.preprocess(data, name) for data, name in zip(images, names)])


class TextEmbedder:
    """Report text -> v^y: the run's text encoder, the method's text branch (on ``device``)."""

    def __init__(self, cfg: MedhashConfig, model: torch.nn.Module, max_chars: int = 20_000, device: str = "cpu"):
        from medhash.services.backbones.text import build_text_backbone

        self.encoder = build_text_backbone(cfg.text_backbone, cfg.llm, loaded_llm=model.frozen_llm()).eval().to(device)
        self.model = model.to(device)
        self.max_chars = max_chars

    def check(self, text: object) -> str:
        """The text in Unicode normal form C, or a DataError when it is not a non-empty, valid
        Unicode string within the size limit (checked per request, so one bad text never fails a batch)."""
        if not isinstance(text, str):
            raise DataError(f"text must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"text is not valid Unicode (an unpaired surrogate at character {exc.start})") from None
        text = unicodedata.normalize("NFC", text)
        if not text.strip():
            raise DataError("text is empty: nothing to encode")
        if len(text) > self.max_chars:
            raise DataError(f"text has {len(text):,} characters, more than the {self.max_chars:,} limit")
        return text

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        """v^y [B, d] of checked texts."""
        return self.model.embed_text(self.encoder.encode(texts)).cpu().numpy().astype(np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.embed([self.check(text) for text in texts])


class Hasher:
    """v -> packed codes (np.packbits rows) through the run's hashing heads, one per code length."""

    def __init__(self, model: torch.nn.Module):
        self.model = model  # on the CPU: the heads are small, and a model loaded without frozen weights cannot move
        self.bits = tuple(sorted(model.bits))

    def check_bits(self, bits: int | None) -> int:
        """``bits``, or the longest trained code length when None; ConfigError for an untrained one."""
        if bits is None:
            return self.bits[-1]
        return check_code_length(bits, self.bits)

    @torch.inference_mode()
    def __call__(self, v: np.ndarray, bits: int) -> np.ndarray:
        codes = self.model.codes(torch.tensor(np.asarray(v, dtype=np.float32)), self.check_bits(bits))
        return pack_codes(codes.numpy().astype(np.uint8))

    def all_bits(self, v: np.ndarray) -> dict[int, np.ndarray]:
        """Packed codes of ``v`` at every trained code length."""
        return {bits: self(v, bits) for bits in self.bits}


@dataclass
class Pipeline:
    """The whole query path of one run directory."""

    image: ImageEmbedder
    text: TextEmbedder
    hasher: Hasher

    @classmethod
    def load(cls, run: RunDir, max_image_pixels: int = MAX_PIXELS, max_text_chars: int = 20_000) -> "Pipeline":
        cfg, model = load_trained(run)
        return cls(ImageEmbedder(cfg, model, max_image_pixels), TextEmbedder(cfg, model, max_text_chars), Hasher(model))

    def image_codes(self, images: list[bytes], bits: int | None = None) -> np.ndarray:
        return self.hasher(self.image(images), self.hasher.check_bits(bits))

    def text_codes(self, texts: list[str], bits: int | None = None) -> np.ndarray:
        return self.hasher(self.text(texts), self.hasher.check_bits(bits))
