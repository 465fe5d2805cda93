"""Shared fixtures: the real data folder beside the checkout, and a private cache per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("MEDHASH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


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
