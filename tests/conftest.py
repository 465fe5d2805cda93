"""Shared fixtures: the real data folder beside the checkout, and a private cache per session."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from medhash.training.trainer import LOCAL_RAY_ENV

SHARED_DATA = Path(os.environ.get("MEDHASH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# Ray waits 30 s for a new head's GCS to bind its port; on 2 busy cores, just after the previous test's cluster
# shut down, one start in a CI run took longer. The tests start many local clusters, so they wait up to 120 s.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
# The clusters the tests start themselves (ray.init, ray.cluster_utils) poll Ray Train workers as `medhash train`'s do.
for _name, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_name, _value)


def start_local_ray(**init_kwargs) -> None:
    """``ray.init`` of a test's own local cluster, tried a second time if its raylet did not register.

    Ray gives a new node's raylet a fixed 30 s to register with the GCS (a constant, no setting). In one CI run,
    6 s after the previous module's cluster of some 30 workers shut down on the 2 cores, a raylet missed that and
    test_serving's whole module errored at set-up; run alone, the same module set up and passed. A second miss
    fails the tests as before.
    """
    import ray

    try:
        ray.init(**init_kwargs)
    except Exception as error:  # Ray raises a bare Exception for this
        if "timed out during startup" not in str(error):
            raise
        ray.shutdown()
        ray.init(**init_kwargs)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctrl_c_enabled() -> None:
    """``preexec_fn`` of a child a test interrupts with SIGINT: a shell's background job (a CI runner's, say)
    starts with SIGINT ignored, and its children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout_s: float, what: str = "the condition") -> float:
    """Seconds until ``condition()`` held; fails after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)
    return time.monotonic() - started


def registered_checkpoints(run: Path) -> int:
    """Checkpoints the Ray Train controller of a run directory has registered (a restart resumes from the latest)."""
    snapshot = run / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snapshot.read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets (../shared/data); tests that need them skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder not found at {SHARED_DATA} (set MEDHASH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def medhash_cache(tmp_path_factory) -> Path:
    """Keep features and converted weights out of the user's cache, but share them across tests.

    MEDHASH_TEST_CACHE keeps converted weights between runs (CI sets nothing: fresh each time).
    """
    root = Path(os.environ.get("MEDHASH_TEST_CACHE") or tmp_path_factory.mktemp("medhash-cache"))
    os.environ["MEDHASH_CACHE"] = str(root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return root


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread (two threads crawl on a loaded 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MilvusServerProcess:
    """A real Milvus standalone server (the ``milvus`` package) in a temporary folder, on loopback.

    ``stop`` and ``start`` again keep the folder and the port, as a restarted server would.
    """

    def __init__(self, base_dir: Path):
        import socket

        from milvus import MilvusServer, MilvusServerConfig

        class Config(MilvusServerConfig):
            def try_bind_port(self, port):
                """Probe a port as the server binds it (SO_REUSEADDR, as Go does), so a port whose old
                connections linger in TIME_WAIT after a stop can be taken again at once."""
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                    return sock
                except OSError:
                    sock.close()
                    return None

        self.base_dir = base_dir
        self._server = MilvusServer(Config())
        self._server.set_base_dir(str(base_dir))
        self.port: int | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server (returns once its /healthz answers); a restart binds the port it had."""
        if self.port is None:
            self._server.start()
            self.port = self._server.listen_port
            return
        self._server.config.update(proxy_port=self.port)  # exactly this port, not the next free one
        self._server.start()

    def stop(self) -> None:
        self._server.stop()  # SIGTERM, then SIGKILL after 1 s


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """One Milvus server for the session's server tests (each test uses its own collection prefix)."""
    pytest.importorskip("milvus", reason="the Milvus server tests need the `server` extra (pip install -e '.[server]')")
    server = MilvusServerProcess(tmp_path_factory.mktemp("milvus-server"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
