"""The Ray Serve application: encoder, hasher and index deployments behind a FastAPI ingress.

(No `from __future__ import annotations` here: Serve rebuilds the route signatures and needs real types.)

    Ingress (FastAPI)  --->  ImageEncoder  image bytes -> v^x --->  Hasher  v -> packed codes, every length
                       --->  TextEncoder   text -> v^y        --->  Hasher       (@serve.batch, autoscaled)
                       --->  Index         Milvus search / upsert (1 replica on a milvus-lite file)

A search crosses the ingress twice: the query to an encoder (which hands its batch to the Hasher and
returns codes) and the codes to the Index. Each deployment loads only what it uses: an encoder its
backbone and the method's branch (on the GPU it was given, if any), the Hasher the hashing heads
without the frozen LLM. Inputs are validated once, at the ingress and the encoders, per request.

Routes: ``POST /search/image`` (multipart), ``POST /search/text`` (JSON), ``POST /ingest``,
``POST /preview``, ``GET /items/{id}``, ``GET /items/{id}/image``, ``GET /labels``, ``GET /views``, ``POST /judgments``,
``GET /judgments`` (CSV),
``GET /healthz``, ``GET /metrics``, docs at ``/docs``. A search answer names its query by a SHA-256
fingerprint (``query.sha256``), which a judgment of one of its hits refers to.
Errors are JSON ``{"error": "..."}`` with a 4xx status; a bad request never touches the index.
:func:`build_app` builds the application from a run directory; :func:`app_builder` is the
``import_path`` of a Serve config file (deploy/serve.yaml).
"""

import asyncio
import base64
import hashlib
import hmac
import io
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from ray.exceptions import RayActorError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from medhash.serving import prometheus
from medhash.serving.config import DeploymentResources, ServeConfig, ServingConfig, load_serving_config
from medhash.services.config import IndexConfig, cache_root, check_code_length, override
from medhash.services.errors import ConfigError, DataError
from medhash.services.findings import FindingMiner, explain
from medhash.services.judgments import JudgmentStore, fingerprint, to_csv
from medhash.services.run_dir import RunDir

LOCALHOSTS = {"127.0.0.1", "localhost", "::1"}
RELATED_FIELDS = ("id", "modality", "view", "labels", "study_id", "image_url")  # of each related item in GET /items/{id}
PREVIEW_PX = 512  # longest side of the image /preview returns
READY_TIMEOUT_S = 5.0  # /healthz waits this long for the encoders and the index to answer
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")  # kept on a stored upload
OPEN_PATHS = {"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
DIRECTIONS = {"reports": "text", "images": "image", "both": None}  # direction -> modality searched
Direction = Literal["reports", "images", "both"]


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _device() -> str:
    """The replica's torch device: the GPU Ray gave it, else the CPU."""
    import ray
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class _BatchedEncoder:
    """One query (checked per request) -> (its packed codes at every length, the batch it was encoded in).

    Requests are embedded in dynamic batches; each batch is hashed by one Hasher call. The replica
    encodes one example in its constructor, so it answers at full speed once Serve routes to it.
    """

    def __init__(self, hasher: DeploymentHandle, batch_size: int, batch_wait_s: float, example):
        self.hasher = hasher
        self.embed.set_max_batch_size(batch_size)
        self.embed.set_batch_wait_timeout_s(batch_wait_s)
        self.embedder.embed([self.check(example)])  # warm-up: weights paged in, kernels chosen

    def check(self, query):
        raise NotImplementedError

    async def __call__(self, query) -> tuple[dict[int, bytes], int]:
        return await self.embed(self.check(query))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def embed(self, checked: list) -> list[tuple[dict[int, bytes], int]]:
        codes = await self.hasher.remote(self.embedder.embed(checked))
        return [({bits: rows[i].tobytes() for bits, rows in codes.items()}, len(checked)) for i in range(len(checked))]

    def ready(self) -> bool:
        return True


def _example_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, format="PNG")
    return buffer.getvalue()


@serve.deployment(name="ImageEncoder")
class ImageEncoder(_BatchedEncoder):
    """Image bytes and file name -> codes; images decode per request, embed in batches."""

    def __init__(self, run_path: str, cfg: ServeConfig, hasher: DeploymentHandle):
        from medhash.serving.pipeline import ImageEmbedder
        from medhash.services.methods import load_trained

        _set_threads(cfg.torch_threads)
        self.embedder = ImageEmbedder(*load_trained(RunDir(run_path)), max_pixels=cfg.max_image_pixels, device=_device())
        super().__init__(hasher, cfg.image_batch_size, cfg.image_batch_wait_s, (_example_png(), "warm-up.png"))

    def check(self, query: tuple[bytes, str]):
        return self.embedder.preprocess(*query)


@serve.deployment(name="TextEncoder")
class TextEncoder(_BatchedEncoder):
    """Report text -> codes; each text checked on its own, embedded in dynamic batches."""

    def __init__(self, run_path: str, cfg: ServeConfig, hasher: DeploymentHandle):
        from medhash.serving.pipeline import TextEmbedder
        from medhash.services.methods import load_trained

        _set_threads(cfg.torch_threads)
        self.embedder = TextEmbedder(*load_trained(RunDir(run_path)), max_chars=cfg.max_text_chars, device=_device())
        super().__init__(hasher, cfg.text_batch_size, cfg.text_batch_wait_s, "warm-up report")

    def check(self, query: str) -> str:
        return self.embedder.check(query)


@serve.deployment(name="Hasher")
class HasherDeployment:
    """v [B, d] -> packed codes at every code length, through the run's hashing heads (no frozen LLM)."""

    def __init__(self, run_path: str, cfg: ServeConfig):
        from medhash.serving.pipeline import Hasher
        from medhash.services.methods import load_trained

        _set_threads(cfg.torch_threads)
        self.hasher = Hasher(load_trained(RunDir(run_path), frozen_weights=False)[1])

    def __call__(self, v: np.ndarray) -> dict[int, np.ndarray]:
        return self.hasher.all_bits(v)


@serve.deployment(name="Index")
class IndexDeployment:
    """The Milvus code index: one replica owns a milvus-lite file; replicas scale with a server URI."""

    def __init__(self, cfg: IndexConfig, bits: tuple[int, ...]):
        from medhash.services.index import open_index

        self.index = open_index(cfg, bits)  # a server's token from cfg.token_env in this replica's environment

    def search(self, bits: int, codes: np.ndarray, k: int, modality: str | None, labels: tuple[str, ...], view: str | None):
        return self.index.search(bits, codes, k, modality=modality, labels=labels, view=view)

    def upsert_item(self, records: dict[int, list]) -> None:
        self.index.upsert_item(records)

    def get(self, item_id: str):
        return self.index.get(item_id)

    def related(self, item_id: str):
        return self.index.related(item_id)

    def count(self, bits: int) -> int:
        return self.index.count(bits)

    def views(self, max_rows: int) -> tuple[list[str], bool]:
        return self.index.views(max_rows)

    def check_health(self) -> None:
        """Serve restarts this replica when its index stops answering (e.g. the milvus-lite process died)."""
        self.index.count(self.index.bits[0])


# ---------------------------------------------------------------------------------------------
# HTTP ingress

api = FastAPI(
    title="medhash",
    version="0.1.0",
    description="Cross-modal medical image / report retrieval with binary hash codes (LSCH). "
    "Send `Authorization: Bearer <token>` when the service requires auth.",
)


@dataclass(frozen=True)
class Guard:
    """What the middleware enforces before any route runs."""

    token: str | None  # None: no auth
    max_request_bytes: int


class JudgmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str = Field(description="the logged-in user who judged")
    query_modality: Literal["image", "text"]
    query_sha256: str = Field(description="the search answer's query.sha256")
    item_id: str
    item_modality: Literal["image", "text"]
    verdict: Literal["relevant", "not_relevant"]


class TextSearch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(description="report text or a free-text question")
    k: int = Field(10, ge=1, description="results to return")
    direction: Direction = Field("images", description="what to search: images, reports or both")
    bits: int | None = Field(None, description="code length; default the longest trained")
    labels: list[str] = Field([], description="keep only results carrying all these labels")
    view: str | None = Field(None, description="keep only results of this view / plane")


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    prometheus.ERRORS.labels(kind).inc()
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _cause(exc: Exception) -> Exception:
    """The original exception of one raised in another replica (Ray wraps it as a subclass)."""
    return getattr(exc, "cause", None) or exc


@api.exception_handler(DataError)
async def _bad_input(request: Request, exc: DataError) -> JSONResponse:
    return error_response(400, "bad_input", str(_cause(exc)))


@api.exception_handler(ConfigError)
async def _bad_option(request: Request, exc: ConfigError) -> JSONResponse:
    return error_response(400, "bad_option", str(_cause(exc)))


class IndexUnavailable(Exception):
    """The index replica did not answer (e.g. its milvus-lite process died and Serve is restarting it)."""


@api.exception_handler(IndexUnavailable)
async def _index_down(request: Request, exc: IndexUnavailable) -> JSONResponse:
    return error_response(503, "index_unavailable", "the index is not answering; retry in a few seconds",
                          headers={"Retry-After": "5"})


@api.exception_handler(RayActorError)
async def _replica_lost(request: Request, exc: RayActorError) -> JSONResponse:
    return error_response(503, "replica_lost", "a worker of the service was lost (e.g. its node went down); "
                          "retry in a few seconds", headers={"Retry-After": "5"})


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_response(422, "validation", problems)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method", 413: "too_large"}.get(exc.status_code, "http")
    return error_response(exc.status_code, kind, str(exc.detail), headers=getattr(exc, "headers", None))


@api.middleware("http")
async def _guard_and_count(request: Request, call_next):
    started = time.perf_counter()
    try:
        response = await _guarded(request, call_next)
    except Exception:
        response = error_response(500, "internal", "internal error; see the replica log")
    # the matched route's template, never the concrete path: ids stay out of metric labels
    route = getattr(request.scope.get("route"), "path", "unrouted")
    prometheus.REQUESTS.labels(route, str(response.status_code)).inc()
    prometheus.REQUEST_LATENCY.labels(route).observe(time.perf_counter() - started)
    return response


async def _guarded(request: Request, call_next):
    guard: Guard = request.app.state.guard
    if guard.token and request.url.path not in OPEN_PATHS:
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), f"Bearer {guard.token}".encode()):
            return error_response(401, "auth", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    if request.method in ("POST", "PUT", "PATCH"):
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            return error_response(411, "no_length", "a Content-Length header is required")
        if int(length) > guard.max_request_bytes:
            return error_response(413, "too_large", f"request of {int(length):,} bytes exceeds the {guard.max_request_bytes:,} limit")
    return await call_next(request)


def _hit_json(hit) -> dict:
    record = asdict(hit)
    image_ref = record.pop("image_ref")
    record["labels"] = list(record["labels"])
    record["image_url"] = f"/items/{quote(hit.id, safe='')}/image" if image_ref else None
    return record


LabelsForm = Annotated[list[str], Form(description="a label every result must carry (repeat the field for several)")]


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        image_encoder: DeploymentHandle,
        text_encoder: DeploymentHandle,
        index: DeploymentHandle,
        bits: tuple[int, ...],
        label_names: list[str],
        cfg: ServeConfig,
        token: str | None,
        judgments_db: str,
    ):
        self.image_encoder, self.text_encoder, self.index = image_encoder, text_encoder, index
        self.judgments = JudgmentStore(judgments_db)
        self.bits, self.label_names, self.cfg = tuple(sorted(bits)), list(label_names), cfg
        self.image_store = Path(cfg.image_store or cache_root() / "serve-images")
        self._views: tuple[float, list[str], bool] | None = None  # (listed at, views, complete), see /views
        self.miner = FindingMiner()
        explain(self.miner, ["A small right pleural effusion is seen."], "warm-up query of a few words")  # spaCy and py3langid loaded
        api.state.guard = Guard(token, cfg.max_request_bytes)

    def _check(self, k: int, bits: int | None, labels: list[str], view: str | None) -> int:
        """The code length to search; DataError / ConfigError for out-of-range options (before any work)."""
        from medhash.services.index import check_filters

        if k > self.cfg.max_k:
            raise DataError(f"k={k} is more than the limit of {self.cfg.max_k}")
        check_filters(labels, view or None)
        if bits is None:
            return self.bits[-1]
        return check_code_length(bits, self.bits)

    async def _index(self, method: str, *args):
        """One call to the Index deployment; a failure that is not the request's own fault is a 503."""
        try:
            return await getattr(self.index, method).remote(*args)
        except Exception as exc:
            if isinstance(_cause(exc), (DataError, ConfigError)):
                raise
            raise IndexUnavailable() from exc

    async def _search(self, codes: dict[int, bytes], bits: int, k: int, direction: str, labels, view,
                      query: dict, text: str | None = None) -> dict:
        """The hits, each with the findings it shares with the query (``text``'s, or the hits' consensus)."""
        packed = np.frombuffer(codes[bits], dtype=np.uint8)[None, :]
        with prometheus.stage("search"):
            hits = await self._index("search", bits, packed, k, DIRECTIONS[direction], tuple(labels), view or None)
        results = [_hit_json(h) for h in hits[0]]
        with prometheus.stage("explain"):  # off the event loop: up to k reports are mined
            why = await asyncio.to_thread(explain, self.miner, [r["snippet"] or "" for r in results], text)
        for result, shared in zip(results, why.shared):
            result["shared_findings"] = shared
        query = {**query, "findings": why.findings, "findings_from": why.source, "findings_note": why.note}
        return {"bits": bits, "direction": direction, "query": query, "results": results}

    async def _encode_image(self, data: bytes, name: str) -> dict[int, bytes]:
        with prometheus.stage("encode_image"):
            codes, batch = await self.image_encoder.remote((data, name))
        prometheus.BATCH_SIZE.labels("image").observe(batch)
        return codes

    async def _encode_text(self, text: str) -> dict[int, bytes]:
        with prometheus.stage("encode_text"):
            codes, batch = await self.text_encoder.remote(text)
        prometheus.BATCH_SIZE.labels("text").observe(batch)
        return codes

    @api.post("/search/image", summary="Search with an uploaded image (PNG, JPEG or DICOM)")
    async def search_image(
        self,
        file: Annotated[UploadFile, File(description="the query image")],
        k: Annotated[int, Form(ge=1)] = 10,
        direction: Annotated[Direction, Form()] = "reports",
        bits: Annotated[int | None, Form()] = None,
        labels: LabelsForm = [],
        view: Annotated[str | None, Form()] = None,
    ) -> dict:
        bits = self._check(k, bits, labels, view)
        data = await file.read()
        codes = await self._encode_image(data, file.filename or "upload")
        return await self._search(codes, bits, k, direction, labels, view, {"modality": "image", "sha256": fingerprint(data)})

    @api.post("/preview", summary="The uploaded image as it is decoded for the encoder (DICOM windowed) and what it is")
    async def preview(self, file: Annotated[UploadFile, File(description="the image to check")]) -> dict:
        from medhash.services.data.images import describe_image

        data, name = await file.read(), file.filename or "upload"
        image, about = await asyncio.to_thread(describe_image, data, name, name.lower().endswith((".dcm", ".dicom")),
                                               self.cfg.max_image_pixels)
        shown = image.copy()
        shown.thumbnail((PREVIEW_PX, PREVIEW_PX))
        buffer = io.BytesIO()
        shown.save(buffer, format="PNG")
        return {"width": image.width, "height": image.height, "colour": image.mode == "RGB", **about,
                "png_base64": base64.b64encode(buffer.getvalue()).decode()}

    @api.post("/search/text", summary="Search with report text")
    async def search_text(self, query: TextSearch) -> dict:
        bits = self._check(query.k, query.bits, query.labels, query.view)
        codes = await self._encode_text(query.text)
        return await self._search(codes, bits, query.k, query.direction, query.labels, query.view,
                                  {"modality": "text", "sha256": fingerprint(query.text)}, query.text)

    @api.post("/ingest", summary="Add or replace one item: an image and / or its report")
    async def ingest(
        self,
        id: Annotated[str, Form(min_length=1, max_length=256)],
        image: Annotated[UploadFile | None, File()] = None,
        report: Annotated[str | None, Form()] = None,
        patient_id: Annotated[str, Form(max_length=256)] = "",
        study_id: Annotated[str, Form(max_length=256)] = "",
        labels: LabelsForm = [],
        view: Annotated[str, Form(max_length=256)] = "",
    ) -> dict:
        """All or nothing: every input is encoded (and so validated) and every record checked before
        anything is stored; a refused request leaves the item as it was."""
        from medhash.services.index import IndexRecord, check_item_id

        check_item_id(id)
        if image is None and report is None:
            raise DataError("ingest needs an image, a report or both")
        codes: dict[str, dict[int, bytes]] = {}
        image_data, image_ref = b"", ""
        if image is not None:
            image_data = await image.read()
            codes["image"] = await self._encode_image(image_data, image.filename or "upload")
            image_ref = str(self._image_path(id, image_data, image.filename or ""))
        if report is not None:
            codes["text"] = await self._encode_text(report)
        records = {
            bits: [
                IndexRecord(id=id, modality=m, code=codes[m][bits], patient_id=patient_id, study_id=study_id,
                            labels=tuple(labels), view=view, snippet=report or "", image_ref=image_ref)
                for m in codes
            ]
            for bits in self.bits
        }
        new_file = bool(image_ref) and not Path(image_ref).exists()
        if image_ref:
            self._write_image(Path(image_ref), image_data)
        try:
            with prometheus.stage("insert"):
                await self._index("upsert_item", records)
        except Exception:
            if new_file:
                Path(image_ref).unlink(missing_ok=True)
            raise
        if image_ref:
            for old in Path(image_ref).parent.iterdir():  # the item's earlier images
                if old.name != Path(image_ref).name:
                    old.unlink(missing_ok=True)
            if view and self._views and view.casefold() not in {known.casefold() for known in self._views[1]}:
                self._views = None  # a new view: list them again
        return {"id": id, "modalities": sorted(codes), "bits": list(self.bits)}

    def _image_path(self, item_id: str, data: bytes, filename: str) -> Path:
        """Where an upload is kept: by item and by content, so a new image never overwrites the one in use."""
        suffix = Path(filename).suffix.lower()
        name = hashlib.sha256(data).hexdigest() + (suffix if suffix in IMAGE_SUFFIXES else "")
        return self.image_store / hashlib.sha1(item_id.encode()).hexdigest() / name

    @staticmethod
    def _write_image(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(data)
        partial.replace(path)

    async def _records(self, item_id: str) -> list:
        hits = await self._index("get", item_id)
        if not hits:
            raise HTTPException(404, f"no item with id {item_id!r}")
        return hits

    @api.get("/items/{item_id}", summary="One indexed item: its metadata, report, modalities and the related items")
    async def item(self, item_id: str) -> dict:
        """``related``: the other items of the same patient or study (id, modality, view, labels, image_url)."""
        hits = await self._records(item_id)
        record = _hit_json(next((h for h in hits if h.image_ref), hits[0]))
        record["snippet"] = next((h.snippet for h in hits if h.modality == "text"), record["snippet"])
        record.pop("distance")
        record["modalities"] = sorted({h.modality for h in hits})
        record.pop("modality")
        record["related"] = [{key: value for key, value in _hit_json(h).items() if key in RELATED_FIELDS}
                             for h in await self._index("related", item_id)]
        return record

    @api.get("/items/{item_id}/image", summary="The item's image as PNG", response_class=Response)
    async def item_image(self, item_id: str) -> Response:
        from medhash.services.data.images import load_image

        image_ref = next((h.image_ref for h in await self._records(item_id) if h.image_ref), "")
        if not image_ref:
            raise HTTPException(404, f"item {item_id!r} has no image")
        image = await asyncio.to_thread(load_image, Path(image_ref))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @api.post("/judgments", status_code=201, summary="Store one user's verdict on one hit of a search")
    async def judge(self, judgment: JudgmentIn) -> dict:
        """The query is named by the ``query`` fingerprint of its search answer, never by its content."""
        await self._records(judgment.item_id)  # 404 for an item the index does not hold
        stored = await asyncio.to_thread(self.judgments.add, **judgment.model_dump())
        return asdict(stored)

    @api.get("/judgments", summary="Every judgment as CSV (the file `medhash eval --judgments` reads)",
             response_class=Response)
    async def judgments_csv(self) -> Response:
        rows = await asyncio.to_thread(self.judgments.all)
        return Response(to_csv(rows), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="judgments.csv"'})

    @api.get("/healthz", summary="Readiness: 200 once the encoders and the index answer, else 503")
    async def healthz(self) -> Response:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await asyncio.gather(self.image_encoder.ready.remote(), self.text_encoder.ready.remote())
                counts = {str(bits): await self.index.count.remote(bits) for bits in self.bits}
        except Exception as exc:
            status = "starting" if isinstance(exc, TimeoutError) else "unavailable"
            return JSONResponse({"status": status, "error": "the encoders or the index do not answer yet"}, status_code=503)
        return JSONResponse({"status": "ok", "bits": list(self.bits), "records": counts})

    @api.get("/labels", summary="The label names results can carry and searches can filter on")
    async def labels(self) -> dict:
        return {"labels": self.label_names}

    @api.get("/views", summary="The views of the indexed items, the view filter's choices (it matches any case)")
    async def views(self) -> dict:
        """``complete`` is false when the index held more than ``serve.view_scan_rows`` images and only
        those were read; the list is read again after ``serve.view_cache_s``."""
        if self._views is None or time.monotonic() - self._views[0] > self.cfg.view_cache_s:
            self._views = (time.monotonic(), *await self._index("views", self.cfg.view_scan_rows))
        return {"views": self._views[1], "complete": self._views[2]}

    @api.get("/metrics", summary="Prometheus metrics of this ingress replica", response_class=Response)
    async def metrics_text(self) -> Response:
        for bits in self.bits:
            prometheus.INDEX_SIZE.labels(str(bits)).set(await self._index("count", bits))
        return Response(prometheus.exposition(), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------------------------------
# Building the application

def is_server_uri(uri: str) -> bool:
    """Whether ``uri`` names a Milvus server (replicas may share it) rather than a milvus-lite file."""
    return uri.startswith(("http://", "https://", "tcp://"))


def _options(res: DeploymentResources, cfg: ServeConfig, **extra) -> dict:
    return {
        "autoscaling_config": {
            "min_replicas": res.min_replicas,
            "max_replicas": max(res.max_replicas, res.min_replicas),
            "target_ongoing_requests": res.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
        },
        "ray_actor_options": {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
        **extra,
    }


def index_settings(index: IndexConfig, milvus_uri: str | None = None) -> IndexConfig:
    """``index`` with its URI resolved (``milvus_uri`` overrides it)."""
    from medhash.services.index import resolve_uri

    return override(index, {"uri": milvus_uri or resolve_uri(index)})


def judgments_path(cfg: ServeConfig, index_uri: str) -> Path:
    """Where relevance judgments are kept: ``serve.judgments_db``, else beside a milvus-lite file, else the cache."""
    if cfg.judgments_db:
        return Path(cfg.judgments_db).expanduser()
    if is_server_uri(index_uri):
        return cache_root() / "judgments.sqlite"
    return Path(index_uri).with_suffix(".judgments.sqlite")


def auth_token(cfg: ServeConfig, host: str | None) -> str | None:
    """The bearer token the service requires, or None when auth is off; ConfigError if it is on but unset.

    Auth is on unless ``serve.require_auth`` says otherwise or the app is bound to loopback; ``host``
    None means the binding is not known here (a Serve config's ``http_options``), so auth is on.
    """
    loopback = host is not None and host in LOCALHOSTS
    required = cfg.require_auth if cfg.require_auth is not None else not loopback
    if not required:
        return None
    token = os.environ.get(cfg.auth_token_env, "").strip()
    if not token:
        where = f"host {host}" if host else "the HTTP binding is set by the Serve config"
        raise ConfigError(f"auth is on ({where}) but ${cfg.auth_token_env} is empty or blank: set a token there "
                          f"(or serve.require_auth: false behind a gateway that authenticates)")
    return token


def build_app(
    run_path: Path | str,
    milvus_uri: str | None = None,
    settings: ServingConfig | None = None,
    deployment_options: dict[str, dict] | None = None,
    host: str | None = None,
):
    """The medhash application of a run directory, refused (ConfigError) when auth is on without a token.

    ``host`` is the address the HTTP proxy binds (None: unknown, so auth is on; see :func:`auth_token`);
    ``settings`` supplies the ``serve`` section and the ``index`` (default: the run's own index);
    ``milvus_uri`` overrides ``index.uri``; ``deployment_options`` overrides Serve options by
    deployment name (ImageEncoder, TextEncoder, Hasher, Index, Ingress), as a Serve config does.
    """
    settings = settings or ServingConfig()
    cfg = settings.serve
    token = auth_token(cfg, host)  # first: nothing starts without the auth it needs
    run = RunDir(Path(run_path).resolve())
    run_cfg = run.config()
    index_cfg = index_settings(settings.index or run_cfg.index, milvus_uri)
    bits = run_cfg.codes.bits
    overrides = deployment_options or {}
    path = str(run.path)

    def configured(deployment, options: dict):
        override = overrides.get(deployment.name, {})
        merged = {**options, **override}
        if "num_replicas" in override:
            merged.pop("autoscaling_config", None)
        if deployment is IndexDeployment and not is_server_uri(index_cfg.uri):  # one process per milvus-lite file
            merged.pop("autoscaling_config", None)
            merged["num_replicas"] = 1
        return deployment.options(**merged)

    hasher = configured(HasherDeployment, _options(cfg.hasher, cfg)).bind(path, cfg)
    return configured(Ingress, _options(cfg.ingress, cfg)).bind(
        configured(ImageEncoder, _options(cfg.image_encoder, cfg, max_ongoing_requests=4 * cfg.image_batch_size)).bind(path, cfg, hasher),
        configured(TextEncoder, _options(cfg.text_encoder, cfg, max_ongoing_requests=4 * cfg.text_batch_size)).bind(path, cfg, hasher),
        configured(IndexDeployment, _options(cfg.index, cfg, health_check_period_s=5, health_check_timeout_s=60)).bind(index_cfg, bits),
        bits,
        run.label_names() if run_cfg.train.supervision == "labels" else [],  # a label-free run knows no labels
        cfg,
        token,
        str(judgments_path(cfg, index_cfg.uri)),
    )


def app_builder(args: dict):
    """``import_path`` target of a Serve config: args ``run`` (required), ``milvus_uri``, ``config`` (a serving YAML).

    The config's ``http_options.host`` is not visible here, so auth is on unless the serving YAML
    sets ``serve.require_auth: false``.
    """
    unknown = set(args) - {"run", "milvus_uri", "config"}
    if unknown or "run" not in args:
        raise ConfigError(f"serve config args: need 'run', may have 'milvus_uri' and 'config'; got {sorted(args)}")
    settings = load_serving_config(args.get("config"))
    return build_app(args["run"], args.get("milvus_uri"), settings)
