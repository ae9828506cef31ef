import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # the CLI's built-in corpus cache must never touch the user's home in tests
    monkeypatch.setenv("SLIMNP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def shared_data(*parts) -> Path:
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


os.environ.setdefault("NUMBA_NUM_THREADS", "2")
