import os

os.environ.setdefault("NUMBA_NUM_THREADS", "2")  # before anything imports Numba

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from backends import BACKENDS, COMPILED, backend_fixture  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Every kernel backend (tests/backends.py), the reference included."""
    yield from backend_fixture(request.param, monkeypatch)


@pytest.fixture(params=COMPILED)
def dev(request, monkeypatch):
    """Every compiled kernel backend (tests/backends.py): what parity tests
    compare with the reference."""
    yield from backend_fixture(request.param, monkeypatch)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # the CLI's built-in corpus cache must never touch the user's home in tests
    monkeypatch.setenv("SLIMNP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))

