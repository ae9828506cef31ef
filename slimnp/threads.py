"""Thread counts of the two libraries that run slimnp's CPU work.

NumPy's OpenBLAS (the GEMMs) is reached through ctypes, so no extra
dependency is needed; Numba's pool (the kernels) through its API.  Both
default to every core; ``slimnp train --threads N`` sets both (on a machine
already busy with other jobs, 1 avoids two spinning thread pools fighting
over the same cores).

OpenBLAS's workers also hold their own floating-point control register (the
x86 MXCSR, where :func:`flush_denormals` sets flushing):
:func:`restart_worker_threads` stops them so that the next GEMM starts new
ones with the calling thread's setting.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys

_blas_fns = None


def _blas_functions():
    """``(get_num_threads, set_num_threads, thread_shutdown, get_corename)``
    of the loaded OpenBLAS (the last two None where the library does not
    export them), or None."""
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
                    # not in OpenBLAS's API, but exported by its pthreads builds
                    # (NumPy's wheels): stops the workers; the next threaded
                    # call starts them again (blas_thread_init)
                    stop = getattr(lib, "blas_thread_shutdown_", None)
                    if stop is not None:
                        stop.restype = ctypes.c_int
                    core = getattr(lib, f"{pre}_get_corename{suf}", None)
                    if core is not None:
                        core.restype = ctypes.c_char_p
                    _blas_fns = (get, put, stop, core)
                    return _blas_fns
    return _blas_fns or None


def blas_threads() -> int | None:
    """OpenBLAS's thread count, or None if no OpenBLAS is loaded."""
    import numpy  # noqa: F401  (loads OpenBLAS)

    fns = _blas_functions()
    return int(fns[0]()) if fns else None


def blas_core() -> str | None:
    """The kernel set OpenBLAS chose for this CPU when it loaded (a
    DYNAMIC_ARCH build picks at run time: ``"SkylakeX"`` on a CPU with
    AVX-512, although the build string may name ``Haswell``), or None."""
    import numpy  # noqa: F401  (loads OpenBLAS)

    fns = _blas_functions()
    if not fns or fns[3] is None:
        return None
    return fns[3]().decode("ascii", "replace").strip() or None


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


def restart_worker_threads() -> bool:
    """Stop the worker threads of OpenBLAS and of the layer pipeline
    (:mod:`slimnp.threaded_lstm`); their next use starts new ones.

    A new thread starts with the floating-point environment of the thread
    that creates it (POSIX ``pthread_create``; on Linux ``clone`` copies the
    FPU state, MXCSR included), and both pools create their threads lazily
    from the thread that calls into them, so after this the calling thread's
    denormal setting reaches them (:func:`flush_denormals`).
    Returns whether OpenBLAS's workers were stopped: False without OpenBLAS
    or without its exported ``blas_thread_shutdown_``, where they keep their
    setting (with ``--threads 1`` every GEMM runs in the calling thread).
    Call it when no other thread is inside OpenBLAS or the pipeline.
    """
    lstm = sys.modules.get(f"{__package__}.threaded_lstm")
    if lstm is not None:  # imported: its pool may hold threads (it imports this module)
        lstm.shutdown_pool()
    import numpy  # noqa: F401  (loads OpenBLAS)

    fns = _blas_functions()
    if not fns or fns[2] is None:
        return False
    fns[2]()
    return True


# Denormals (subnormal floats, below ~1.2e-38 in float32): x86 cores take
# ~100-cycle microcode assists on them, so a few in a GEMM's operands (LSTM
# gate derivatives of a trained model, for one) slow it several-fold.
# TensorFlow flushes them on CPU by default; PyTorch has set_flush_denormal.
# ---------------------------------------------------------------------------
def flush_denormals(on: bool = True) -> bool:
    """Flush denormal floats to zero (``on``) or keep them (IEEE), on the CPU.

    Sets the FTZ (flush-to-zero) and DAZ (denormals-are-zero) bits of the x86
    MXCSR register in the calling thread and in every thread of Numba's pool,
    and stops OpenBLAS's worker threads (and the layer pipeline's): they
    start again at their next use, from the thread that uses them, with its
    setting (:func:`restart_worker_threads`).  Every float
    operation of NumPy, the Numba kernels and the GEMMs in these threads
    then gives 0 where its result or an operand would be below the smallest
    normal float (``np.finfo(dtype).tiny``: 1.18e-38 in float32, 2.2e-308 in
    float64); nothing else changes.  Threads started later by other code
    inherit the setting from the thread that starts them.

    Returns whether the calling thread flushed before the call.  On machines
    other than x86-64 it does nothing and returns False.  GPU arrays are not
    affected (CUDA kernels have their own flags).  Call it while no other
    thread is inside OpenBLAS.
    """
    from . import kernels

    cpu = kernels.float_control()
    if not cpu.X86_64:
        return False
    old, _ = _set_flush(cpu, cpu.MXCSR_FTZ_DAZ if on else 0)
    return old & cpu.MXCSR_FTZ_DAZ == cpu.MXCSR_FTZ_DAZ


def denormals_are_flushed() -> bool:
    """Whether the calling thread flushes denormals (both FTZ and DAZ set)."""
    from . import kernels

    cpu = kernels.float_control()
    return cpu.X86_64 and cpu.mxcsr() & cpu.MXCSR_FTZ_DAZ == cpu.MXCSR_FTZ_DAZ


@contextlib.contextmanager
def denormals_flushed(on: bool = True):
    """Context manager form of :func:`flush_denormals`: on exit the calling
    thread and each thread of Numba's pool get back the setting they had,
    and OpenBLAS's workers restart with the calling thread's."""
    from . import kernels

    cpu = kernels.float_control()
    if not cpu.X86_64:
        yield
        return
    old, old_pool = _set_flush(cpu, cpu.MXCSR_FTZ_DAZ if on else 0)
    try:
        yield
    finally:
        _set_flush(cpu, old, old_pool)


def _set_flush(cpu, bits, pool_bits=None):
    """FTZ/DAZ ``bits`` in the calling thread, ``pool_bits`` (default: the
    same) in Numba's pool, then OpenBLAS's and the pipeline's workers
    restarted to inherit them; returns the old ``(register, pool registers)``."""
    old = cpu.set_ftz_daz(bits)
    old_pool = cpu.set_ftz_daz_pool(bits if pool_bits is None else pool_bits)
    restart_worker_threads()
    return old, old_pool
