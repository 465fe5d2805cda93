"""All medhash configuration, typed and validated in one place.

A YAML file maps onto :class:`MedhashConfig`; every section has working offline defaults, so an
empty file (or none) is a valid configuration. Unknown keys and wrong values are refused with a
message that names the field.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.errors import ConfigError

DatasetName = Literal["medpix2", "covid-cxr", "iu-xray", "mimic-cxr", "manifest"]


def cache_root() -> Path:
    """Where medhash keeps features, converted weights and augmentations (``MEDHASH_CACHE``)."""
    return Path(os.environ.get("MEDHASH_CACHE", Path.home() / ".cache" / "medhash"))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    """Which dataset to read, from where, and how to split it."""

    dataset: DatasetName = "medpix2"
    root: Path | None = None  # dataset folder; None: $MEDHASH_DATA/<default folder>
    images: Path | None = None  # image folder where it lives apart from the reports (IU X-ray)
    split_file: Path | None = None  # CSV `id,split` overriding the dataset's own split
    seed: int = 0  # seed of the patient-level split where the source has none


class ImageBackboneConfig(Section):
    """Image backbone g(.): the offline EfficientNet-Lite0, or any HF / timm model by id or path."""

    kind: Literal["efficientnet-lite", "hf", "timm"] = "efficientnet-lite"
    name: str = "efficientnet-lite0"  # model id or local path
    image_size: int = Field(224, ge=32, le=1024)
    batch_size: int = Field(16, ge=1)


class TextBackboneConfig(Section):
    """Text encoder: the offline all-MiniLM-L6-v2, or any HF encoder by id or path."""

    name: str = "all-MiniLM-L6-v2"  # "all-MiniLM-L6-v2" resolves to the offline package
    max_length: int = Field(128, ge=8, le=8192)
    batch_size: int = Field(32, ge=1)


class LLMConfig(Section):
    """The causal LM used for augmentation and prompt-tuned alignment."""

    name: str = "gemma-3-270m"  # "gemma-3-270m" resolves to the offline GGUF package
    num_layers: int | None = Field(None, ge=1)  # keep only the first N decoder layers (CPU budget)


class MedhashConfig(Section):
    """The whole configuration."""

    data: DataConfig = DataConfig()
    image_backbone: ImageBackboneConfig = ImageBackboneConfig()
    text_backbone: TextBackboneConfig = TextBackboneConfig()
    llm: LLMConfig = LLMConfig()


def load_config(path: Path | str | None = None, **overrides: dict) -> MedhashConfig:
    """Read a YAML config (or the defaults) and apply per-section overrides.

    ``overrides`` maps a section name to a dict of fields, e.g. ``data={"dataset": "covid-cxr"}``.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for section, fields in overrides.items():
        raw.setdefault(section, {}).update({k: v for k, v in fields.items() if v is not None})
    try:
        return MedhashConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
