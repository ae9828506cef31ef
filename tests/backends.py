"""The kernel backends: one parametrisation for every test that runs kernels.

=========  ==========================================================  ==========
name       what runs                                                    dispatcher
=========  ==========================================================  ==========
reference  ``kernels/reference.py``, the NumPy specification            reference
cpu        ``kernels/cpu.py`` (Numba) on NumPy arrays                   cpu
emu        ``kernels/gpu.py``'s CUDA C on a CPU emulator (``gpu_emu``)   gpu
emu-rev    the same, each block's threads run in the opposite order     gpu
cuda       ``kernels/gpu.py`` on CuPy arrays; marked ``gpu``            auto
=========  ==========================================================  ==========

``conftest.py`` turns :data:`BACKENDS` into two fixtures: ``backend``, every
row (for tests whose expected values are written out: loops, invariants),
and ``dev``, every row but the reference (for parity tests against it).
Each yields a :class:`Backend` and, while the test runs, sets the
dispatcher's mode (``kernels.use``) so that ``kernels.*`` calls on arrays
from ``put`` reach that backend.  ``emu-rev`` exists to expose a missing
``__syncthreads``: without the emulator (no C++ compiler) both ``emu`` rows
skip, and ``cuda`` skips without a usable CUDA device (fails instead under
``SLIMNP_REQUIRE_GPU=1``).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from slimnp import backend as sbackend
from slimnp import kernels
from slimnp.kernels import gpu, reference

import gpu_emu

BACKENDS = ["reference", "cpu", "emu", "emu-rev", pytest.param("cuda", marks=pytest.mark.gpu)]
COMPILED = BACKENDS[1:]
GPU = ("emu", "emu-rev", "cuda")  # gpu.py: sums in another order (atomics, chunks), FMAs on CUDA
DTYPES = [np.float32, np.float64]

# Tolerances of a backend's results against the reference's, for
# elementwise results (``*_TOL``) and for sums of hundreds of terms
# (``*_SUM_TOL``: a row's loss, a logsumexp, a segment sum).  The CPU kernels
# follow the reference's formulas in its order but for a vectorised exp and
# blocked sums; the GPU kernels add in another order (atomics, chunks) and
# fuse multiply-adds.  :func:`tol` picks the row for a backend.
CPU_TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
CPU_SUM_TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}
GPU_TOL = {np.float32: dict(rtol=3e-5, atol=3e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}
GPU_SUM_TOL = {np.float32: dict(rtol=2e-4, atol=2e-4), np.float64: dict(rtol=1e-10, atol=1e-11)}


def tol(backend, dtype, sums=False) -> dict:
    """``assert_allclose`` keywords for ``backend``'s (a :class:`Backend` or
    its name) results of ``dtype`` against the reference; ``sums`` for sums
    of many terms."""
    name = getattr(backend, "name", backend)
    if name in GPU:
        table = GPU_SUM_TOL if sums else GPU_TOL
    else:
        table = CPU_SUM_TOL if sums else CPU_TOL
    return table[np.dtype(dtype).type]


# The slim output layer's parity cases, word-major (the notation at the top
# of the slim output layer in slimnp/layers.py).  (K, N, Mk, V, shared):
# generic; K=1; N=1; pools of one entry; heavy sharing; one word.
SLIM_CASES = [(3, 7, 5, 40, False), (1, 4, 6, 6, False), (4, 1, 3, 25, False),
              (2, 5, 1, 30, False), (5, 9, 8, 300, True), (2, 3, 4, 1, False)]


def slim_case(rng, dtype, K, N, Mk, V, shared=False):
    """``(PT (K, Mk, N), idx_kv (K, V) int32, b (V,), dzT (V, N))`` with
    words 0 and V-1 on the first and the last entry of every pool and, if
    ``shared``, a third of the vocabulary on one entry of every pool."""
    PT = rng.standard_normal((K, Mk, N)).astype(dtype)
    idx_kv = rng.integers(0, Mk, (K, V)).astype(np.int32)
    idx_kv[:, 0] = 0
    idx_kv[:, -1] = Mk - 1
    if shared:
        idx_kv[:, ::3] = Mk // 2
    b = rng.standard_normal(V).astype(dtype)
    dzT = rng.standard_normal((V, N)).astype(dtype)
    return PT, idx_kv, b, dzT


class Backend:
    """Where kernels run: ``impl`` the kernel module, ``mode`` the
    dispatcher's mode for it, ``put`` a host array to its memory, ``get`` back."""

    def __init__(self, name, impl, mode, put, get):
        self.name, self.impl, self.mode, self.put, self.get = name, impl, mode, put, get

    def __repr__(self):
        return f"Backend({self.name})"


def need_gpu():
    """Skip without a usable CUDA device; fail instead under
    ``SLIMNP_REQUIRE_GPU=1`` (bench/gpu_check.sh sets it: on the GPU machine
    a skipped test would hide a broken CuPy installation)."""
    if sbackend.gpu_available():
        return
    try:
        sbackend.get_xp("gpu")
    except sbackend.DeviceUnavailable as exc:
        why = str(exc)
    if os.environ.get("SLIMNP_REQUIRE_GPU", "") not in ("", "0"):
        pytest.fail(f"SLIMNP_REQUIRE_GPU is set but {why}")
    pytest.skip(why)


def _copy(a):
    return np.array(a, copy=True)


def backend_fixture(name, monkeypatch):
    """The generator behind the ``backend`` and ``dev`` fixtures."""
    monkeypatch.setattr(gpu, "_cache", {})
    if name.startswith("emu"):
        if gpu_emu.load() is None:
            pytest.skip(gpu_emu.why_unavailable())
        monkeypatch.setattr(gpu, "_factory", gpu_emu.factory)
        gpu_emu.set_reverse(name == "emu-rev")
        be = Backend(name, gpu, "gpu", _copy, np.asarray)
    elif name == "cuda":
        need_gpu()
        monkeypatch.setattr(gpu, "_factory", None)
        be = Backend(name, gpu, "auto", sbackend.get_xp("gpu").asarray, sbackend.to_numpy)
    elif name == "cpu":
        from slimnp.kernels import cpu  # imports Numba

        be = Backend(name, cpu, "cpu", _copy, np.asarray)
    else:
        be = Backend(name, reference, "reference", _copy, np.asarray)
    try:
        with kernels.using(be.mode):
            yield be
    finally:
        gpu_emu.set_reverse(False)
