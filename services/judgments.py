"""Relevance judgments of search hits by logged-in users, kept in an SQLite file.

A judgment is (user, the query's modality and SHA-256 fingerprint, the hit's item id and modality,
verdict, time): never the query's content. Each judgment is one committed row (WAL journal,
``synchronous=FULL``), so a killed process leaves whole rows or none; two users judging the same
hit keep two rows. `medhash eval --judgments` reads the file (or its CSV export) and maps each
fingerprint back to the dataset item whose image bytes or report text it is (:func:`fingerprint`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import sqlite3
import threading
import unicodedata
from dataclasses import astuple, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from medhash.services.errors import DataError
from medhash.services.index import check_item_id

VERDICTS = ("relevant", "not_relevant")
MODALITIES = ("image", "text")
MAX_USER_CHARS = 128
SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    query_modality TEXT NOT NULL CHECK (query_modality IN ('image', 'text')),
    query_sha256 TEXT NOT NULL CHECK (length(query_sha256) = 64),
    item_id TEXT NOT NULL,
    item_modality TEXT NOT NULL CHECK (item_modality IN ('image', 'text')),
    verdict TEXT NOT NULL CHECK (verdict IN ('relevant', 'not_relevant')),
    judged_at TEXT NOT NULL
)
"""


def fingerprint(query: bytes | str) -> str:
    """SHA-256 (hex) of image bytes as uploaded, or of a report text in Unicode NFC without outer whitespace."""
    data = query if isinstance(query, bytes) else unicodedata.normalize("NFC", query).strip().encode("utf-8")
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Judgment:
    """One user's verdict on one hit of one query."""

    user: str
    query_modality: str  # image | text
    query_sha256: str  # fingerprint() of the query
    item_id: str
    item_modality: str  # image | text
    verdict: str  # relevant | not_relevant
    judged_at: str  # ISO 8601, UTC

    def check(self) -> "Judgment":
        """This judgment, or a DataError naming the field that is wrong."""
        if not self.user.strip() or len(self.user) > MAX_USER_CHARS or not self.user.isprintable():
            raise DataError(f"user: expected 1-{MAX_USER_CHARS} printable characters")
        for name in ("query_modality", "item_modality"):
            if getattr(self, name) not in MODALITIES:
                raise DataError(f"{name}: expected one of {', '.join(MODALITIES)}")
        if len(self.query_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.query_sha256):
            raise DataError("query_sha256: expected 64 lower-case hex digits (the search answer's query.sha256)")
        check_item_id(self.item_id)
        if self.verdict not in VERDICTS:
            raise DataError(f"verdict: expected one of {', '.join(VERDICTS)}")
        return self


COLUMNS = tuple(f.name for f in fields(Judgment))


class JudgmentStore:
    """The judgments file: append and read, safe to share between the threads of one process."""

    def __init__(self, path: Path | str):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise DataError(f"judgments file {self.path}: not an SQLite database this version can use ({exc})") from None

    def add(self, user: str, query_modality: str, query_sha256: str, item_id: str, item_modality: str,
            verdict: str) -> Judgment:
        """Store one judgment (checked first), stamped with the current UTC time."""
        judged_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        judgment = Judgment(user, query_modality, query_sha256, item_id, item_modality, verdict, judged_at).check()
        with self._lock:
            self._db.execute(f"INSERT INTO judgments ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                             astuple(judgment))
        return judgment

    def all(self) -> list[Judgment]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM judgments ORDER BY id").fetchall()
        return [Judgment(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def to_csv(judgments: list[Judgment]) -> str:
    """The judgments as CSV with a header row (the export format :func:`read_judgments` reads back)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    writer.writerows(astuple(j) for j in judgments)
    return buffer.getvalue()


def read_judgments(path: Path) -> list[Judgment]:
    """Judgments from an SQLite judgments file or its CSV export (told apart by content); each row checked."""
    path = Path(path)
    try:
        head = path.open("rb").read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise DataError(f"judgments file {path}: cannot read ({exc.strerror})") from None
    if head == SQLITE_MAGIC:
        store = JudgmentStore(path)
        try:
            return store.all()
        finally:
            store.close()
    try:
        with path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"judgments file {path}: neither SQLite nor a UTF-8 CSV export ({exc})") from None
    if rows and set(COLUMNS) - set(rows[0]):
        raise DataError(f"judgments file {path}: the CSV needs the columns {', '.join(COLUMNS)}")
    judgments = []
    for line, row in enumerate(rows, start=2):
        try:
            judgments.append(Judgment(**{c: row[c] or "" for c in COLUMNS}).check())
        except DataError as exc:
            raise DataError(f"judgments file {path}, line {line}: {exc}") from None
    return judgments
