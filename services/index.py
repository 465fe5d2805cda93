"""The Milvus index of packed binary codes: upsert, Hamming top-k search with filters, get, delete.

One collection per code length (``<prefix>_<bits>``), a ``BINARY_VECTOR`` of that many bits plus the
item's metadata; the primary key is ``"<modality>:<id>"``, so re-upserting an item replaces it.
A ``.db`` path opens a milvus-lite file (exact ``BIN_FLAT`` scan; one process per file); an
``http(s)://`` or ``tcp://`` URI opens a Milvus server (``index.index_type``, ``BIN_IVF_FLAT`` by
default; replicas scale out). Labels are an ``ARRAY`` of strings, matched whole by ``array_contains_all``
(Milvus 2.3 servers match ``like`` by prefix only). The view is matched without regard to case: each
row also stores it case-folded (``view_key``), and the filter compares that.

Writing one item is all-or-nothing across code lengths (:meth:`CodeIndex.upsert_item`): the item's
records are journalled to a file before the first upsert and the file is removed after the last, so
an item a crash left half-written is written again when the index next opens.

Ties: Milvus orders equal Hamming distances by no documented rule (milvus-lite was seen to return
them in insertion order), and when several items tie at the k-th distance, which of them make the
top k is Milvus's choice. :meth:`CodeIndex.search` sorts the hits it gets by (distance, id, modality).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhash.services.config import IndexConfig, cache_root, check_code_length
from medhash.services.errors import ConfigError, DataError

MODALITIES = ("image", "text")
MAX_TOP_K = 16384  # Milvus's limit on k
_SERVER_SCHEMES = ("http://", "https://", "tcp://")
_MAX_BYTES = {"pk": 520, "id": 512, "modality": 8, "patient_id": 256, "study_id": 256, "view": 64,
              "view_key": 256, "snippet": 2048, "image_ref": 2048}  # VARCHAR max_length of each text field
MAX_LABELS, MAX_LABEL_BYTES = 256, 256  # the labels ARRAY: elements per item, bytes per element
_OUTPUT_FIELDS = ["id", "modality", "patient_id", "study_id", "labels", "view", "snippet", "image_ref"]
_UPSERT_BATCH = 10_000  # rows per Milvus call
_SCAN_BATCH = 10_000  # rows per page when listing the views
MAX_FILTER_LABELS = 16  # labels one search may require (Milvus fails on long filter expressions)
MAX_FILTER_CHARS = 256  # characters of one label or view filter
ITEM_ID = re.compile(r"[^\s/\\][^/\\\x00-\x1f\x7f]{0,255}")  # no slashes or control characters: ids are URL path segments
_DELETE_BATCH = 1_000  # primary keys per delete expression
_SETUP_TIMEOUT_S = 300.0  # creating or loading a collection (a server loads its segments first)


@dataclass(frozen=True)
class IndexRecord:
    """One item's code in one modality, with the metadata a search hit shows."""

    id: str  # item id
    modality: str  # "image" | "text"
    code: bytes  # packed code (np.packbits, big-endian), len == bits // 8
    patient_id: str = ""
    study_id: str = ""
    labels: tuple[str, ...] = ()
    view: str = ""
    snippet: str = ""  # report text snippet (text records) or caption; truncated to 2,048 bytes
    image_ref: str = ""  # path or URL of the image (image records)


@dataclass(frozen=True)
class Hit:
    """One search result (``distance`` is the Hamming distance; 0 from :meth:`CodeIndex.get`)."""

    id: str
    modality: str
    distance: int
    patient_id: str
    study_id: str
    labels: tuple[str, ...]
    view: str
    snippet: str
    image_ref: str


def resolve_uri(cfg: IndexConfig) -> str:
    """The ``index`` section's URI; unset means the milvus-lite file ``<MEDHASH_CACHE>/index/medhash.db``."""
    return cfg.uri or str(cache_root() / "index" / "medhash.db")


def check_item_id(item_id: str) -> str:
    """``item_id`` when it can be stored and fetched again by every route, else DataError."""
    if not ITEM_ID.fullmatch(item_id) or item_id in (".", "..") or item_id != item_id.strip():
        raise DataError(f"item id {item_id[:80]!r} is not usable: 1-256 characters, no slashes, control "
                        f"characters or surrounding spaces")
    return item_id


def check_filters(labels: Sequence[str], view: str | None) -> None:
    """DataError unless the label and view filters are few, short and matchable."""
    if len(labels) > MAX_FILTER_LABELS:
        raise DataError(f"{len(labels):,} label filters; at most {MAX_FILTER_LABELS} per search")
    for value in (*labels, *([view] if view else [])):
        if not isinstance(value, str) or len(value) > MAX_FILTER_CHARS or not _is_filter_value(value):
            raise DataError(f"filter value {str(value)[:80]!r} is empty, longer than {MAX_FILTER_CHARS} characters, "
                            f"or contains control characters")


def open_index(cfg: IndexConfig, bits: Iterable[int], token: str | None = None) -> CodeIndex:
    """A :class:`CodeIndex` as the ``index`` section describes it (token: argument, else ``cfg.token_env``)."""
    return CodeIndex(resolve_uri(cfg), bits, prefix=cfg.collection_prefix,
                     token=token or os.environ.get(cfg.token_env) or None, index_type=cfg.index_type,
                     ivf_nlist=cfg.ivf_nlist, nprobe=cfg.nprobe, timeout_s=cfg.timeout_s, consistency=cfg.consistency)


def rows_to_index(info: dict) -> int:
    """Rows a server has still to index, from ``describe_index``: rows never indexed plus rows waiting in
    its queue (new segments, and compacted segments it indexes again after every row was indexed once)."""
    return max(info.get("total_rows", 0) - info.get("indexed_rows", 0), 0) + info.get("pending_index_rows", 0)


class CodeIndex:
    """Binary codes of several lengths in Milvus, searched by Hamming distance."""

    def __init__(self, uri: str, bits: Iterable[int], prefix: str = "medhash", token: str | None = None,
                 *, index_type: str = IndexConfig().index_type, ivf_nlist: int = IndexConfig().ivf_nlist,
                 nprobe: int = IndexConfig().nprobe, timeout_s: float = IndexConfig().timeout_s,
                 consistency: str = IndexConfig().consistency):
        self._bits = tuple(dict.fromkeys(int(b) for b in bits))
        if not self._bits:
            raise ConfigError("index: no code lengths given")
        for b in self._bits:
            check_code_length(b)
        self.uri, self.prefix = uri, prefix
        self.is_server = uri.startswith(_SERVER_SCHEMES)
        self.index_type = index_type if self.is_server else "BIN_FLAT"
        ivf = self.index_type == "BIN_IVF_FLAT"
        self._search_params = {"metric_type": "HAMMING", "params": {"nprobe": nprobe} if ivf else {}}
        self._index_params = {"nlist": ivf_nlist} if ivf else {}
        self._timeout = timeout_s if self.is_server else None  # milvus-lite: its own process, health-checked
        self._consistency = consistency if self.is_server else "Strong"  # milvus-lite answers Strong in ms
        self._client = _connect(uri, token, timeout_s)
        for b in self._bits:
            self._ensure_collection(b)
        self._journal = _journal_dir(uri, prefix)
        self._replay_journal()

    @property
    def bits(self) -> tuple[int, ...]:
        """The code lengths this index holds."""
        return self._bits

    # -- writing -------------------------------------------------------------------------------

    def upsert(self, bits: int, records: Sequence[IndexRecord]) -> int:
        """Insert or replace ``records`` in the ``bits`` collection; returns how many were written.

        Every record is checked first: one bad record raises DataError naming it, and nothing is written.
        A record repeated in ``records`` counts once (the last one wins).
        """
        name = self._collection(bits)
        rows = {}
        for record in records:
            row = _row(record, bits)
            rows[row["pk"]] = row
        rows = list(rows.values())
        for start in range(0, len(rows), _UPSERT_BATCH):
            self._client.upsert(name, rows[start : start + _UPSERT_BATCH], timeout=self._timeout)
        return len(rows)

    def upsert_item(self, records: dict[int, Sequence[IndexRecord]]) -> None:
        """Write one item's records at every code length (``{bits: records}``), all or nothing.

        Every record is checked before anything is written; a crash part-way is repaired when the
        index next opens (see the module docstring).
        """
        if set(records) != set(self._bits):
            raise DataError(f"an item needs records at every code length {list(self._bits)}, got {sorted(records)}")
        for bits, rows in records.items():
            for record in rows:
                _row(record, bits)
        ids = {record.id for rows in records.values() for record in rows}
        if len(ids) != 1:
            raise DataError(f"upsert_item writes one item, got ids {sorted(ids)[:5]}")
        self._journal.mkdir(parents=True, exist_ok=True)
        entry = self._journal / f"{hashlib.sha1(ids.pop().encode()).hexdigest()}.pkl"
        partial = entry.with_suffix(".partial")
        partial.write_bytes(pickle.dumps({bits: list(rows) for bits, rows in records.items()}))
        os.replace(partial, entry)
        self._write_entry(entry)

    def _write_entry(self, entry: Path) -> None:
        for bits, rows in pickle.loads(entry.read_bytes()).items():
            self.upsert(bits, rows)
        entry.unlink()

    def _replay_journal(self) -> None:
        """Finish every item a crash left half-written (journal entries not yet removed)."""
        if self._journal.is_dir():
            for entry in sorted(self._journal.glob("*.pkl")):
                self._write_entry(entry)

    def delete(self, item_ids: Sequence[str]) -> None:
        """Remove both modalities' records of ``item_ids`` from every collection (unknown ids are ignored)."""
        keys = [_literal(f"{modality}:{item_id}") for item_id in item_ids for modality in MODALITIES]
        for start in range(0, len(keys), _DELETE_BATCH):
            in_batch = f"pk in [{', '.join(keys[start : start + _DELETE_BATCH])}]"
            for b in self._bits:
                self._client.delete(self._collection(b), filter=in_batch, timeout=self._timeout)

    def flush(self, timeout_s: float = _SETUP_TIMEOUT_S) -> None:
        """Seal what was written and wait until a server has indexed it (its IVF index covers sealed
        segments only; rows still growing are scanned). Bulk ingestion ends with this.

        The wait lasts as long as the server makes progress: it fails only when the rows left to index
        (:func:`rows_to_index`) have not shrunk for ``timeout_s`` (10 M codes: the 2-core standalone server here had
        indexed 6.87 M after 40 minutes, and re-indexed compacted segments for 15 minutes more).
        """
        for b in self._bits:
            name = self._collection(b)
            self._client.flush(name, timeout=timeout_s)
            if not self.is_server:
                continue
            left, deadline = None, 0.0
            while True:
                info = self._client.describe_index(name, "code", timeout=self._timeout)
                now = rows_to_index(info)
                if now == 0:
                    break
                if left is None or now < left:
                    left, deadline = now, time.monotonic() + timeout_s
                elif time.monotonic() > deadline:
                    raise DataError(f"{name}: the server indexed no more rows in {timeout_s:.0f} s ({info})")
                time.sleep(1)

    def drop(self) -> None:
        """Remove this index's collections and everything in them."""
        for b in self._bits:
            self._client.drop_collection(self._collection(b), timeout=_SETUP_TIMEOUT_S)

    # -- reading -------------------------------------------------------------------------------

    def search(self, bits: int, codes: np.ndarray, k: int, modality: str | None = None,
               labels: Sequence[str] = (), view: str | None = None) -> list[list[Hit]]:
        """The ``k`` nearest codes by Hamming distance for each packed query code (uint8 ``[Q, bits//8]``).

        Filters: ``modality`` ("image" / "text"), ``labels`` (an item must carry all of them), ``view``
        (in any case: "axial" finds "Axial"); None or empty means no filter.
        Each query's hits are sorted by (distance, id, modality); see the module docstring on ties.
        """
        name = self._collection(bits)
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != bits // 8:
            raise DataError(f"query codes for the {bits}-bit index must be packed uint8 of shape (Q, {bits // 8}), "
                            f"got {codes.dtype} {codes.shape}")
        if not 1 <= k <= MAX_TOP_K:
            raise DataError(f"k must be between 1 and {MAX_TOP_K}, got {k}")
        if modality is not None and modality not in MODALITIES:
            raise DataError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        check_filters(labels, view)
        if len(codes) == 0:
            return []
        clauses = [f"modality == {_literal(modality)}"] if modality else []
        clauses += [f"array_contains_all(labels, [{', '.join(_literal(label) for label in labels)}])"] if labels else []
        clauses += [f"view_key == {_literal(view.casefold())}"] if view else []
        results = self._read(
            "search", name, data=[row.tobytes() for row in codes], anns_field="code", limit=k,
            search_params=self._search_params, output_fields=_OUTPUT_FIELDS, filter=" and ".join(clauses),
        )
        return [sorted((_hit(h["entity"], h["distance"]) for h in hits), key=lambda h: (h.distance, h.id, h.modality))
                for hits in results]

    def get(self, item_id: str) -> list[Hit]:
        """Both modalities' records of an item (those indexed), image first, with distance 0.

        The metadata comes from the first code length (in the order given) that holds the record.
        """
        keys = ", ".join(_literal(f"{modality}:{item_id}") for modality in MODALITIES)
        found: dict[str, Hit] = {}
        for b in self._bits:
            for row in self._read("query", self._collection(b), strong=True, filter=f"pk in [{keys}]",
                                  output_fields=_OUTPUT_FIELDS):
                found.setdefault(row["modality"], _hit(row, 0))
        return [found[m] for m in MODALITIES if m in found]

    def related(self, item_id: str, limit: int = 50) -> list[Hit]:
        """Other items of the same patient or study as ``item_id`` (one record each, image first), by id."""
        own = self.get(item_id)
        if not own:
            return []
        clauses = [f"{field} == {_literal(value)}" for field, value in
                   (("patient_id", own[0].patient_id), ("study_id", own[0].study_id)) if value]
        if not clauses:
            return []
        rows = self._read("query", self._collection(self._bits[0]), strong=True, filter=" or ".join(clauses),
                          output_fields=_OUTPUT_FIELDS, limit=min(4 * limit, MAX_TOP_K))
        found: dict[str, Hit] = {}
        for row in sorted(rows, key=lambda r: (r["id"], MODALITIES.index(r["modality"]))):
            if row["id"] != item_id:
                found.setdefault(row["id"], _hit(row, 0))
        return list(found.values())[:limit]

    def views(self, max_rows: int) -> tuple[list[str], bool]:
        """The distinct views of the indexed items (one spelling per case-folded view, sorted) from at most
        ``max_rows`` image records of the first code length, and whether that covered every image record."""
        name, seen, scanned = self._collection(self._bits[0]), {}, 0
        pages = self._client.query_iterator(name, batch_size=min(_SCAN_BATCH, max_rows), limit=max_rows,
                                            filter='modality == "image"', output_fields=["view"], timeout=self._timeout)
        try:
            while rows := pages.next():
                scanned += len(rows)
                for row in rows:
                    if row["view"]:
                        seen.setdefault(row["view"].casefold(), row["view"])
        finally:
            pages.close()
        complete = scanned < max_rows or self._read("query", name, strong=True, filter='modality == "image"',
                                                    output_fields=["count(*)"])[0]["count(*)"] <= max_rows
        return sorted(seen.values(), key=str.casefold), complete

    def count(self, bits: int) -> int:
        """Number of records (both modalities) in the ``bits`` collection."""
        rows = self._read("query", self._collection(bits), strong=True, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        """Release the connection (and, for milvus-lite, stop its server process, which holds the file's lock)."""
        self._client.close()
        if not self.is_server:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(Path(self.uri).expanduser().resolve()))

    # -- internals -----------------------------------------------------------------------------

    def _read(self, method: str, name: str, strong: bool = False, **kwargs):
        """``client.<method>(name, ...)`` with the call timeout and the read consistency (``strong``: every
        write seen, for lookups by id and counts); a collection a restarted server has not loaded yet is
        loaded and the call made again."""
        from pymilvus.exceptions import MilvusException

        level = "Strong" if strong else self._consistency
        try:
            return getattr(self._client, method)(name, timeout=self._timeout, consistency_level=level, **kwargs)
        except MilvusException as exc:
            if "not loaded" not in str(exc.message):
                raise
            self._client.load_collection(name, timeout=_SETUP_TIMEOUT_S)
            return getattr(self._client, method)(name, timeout=self._timeout, consistency_level=level, **kwargs)

    def _collection(self, bits: int) -> str:
        check_code_length(bits, self._bits, "collection")
        return f"{self.prefix}_{bits}"

    def _ensure_collection(self, bits: int) -> None:
        from pymilvus import DataType, MilvusClient

        name = self._collection(bits)
        if self._client.has_collection(name, timeout=_SETUP_TIMEOUT_S):
            fields = {f["name"]: f["type"] for f in self._client.describe_collection(name, timeout=_SETUP_TIMEOUT_S)["fields"]}
            if fields.get("labels") != DataType.ARRAY or "view_key" not in fields:
                raise ConfigError(f"collection {name} at {self.uri} was written by an earlier medhash (labels as text or "
                                  f"no case-folded view); index the run again into a new file or collection_prefix")
            self._client.load_collection(name, timeout=_SETUP_TIMEOUT_S)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=_MAX_BYTES["pk"])
        schema.add_field("code", DataType.BINARY_VECTOR, dim=bits)
        for field in (*_OUTPUT_FIELDS, "view_key"):
            if field == "labels":
                schema.add_field(field, DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_LABELS,
                                 max_length=MAX_LABEL_BYTES)
            else:
                schema.add_field(field, DataType.VARCHAR, max_length=_MAX_BYTES[field])
        index_params = MilvusClient.prepare_index_params()
        index_params.add_index("code", index_type=self.index_type, metric_type="HAMMING", params=self._index_params)
        self._client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong",
                                       timeout=_SETUP_TIMEOUT_S)


def _journal_dir(uri: str, prefix: str) -> Path:
    """Where half-written items are journalled: beside a milvus-lite file, in the cache for a server."""
    if uri.startswith(_SERVER_SCHEMES):
        return cache_root() / "index" / "journal" / f"{hashlib.sha1(uri.encode()).hexdigest()[:12]}-{prefix}"
    return Path(uri).expanduser().resolve().with_name(f"{Path(uri).name}.{prefix}.journal")


def _connect(uri: str, token: str | None, timeout_s: float):
    """A MilvusClient for ``uri``; a milvus-lite file gets its folder created.

    milvus-lite starts its process and gives it half a second; on a loaded machine its socket may
    appear later, so connecting to a file is retried until ``timeout_s`` (at least 30 s) has passed.
    """
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException

    lite = not uri.startswith(_SERVER_SCHEMES)
    if lite:
        if "://" in uri:
            raise ConfigError(f"index uri {uri!r}: expected a milvus-lite file (*.db) or http://, https://, tcp://")
        if not uri.endswith(".db"):
            raise ConfigError(f"index uri {uri!r}: a milvus-lite file name must end in .db")
        Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
        uri = str(Path(uri).expanduser().resolve())
    timeout_s = max(timeout_s, 30.0)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # milvus-lite's pkg_resources deprecation notice
                return MilvusClient(uri=uri, token=token or "", timeout=timeout_s)
        except MilvusException as exc:
            if exc.message == "Open local milvus failed":
                raise ConfigError(f"another process owns {uri}; only one process may open a milvus-lite file "
                                  f"— use a Milvus server URI to scale out") from exc
            if not (lite and exc.message.startswith("Fail connecting") and time.monotonic() < deadline):
                raise ConfigError(f"cannot open the Milvus index at {uri}: {exc.message}") from exc
        time.sleep(0.5)


def _row(record: IndexRecord, bits: int) -> dict:
    """The Milvus row of a record, or DataError naming the record and its problem."""
    where = f"index record {record.modality}:{record.id}"
    check_item_id(record.id)
    if record.modality not in MODALITIES:
        raise DataError(f"{where}: modality must be one of {', '.join(MODALITIES)}")
    if not isinstance(record.code, bytes) or len(record.code) != bits // 8:
        size = len(record.code) if isinstance(record.code, (bytes, bytearray)) else type(record.code).__name__
        raise DataError(f"{where}: a {bits}-bit code is {bits // 8} packed bytes, got {size}")
    bad = [label for label in record.labels if not _is_filter_value(label) or len(label.encode("utf-8")) > MAX_LABEL_BYTES]
    if bad:
        raise DataError(f"{where}: label {bad[0][:80]!r} is empty, longer than {MAX_LABEL_BYTES} bytes, or contains "
                        f"control characters")
    if len(record.labels) > MAX_LABELS:
        raise DataError(f"{where}: {len(record.labels)} labels; at most {MAX_LABELS} per item")
    row = {
        "pk": f"{record.modality}:{record.id}", "code": record.code, "id": record.id, "modality": record.modality,
        "patient_id": record.patient_id, "study_id": record.study_id,
        "labels": list(record.labels), "view": record.view, "view_key": record.view.casefold(),
        "snippet": _truncate(record.snippet, _MAX_BYTES["snippet"]), "image_ref": record.image_ref,
    }
    for field, value in row.items():
        if field in _MAX_BYTES and len(value.encode("utf-8")) > _MAX_BYTES[field]:
            raise DataError(f"{where}: {field} is longer than {_MAX_BYTES[field]} bytes")
    return row


def _hit(entity: dict, distance: float) -> Hit:
    return Hit(id=entity["id"], modality=entity["modality"], distance=int(round(distance)),
               patient_id=entity["patient_id"], study_id=entity["study_id"], labels=tuple(entity["labels"]), view=entity["view"],
               snippet=entity["snippet"], image_ref=entity["image_ref"])


def _is_filter_value(text: str) -> bool:
    """Whether a label or view can be stored and matched exactly by a filter."""
    return bool(text) and text.isprintable()


def _truncate(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def _literal(text: str) -> str:
    """A Milvus filter string literal (a malformed one can hang milvus-lite, so escape everything)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
