"""The Ray Serve application on a real local Ray cluster with a real milvus-lite file.

A tiny LSCH run (tiny random LLM; real EfficientNet-Lite0, MiniLM and MedPix data) is trained once;
its items are bulk-ingested with the `medhash index` code; answers over HTTP are checked against
the in-process pipeline and numpy Hamming distances. Then bad inputs, ingestion, metrics, a restart
with auth on, and autoscaling of the TextEncoder under load from another process.
"""
from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import free_port, start_local_ray, wait_for
from medhash.serving.ingest import index_features, ingest_dataset
from medhash.serving.pipeline import Pipeline
from medhash.services.codes import hamming_distances
from medhash.serving.config import DeploymentResources, ServeConfig, ServingConfig
from medhash.services.config import load_config
from medhash.services.data import open_dataset
from medhash.services.features.featureset import build_featureset, limit_per_split
from medhash.services.methods import embed

pytestmark = pytest.mark.real

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
TOKEN_ENV = "MEDHASH_TEST_SERVING_TOKEN"
MAX_REQUEST_BYTES = 2 * 2**20
MAX_IMAGE_PIXELS = 4_000_000


def tiny_config(shared_data: Path):
    """The tiny MedPix run of test_training.py on 60 items per split, one epoch per stage (serving needs a run, not a good one)."""
    return load_config(CONFIGS / "medpix2-lsch-tiny.yaml", {
        "data.root": shared_data / "medpix2", "llm.name": "tiny-random", "train.epochs": 1, "train.limit_items": 60,
        "method_params.lsch.align_epochs": 1, "method_params.lsch.rbm_epochs": 1,
    })


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray import serve

    start_local_ray(num_cpus=2, include_dashboard=False)
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_run(shared_data, ray_cluster, tmp_path_factory):
    from medhash.training.trainer import train

    cfg = tiny_config(shared_data)
    return train(cfg, tmp_path_factory.mktemp("serving") / "run", build_featureset(cfg, progress=False))


@pytest.fixture(scope="module")
def dataset(shared_data):
    """The tiny run's items (``train.limit_items`` per split)."""
    cfg = tiny_config(shared_data)
    return limit_per_split(open_dataset(cfg.data), cfg.train.limit_items)


class Reference:
    """The in-process pipeline and the codes of every indexed record, keyed (id, modality)."""

    def __init__(self, run, dataset):
        self.pipeline = Pipeline.load(run)
        features = index_features(run.config(), dataset, progress=False)
        v = embed(self.pipeline.hasher.model, features.image, features.text)
        self.keys = {m: [(str(i), m) for i in features.ids] for m in ("image", "text")}
        self.codes = {m: {b: self.pipeline.hasher(v[m], b) for b in self.pipeline.hasher.bits} for m in v}

    def check(self, results: list[dict], query_code: np.ndarray, direction: str, bits: int, k: int) -> None:
        """Same distances as a full numpy scan, and the same records wherever the k-th distance does not tie."""
        modalities = {"reports": ["text"], "images": ["image"], "both": ["image", "text"]}[direction]
        keys = [key for m in modalities for key in self.keys[m]]
        distances = hamming_distances(query_code, np.concatenate([self.codes[m][bits] for m in modalities]))[0]
        expected = np.sort(distances)[:k]
        got = {(r["id"], r["modality"]): r["distance"] for r in results}
        assert len(results) == len(got) == k
        assert sorted(got.values()) == expected.tolist()
        of = dict(zip(keys, distances.tolist()))
        assert all(of[key] == d for key, d in got.items())
        below = {key for key, d in of.items() if d < expected[-1]}
        assert below <= set(got)


@pytest.fixture(scope="module")
def reference(tiny_run, dataset):
    return Reference(tiny_run, dataset)


@pytest.fixture(scope="module")
def index_uri(tiny_run, dataset, tmp_path_factory):
    """A milvus-lite file holding the tiny run's items, written by the `medhash index` code."""
    from medhash.services.index import CodeIndex

    uri = str(tmp_path_factory.mktemp("milvus") / "index.db")
    index = CodeIndex(uri, tiny_run.config().codes.bits)
    try:
        assert ingest_dataset(tiny_run, index, dataset, progress=False) == len(dataset)
        assert ingest_dataset(tiny_run, index, dataset, progress=False) == len(dataset)  # idempotent
        assert index.count(64) == 2 * len(dataset)
    finally:
        index.close()
    return uri


def start(run, uri: str, port: int, options: dict | None = None, index_section=None, **serve_fields) -> str:
    """(Re)start Serve and the application (``index_section`` instead of the run's); the base URL."""
    from ray import serve

    from medhash.serving.app import build_app

    serve.shutdown()
    fields = dict(port=port, max_request_bytes=MAX_REQUEST_BYTES, max_image_pixels=MAX_IMAGE_PIXELS, auth_token_env=TOKEN_ENV)
    settings = ServingConfig(serve=ServeConfig(**{**fields, **serve_fields}), index=index_section)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(run.path, uri, settings, options, host="127.0.0.1"), name="medhash", route_prefix="/")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(tiny_run, index_uri):
    port = free_port()
    return {"url": start(tiny_run, index_uri, port, require_auth=False), "port": port}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def query_items(dataset, n: int = 2):
    return [item for item in dataset.items if item.split == "query"][:n]


def test_searches_over_http_match_the_in_process_pipeline(served, reference, dataset):
    url = served["url"]
    for item in query_items(dataset):
        data = item.image_paths[0].read_bytes()
        for direction, bits in (("reports", 64), ("images", 16), ("both", 32)):
            answer = requests.post(
                f"{url}/search/image", files={"file": (item.image_paths[0].name, data)},
                data={"k": 10, "direction": direction, "bits": bits}, timeout=60,
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            reference.check(body["results"], reference.pipeline.image_codes([data], bits), direction, bits, 10)
            hit = body["results"][0]
            assert set(hit) == {"id", "modality", "distance", "patient_id", "study_id", "labels", "view", "snippet", "image_url",
                                "shared_findings"}
            assert hit["image_url"] == f"/items/{hit['id']}/image"
        answer = requests.post(f"{url}/search/text", json={"text": item.report, "k": 5}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["bits"] == 64 and answer.json()["direction"] == "images"  # the defaults
        reference.check(answer.json()["results"], reference.pipeline.text_codes([item.report]), "images", 64, 5)
    # the item's own image, sent as bytes, lands on (or next to) its indexed code
    item = query_items(dataset)[0]
    answer = requests.post(
        f"{url}/search/image", files={"file": ("q.png", item.image_paths[0].read_bytes())},
        data={"k": 5, "direction": "images", "bits": 64}, timeout=60,
    ).json()["results"]
    assert any(r["id"] == item.id and r["distance"] <= 1 for r in answer)
    # filters: every result carries the label and view asked for
    label, view = item.labels[0], item.view
    answer = requests.post(
        f"{url}/search/text", json={"text": item.report, "k": 5, "direction": "both", "labels": [label], "view": view}, timeout=60
    )
    assert answer.status_code == 200 and answer.json()["results"]
    assert all(label in r["labels"] and r["view"] == view for r in answer.json()["results"])


def test_every_hit_carries_the_findings_it_shares_with_the_query(served, dataset):
    from medhash.services.findings import FindingMiner, explain

    miner, url = FindingMiner(), served["url"]
    text = "Large pleural effusion and a lung mass"
    body = requests.post(f"{url}/search/text", json={"text": text, "k": 20, "direction": "reports"}, timeout=60).json()
    assert body["query"]["findings"] == ["mass", "pleural effusion", "lung"]
    assert body["query"]["findings_from"] == "query text" and body["query"]["findings_note"] is None
    snippets = [r["snippet"] for r in body["results"]]
    assert [r["shared_findings"] for r in body["results"]] == explain(miner, snippets, text).shared
    for result in body["results"]:  # every marked span is a spelling of a query finding in the hit's report
        for finding in result["shared_findings"]:
            assert finding["term"] in body["query"]["findings"]
            assert all(miner.canonical[result["snippet"][s:e].lower()] == finding["term"] for s, e in finding["spans"])

    item = query_items(dataset)[0]
    body = requests.post(f"{url}/search/image", files={"file": ("q.png", item.image_paths[0].read_bytes())},
                         data={"k": 10}, timeout=60).json()
    why = explain(miner, [r["snippet"] for r in body["results"]])
    assert body["query"]["findings_from"] == "hits' consensus" and body["query"]["findings"] == why.findings
    assert [r["shared_findings"] for r in body["results"]] == why.shared


def test_one_search_latency_through_serve_and_in_process(served, reference, dataset):
    """Not a bound: records both numbers for the report (run with -s)."""
    item = query_items(dataset)[0]
    started = time.perf_counter()
    for _ in range(5):
        assert requests.post(f"{served['url']}/search/text", json={"text": item.report, "k": 10}, timeout=60).status_code == 200
    over_http = (time.perf_counter() - started) / 5
    started = time.perf_counter()
    for _ in range(5):
        code = reference.pipeline.text_codes([item.report])
        np.argsort(hamming_distances(code, reference.codes["image"][64])[0])[:10]
    in_process = (time.perf_counter() - started) / 5
    print(f"\none text search: {over_http * 1000:.1f} ms through Serve, {in_process * 1000:.1f} ms in process")


def test_bad_input_gets_a_4xx_json_error_and_loses_nothing(served, dataset):
    url = served["url"]
    before = requests.get(f"{url}/healthz", timeout=30).json()["records"]
    real_png = dataset.items[0].image_paths[0].read_bytes()
    huge = png_bytes(Image.new("L", (2500, 2500)))  # 6.25 M pixels, more than MAX_IMAGE_PIXELS
    image_cases = {
        "not an image": (b"this is plain text, not a picture", 400),
        "corrupt image": (real_png[: len(real_png) // 3], 400),
        "huge image": (huge, 400),
        "empty file": (b"", 400),
        "too large request": (b"\0" * (MAX_REQUEST_BYTES + 1), 413),
    }
    for case, (data, status) in image_cases.items():
        answer = requests.post(f"{url}/search/image", files={"file": ("x.png", data)}, data={"k": 3}, timeout=60)
        assert answer.status_code == status, (case, answer.text)
        assert isinstance(answer.json()["error"], str) and answer.json()["error"], case
    text_cases = {
        "empty text": ({"json": {"text": "   "}}, 400),
        "wrong type": ({"json": {"text": 5}}, 422),
        "k not a number": ({"json": {"text": "x", "k": "many"}}, 422),
        "unknown field": ({"json": {"text": "x", "colour": "red"}}, 422),
        "k above the limit": ({"json": {"text": "x", "k": 100_000}}, 400),
        "untrained bits": ({"json": {"text": "x", "bits": 7}}, 400),
        "bad direction": ({"json": {"text": "x", "direction": "sideways"}}, 422),
        "not UTF-8": ({"data": b'{"text": "\xff\xfe broken"}', "headers": {"Content-Type": "application/json"}}, 400),
        "not JSON": ({"data": b"text=hello", "headers": {"Content-Type": "application/json"}}, 422),
    }
    for case, (kwargs, status) in text_cases.items():
        answer = requests.post(f"{url}/search/text", timeout=60, **kwargs)
        assert answer.status_code == status, (case, answer.text)
        assert answer.json()["error"], case
    for path in ("/items/no-such-item", "/items/no-such-item/image"):
        answer = requests.get(url + path, timeout=30)
        assert answer.status_code == 404 and "no-such-item" in answer.json()["error"]
    answer = requests.post(f"{url}/search/image", data={"k": 3}, timeout=30)  # no file field
    assert answer.status_code == 422 and answer.json()["error"]
    answer = requests.post(f"{url}/ingest", data={"id": "bad-1", "report": "a report"}, files={"image": ("x.png", b"junk")}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]
    answer = requests.post(f"{url}/ingest", data={"id": "bad-2"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]
    # still serving, nothing lost, nothing half-written
    assert requests.get(f"{url}/healthz", timeout=30).json()["records"] == before
    assert requests.get(f"{url}/items/bad-1", timeout=30).status_code == 404
    answer = requests.post(f"{url}/search/text", json={"text": dataset.items[0].report}, timeout=60)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 10


def test_ingest_then_get_find_and_fetch_the_image(served, dataset):
    url = served["url"]
    source = dataset.items[-1]
    before = requests.get(f"{url}/healthz", timeout=30).json()["records"]
    form = {
        "id": "upload-1", "report": "Fresh report: small nodule in the right upper lobe.", "patient_id": "patient-up",
        "study_id": "study-up", "labels": ["test:uploaded", "location:Chest"], "view": "axial",
    }
    for _ in range(2):  # the second call replaces, it does not duplicate
        answer = requests.post(f"{url}/ingest", data=form, files={"image": ("scan.png", source.image_paths[0].read_bytes())}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["modalities"] == ["image", "text"]
    after = requests.get(f"{url}/healthz", timeout=30).json()["records"]
    assert after == {bits: count + 2 for bits, count in before.items()}
    item = requests.get(f"{url}/items/upload-1", timeout=30).json()
    assert item["modalities"] == ["image", "text"] and item["patient_id"] == "patient-up" and item["study_id"] == "study-up"
    assert item["labels"] == ["test:uploaded", "location:Chest"] and item["snippet"].startswith("Fresh report")
    image = Image.open(io.BytesIO(requests.get(url + item["image_url"], timeout=30).content))
    assert image.size == Image.open(source.image_paths[0]).size
    answer = requests.post(
        f"{url}/search/text", json={"text": form["report"], "direction": "reports", "labels": ["test:uploaded"]}, timeout=60
    ).json()["results"]
    assert [(r["id"], r["distance"]) for r in answer] == [("upload-1", 0)]


def test_labels_route_lists_the_runs_label_names(served, tiny_run):
    labels = requests.get(f"{served['url']}/labels", timeout=30).json()["labels"]
    assert labels == tiny_run.label_names() and "location:Head" in labels


def test_metrics_are_prometheus_text_without_patient_data(served, dataset):
    records = requests.get(f"{served['url']}/healthz", timeout=30).json()["records"]["64"]
    text = requests.get(f"{served['url']}/metrics", timeout=30).text
    for needle in (
        'medhash_requests_total{route="/search/text",status="200"}',
        'medhash_requests_total{route="/search/image",status="400"}',
        'medhash_requests_total{route="/items/{item_id}",status="404"}',
        'medhash_stage_latency_seconds_count{stage="encode_image"}',
        'medhash_stage_latency_seconds_count{stage="insert"}',
        'medhash_batch_size_count{encoder="text"}',
        f'medhash_index_records{{bits="64"}} {records}.0',
        'medhash_errors_total{kind="bad_input"}',
        'medhash_errors_total{kind="too_large"}',
    ):
        assert needle in text, needle
    for private in ("upload-1", "patient-up", "no-such-item", dataset.items[0].patient_id):
        assert private not in text


def test_a_search_with_40000_labels_is_refused_and_the_next_one_answers(served, dataset):
    url, item = served["url"], query_items(dataset)[0]
    labels = [f"topic:label {i}" for i in range(40_000)]
    answer = requests.post(f"{url}/search/text", json={"text": item.report, "labels": labels}, timeout=60)
    assert answer.status_code == 400 and "at most 16" in answer.json()["error"]
    answer = requests.post(f"{url}/search/image", files={"file": ("q.png", item.image_paths[0].read_bytes())},
                           data={"labels": labels[:50]}, timeout=60)
    assert answer.status_code == 400 and "at most 16" in answer.json()["error"]
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    answer = requests.post(f"{url}/search/text", json={"text": item.report}, timeout=60)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 10


def test_a_thin_image_is_refused_before_it_is_padded_to_a_square(served):
    answer = requests.post(f"{served['url']}/search/image", files={"file": ("thin.png", png_bytes(Image.new("L", (1, 40_000))))},
                           timeout=60)
    assert answer.status_code == 400 and "thin.png" in answer.json()["error"]


def test_one_text_with_a_lone_surrogate_fails_only_its_own_request(served, dataset):
    from concurrent.futures import ThreadPoolExecutor

    texts = [item.report for item in dataset.items[:11]] + ["lung \ud800 nodule"]
    def post(text):
        return requests.post(f"{served['url']}/search/text", json={"text": text, "k": 3}, timeout=120)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, texts))
    assert [a.status_code for a in answers] == [200] * 11 + [400]
    assert "surrogate" in answers[-1].json()["error"]


def test_a_refused_reingest_changes_nothing(served, dataset):
    url = served["url"]
    first, second = dataset.items[0].image_paths[0].read_bytes(), dataset.items[1].image_paths[0].read_bytes()
    form = {"id": "reingest-1", "report": "Original report: clear lungs.", "patient_id": "p-1"}
    assert requests.post(f"{url}/ingest", data=form, files={"image": ("a.png", first)}, timeout=60).status_code == 200
    before = requests.get(f"{url}/items/reingest-1", timeout=30).json()
    image_before = requests.get(url + before["image_url"], timeout=30).content
    refused = requests.post(f"{url}/ingest", data={**form, "report": "New report", "patient_id": "é" * 200},  # 400 bytes
                            files={"image": ("b.png", second)}, timeout=60)
    assert refused.status_code == 400 and "patient_id" in refused.json()["error"]
    assert requests.get(f"{url}/items/reingest-1", timeout=30).json() == before
    assert requests.get(url + before["image_url"], timeout=30).content == image_before
    hits = requests.post(f"{url}/search/text", json={"text": form["report"], "direction": "reports", "k": 100}, timeout=60)
    ours = [hit["distance"] for hit in hits.json()["results"] if hit["id"] == "reingest-1"]
    assert ours == [0]  # still the first report's codes (other reports may share them: ties come in any order)


def test_a_label_with_a_comma_filters_on_both_routes(served, dataset):
    url, source = served["url"], dataset.items[2]
    label = "topic:Neoplasm, benign"  # one of MedPix's labels with a comma in it
    form = {"id": "comma-1", "report": source.report, "labels": [label, "location:Chest"]}
    assert requests.post(f"{url}/ingest", data=form, files={"image": ("c.png", source.image_paths[0].read_bytes())},
                         timeout=60).status_code == 200
    assert requests.get(f"{url}/items/comma-1", timeout=30).json()["labels"] == [label, "location:Chest"]
    text = requests.post(f"{url}/search/text", json={"text": source.report, "direction": "both", "labels": [label]}, timeout=60)
    image = requests.post(f"{url}/search/image", files={"file": ("q.png", source.image_paths[0].read_bytes())},
                          data={"labels": [label], "direction": "both"}, timeout=60)
    for answer in (text, image):
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert "comma-1" in {r["id"] for r in results} and all(label in r["labels"] for r in results)


def test_the_view_filter_lists_the_index_views_and_matches_any_case(served, dataset):
    url = served["url"]
    listed = requests.get(f"{url}/views", timeout=30).json()
    assert listed["complete"] and "axial" in {view.casefold() for view in listed["views"]}
    assert {view.casefold() for view in listed["views"]} == {item.view.casefold() for item in dataset.items if item.view}
    for view in ("axial", "AXIAL"):
        hits = requests.post(f"{url}/search/text", json={"text": dataset.items[0].report, "view": view, "k": 20}, timeout=60)
        assert hits.json()["results"] and {r["view"].casefold() for r in hits.json()["results"]} == {"axial"}
    form = {"id": "view-1", "report": "Oblique view of the left wrist.", "view": "Oblique (wrist)"}
    assert requests.post(f"{url}/ingest", data=form, files={"image": ("w.png", dataset.items[3].image_paths[0].read_bytes())},
                         timeout=60).status_code == 200
    assert "Oblique (wrist)" in requests.get(f"{url}/views", timeout=30).json()["views"]  # a new view is listed at once


@pytest.mark.parametrize("item_id", ["a/b", "..", " padded"])
def test_ids_no_route_could_fetch_are_refused_at_ingest(served, item_id):
    answer = requests.post(f"{served['url']}/ingest", data={"id": item_id, "report": "a report"}, timeout=60)
    assert answer.status_code == 400 and "not usable" in answer.json()["error"]


def test_health_means_the_encoders_answer(served, dataset):
    started = time.perf_counter()
    assert requests.get(f"{served['url']}/healthz", timeout=30).json()["status"] == "ok"
    answer = requests.post(f"{served['url']}/search/text", json={"text": dataset.items[0].report}, timeout=60)
    assert answer.status_code == 200 and time.perf_counter() - started < 5  # warm: no first-request model load


def search_pair(url: str, dataset, headers: dict) -> tuple:
    item = query_items(dataset)[0]
    text = requests.post(f"{url}/search/text", json={"text": item.report, "k": 10}, headers=headers, timeout=60).json()
    image = requests.post(
        f"{url}/search/image", files={"file": ("q.png", item.image_paths[0].read_bytes())}, headers=headers, timeout=60
    ).json()
    return text, image


def test_restart_with_auth_keeps_every_record_and_answer(served, tiny_run, index_uri, dataset, monkeypatch):
    url = served["url"]
    counts = requests.get(f"{url}/healthz", timeout=30).json()["records"]
    answers = search_pair(url, dataset, {})
    monkeypatch.setenv(TOKEN_ENV, "s3cret-token")
    start(tiny_run, index_uri, served["port"], require_auth=True)
    denied = requests.post(f"{url}/search/text", json={"text": "x"}, timeout=30)
    assert denied.status_code == 401 and denied.json()["error"]
    wrong = {"Authorization": "Bearer wrong"}
    assert requests.get(f"{url}/items/upload-1", headers=wrong, timeout=30).status_code == 401
    assert requests.get(f"{url}/healthz", timeout=30).json()["records"] == counts  # health stays open
    assert search_pair(url, dataset, {"Authorization": "Bearer s3cret-token"}) == answers


LOAD = """
import sys, time, requests
from concurrent.futures import ThreadPoolExecutor
url, text = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 150  # bounded in time and count: it stops by itself
def hammer(_):
    for _ in range(2000):
        if time.monotonic() > deadline:
            return
        requests.post(url + "/search/text", json={"text": text, "k": 5}, timeout=60)
with ThreadPoolExecutor(8) as pool:
    list(pool.map(hammer, range(8)))
"""


def text_replicas() -> int:
    from ray import serve

    states = serve.status().applications["medhash"].deployments["TextEncoder"].replica_states
    return int(states.get("RUNNING", 0))


def test_text_encoder_scales_out_under_load_and_back_in(served, tiny_run, index_uri, dataset):
    one = DeploymentResources(min_replicas=1, max_replicas=1)
    autoscaling = {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2,
    }
    url = start(
        tiny_run, index_uri, served["port"], {"TextEncoder": {"autoscaling_config": autoscaling}},
        require_auth=False, image_encoder=one, hasher=one, index=one, ingress=one, text_batch_size=2,
    )
    assert text_replicas() == 1
    load = subprocess.Popen([sys.executable, "-c", LOAD, url, query_items(dataset)[0].report])
    try:
        up = wait_for(lambda: text_replicas() >= 2, 120)
    finally:
        load.terminate()
        load.wait(10)
    down = wait_for(lambda: text_replicas() == 1, 60)
    print(f"\nTextEncoder: 2 replicas {up:.1f} s into the load, back to 1 replica {down:.1f} s after it stopped")
    assert requests.post(f"{url}/search/text", json={"text": "chest"}, timeout=60).status_code == 200


def test_an_item_lists_the_other_items_of_its_patient_and_its_full_report(served, dataset):
    from collections import defaultdict
    from urllib.parse import quote

    by_patient = defaultdict(list)
    for item in dataset.items:
        by_patient[item.patient_id].append(item)
    case = next(items for items in by_patient.values() if len(items) >= 2)
    answer = requests.get(f"{served['url']}/items/{quote(case[0].id, safe='')}", timeout=30).json()
    assert [r["id"] for r in answer["related"]] == sorted(item.id for item in case[1:])
    assert all(set(r) == {"id", "modality", "view", "labels", "study_id", "image_url"} for r in answer["related"])
    assert answer["snippet"] == case[0].report[:2048]  # the whole report (MedPix captions fit the index's 2 KB)


def test_preview_shows_the_query_as_decoded_and_refuses_what_search_refuses(served, dataset):
    import base64

    path = query_items(dataset)[0].image_paths[0]
    answer = requests.post(f"{served['url']}/preview", files={"file": (path.name, path.read_bytes())}, timeout=60)
    about = answer.json()
    assert answer.status_code == 200 and about["format"] == "PNG" and about["modality"] == ""
    with Image.open(path) as original:
        assert (about["width"], about["height"]) == original.size
    assert Image.open(io.BytesIO(base64.b64decode(about["png_base64"]))).size[0] <= 512
    refused = requests.post(f"{served['url']}/preview", files={"file": ("notes.png", b"not an image")}, timeout=60)
    assert refused.status_code == 400 and "not a PNG, JPEG or DICOM image" in refused.json()["error"]


def test_a_judgment_of_a_hit_is_stored_exported_and_kept_across_a_restart(served, tiny_run, index_uri, dataset, tmp_path):
    from medhash.services.judgments import fingerprint, read_judgments

    url = start(tiny_run, index_uri, served["port"], require_auth=False)
    item = query_items(dataset)[0]
    answer = requests.post(f"{url}/search/text", json={"text": item.report, "k": 3}, timeout=60).json()
    assert (answer["query"]["modality"], answer["query"]["sha256"]) == ("text", fingerprint(item.report))
    hit = answer["results"][0]
    judgment = {"user": "alice", "query_modality": "text", "query_sha256": answer["query"]["sha256"],
                "item_id": hit["id"], "item_modality": hit["modality"], "verdict": "relevant"}
    for user in ("alice", "bob"):  # two users, two rows
        stored = requests.post(f"{url}/judgments", json={**judgment, "user": user}, timeout=30)
        assert stored.status_code == 201 and stored.json()["user"] == user and stored.json()["judged_at"]
    missing = requests.post(f"{url}/judgments", json={**judgment, "item_id": "no-such-item"}, timeout=30)
    assert missing.status_code == 404
    bad = requests.post(f"{url}/judgments", json={**judgment, "verdict": "maybe"}, timeout=30)
    assert bad.status_code == 422
    start(tiny_run, index_uri, served["port"], require_auth=False)  # a restart keeps them
    export = requests.get(f"{url}/judgments", timeout=30)
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    (tmp_path / "judgments.csv").write_text(export.text, encoding="utf-8")
    rows = read_judgments(tmp_path / "judgments.csv")
    assert [(r.user, r.item_id, r.verdict) for r in rows[-2:]] == [("alice", hit["id"], "relevant"), ("bob", hit["id"], "relevant")]
    assert item.report not in export.text  # the query is its fingerprint, never its text
    assert read_judgments(Path(index_uri).with_suffix(".judgments.sqlite")) == rows  # the file next to the index


def index_replica():
    from medhash.benchmarks.serve_speed import replica_processes

    (replica,) = replica_processes()["Index"]
    return replica


def test_the_index_replica_is_restarted_when_its_milvus_lite_process_dies(served, tiny_run, index_uri, dataset):
    url = start(tiny_run, index_uri, served["port"], require_auth=False)
    query = {"text": query_items(dataset)[0].report, "k": 5}
    before = requests.post(f"{url}/search/text", json=query, timeout=60).json()
    counts = requests.get(f"{url}/healthz", timeout=30).json()["records"]
    replica = index_replica()
    milvus = [p for p in replica.children(recursive=True) if "milvus" in " ".join(p.cmdline())]
    assert milvus, "the Index replica runs no milvus-lite process"
    for process in milvus:
        process.kill()
    down = requests.post(f"{url}/search/text", json=query, timeout=120)
    assert down.status_code == 503 and down.headers["Retry-After"] and "index" in down.json()["error"]
    back = wait_for(lambda: requests.post(f"{url}/search/text", json=query, timeout=60).status_code == 200, 120)
    print(f"\nIndex: answering again {back:.1f} s after its milvus-lite process was killed")
    assert index_replica().pid != replica.pid
    assert requests.get(f"{url}/healthz", timeout=30).json()["records"] == counts
    assert requests.post(f"{url}/search/text", json=query, timeout=60).json() == before


def test_ingest_speed_benchmark_indexes_every_item_and_reports_both_passes(tiny_run, dataset):
    from medhash.benchmarks.ingest_speed import format_report, measure_ingest_speed

    encoders, indexing = measure_ingest_speed(tiny_run, dataset, n_items=8, batch_size=4)
    assert encoders.items == indexing.items == 8
    assert set(encoders.stages) == {"read files", "encode"}
    assert set(indexing.stages) == {"read files", "encode", "hash", "upsert"}
    assert all(seconds > 0 for seconds in indexing.stages.values())
    report = format_report(encoders, indexing, 4)
    assert "| indexing |" in report and "Index throughput / encoders alone:" in report


def index_replicas() -> int:
    from ray import serve

    states = serve.status().applications["medhash"].deployments["Index"].replica_states
    return int(states.get("RUNNING", 0))


@pytest.mark.server
def test_on_a_milvus_server_two_index_replicas_answer_and_a_lost_server_is_a_503_until_it_returns(
        served, tiny_run, reference, dataset, milvus_server):
    from medhash.services.config import IndexConfig
    from medhash.services.index import open_index

    index_cfg = IndexConfig(uri=milvus_server.uri, collection_prefix="serving", ivf_nlist=16, nprobe=16, timeout_s=5)
    index = open_index(index_cfg, tiny_run.config().codes.bits)
    try:
        assert ingest_dataset(tiny_run, index, dataset, progress=False) == len(dataset)
    finally:
        index.close()
    url = start(tiny_run, milvus_server.uri, served["port"], {"Index": {"num_replicas": 2}}, index_section=index_cfg,
                require_auth=False)
    assert index_replicas() == 2
    item = query_items(dataset)[0]
    query = {"text": item.report, "k": 10, "direction": "both", "bits": 32}
    for _ in range(4):  # answered by either replica: the same exact top-k
        answer = requests.post(f"{url}/search/text", json=query, timeout=60)
        assert answer.status_code == 200, answer.text
        reference.check(answer.json()["results"], reference.pipeline.text_codes([item.report], 32), "both", 32, 10)
    before = answer.json()
    counts = requests.get(f"{url}/healthz", timeout=30).json()["records"]
    assert counts["64"] == 2 * len(dataset)

    milvus_server.stop()
    started = time.monotonic()
    down = requests.post(f"{url}/search/text", json=query, timeout=120)
    assert down.status_code == 503 and down.headers["Retry-After"] and "index" in down.json()["error"]
    assert time.monotonic() - started < 30  # the call timeout, not a hang
    assert requests.get(f"{url}/healthz", timeout=60).status_code == 503
    milvus_server.start()
    back = wait_for(lambda: requests.post(f"{url}/search/text", json=query, timeout=60).status_code == 200, 240)
    print(f"\nIndex on a Milvus server: answering again {back:.1f} s after the server came back")
    assert requests.post(f"{url}/search/text", json=query, timeout=60).json() == before
    wait_for(lambda: requests.get(f"{url}/healthz", timeout=30).status_code == 200, 120)  # its reads may lag
    assert requests.get(f"{url}/healthz", timeout=30).json()["records"] == counts
    wait_for(lambda: index_replicas() == 2, 120)


def test_medhash_serve_shuts_down_cleanly_on_sigterm(served, tiny_run, index_uri):
    """The command as a container runtime stops it (last here: it joins this module's cluster and replaces the app)."""
    import os
    import signal

    env = {**os.environ, "MEDHASH_CACHE": str(Path(index_uri).parent)}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("medhash")), "serve", "--run", str(tiny_run.path), "--milvus-uri", index_uri,
         "--port", str(served["port"])], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    watchdog = threading.Timer(600, process.kill)  # a service that never says it serves fails, never hangs
    watchdog.start()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("medhash serving"):
            break
    watchdog.cancel()
    assert lines and lines[-1].startswith("medhash serving"), "".join(lines)[-2000:]
    assert requests.get(f"{served['url']}/healthz", timeout=30).status_code == 200
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-2000:]
    assert "shutting down" in output and "Aborted" not in output
