"""The core's configuration: data, backbones, LLM, augmentation, codes, training, index, and the method.

A YAML file maps onto :class:`MedhashConfig`; every section has working offline defaults, so an
empty file (or none) is a valid configuration. Unknown keys and wrong values are refused with a
message that names the field. ``method_params`` holds each hashing method's own typed parameters
(the method's ``Params`` class, found through :mod:`medhash.services.registry`), validated here too.
The apps keep their own settings (``medhash.serving.config``, ``medhash.ui.config``); they load them
with the same :func:`read_yaml` / :func:`validated` and override them with :func:`override`.
"""
from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medhash.services import registry
from medhash.services.errors import ConfigError

DatasetName = Literal["medpix2", "covid-cxr", "iu-xray", "mimic-cxr", "manifest"]
DATASETS: tuple[str, ...] = get_args(DatasetName)  # every dataset reader, for command-line choices
MAX_BITS = 1024
CODE_LENGTH_RULE = "a code length is a multiple of 8 from 8 to " + str(MAX_BITS) + " bits, got {!r}"


def cache_root() -> Path:
    """Where medhash keeps features, converted weights and augmentations (``MEDHASH_CACHE``)."""
    return Path(os.environ.get("MEDHASH_CACHE", Path.home() / ".cache" / "medhash"))


class Section(BaseModel):
    """A frozen settings block that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=BaseModel)


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


LLM_READER = "llm"  # text_backbone.name for "the run's LLM reads the text" (services/backbones/reader.py)


class TextBackboneConfig(Section):
    """Text encoder: the offline all-MiniLM-L6-v2, any HF encoder by id or path, or ``llm``: the run's LLM
    reads the text (LSCH; its keys and values are the features)."""

    name: str = "all-MiniLM-L6-v2"  # "all-MiniLM-L6-v2" resolves to the offline package
    max_length: int = Field(128, ge=8, le=8192)  # tokens read per text (with ``llm``, BOS included)
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
    placement: Literal["PACK", "SPREAD"] = "PACK"  # of the workers over Ray nodes; SPREAD: one per node where it can
    seed: int = 0
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(20, ge=0)  # of the method's main stage (methods with earlier stages set theirs in method_params)
    view_prob: float = Field(0.5, ge=0, le=1)  # chance a report is replaced by one of its augmented views
    max_steps_per_epoch: int | None = Field(None, ge=1)  # cap for tiny configs
    limit_items: int | None = Field(None, ge=8)  # use only the first N items per split (tiny configs)
    max_failures: int = Field(2, ge=0)  # worker failures Ray Train recovers from
    # "findings": supervise with the findings mined from the reports (services/findings.py) instead of the
    # dataset's labels, which training then never reads (label-free; `medhash eval` still scores with them)
    supervision: Literal["labels", "findings"] = "labels"
    # the mined categories a label-free run trains on and chooses its epoch by (docs/results.md, "Label-free LSCH:
    # a soft instance term": anatomy terms track MedPix's labels, "finding" terms such as mass do not)
    findings_categories: tuple[Literal["anatomy", "finding", "diagnosis", "region"], ...] = Field(
        ("anatomy", "finding", "diagnosis"), min_length=1
    )
    # a training item with no mined finding takes the findings held by most of its this many nearest training
    # neighbours that have some (joint cosine of the frozen image and report features); 0: it stays unlabelled
    findings_neighbours: int = Field(0, ge=0)


class AugmentConfig(Section):
    """Stage 1, LLM data augmentation: which generator writes the prompt templates' text views."""

    # train on the augmented views (off: the reports only); off by default: on MedPix dev (3 seeds) no views paid
    # beside the label term (docs/results.md, "Grounded LLM views in training")
    use_views: bool = False
    generator: Literal["extractive", "local", "openai"] = "local"  # "local": the `llm` section's LM, at full depth
    also_extractive: bool = False  # training swaps in the extractive views too, beside the generator's
    endpoint: str = "http://127.0.0.1:8000"  # "openai": OpenAI-compatible server (vLLM, Ollama, TGI)
    model: str = ""  # "openai": the model name the server serves
    api_key_env: str = "MEDHASH_LLM_API_KEY"  # "openai": environment variable holding the API key
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)
    max_new_tokens: int = Field(48, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0: greedy
    # "local": "copy" lets the model write only whole clauses of the prompt's fields (a base model invents findings
    # when it writes freely, docs/results.md); "free" is unconstrained. Both are checked against the source.
    decoding: Literal["copy", "free"] = "copy"
    templates: tuple[Literal["image_description", "report_summary", "joint_reasoning"], ...] = (
        "image_description", "report_summary", "joint_reasoning"
    )
    batch_size: int = Field(8, ge=1)  # prompts per LM batch; requests in flight for "openai"

    @model_validator(mode="after")
    def _generators(self) -> AugmentConfig:
        if self.also_extractive and self.generator == "extractive":
            raise ValueError("also_extractive: the generator is the extractive one already")
        return self

    def generators(self) -> tuple[AugmentConfig, ...]:
        """One section per generator whose views training swaps in: this one, then the extractive one if asked."""
        extractive = (self.model_copy(update={"generator": "extractive", "also_extractive": False}),)
        return (self,) + (extractive if self.also_extractive else ())


class IndexConfig(Section):
    """The Milvus index of binary codes: a milvus-lite file (one process) or a Milvus server (scales out)."""

    uri: str | None = None  # None: <MEDHASH_CACHE>/index/medhash.db; a server: "http://host:19530"
    collection_prefix: str = Field("medhash", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # collections <prefix>_<bits>
    token_env: str = "MEDHASH_MILVUS_TOKEN"  # environment variable holding a server's token ("user:password")
    index_type: Literal["BIN_IVF_FLAT", "BIN_FLAT"] = "BIN_IVF_FLAT"  # server only: a milvus-lite file scans BIN_FLAT
    ivf_nlist: int = Field(1024, ge=1, le=65536)  # BIN_IVF_FLAT clusters, fixed when a collection is created
    nprobe: int = Field(16, ge=1, le=65536)  # BIN_IVF_FLAT clusters searched per query (docs/benchmarks.md: recall)
    timeout_s: float = Field(10.0, gt=0)  # per call to a server: a lost server fails the call (503), no hang
    # searches on a server: "Session" sees this replica's own writes at once and others' within Milvus's time
    # tick; "Strong" sees every write but waits for the tick (~400 ms a search here, docs/benchmarks.md).
    # Lookups by id and counts are always Strong.
    consistency: Literal["Session", "Bounded", "Strong"] = "Session"


class CodesConfig(Section):
    """The binary codes every method learns: one code per length, each a multiple of 8 bits (packed bytes)."""

    bits: tuple[int, ...] = (16, 32, 64, 128)

    @field_validator("bits")
    @classmethod
    def _lengths(cls, bits: tuple[int, ...]) -> tuple[int, ...]:
        if not bits:
            raise ValueError("at least one code length")
        for b in bits:
            if not _valid_code_length(b):
                raise ValueError(CODE_LENGTH_RULE.format(b))
        if len(set(bits)) != len(bits):
            raise ValueError(f"code lengths repeat: {bits}")
        return tuple(sorted(bits))


def check_code_length(bits: int, available: tuple[int, ...] | None = None, what: str = "codes") -> int:
    """``bits`` if it is one of ``available`` or, without them, a valid code length; ConfigError otherwise
    (``what`` names the thing that has no such length, e.g. "collection")."""
    if available is not None:
        if bits not in available:
            raise ConfigError(f"no {bits}-bit {what}: the code lengths here are {', '.join(map(str, available))}")
    elif not _valid_code_length(bits):
        raise ConfigError(CODE_LENGTH_RULE.format(bits))
    return bits


def _valid_code_length(bits: object) -> bool:
    return isinstance(bits, int) and not isinstance(bits, bool) and 8 <= bits <= MAX_BITS and bits % 8 == 0


class MedhashConfig(Section):
    """The whole configuration of a run. ``method`` names the hashing method; ``method_params`` holds
    methods' own parameters by method name, e.g. ``{"lsch": {"alpha": 1.0}, "ucch": {"hidden": 2048}}``,
    each validated by that method's ``Params`` (the paper's defaults stand for what is not given)."""

    method: str = "lsch"
    method_params: dict[str, dict[str, Any]] = {}

    data: DataConfig = DataConfig()
    image_backbone: ImageBackboneConfig = ImageBackboneConfig()
    text_backbone: TextBackboneConfig = TextBackboneConfig()
    llm: LLMConfig = LLMConfig()
    augment: AugmentConfig = AugmentConfig()
    codes: CodesConfig = CodesConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()

    @model_validator(mode="after")
    def _method_and_params(self) -> MedhashConfig:
        known = registry.method_names()
        for name in (self.method, *self.method_params):
            if name not in known:
                raise ValueError(f"unknown method {name!r}; known: {', '.join(known)}")
        for name, params in self.method_params.items():
            try:
                registry.method_class(name).Params.model_validate(params)
            except ValidationError as exc:
                raise ValueError(_problems(exc, f"method_params.{name}.")) from None
        return self


def read_yaml(path: Path | str | None) -> dict:
    """The mapping in a YAML file ({} for None); ConfigError for a missing file, bad YAML or a non-mapping."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def validated(model: type[S], raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> S:
    """``model`` from ``raw`` with dotted ``overrides`` set (a None value: not given, no change);
    ConfigError naming each bad field."""
    raw = _set_dotted(dict(raw), overrides or {})
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_problems(exc)}") from exc


def load_config(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None) -> MedhashConfig:
    """Read a YAML config (or the defaults) with dotted ``overrides``, e.g. ``{"train.workers": 2}``."""
    return validated(MedhashConfig, read_yaml(path), overrides)


def override(cfg: S, overrides: Mapping[str, Any]) -> S:
    """``cfg`` with dotted ``overrides`` set, validated again as if loaded from a file."""
    return validated(type(cfg), cfg.model_dump(mode="python"), overrides)


def parse_assignments(assignments: list[str] | None) -> dict[str, Any]:
    """``["train.lr=0.01", "codes.bits=[32, 64]"]`` -> dotted overrides (values read as YAML)."""
    parsed: dict[str, Any] = {}
    for assignment in assignments or []:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE (e.g. train.lr=0.01), got {assignment!r}")
        try:
            parsed[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: the value is not valid YAML: {exc}") from exc
    return parsed


def _set_dotted(raw: dict, overrides: Mapping[str, Any]) -> dict:
    for key, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, Mapping) else {}
            node = child
        node[leaf] = value
    return raw


def _problems(exc: ValidationError, prefix: str = "") -> str:
    """One line naming every bad field: ``train.lr: Input should be greater than 0; ...``."""
    parts = []
    for error in exc.errors():
        field = (prefix + ".".join(str(p) for p in error["loc"])).rstrip(".")
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)
