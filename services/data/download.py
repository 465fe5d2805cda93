"""Fetch the public datasets for users with internet: resumable, size- and checksum-verified.

``medhash data download iu-xray|medpix2 --dest DIR``. A file is first written to ``<name>.part``;
running the command again after an interruption resumes it with an HTTP Range request (a server
that ignores the range sends the whole file again, and it is rewritten). A finished file is checked
against the size and sha256 pinned in :data:`SOURCES`, and a mismatch deletes it.

Honesty note: this module was written on a machine without internet, so no download of these
files has been checksummed here and no sha256 or size is pinned yet (``None``). Until one is,
the command verifies what it can (the full length the server announced) and prints the sha256 of
what it fetched, so it can be pinned in SOURCES. The local copy of ``NLMCXR_reports.tgz`` in
../shared/data came from the torchxrayvision package, not from OpenI, so its hash is not pinned
as OpenI's. Whether the MedPix 2.0 repository archive holds the images is not verified either:
the command says so when it has none.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medhash.services.errors import DataError

log = logging.getLogger(__name__)
CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One file to fetch, and what to do with it once verified."""

    url: str
    filename: str
    sha256: str | None = None  # pinned once known
    size: int | None = None
    unpack: str | None = None  # "images": PNGs of a .tgz into DEST/images; "zip": a repository zip into DEST


SOURCES: dict[str, tuple[Source, ...]] = {
    "iu-xray": (
        Source("https://openi.nlm.nih.gov/imgs/collections/NLMCXR_reports.tgz", "NLMCXR_reports.tgz"),
        Source("https://openi.nlm.nih.gov/imgs/collections/NLMCXR_png.tgz", "NLMCXR_png.tgz", unpack="images"),
    ),
    "medpix2": (
        Source("https://github.com/CHILab1/MedPix-2.0/archive/refs/heads/main.zip", "MedPix-2.0-main.zip", unpack="zip"),
    ),
}


def download(name: str, dest: Path, timeout: float = 60.0) -> list[str]:
    """Fetch (or resume) every file of dataset ``name`` into ``dest``; one report line per file."""
    if name not in SOURCES:
        raise DataError(f"no download for {name!r}; available: {', '.join(SOURCES)}")
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for source in SOURCES[name]:
        target = dest / source.filename
        digest = fetch(source.url, target, source.sha256, source.size, timeout)
        pinned = "verified" if source.sha256 else "not pinned yet: record it in services/data/download.py"
        lines.append(f"{target} ({target.stat().st_size:,} bytes) sha256 {digest} ({pinned})")
        if source.unpack == "images":
            lines.append(f"{unpack_pngs(target, dest / 'images'):,} PNG images in {dest / 'images'}")
        elif source.unpack == "zip":
            lines.append(unpack_repository(target, dest))
    return lines


def fetch(url: str, target: Path, sha256: str | None = None, size: int | None = None, timeout: float = 60.0) -> str:
    """Download ``url`` to ``target``, resuming ``target.part``; verify and return the sha256."""
    if target.is_file():
        return _verify(target, sha256, size)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    expected = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if offset and response.status != 206:
                offset = 0  # the server ignored the range: start over
            length = response.headers.get("Content-Length")
            expected = offset + int(length) if length is not None else None
            log.info("fetching %s (%s bytes, from byte %d)", url, expected or "unknown", offset)
            with part.open("ab" if offset else "wb") as out:
                shutil.copyfileobj(response, out, CHUNK)
    except urllib.error.HTTPError as exc:
        if not (exc.code == 416 and offset):  # 416 on a resume: the partial file is already whole
            raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        kept = part.stat().st_size if part.is_file() else 0
        raise DataError(
            f"cannot download {url} ({type(exc).__name__}: {reason}); no internet? "
            f"{kept:,} bytes kept in {part}: run the same command again to resume, "
            "or fetch the files on a connected machine and pass --root"
        ) from None
    if expected is not None and part.stat().st_size != expected:
        raise DataError(f"{url}: got {part.stat().st_size:,} of {expected:,} bytes; run again to resume")
    digest = _verify(part, sha256, size)
    part.replace(target)
    return digest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, sha256: str | None, size: int | None) -> str:
    actual_size, digest = path.stat().st_size, sha256_of(path)
    if size is not None and actual_size != size:
        path.unlink()
        raise DataError(f"{path}: {actual_size:,} bytes, expected {size:,}; deleted, run again to fetch it anew")
    if sha256 is not None and digest != sha256:
        path.unlink()
        raise DataError(f"{path}: sha256 {digest} does not match the pinned {sha256}; deleted, run again")
    return digest


def unpack_pngs(archive: Path, folder: Path) -> int:
    """Every ``*.png`` of a .tgz into ``folder`` (flat, by file name); already present files are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name.lower().endswith(".png"):
                    out = folder / name
                    if not out.is_file() or out.stat().st_size != member.size:
                        with tar.extractfile(member) as src, out.open("wb") as dst:
                            shutil.copyfileobj(src, dst, CHUNK)
                    count += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive}: cannot unpack ({exc})") from None
    return count


def unpack_repository(archive: Path, dest: Path) -> str:
    """A GitHub repository zip into ``dest``, without its top folder; says whether images came with it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                inner = PurePosixPath(*PurePosixPath(info.filename).parts[1:])
                if info.is_dir() or not inner.parts or ".." in inner.parts:
                    continue
                out = dest / inner
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive}: cannot unpack ({exc})") from None
    images = sum(1 for _ in dest.rglob("images/*.png"))
    if not images:
        return f"unpacked into {dest}, but it holds no images/*.png: get the images the MedPix 2.0 README points to"
    return f"unpacked into {dest}: {images:,} PNG images"
