"""Resumable, verified downloads against a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medhash.services.data.download import fetch, unpack_pngs
from medhash.services.errors import DataError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class RangeHandler(BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; ``cut_after`` bytes makes the next response stop short."""

    ranges: list[str | None] = []
    cut_after: int | None = None

    def do_GET(self):
        header = self.headers.get("Range")
        type(self).ranges.append(header)
        start = int(header.removeprefix("bytes=").removesuffix("-")) if header else 0
        if start >= len(PAYLOAD):
            self.send_response(416)
            self.end_headers()
            return
        body = PAYLOAD[start:]
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(len(body)))
        if header:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        cut, type(self).cut_after = type(self).cut_after, None
        self.wfile.write(body[:cut] if cut is not None else body)
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    RangeHandler.ranges, RangeHandler.cut_after = [], None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/NLMCXR_reports.tgz"
    httpd.shutdown()
    httpd.server_close()


def test_interrupted_download_resumes_with_range(server, tmp_path):
    target = tmp_path / "file.tgz"
    RangeHandler.cut_after = 300_000
    with pytest.raises(DataError, match="run (the same command )?again to resume"):
        fetch(server, target, sha256=SHA256, timeout=5)
    part = tmp_path / "file.tgz.part"
    assert part.stat().st_size == 300_000 and not target.exists()
    assert fetch(server, target, sha256=SHA256, size=len(PAYLOAD), timeout=5) == SHA256
    assert RangeHandler.ranges == [None, "bytes=300000-"]
    assert target.read_bytes() == PAYLOAD and not part.exists()
    assert fetch(server, target, sha256=SHA256, timeout=5) == SHA256  # already there: verified, not fetched
    assert len(RangeHandler.ranges) == 2


def test_complete_partial_file_is_finished_on_416(server, tmp_path):
    (tmp_path / "f.part").write_bytes(PAYLOAD)
    assert fetch(server, tmp_path / "f", sha256=SHA256, timeout=5) == SHA256
    assert RangeHandler.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_checksum_and_size_mismatch_delete_the_file(server, tmp_path):
    with pytest.raises(DataError, match="does not match the pinned"):
        fetch(server, tmp_path / "a", sha256="0" * 64, timeout=5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.part").exists()
    with pytest.raises(DataError, match="1,048,576 bytes, expected 5; deleted"):
        fetch(server, tmp_path / "b", size=5, timeout=5)
    assert fetch(server, tmp_path / "c", timeout=5) == SHA256  # nothing pinned: the hash is reported


def test_offline_is_a_clear_error(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    with pytest.raises(DataError, match=r"cannot download http://127.0.0.1:\d+/x .*no internet\?"):
        fetch(f"http://127.0.0.1:{port}/x", tmp_path / "x", timeout=5)


def test_unpack_pngs_flattens_and_skips_other_files(tmp_path):
    archive = tmp_path / "NLMCXR_png.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("CXR1_1_IM-0001-3001.png", "sub/CXR2_IM-0652-1001.png", "readme.txt", "../evil.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"png"))
    assert unpack_pngs(archive, tmp_path / "images") == 3
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["CXR1_1_IM-0001-3001.png", "CXR2_IM-0652-1001.png", "evil.png"]
    assert not (tmp_path / "evil.png").exists()
