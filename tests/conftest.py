import os

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # the CLI's built-in corpus cache must never touch the user's home in tests
    monkeypatch.setenv("SLIMNP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


os.environ.setdefault("NUMBA_NUM_THREADS", "2")
