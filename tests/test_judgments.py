"""Relevance judgments: the SQLite store, its CSV export, crash safety, and scoring codes against them."""
from __future__ import annotations

import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from medhash.services.codes import pack_codes
from medhash.services.errors import DataError
from medhash.services.evaluation.judgments import judged_relevance, score_judgments
from medhash.services.judgments import Judgment, JudgmentStore, fingerprint, read_judgments, to_csv

SHA = fingerprint("pleural effusion")


def test_two_users_judging_the_same_hit_keep_two_rows_and_survive_a_reopen(tmp_path):
    store = JudgmentStore(tmp_path / "j.sqlite")
    store.add("alice", "text", SHA, "case_1", "image", "relevant")
    store.add("bob", "text", SHA, "case_1", "image", "not_relevant")
    store.close()
    rows = JudgmentStore(tmp_path / "j.sqlite").all()
    assert [(j.user, j.verdict) for j in rows] == [("alice", "relevant"), ("bob", "not_relevant")]
    assert all(j.judged_at.endswith("+00:00") for j in rows)
    assert set(vars(rows[0])) == {"user", "query_modality", "query_sha256", "item_id", "item_modality", "verdict", "judged_at"}


def test_the_csv_export_reads_back_as_the_file_does(tmp_path):
    store = JudgmentStore(tmp_path / "j.sqlite")
    store.add("alice", "image", fingerprint(b"\x89PNG..."), "case 1, \"ok\"", "text", "relevant")
    (tmp_path / "j.csv").write_text(to_csv(store.all()), encoding="utf-8")
    assert read_judgments(tmp_path / "j.csv") == read_judgments(tmp_path / "j.sqlite") == store.all()


@pytest.mark.parametrize("field, value, message", [
    ("user", " ", "user"), ("user", "x" * 200, "user"), ("query_modality", "video", "query_modality"),
    ("query_sha256", "abc", "query_sha256"), ("item_id", "", "id"), ("verdict", "maybe", "verdict"),
])
def test_a_bad_judgment_is_refused_naming_the_field_and_nothing_is_stored(tmp_path, field, value, message):
    store = JudgmentStore(tmp_path / "j.sqlite")
    fields = dict(user="alice", query_modality="text", query_sha256=SHA, item_id="case_1", item_modality="image",
                  verdict="relevant")
    with pytest.raises(DataError, match=message):
        store.add(**{**fields, field: value})
    assert store.all() == []


def test_unreadable_files_get_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_judgments(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DataError, match="neither SQLite nor a UTF-8 CSV"):
        read_judgments(tmp_path / "bad.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="needs the columns"):
        read_judgments(tmp_path / "other.csv")


KILLED_WRITER = """
import os, signal, sys
from medhash.services.judgments import JudgmentStore, fingerprint
store = JudgmentStore(sys.argv[1])
for i in range(100000):
    store.add("alice", "text", fingerprint(str(i)), f"case_{i}", "image", "relevant")
    if i == 500:
        print("written", flush=True)
"""


def test_a_writer_killed_mid_write_leaves_only_whole_rows(tmp_path):
    path = tmp_path / "j.sqlite"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"
    writer.kill()
    writer.wait(30)
    rows = read_judgments(path)
    assert len(rows) > 500 and all(r.item_id == f"case_{int(r.item_id[5:])}" and r.verdict == "relevant" for r in rows)
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def judgment(user, item, verdict, at, query="q", modality="text", item_modality="image"):
    return Judgment(user, modality, fingerprint(query), item, item_modality, verdict, at)


def test_each_users_latest_verdict_counts_once_and_the_majority_decides():
    relevance = judged_relevance([
        judgment("alice", "a", "not_relevant", "2026-01-01T00:00:00+00:00"),
        judgment("alice", "a", "relevant", "2026-01-02T00:00:00+00:00"),  # alice changed her mind
        judgment("bob", "a", "relevant", "2026-01-01T00:00:00+00:00"),
        judgment("alice", "b", "relevant", "2026-01-01T00:00:00+00:00"),
        judgment("bob", "b", "not_relevant", "2026-01-01T00:00:00+00:00"),  # a tie: not relevant
    ])
    key = ("text", fingerprint("q"))
    assert relevance == {(*key, "a", "image"): True, (*key, "b", "image"): False}


def test_scores_follow_the_ranking_of_the_judged_hits():
    # item rows: 0 = the query's own case, 1..3 other cases; text query 0; image codes at distance 0, 1, 2, 3 bits
    ids = np.array(["q0", "c1", "c2", "c3"])
    image_bits = np.zeros((4, 8), dtype=np.uint8)
    for row in range(4):
        image_bits[row, :row] = 1
    codes = {"text": pack_codes(np.zeros((4, 8), dtype=np.uint8)), "image": pack_codes(image_bits)}
    fingerprints = {("text", fingerprint("report of q0")): 0}
    at = "2026-01-01T00:00:00+00:00"
    judgments = [judgment("alice", "c1", "not_relevant", at, "report of q0"),
                 judgment("alice", "c2", "relevant", at, "report of q0"),
                 judgment("alice", "c9", "relevant", at, "an upload nobody indexed")]
    scores = score_judgments(judgments, fingerprints, ids, codes)
    assert scores["queries"] == {"resolved": 1, "unresolved": 1}
    t2i = scores["directions"]["t2i"]
    assert t2i["queries"] == 1
    assert t2i["map@judged"] == pytest.approx(0.5)  # judged ranking: c1 (no), c2 (yes)
    assert t2i["p@1"] == 0 and t2i["p@5"] == pytest.approx(1 / 5)
    assert "i2t" not in scores["directions"]
