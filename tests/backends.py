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

# tolerances of the GPU kernels against the reference: elementwise results,
# and sums of hundreds of terms added in another order
GPU_TOL = {np.float32: dict(rtol=3e-5, atol=3e-5), np.float64: dict(rtol=1e-11, atol=1e-12)}
GPU_SUM_TOL = {np.float32: dict(rtol=2e-4, atol=2e-4), np.float64: dict(rtol=1e-10, atol=1e-11)}


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
