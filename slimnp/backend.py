"""Array-module selection, seeding and dtype policy.

This is the one place that knows about CuPy.  Everything else asks for ``xp``
(``get_xp(name)``) or uses ``array_module(x)`` on an array it was given, so a
CPU-only machine never pays for importing CuPy.  The device calls the rest
of slimnp needs are here too: choosing a GPU, the current stream, and NCCL
(:class:`NcclAllreduce`, the data-parallel gradient sum on GPUs).

Dtype policy: parameters and activations are float32 (``FLOAT``), token ids are
int32 (``INDEX``).  Every function also accepts float64, which the gradient
checks use.
"""
from __future__ import annotations

import numpy as np

FLOAT = np.float32
INDEX = np.int32

_cupy = None
_cupy_error: str | None = None
_cupy_missing = False  # the import itself failed (not installed), as opposed to CUDA unusable

DEVICES = ("cpu", "gpu")


class DeviceUnavailable(RuntimeError):
    """The device asked for cannot be used here (no CuPy, no CUDA driver, no
    GPU); the message says which and what to install."""


def _import_cupy():
    """Import CuPy lazily; remember the failure so we only try once."""
    global _cupy, _cupy_error, _cupy_missing
    if _cupy is None and _cupy_error is None:
        try:
            import cupy  # noqa: F401  (optional extra: pip install slimnp[gpu])
        except Exception as exc:  # ImportError, or a broken installation
            _cupy_missing = True
            _cupy_error = f"{type(exc).__name__}: {exc}"
            return None
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("no CUDA device found")
            _cupy = cupy
        except Exception as exc:  # CuPy present, CUDA unusable (no driver, no GPU)
            _cupy_error = f"{type(exc).__name__}: {exc}"
    return _cupy


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return _import_cupy() is not None


def get_xp(device: str = "cpu"):
    """Return the array module for ``device`` ('cpu' -> numpy, 'gpu' -> cupy)."""
    if device == "cpu":
        return np
    if device == "gpu":
        cp = _import_cupy()
        if cp is None:
            if _cupy_missing:
                raise DeviceUnavailable(
                    f"device 'gpu' needs CuPy, which does not import ({_cupy_error}); install "
                    "the wheel for your CUDA major version, e.g. pip install 'slimnp[gpu]' "
                    "(cupy-cuda12x; README: GPU)")
            raise DeviceUnavailable(
                f"device 'gpu': CuPy is installed but CUDA is not usable ({_cupy_error}); "
                "check the NVIDIA driver (nvidia-smi) and that the cupy-cudaXXx wheel matches "
                "the driver's CUDA major version (README: GPU)")
        return cp
    raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'gpu'")


def array_module(x):
    """numpy or cupy, whichever owns ``x`` (numpy for anything that is not CuPy)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    return np


def to_numpy(x) -> np.ndarray:
    """A host copy of ``x`` (no copy for numpy input)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def compile_cuda(source: str, options, name_expressions):
    """CUDA C ``source`` compiled by NVRTC (CuPy's ``RawModule``): an object
    whose ``get_function(name)`` gives a kernel launched as
    ``k(grid, block, args)``.  ``name_expressions`` names the template
    instances to compile (``["lstm_fwd<float>", ...]``)."""
    return get_xp("gpu").RawModule(code=source, options=options, name_expressions=name_expressions)


def use_gpu(index: int) -> None:
    """Make GPU ``index`` (modulo the GPUs this process sees) the current
    device, before any device memory is allocated."""
    cp = get_xp("gpu")
    cp.cuda.Device(index % cp.cuda.runtime.getDeviceCount()).use()


def current_stream_ptr(x) -> int:
    """The CUDA stream CuPy launches on now, as a raw pointer (``x``: a
    device array, for its module)."""
    return array_module(x).cuda.get_current_stream().ptr


# ----------------------------------------------------------------------------
# NCCL: device buffers summed over processes (CuPy's optional binding)
# ----------------------------------------------------------------------------
def nccl_module():
    """CuPy's NCCL binding where CuPy works and carries it; None otherwise."""
    if _import_cupy() is None:
        return None
    try:
        from cupy.cuda import nccl  # optional part of CuPy
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None


class NcclAllreduce:
    """One process's member of an NCCL clique of ``size`` processes.

    Rank 0 makes the clique's id (``nccl.get_unique_id()``) and the caller
    hands it to the others (over MPI) before each builds this with its
    ``rank``.  Calling it on a C-contiguous device buffer replaces the buffer
    by the sum over the clique, in place: one ``allReduce`` queued on the
    stream CuPy launches on, behind the kernels that wrote the buffer.

    ``nccl``: the binding (:func:`nccl_module`; tests pass a stand-in).
    """

    def __init__(self, nccl, size: int, uid, rank: int):
        self.nccl = nccl
        self.comm = nccl.NcclCommunicator(size, uid, rank)
        self._kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def __call__(self, buf) -> None:
        ptr = buf.data.ptr
        self.comm.allReduce(ptr, ptr, buf.size, self._kinds[np.dtype(buf.dtype)], self.nccl.NCCL_SUM,
                            current_stream_ptr(buf))


def make_rng(seed: int) -> np.random.Generator:
    """The host RNG all randomness derives from (init, dropout masks, shuffles).

    PCG64 under ``numpy.random.Generator``: its state is a small dict that the
    checkpoint stores, so a resumed run draws exactly the numbers an
    uninterrupted one would.
    """
    return np.random.Generator(np.random.PCG64(seed))
