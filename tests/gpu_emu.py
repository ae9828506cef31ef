"""Run ``slimnp/kernels/gpu.py``'s CUDA C on the CPU (see ``gpu_emu.h``).

:func:`factory` builds (once, with the system's C++ compiler, cached by the
source's hash) a shared library holding every kernel of ``gpu.SOURCE`` for
float and double, compiled as C++ against the emulator header, and returns
callables with CuPy ``RawKernel``'s calling convention
(``kernel(grid, block, args)``) over NumPy arrays.  Installed as
``gpu._factory``, it lets ``gpu.py``'s own Python launch code run on NumPy
arrays, so the tests compare the GPU kernels with the reference on a
machine without a GPU.  Each call checks every argument against the
kernel's C signature (a pointer for an array, ``np.int64`` for ``long long``,
``np.int32`` for ``int``, the float type for ``float``/``double``): a wrong
scalar type is exactly the mistake a real launch would not report.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_lib = None
_error = None

_SCALARS = {"q": (np.int64, ctypes.c_longlong), "i": (np.int32, ctypes.c_int),
            "f": (np.float32, ctypes.c_float), "d": (np.float64, ctypes.c_double)}


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _source() -> str:
    from slimnp.kernels import gpu

    exports = "\n".join(f"EMU_EXPORT({k}, {t})" for k in gpu.KERNELS for t in ("float", "double"))
    return f'#include "gpu_emu.h"\n{gpu.SOURCE}\n{exports}\n'


def load():
    """The compiled emulator library, or None (see :func:`why_unavailable`)."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    cxx = compiler()
    if cxx is None:
        _error = "no C++ compiler (g++) to build the CUDA emulator"
        return None
    src = _source()
    header = (HERE / "gpu_emu.h").read_text()
    key = hashlib.sha256((src + header + cxx).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("SLIMNP_EMU_CACHE", Path(tempfile.gettempdir()) / "slimnp-gpu-emu"))
    cache.mkdir(parents=True, exist_ok=True)
    so = cache / f"emu-{key}.so"
    if not so.exists():
        cpp = cache / f"emu-{key}.cpp"
        cpp.write_text(src)
        tmp = cache / f"emu-{key}.{os.getpid()}.so"
        cmd = [cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-w",
               f"-I{HERE}", str(cpp), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            # a compile failure of the kernels is a test failure, not a skip
            raise RuntimeError(f"emulator build failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
        os.replace(tmp, so)
    _lib = ctypes.CDLL(str(so))
    _lib.emu_error.restype = ctypes.c_char_p
    return _lib


def why_unavailable() -> str:
    load()
    return _error or ""


def set_reverse(on: bool) -> None:
    """Run each round of a block's threads from the last to the first (a
    missing barrier then shows with the other reader/writer order)."""
    load().emu_set_reverse(int(on))


class Kernel:
    """One emulated kernel instantiation, called like a CuPy RawKernel."""

    def __init__(self, lib, name: str, ctype: str):
        self.name = f"{name}<{ctype}>"
        self._launch = getattr(lib, f"emu_launch_{name}_{ctype}")
        self._launch.restype = ctypes.c_int
        sig = getattr(lib, f"emu_sig_{name}_{ctype}")
        sig.restype = ctypes.c_char_p
        self.signature = sig().decode()
        self.calls = 0

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name}: {len(args)} arguments for a signature of {len(self.signature)}")
        keep, ptrs = [], []
        for i, (code, a) in enumerate(zip(self.signature, args)):
            if code == "p":
                if not isinstance(a, np.ndarray):
                    raise TypeError(f"{self.name} argument {i}: expected an array, got {type(a).__name__}")
                if not a.flags.c_contiguous:
                    raise TypeError(f"{self.name} argument {i}: array is not C-contiguous")
                v = ctypes.c_void_p(a.ctypes.data)
            else:
                want, ctype = _SCALARS[code]
                if type(a) is not want:
                    raise TypeError(f"{self.name} argument {i}: expected {want.__name__}, "
                                    f"got {type(a).__name__}")
                v = ctype(a.item())
            keep.append(v)
            ptrs.append(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p))
        arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
        rc = self._launch(*grid, *block, arr)
        self.calls += 1
        if rc:
            raise RuntimeError(f"{self.name}: {_lib.emu_error().decode()}")


def factory(name: str, dtype) -> Kernel:
    """``gpu._factory``: the emulated ``name<T>`` for ``dtype``."""
    from slimnp.kernels import gpu

    return Kernel(load(), name, gpu.CTYPES[np.dtype(dtype)])
