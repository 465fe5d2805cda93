"""Augmentation results as append-only JSONL, one file per dataset and generator.

``cache_root()/augment/<dataset>/<generator-key>.jsonl`` holds one record per (item id, template):
``id, template, template_version, generator, input_hash, text``. A record answers a request when
its input hash (sha256 of the filled prompt) and template version match; a later record for the same
(id, template) replaces an earlier one. Records are appended as results arrive, so an interrupted
run resumes where it stopped; a last line cut short by the interruption is dropped on opening.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from medhash.services.config import cache_root
from medhash.services.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    id: str
    template: str
    template_version: str
    generator: str
    input_hash: str
    text: str


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def cache_path(dataset_name: str, generator_key: str) -> Path:
    return cache_root() / "augment" / dataset_name / f"{generator_key}.jsonl"


class AugmentCache:
    """The records of one cache file, read on opening; :meth:`add` appends and flushes."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, str], Record] = {}
        if path.is_file():
            self._read()

    def _read(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        valid_bytes = 0
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    record = Record(**json.loads(line))
                except (ValueError, TypeError) as exc:
                    if number == len(lines):  # an interrupted append: drop it and continue from here
                        log.warning("%s: dropping a truncated last line", self.path)
                        with self.path.open("r+b") as f:
                            f.truncate(valid_bytes)
                        return
                    raise DataError(f"{self.path}:{number}: not an augmentation record ({exc}); "
                                    "delete the file to regenerate") from exc
                self.records[(record.id, record.template)] = record
            valid_bytes += len(line) + 1
        if raw and not raw.endswith(b"\n"):  # complete record, newline lost: end the line before appending
            with self.path.open("ab") as f:
                f.write(b"\n")

    def lookup(self, item_id: str, template: str, version: str, input_hash: str) -> str | None:
        """The cached text for this request, or None when absent or stale."""
        record = self.records.get((item_id, template))
        if record and record.template_version == version and record.input_hash == input_hash:
            return record.text
        return None

    def add(self, record: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        self.records[(record.id, record.template)] = record
