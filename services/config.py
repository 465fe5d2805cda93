"""All medhash configuration, typed and validated in one place.

A YAML file maps onto :class:`MedhashConfig`; every section has working offline defaults, so an
empty file (or none) is a valid configuration. Unknown keys and wrong values are refused with a
message that names the field.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medhash.services.errors import ConfigError

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
    reports: Path | None = None  # report folder where it lives apart from the images (MIMIC-CXR)
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


class TrainConfig(Section):
    """Optimisation schedule and Ray Train scaling."""

    workers: int = Field(1, ge=1)  # Ray Train workers (GPU nodes in production, CPU here)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = Field(1.0, gt=0)
    seed: int = 0
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    align_epochs: int = Field(5, ge=0)  # stage A: align v^x, v^y (float contrastive), GBRBM untouched
    rbm_epochs: int = Field(5, ge=0)  # stage B: CD-k pre-training of the GBRBM heads on frozen v
    joint_epochs: int = Field(20, ge=0)  # stage C: joint fine-tuning through p(h|v)
    view_prob: float = Field(0.5, ge=0, le=1)  # chance a report is replaced by one of its augmented views
    max_steps_per_epoch: int | None = Field(None, ge=1)  # cap for tiny configs
    limit_items: int | None = Field(None, ge=8)  # use only the first N items per split (tiny configs)
    max_failures: int = Field(2, ge=0)  # worker failures Ray Train recovers from


class AugmentConfig(Section):
    """Stage 1, LLM data augmentation: which generator writes the prompt templates' text views."""

    generator: Literal["extractive", "local", "openai"] = "extractive"  # "local": the `llm` section's LM
    endpoint: str = "http://127.0.0.1:8000"  # "openai": OpenAI-compatible server (vLLM, Ollama, TGI)
    model: str = ""  # "openai": the model name the server serves
    api_key_env: str = "MEDHASH_LLM_API_KEY"  # "openai": environment variable holding the API key
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)
    max_new_tokens: int = Field(48, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0: greedy
    templates: tuple[Literal["image_description", "report_summary", "joint_reasoning"], ...] = (
        "image_description", "report_summary", "joint_reasoning"
    )
    batch_size: int = Field(8, ge=1)  # prompts per LM batch; requests in flight for "openai"


class LSCHConfig(Section):
    """The LSCH model (structured encoding, prompt-tuned LLM, GBRBM hashing), its losses and ablation switches."""

    bits: tuple[int, ...] = (16, 32, 64, 128)  # one hashing head per code length
    # ablation switches (method.md: switch off one at a time)
    use_augmentation: bool = True  # LLM-augmented text views (read by the training code)
    use_structured_encoding: bool = True  # off: one plain linear map Z -> one LLM token
    use_soft_prompt: bool = True
    use_hard_prompt: bool = True
    use_llm: bool = True  # off: v = linear map of the pooled x / y tokens, no LLM
    use_gbrbm: bool = True  # off: code = sign of a linear layer (tanh relaxation in training)
    hard_negative_mining: bool = True  # off: plain InfoNCE
    # architecture
    m_img_tokens: int = Field(4, ge=1)  # tokens X per image in the LLM embedding space
    m_txt_tokens: int = Field(4, ge=1)  # tokens Y per report
    n_virtual_tokens: int = Field(8, ge=1)  # soft prompt length
    pooling: Literal["mean", "last"] = "mean"  # v = mean over the x / y positions, or the last one
    image_prompt: str = "Represent this medical image for retrieval of matching radiology reports:"
    text_prompt: str = "Represent this radiology report for retrieval of matching medical images:"
    lora_rank: int = Field(0, ge=0)  # > 0: LoRA adapters (peft) on the LLM attention projections
    embed_dim: int = Field(640, ge=8)  # width of v when no LLM is loaded (use_llm off)
    # losses
    tau: float = Field(0.1, gt=0)  # InfoNCE temperature
    alpha: float = Field(0.5, ge=0)  # manifold-similarity weight (paper, small set, I2T)
    beta: float = Field(0.8, ge=0)  # quantisation + bit-balance weight (paper, small set, I2T)
    hard_negative_strength: float = Field(0.5, ge=0)  # beta_h of the negatives' weights exp(beta_h * logit)
    # which items the contrastive term never pushes apart from item i (besides its own pair):
    # "shared_label" any label in common, "same_labels" the identical label set, "none" nobody
    false_negatives: Literal["shared_label", "same_labels", "none"] = "shared_label"
    classification_weight: float = Field(0.0, ge=0)  # gamma: codes linearly predict the labels (0: off)
    knn_k: int = Field(5, ge=1)  # neighbours of the feature kNN graph in S_ma
    manifold_label_weight: float = Field(0.8, ge=0, le=1)  # share of label cosine in S_ma where labels exist
    gbrbm_cd_k: int = Field(1, ge=1)  # Gibbs steps of CD-k pre-training


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
    require_auth: bool | None = None  # None: on unless bound to localhost
    max_request_bytes: int = Field(20 * 2**20, ge=1024)  # larger requests get 413
    max_image_pixels: int = Field(50_000_000, ge=1)  # larger images are refused before decoding
    max_text_chars: int = Field(20_000, ge=1)
    max_k: int = Field(100, ge=1)
    torch_threads: int = Field(1, ge=1)  # per replica: replicas share the node's cores
    image_batch_size: int = Field(8, ge=1)  # @serve.batch of the ImageEncoder
    image_batch_wait_s: float = Field(0.01, ge=0)
    text_batch_size: int = Field(16, ge=1)  # @serve.batch of the TextEncoder
    text_batch_wait_s: float = Field(0.01, ge=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    image_encoder: DeploymentResources = DeploymentResources()
    text_encoder: DeploymentResources = DeploymentResources()
    hasher: DeploymentResources = DeploymentResources()
    index: DeploymentResources = DeploymentResources(max_replicas=1)  # > 1 only with a Milvus server URI
    ingress: DeploymentResources = DeploymentResources()
    image_store: Path | None = None  # uploaded images; None: <medhash cache>/serve-images


class IndexConfig(Section):
    """The Milvus index of binary codes: a milvus-lite file (one process) or a Milvus server (scales out)."""

    uri: str | None = None  # None: <MEDHASH_CACHE>/index/medhash.db; a server: "http://host:19530"
    collection_prefix: str = Field("medhash", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # collections <prefix>_<bits>
    token_env: str = "MEDHASH_MILVUS_TOKEN"  # environment variable holding a server's token ("user:password")
    ivf_nlist: int = Field(1024, ge=1, le=65536)  # BIN_IVF_FLAT clusters (server only; milvus-lite scans BIN_FLAT)
    nprobe: int = Field(16, ge=1, le=65536)  # clusters searched per query (server only)


class UIConfig(Section):
    """The Gradio front end: where the search API is, who may log in, input limits."""

    api_url: str = "http://127.0.0.1:8000"  # the serving HTTP API
    api_token_env: str = "MEDHASH_API_TOKEN"  # bearer token for the API, when it requires one
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    users: dict[str, str] = {}  # user -> password; prefer users_env outside demos
    users_env: str = "MEDHASH_UI_USERS"  # environment variable of "user:password" pairs, comma-separated
    max_upload_bytes: int = Field(20 * 2**20, ge=1024)
    max_k: int = Field(50, ge=1)
    request_timeout_s: float = Field(60.0, gt=0)


class MedhashConfig(Section):
    """The whole configuration. ``method`` names the hashing method (medhash.services.methods); ``lsch`` and
    ``train`` hold LSCH's settings and the shared schedule (``lsch.bits`` are every method's code lengths),
    ``method_params`` the other methods' own hyper-parameters by method name, e.g. ``{"ucch": {"hidden": 2048}}``
    (each validated by its method)."""

    method: str = "lsch"
    method_params: dict[str, dict[str, Any]] = {}

    data: DataConfig = DataConfig()
    image_backbone: ImageBackboneConfig = ImageBackboneConfig()
    text_backbone: TextBackboneConfig = TextBackboneConfig()
    llm: LLMConfig = LLMConfig()
    lsch: LSCHConfig = LSCHConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()
    ui: UIConfig = UIConfig()


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
