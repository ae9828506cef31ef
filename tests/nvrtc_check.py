"""Compile CUDA C with NVRTC through ctypes: no GPU, no driver, no CuPy.

NVRTC (the compiler CuPy's ``RawModule`` uses) is a plain shared library; it
turns CUDA C into PTX for a virtual architecture without touching a device.
So a machine without a GPU can still catch syntax and type errors in
``slimnp/kernels/gpu.py``'s kernels: ``pip install nvidia-cuda-nvrtc-cu12``
(or any CUDA toolkit's ``libnvrtc``) and the compile tests run.

    python tests/nvrtc_check.py        # compile every kernel, float and double
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os

_lib = None
_error = None


def _candidates():
    """Paths of libnvrtc to try: the pip wheels (CUDA 12 and 13 layouts), a
    toolkit under CUDA_PATH / CUDA_HOME / /usr/local/cuda, the loader's."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for root in nvidia.__path__:
            yield from sorted(glob.glob(os.path.join(root, "cuda_nvrtc", "lib", "libnvrtc.so*")))
            yield from sorted(glob.glob(os.path.join(root, "cu1*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(env):
            yield from sorted(glob.glob(os.path.join(os.environ[env], "lib64", "libnvrtc.so*")))
    yield from sorted(glob.glob("/usr/local/cuda/lib64/libnvrtc.so*"))
    name = ctypes.util.find_library("nvrtc")
    if name:
        yield name


def load():
    """The NVRTC library (ctypes), or None; :func:`why_unavailable` says why."""
    global _lib, _error
    if _lib is None and _error is None:
        tried = []
        for path in _candidates():
            if "builtins" in os.path.basename(path) or ".alt." in os.path.basename(path):
                continue
            try:
                # NVRTC dlopen()s its builtins library by name at compile time;
                # loading the sibling copy first makes that find it (the CUDA 13
                # wheels' directory is on no search path)
                for b in sorted(glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*"))):
                    if ".alt." not in b:
                        ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
                lib = ctypes.CDLL(path)
                lib.nvrtcVersion  # noqa: B018  (a libnvrtc, not another library)
            except (OSError, AttributeError) as exc:
                tried.append(f"{path}: {exc}")
                continue
            _lib = lib
            break
        else:
            _error = ("no libnvrtc found (pip install nvidia-cuda-nvrtc-cu12)"
                      + (f"; tried {'; '.join(tried)}" if tried else ""))
    return _lib


def why_unavailable() -> str:
    load()
    return _error or ""


def version() -> tuple:
    lib = load()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


class CompileError(RuntimeError):
    """NVRTC rejected the source; the message is its log."""


def _check(lib, rc, what):
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise CompileError(f"{what}: {lib.nvrtcGetErrorString(rc).decode()}")


def compile_ptx(source: str, name_expressions=(), options=("-arch=compute_80",),
                name: str = "slimnp_kernels.cu"):
    """Compile ``source`` to PTX.

    Returns ``(ptx: str, log: str, lowered: dict)``: the log holds warnings
    (empty when clean) and ``lowered`` maps each name expression (e.g.
    ``"lstm_fwd<float>"``) to its mangled symbol, which proves the template
    was instantiated.  Raises :class:`CompileError` with NVRTC's log.
    """
    lib = load()
    if lib is None:
        raise RuntimeError(why_unavailable())
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0,
                                       None, None), "nvrtcCreateProgram")
    try:
        for expr in name_expressions:
            _check(lib, lib.nvrtcAddNameExpression(prog, expr.encode()), f"add {expr}")
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace").strip()
        if rc != 0:
            raise CompileError(log or f"nvrtcCompileProgram failed with code {rc}")
        lowered = {}
        for expr in name_expressions:
            sym = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(sym)), f"lower {expr}")
            lowered[expr] = sym.value.decode()
        if any(o.startswith(("-arch=sm_", "--gpu-architecture=sm_")) for o in options):
            # a real architecture: NVRTC assembles to a cubin (ptxas included)
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
            cubin = ctypes.create_string_buffer(n.value)
            _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            return cubin.raw, log, lowered
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        ptx = ctypes.create_string_buffer(n.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode(), log, lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# What CuPy's RawModule adds to the options (cupy/cuda/compiler.py, v13-14).
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def compile_gpu_kernels(arch: str = "compute_80"):
    """Compile ``slimnp.kernels.gpu.SOURCE`` for float and double with the
    options CuPy passes; returns ``(ptx or cubin, log, lowered)``
    (``arch`` = ``compute_XX``: PTX; ``sm_XX``: a cubin, as CuPy builds for
    the device it runs on)."""
    from slimnp.kernels import gpu

    exprs = gpu.name_expressions("float32") + gpu.name_expressions("float64")
    return compile_ptx(gpu.SOURCE, exprs, (f"-arch={arch}",) + tuple(gpu.OPTIONS) + CUPY_OPTIONS)


if __name__ == "__main__":  # pragma: no cover
    import sys

    if load() is None:
        sys.exit(why_unavailable())
    for arch in ("compute_80", "sm_90"):
        out, log, lowered = compile_gpu_kernels(arch)
        kind = "PTX" if arch.startswith("compute") else "cubin"
        print(f"NVRTC {version()} {arch}: {len(lowered)} kernels, {len(out):,} bytes of {kind}"
              + (f"\n{log}" if log else ", no warnings"))
