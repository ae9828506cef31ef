"""Thread counts of the two libraries that run slimnp's CPU work.

NumPy's OpenBLAS (the GEMMs) is reached through ctypes, so no extra
dependency is needed; Numba's pool (the kernels) through its API.  Both
default to every core; ``slimnp train --threads N`` sets both (on a machine
already busy with other jobs, 1 avoids two spinning thread pools fighting
over the same cores).
"""
from __future__ import annotations

import ctypes

_blas_fns = None


def _blas_functions():
    """``(get_num_threads, set_num_threads)`` of the loaded OpenBLAS, or None."""
    global _blas_fns
    if _blas_fns is None:
        _blas_fns = False
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({ln.split()[-1] for ln in f if "openblas" in ln.lower() and "/" in ln})
        except OSError:  # not Linux: leave BLAS alone
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for pre, suf in (("scipy_openblas", "64_"), ("openblas", "64_"),
                             ("scipy_openblas", ""), ("openblas", "")):
                get = getattr(lib, f"{pre}_get_num_threads{suf}", None)
                put = getattr(lib, f"{pre}_set_num_threads{suf}", None)
                if get is not None and put is not None:
                    get.restype = ctypes.c_int
                    _blas_fns = (get, put)
                    return _blas_fns
    return _blas_fns or None


def blas_threads() -> int | None:
    """OpenBLAS's thread count, or None if no OpenBLAS is loaded."""
    import numpy  # noqa: F401  (loads OpenBLAS)

    fns = _blas_functions()
    return int(fns[0]()) if fns else None


def set_blas_threads(n: int) -> None:
    """Set OpenBLAS's thread count (no-op without OpenBLAS)."""
    fns = _blas_functions()
    if fns:
        fns[1](ctypes.c_int(int(n)))


def set_threads(n: int) -> None:
    """Use ``n`` threads for the GEMMs (OpenBLAS) and the kernels (Numba)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    set_blas_threads(n)
    from . import kernels

    kernels.set_cpu_threads(n)
