"""slimnp.threads: the thread counts of OpenBLAS (the GEMMs) and Numba (the
kernels), which ``--threads N`` sets together.

(The pipeline over layers restoring OpenBLAS's count after a failure is
tested in test_threaded_lstm.py.)
"""
import os
import platform
import subprocess
import sys

import numba
import pytest

from slimnp import threads


@pytest.fixture
def restored():
    """Whatever a test sets, the session's counts come back after it."""
    blas, nb = threads.blas_threads(), numba.get_num_threads()
    yield
    if blas is not None:
        threads.set_blas_threads(blas)
    numba.set_num_threads(nb)


def test_set_threads_sets_both_libraries(restored):
    threads.set_threads(1)
    assert numba.get_num_threads() == 1
    if threads.blas_threads() is None:
        pytest.skip("NumPy here does not use OpenBLAS")
    assert threads.blas_threads() == 1
    threads.set_blas_threads(2)
    assert threads.blas_threads() == 2 and numba.get_num_threads() == 1  # OpenBLAS alone


def test_numba_is_capped_at_its_pool_and_zero_is_refused(restored):
    threads.set_threads(numba.config.NUMBA_NUM_THREADS + 50)  # more than the pool was started with
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    before = numba.get_num_threads()
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        threads.set_threads(0)
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("core", ["Sandybridge", "Nehalem"])
def test_blas_core_is_the_kernel_chosen_at_load_time(core):
    """The kernel set OpenBLAS runs, not its build target: an OPENBLAS_CORETYPE
    override (older than any CPU here, so it is always honoured) is what it names."""
    if threads.blas_threads() is None:
        pytest.skip("NumPy here does not use OpenBLAS")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the overrides named are x86 kernel sets")
    if threads.blas_core() is None:
        pytest.skip("this OpenBLAS does not export get_corename")
    env = dict(os.environ, OPENBLAS_CORETYPE=core)
    out = subprocess.run([sys.executable, "-c", "from slimnp.threads import blas_core; print(blas_core())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == core
