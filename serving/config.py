"""The serving app's settings: HTTP, auth, input limits, batching, per-deployment scaling, its index.

A serving YAML (``medhash serve --config``, or ``args.config`` of a Serve config such as
deploy/serve.yaml) holds a ``serve`` section and, optionally, an ``index`` section; without one the
run's own ``index`` section applies. The run's training configuration holds no serving settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pydantic import Field

from medhash.services.config import IndexConfig, Section, read_yaml, validated


class DeploymentResources(Section):
    """Replicas and resources of one Ray Serve deployment (autoscaled between min and max replicas)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)  # per replica; more in flight scales up
    num_cpus: float = Field(0.25, gt=0)  # fractional: several replicas share a core
    num_gpus: float = Field(0.0, ge=0)  # > 0 on GPU nodes (encoders)


class ServeConfig(Section):
    """The Ray Serve application: HTTP, auth, input limits, batching and per-deployment scaling."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    auth_token_env: str = "MEDHASH_API_TOKEN"  # environment variable holding the bearer token
    require_auth: bool | None = None  # None: on unless bound to loopback (always on under a Serve config)
    max_request_bytes: int = Field(20 * 2**20, ge=1024)  # larger requests get 413
    max_image_pixels: int = Field(50_000_000, ge=1)  # larger images are refused before decoding
    max_text_chars: int = Field(20_000, ge=1)
    max_k: int = Field(100, ge=1)
    view_scan_rows: int = Field(1_000_000, ge=1)  # image records GET /views reads at most
    view_cache_s: float = Field(300.0, ge=0)  # GET /views lists the index's views again after this long
    torch_threads: int = Field(1, ge=1)  # per replica: replicas share the node's cores
    image_batch_size: int = Field(8, ge=1)  # @serve.batch of the ImageEncoder
    image_batch_wait_s: float = Field(0.002, ge=0)
    text_batch_size: int = Field(16, ge=1)  # @serve.batch of the TextEncoder
    text_batch_wait_s: float = Field(0.002, ge=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    image_encoder: DeploymentResources = DeploymentResources()
    text_encoder: DeploymentResources = DeploymentResources()
    hasher: DeploymentResources = DeploymentResources()
    index: DeploymentResources = DeploymentResources(max_replicas=1)  # > 1 only with a Milvus server URI
    ingress: DeploymentResources = DeploymentResources(max_replicas=1)  # /metrics is per ingress replica (docs/deploy.md)
    image_store: Path | None = None  # uploaded images; None: <medhash cache>/serve-images
    judgments_db: Path | None = None  # SQLite file of relevance judgments; None: next to a milvus-lite file
    # (<name>.judgments.sqlite), else <medhash cache>/judgments.sqlite. Ingress replicas must share its filesystem.


class ServingConfig(Section):
    """One serving YAML: the ``serve`` section and the ``index`` to read (None: the run's own)."""

    serve: ServeConfig = ServeConfig()
    index: IndexConfig | None = None


def load_serving_config(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> ServingConfig:
    """Read a serving YAML (or the defaults) with dotted ``overrides``, e.g. ``{"serve.port": 8001}``."""
    return validated(ServingConfig, read_yaml(path), overrides)
