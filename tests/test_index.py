"""CodeIndex on a real milvus-lite file and a real Milvus server: exact Hamming top-k, idempotent upsert,
durability, filters. Tests taking ``filled`` or ``make_index`` run on both backends."""
from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medhash.services.codes import hamming_distances
from medhash.services.config import IndexConfig
from medhash.services.errors import ConfigError, DataError
from medhash.services.index import CodeIndex, IndexRecord, open_index, resolve_uri, rows_to_index

BITS = (16, 64, 128)
N_CODES, N_QUERIES, K = 2000, 20, 10
BACKENDS = ["milvus-lite", pytest.param("milvus-server", marks=pytest.mark.server)]


def open_backend(request, backend: str, lite_file: Path, bits) -> CodeIndex:
    """A fresh, empty index on ``backend``: a milvus-lite file, or new collections on the session's server
    (BIN_IVF_FLAT searching every cluster, so its answers are exact too)."""
    if backend == "milvus-lite":
        return CodeIndex(str(lite_file), bits)
    server = request.getfixturevalue("milvus_server")
    return CodeIndex(server.uri, bits, prefix=f"t{uuid.uuid4().hex[:12]}", index_type="BIN_IVF_FLAT",
                     ivf_nlist=16, nprobe=16)


@pytest.fixture(params=BACKENDS)
def make_index(request, tmp_path):
    """``make_index(bits)``: an empty index on each backend, closed after the test."""
    opened = []

    def make(bits) -> CodeIndex:
        opened.append(open_backend(request, request.param, tmp_path / f"index{len(opened)}.db", bits))
        return opened[-1]

    yield make
    for index in opened:
        index.close()


def random_codes(n: int, bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, bits // 8), dtype=np.uint8)


def records(codes: np.ndarray, modality: str = "image") -> list[IndexRecord]:
    return [
        IndexRecord(id=f"item{i}", modality=modality, code=code.tobytes(), patient_id=f"p{i % 7}",
                    labels=("location:Head_Neck",) if i % 3 == 0 else ("topic:a", "finding:COVID-19"),
                    view="PA" if i % 2 else "AP", snippet=f"report {i}", image_ref=f"/img/{i}.png")
        for i, code in enumerate(codes)
    ]


@pytest.fixture(scope="module", params=BACKENDS)
def filled(request, tmp_path_factory):
    """An index with N_CODES random image codes at each bit length, its milvus-lite file (None on a server)
    and those codes."""
    path = tmp_path_factory.mktemp("index") / "codes.db"
    index = open_backend(request, request.param, path, BITS)
    path = None if index.is_server else path
    database = {bits: random_codes(N_CODES, bits, seed=bits) for bits in BITS}
    for bits, codes in database.items():
        assert index.upsert(bits, records(codes)) == N_CODES
    yield index, path, database
    index.close()


def assert_matches_brute_force(hits: list, queries: np.ndarray, database: np.ndarray, k: int) -> None:
    """Same distance multiset as numpy's ranking, and the same ids strictly inside the k-th distance."""
    distances = hamming_distances(queries, database)
    for q, row in enumerate(hits):
        expected = np.sort(distances[q])[:k]
        assert [h.distance for h in row] == sorted(h.distance for h in row)
        assert Counter(h.distance for h in row) == Counter(expected.tolist())
        inside = {f"item{i}" for i in np.flatnonzero(distances[q] < expected[-1])}
        assert {h.id for h in row if h.distance < expected[-1]} == inside
        for h in row:
            assert distances[q, int(h.id[4:])] == h.distance


@pytest.mark.parametrize("bits", BITS)
def test_search_equals_brute_force_hamming(filled, bits):
    index, _, database = filled
    queries = random_codes(N_QUERIES, bits, seed=1000 + bits)
    hits = index.search(bits, queries, K, modality="image")  # other tests add text records
    assert_matches_brute_force(hits, queries, database[bits], K)
    exact = index.search(bits, database[bits][:3], 1, modality="image")
    assert [row[0].distance for row in exact] == [0, 0, 0]


def test_upsert_is_idempotent_and_updates_fields(filled):
    index, _, database = filled
    first = records(database[64][:5])
    changed = [IndexRecord(r.id, r.modality, database[64][-1].tobytes(), labels=("new:label",), snippet="updated")
               for r in first]
    assert index.upsert(64, first) == 5 and index.count(64) == N_CODES
    assert index.upsert(64, changed + changed) == 5 and index.count(64) == N_CODES
    hits = {h.id: h for h in index.search(64, database[64][-1:], 6)[0]}
    assert set(hits) >= {f"item{i}" for i in range(5)} and hits["item0"].distance == 0
    assert (hits["item0"].labels, hits["item0"].snippet, hits["item0"].patient_id) == (("new:label",), "updated", "")
    index.upsert(64, first)  # restore for the other tests
    assert index.search(64, database[64][:1], 1)[0][0].labels == ("location:Head_Neck",)


def test_close_and_reopen_keeps_counts_and_results(filled, tmp_path):
    path = tmp_path / "durable.db"
    codes = random_codes(500, 64, seed=7)
    queries = random_codes(5, 64, seed=8)
    index = CodeIndex(str(path), [64])
    index.upsert(64, records(codes))
    before = index.search(64, queries, K)
    index.close()
    reopened = CodeIndex(str(path), [64])
    try:
        assert reopened.count(64) == 500
        assert reopened.search(64, queries, K) == before
    finally:
        reopened.close()


def test_filters_by_modality_label_and_view(filled):
    index, _, database = filled
    texts = [IndexRecord(f"item{i}", "text", database[16][i].tobytes(), snippet=f"text {i}", view="PA")
             for i in range(50)]
    index.upsert(16, texts)
    query = database[16][:1]
    text_hits = index.search(16, query, 20, modality="text")[0]
    assert len(text_hits) == 20 and {h.modality for h in text_hits} == {"text"}
    assert text_hits[0].id == "item0" and text_hits[0].distance == 0
    head = index.search(16, query, 30, modality="image", labels=["location:Head_Neck"])[0]
    assert len(head) == 30 and all(h.labels == ("location:Head_Neck",) for h in head)
    # "_" is literal, not a wildcard, and labels must all be present
    assert index.search(16, query, 5, labels=["location:HeadxNeck"]) == [[]]
    both = index.search(16, query, 10, labels=["topic:a", "finding:COVID-19"], view="PA")[0]
    assert both and all(set(h.labels) == {"topic:a", "finding:COVID-19"} and h.view == "PA" for h in both)
    index.delete(["no-such-item"])
    index.delete([])
    assert index.count(16) == N_CODES + 50


def test_related_items_share_the_patient_or_the_study(make_index):
    index = make_index([32])
    codes = random_codes(5, 32, seed=1)
    index.upsert(32, [IndexRecord("a", "image", codes[0].tobytes(), patient_id="P1", study_id="S1"),
                      IndexRecord("a", "text", codes[0].tobytes(), patient_id="P1", study_id="S1"),
                      IndexRecord("b", "text", codes[1].tobytes(), patient_id="P1", study_id="S2"),
                      IndexRecord("c", "image", codes[2].tobytes(), patient_id="P2", study_id="S1"),
                      IndexRecord("d", "image", codes[3].tobytes(), patient_id="P2", study_id="S3"),
                      IndexRecord("e", "image", codes[4].tobytes())])
    assert [h.id for h in index.related("a")] == ["b", "c"]  # same patient, same study; never itself
    assert [h.id for h in index.related("d")] == ["c"]
    assert index.related("e") == [] and index.related("nope") == []


def test_get_and_delete(make_index):
    index = make_index([32, 64])
    for bits in (32, 64):
        codes = random_codes(3, bits, seed=bits)
        index.upsert(bits, [IndexRecord("a", "image", codes[0].tobytes(), image_ref="/a.png", labels=("x:1",)),
                            IndexRecord("a", "text", codes[1].tobytes(), snippet="the report"),
                            IndexRecord("b", "image", codes[2].tobytes())])
    hits = index.get("a")
    assert [(h.modality, h.distance) for h in hits] == [("image", 0), ("text", 0)]
    assert hits[0].image_ref == "/a.png" and hits[0].labels == ("x:1",) and hits[1].snippet == "the report"
    assert index.get("nope") == []
    index.delete([f"unknown{i}" for i in range(1500)] + ["a"])  # "a" falls in the last delete batch
    assert index.get("a") == [] and index.count(32) == index.count(64) == 1
    assert [h.id for h in index.get("b")] == ["b"]


def test_bad_inputs_raise_clear_errors(filled, tmp_path):
    index, _, _ = filled
    with pytest.raises(DataError, match="64-bit code is 8 packed bytes, got 4"):
        index.upsert(64, [IndexRecord("ok", "image", bytes(8)), IndexRecord("short", "image", bytes(4))])
    assert index.get("ok") == []  # nothing written
    with pytest.raises(DataError, match="modality"):
        index.upsert(64, [IndexRecord("x", "audio", bytes(8))])
    with pytest.raises(DataError, match="control characters"):
        index.upsert(64, [IndexRecord("x", "image", bytes(8), labels=("a\tb",))])
    with pytest.raises(DataError, match=r"shape \(Q, 8\)"):
        index.search(64, np.zeros((2, 4), dtype=np.uint8), 5)
    with pytest.raises(DataError, match=r"shape \(Q, 8\)"):
        index.search(64, np.zeros((2, 64), dtype=np.int64), 5)
    with pytest.raises(DataError, match="k must be"):
        index.search(64, np.zeros((1, 8), dtype=np.uint8), 0)
    with pytest.raises(DataError, match="control characters"):
        index.search(64, np.zeros((1, 8), dtype=np.uint8), 5, labels=['x"\n'])
    with pytest.raises(ConfigError, match="no 32-bit collection"):
        index.count(32)
    with pytest.raises(ConfigError, match="multiple of 8"):
        CodeIndex(str(tmp_path / "x.db"), [12])
    with pytest.raises(ConfigError, match="expected a milvus-lite file"):
        CodeIndex("ftp://host/index", [64])
    with pytest.raises(ConfigError, match="must end in .db"):
        CodeIndex(str(tmp_path / "index"), [64])


def test_second_process_is_refused_with_a_clear_message(filled):
    _, path, _ = filled
    if path is None:
        pytest.skip("a Milvus server takes any number of clients")
    script = f"from medhash.services.index import CodeIndex\nCodeIndex({str(path)!r}, [64])"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"another process owns {path}" in result.stderr and "Milvus server URI" in result.stderr


def test_closing_releases_the_file_to_another_process(tmp_path):
    path = tmp_path / "index.db"
    CodeIndex(str(path), [64]).close()  # this process keeps running
    script = f"from medhash.services.index import CodeIndex\nCodeIndex({str(path)!r}, [64]).close()"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_default_uri_lives_in_the_cache(medhash_cache):
    assert resolve_uri(IndexConfig()) == str(medhash_cache / "index" / "medhash.db")
    assert resolve_uri(IndexConfig(uri="http://milvus:19530")) == "http://milvus:19530"


def test_open_index_follows_the_config_section(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDHASH_MILVUS_TOKEN", "")
    index = open_index(IndexConfig(uri=str(tmp_path / "cfg.db"), collection_prefix="other"), [16])
    try:
        index.upsert(16, [IndexRecord("a", "text", bytes(2))])
        assert index.count(16) == 1 and index._client.list_collections() == ["other_16"]
    finally:
        index.close()


def test_filters_beyond_the_limits_are_refused_before_milvus_sees_them(filled):
    index, _, _ = filled
    query = np.zeros((1, 8), dtype=np.uint8)
    with pytest.raises(DataError, match="40,000 label filters; at most 16"):
        index.search(64, query, 5, labels=[f"topic:{i}" for i in range(40_000)])
    with pytest.raises(DataError, match="longer than 256"):
        index.search(64, query, 5, view="x" * 257)
    labels = [f"topic:{i}" for i in range(16)]  # at the limit: a valid (empty) answer
    assert index.search(64, query, 5, labels=labels) == [[]]
    assert len(index.search(64, query, 5)[0]) == 5  # and the index still answers


@pytest.mark.parametrize("item_id", ["a/b", "..", " padded", "tab\there", "x" * 257, ""])
def test_ids_that_no_route_could_fetch_are_refused(filled, item_id):
    index, _, _ = filled
    with pytest.raises(DataError, match="not usable"):
        index.upsert(64, [IndexRecord(item_id, "image", bytes(8))])


def one_item(item_id: str, bits=BITS, **fields) -> dict[int, list[IndexRecord]]:
    return {b: [IndexRecord(item_id, m, bytes(b // 8), **fields) for m in ("image", "text")] for b in bits}


def test_upsert_item_is_all_or_nothing_across_code_lengths(make_index):
    index = make_index(BITS)
    index.upsert_item(one_item("case1", view="AP"))
    assert all(index.count(b) == 2 for b in BITS)
    bad = one_item("case1", view="PA")
    bad[128][1] = IndexRecord("case1", "text", bytes(3))  # one wrong record at the last code length
    with pytest.raises(DataError, match="128-bit code"):
        index.upsert_item(bad)
    assert {h.view for h in index.get("case1")} == {"AP"}  # nothing changed at any code length
    with pytest.raises(DataError, match="every code length"):
        index.upsert_item({64: one_item("case2")[64]})
    assert index.get("case2") == []


def test_an_item_half_written_by_a_crash_is_completed_when_the_index_reopens(tmp_path):
    """A process killed between code lengths: the next open finishes the item from its journal."""
    path = tmp_path / "crash.db"
    script = f"""
import os
from medhash.services.index import CodeIndex, IndexRecord
index = CodeIndex({str(path)!r}, {BITS!r})
written = []
def upsert(bits, records, _upsert=index.upsert):
    if written:
        os._exit(9)  # killed after the first code length
    written.append(bits)
    return _upsert(bits, records)
index.upsert = upsert
index.upsert_item({{b: [IndexRecord("case9", "image", bytes(b // 8), view="AP")] for b in {BITS!r}}})
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    index = CodeIndex(str(path), BITS)
    assert [index.count(b) for b in BITS] == [1, 1, 1]
    assert index.get("case9")[0].view == "AP"
    assert not list(index._journal.glob("*"))  # the journal entry is gone once written
    index.close()


def test_labels_are_matched_whole_whatever_they_contain(make_index):
    index = make_index([16])
    index.upsert(16, [IndexRecord("a", "image", bytes(2), labels=("finding:effusion, left", "x|y")),
                      IndexRecord("b", "image", bytes(2), labels=("finding:effusion",))])
    query = np.zeros((1, 2), dtype=np.uint8)
    assert [h.id for h in index.search(16, query, 5, labels=["finding:effusion, left"])[0]] == ["a"]
    assert [h.id for h in index.search(16, query, 5, labels=["x|y", "finding:effusion, left"])[0]] == ["a"]
    assert [h.id for h in index.search(16, query, 5, labels=["finding:effusion"])[0]] == ["b"]
    assert index.get("a")[0].labels == ("finding:effusion, left", "x|y")


def test_the_view_filter_ignores_case_and_the_index_lists_its_views(make_index):
    index = make_index([16])
    views = ["Axial", "axial", "AXIAL", "PA", "", "Straße"]
    index.upsert(16, [IndexRecord(f"v{i}", "image", bytes([i, 0]), view=view) for i, view in enumerate(views)]
                 + [IndexRecord("t0", "text", bytes(2), view="Lateral")])
    query = np.zeros((1, 2), dtype=np.uint8)
    assert {h.id for h in index.search(16, query, 10, view="aXiAl")[0]} == {"v0", "v1", "v2"}
    assert [h.id for h in index.search(16, query, 10, view="STRASSE")[0]] == ["v5"]  # full case folding
    assert index.get("v1")[0].view == "axial"  # stored as given
    listed, complete = index.views(1000)
    assert [view.casefold() for view in listed] == ["axial", "pa", "strasse"] and complete  # images' views, one spelling each
    part, complete = index.views(2)
    assert set(part) <= set(listed) and not complete


@pytest.mark.parametrize("labels_as_text", [True, False], ids=["labels as text", "no case-folded view"])
def test_an_index_of_an_earlier_schema_is_refused_by_name(tmp_path, labels_as_text):
    from pymilvus import DataType, MilvusClient

    path = tmp_path / "old.db"
    client = MilvusClient(str(path))
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=16)
    if labels_as_text:
        schema.add_field("labels", DataType.VARCHAR, max_length=64)
    else:
        schema.add_field("labels", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=8, max_length=64)
    client.create_collection("medhash_16", schema=schema)
    client.close()
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(str(path.resolve()))
    with pytest.raises(ConfigError, match="medhash_16 .* earlier medhash"):
        CodeIndex(str(path), [16])


def eventually(call, seconds: float = 120):
    """``call()``, retried while a restarted server is still loading (it answers /healthz first)."""
    import time

    from grpc import RpcError
    from pymilvus.exceptions import MilvusException

    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except (MilvusException, RpcError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.mark.server
def test_the_rows_left_to_index_count_what_compaction_queues_after_every_row_was_indexed():
    """What a 10 M BIN_IVF_FLAT insert reported: first rows not yet indexed, then compacted segments queued again."""
    assert rows_to_index({"total_rows": 10_000_000, "indexed_rows": 6_870_000, "pending_index_rows": 0}) == 3_130_000
    assert rows_to_index({"total_rows": 10_000_000, "indexed_rows": 10_000_000, "pending_index_rows": 3_720_000}) == 3_720_000
    assert rows_to_index({"total_rows": 500, "indexed_rows": 500, "pending_index_rows": 0}) == 0
    assert rows_to_index({}) == 0  # milvus-lite reports no index progress


def test_a_restarted_server_gives_the_same_answers(milvus_server):
    """Stopped (SIGTERM, SIGKILL after 1 s) and started again on its folder (the session's server:
    a second server on this machine would need etcd's fixed peer port)."""
    server = milvus_server
    index = CodeIndex(server.uri, [64], prefix="durable", ivf_nlist=16, nprobe=16)
    codes, queries = random_codes(3000, 64, seed=3), random_codes(5, 64, seed=4)
    index.upsert(64, records(codes))
    index.delete(["item7"])
    before = index.search(64, queries, K)
    index.close()
    server.stop()
    server.start()
    index = CodeIndex(server.uri, [64], prefix="durable", ivf_nlist=16, nprobe=16)
    assert eventually(lambda: index.count(64)) == 2999 and index.get("item7") == []
    assert index.search(64, queries, K) == before
    index.close()


@pytest.mark.server
def test_a_lost_server_fails_calls_quickly_and_the_client_recovers_when_it_returns(milvus_server):
    import time

    from pymilvus.exceptions import MilvusException

    server = milvus_server
    index = CodeIndex(server.uri, [64], prefix="lost", ivf_nlist=16, nprobe=16, timeout_s=3)
    codes = random_codes(200, 64, seed=5)
    index.upsert(64, records(codes))
    server.stop()
    start = time.monotonic()
    with pytest.raises(MilvusException, match="server unavailable"):
        index.search(64, codes[:1], K)
    assert time.monotonic() - start < 30  # the call's timeout, not a hang
    server.start()
    assert eventually(lambda: index.search(64, codes[:1], 1))[0][0].id == "item0"  # the same client reconnects
    assert index.count(64) == 200
    index.close()
