"""Reading source text: CSV / JSONL rows with per-row UTF-8 checks, and short problem summaries."""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from medhash.services.errors import DataError


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when it ends in ``.gz``."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def decode(data: bytes) -> tuple[str, bool]:
    """Text and whether it was valid UTF-8; invalid bytes become U+FFFD."""
    try:
        return data.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), False


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV (optionally .gz) or JSONL file as dicts of strings.

    Bytes that are not UTF-8 are kept as lone surrogates so :func:`clean` can report the row.
    """
    text = read_bytes(path).decode("utf-8-sig", errors="surrogateescape")
    if path.name.removesuffix(".gz").endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line")
            rows.append({k: "" if v is None else v if isinstance(v, str) else _join(v) for k, v in row.items()})
        return rows
    try:
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise DataError(f"{path}: not a valid CSV file ({exc})") from None


def _join(value: object) -> str:
    return ";".join(map(str, value)) if isinstance(value, list) else str(value)


def require_columns(path: Path, rows: list[dict[str, str]], columns: tuple[str, ...]) -> None:
    present = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in present]
    if not rows:
        raise DataError(f"{path}: no rows")
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(sorted(present))}")


def clean(value: str) -> tuple[str, bool]:
    """``value`` stripped, with any undecodable bytes replaced; and whether it was valid UTF-8."""
    try:
        value.encode("utf-8")
        return value.strip(), True
    except UnicodeEncodeError:
        raw = value.encode("utf-8", errors="surrogateescape")
        return raw.decode("utf-8", errors="replace").strip(), False


def summarize(count_of: str, ids: list[str], shown: int = 5) -> str:
    """One problem line: ``'<n> <count_of> (first: a, b, ...)'``."""
    first = ", ".join(ids[:shown]) + (", ..." if len(ids) > shown else "")
    return f"{len(ids):,} {count_of} (first: {first})"
