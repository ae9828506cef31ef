"""Optimizers and learning-rate schedules over flat parameter buffers.

An optimizer sees the model's two flat buffers (``store.data``,
``store.grad``), so clipping is one norm and an update is a handful of
vector ops, whatever the number of layers.  Its state is a dict of arrays and
scalars that checkpoints store and restore: :class:`SGD` has only
settings, :class:`Adagrad` adds its per-element accumulator (a flat array like
the parameters).
"""
from __future__ import annotations

import math
import types

import numpy as np

from . import kernels
from .backend import array_module, to_numpy

OPTIMIZERS = ("sgd", "adagrad")


def _views(flat, seg):
    """The part of a flat buffer that ``seg`` (see ``ParamStore.segments``) covers."""
    if seg[0] == "dense":
        return flat[seg[1] : seg[1] + seg[2]]
    _, off, shape, _ = seg
    n = 1
    for s in shape:
        n *= s
    return flat[off : off + n].reshape(shape[0], -1)


def global_norm(grad, segments=None) -> float:
    """L2 norm of the flat gradient; ``segments`` skips its known-zero rows."""
    if segments is None:
        return math.sqrt(kernels.sumsq(grad))
    total = 0.0
    for seg in segments:
        v = _views(grad, seg)
        total += kernels.sumsq(v) if seg[0] == "dense" else kernels.sumsq_rows(v, seg[3])
    return math.sqrt(total)


def clip_global_norm(grad, max_norm: float) -> float:
    """Scale ``grad`` in place so its L2 norm is at most ``max_norm``.

    Returns the norm before clipping (``max_norm <= 0`` disables clipping).
    """
    norm = global_norm(grad)
    if max_norm > 0 and norm > max_norm:
        grad *= grad.dtype.type(max_norm / norm)
    return norm


def clip_factor(norm: float, max_norm: float) -> float:
    """The multiplier global-norm clipping applies to a gradient of ``norm``."""
    return max_norm / norm if max_norm > 0 and norm > max_norm else 1.0


class SGD:
    """Plain SGD: ``theta -= lr * g`` (after global-norm clipping)."""

    name = "sgd"

    def __init__(self, clip: float = 5.0):
        self.clip = clip

    def step(self, params, grad, lr: float, segments=None) -> float:
        """One update; returns the gradient norm before clipping.

        ``segments`` (``ParamStore.segments()``) lets the update skip the
        rows of an embedding gradient that are known to be zero.  Clipping
        and the step are fused: ``params += (-lr * clip) * grad`` in one pass.
        """
        norm = global_norm(grad, segments)
        a = -lr * clip_factor(norm, self.clip)
        for seg in segments or [("dense", 0, grad.shape[0])]:
            p, g = _views(params, seg), _views(grad, seg)
            if seg[0] == "dense":
                kernels.axpy(p, a, g)
            else:
                kernels.axpy_rows(p, a, g, seg[3])
        return norm

    def state_dict(self) -> dict:
        return {"name": self.name, "clip": self.clip}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name", self.name) != self.name:
            raise ValueError(f"checkpoint optimizer is {state.get('name')!r}, not {self.name!r}")
        self.clip = float(state.get("clip", self.clip))


# --------------------------------------------------------------------------
# Adagrad
# --------------------------------------------------------------------------
#
# The update kernels are plain functions compiled by Numba on first use
# (:func:`_adagrad_kernels`), so importing this module does not import Numba.
# ``prange`` is the builtin ``range`` until then; the builder rebinds it to
# ``numba.prange`` before compiling, which is what makes the loops parallel.
prange = range

_SPAN = 1 << 14  # elements per parallel work item of the dense kernel (64 kB of float32)
_JIT = dict(nogil=True, cache=True, error_model="numpy")
_compiled = None  # {"dense": (serial, parallel), "rows": (...)}, built by _adagrad_kernels

# Elements updated by one call above which the parallel kernel runs.  Below
# it, waking Numba's pool costs more than it saves (2-core box, float32: 400
# rows x 200 took 38 us serially and 147 us in parallel; 2,600 x 200, 370 and
# 390 us; 4,000 x 512, 1.33 and 0.88 ms).  Read at each call.
PARALLEL_MIN = 1 << 19


def _adagrad_span_impl(p, acc, g, av, lrv, epsv):
    """The update on 1-d ``p``, ``acc``, ``g``; ``av``, ``lrv``, ``epsv`` in their dtype."""
    for j in range(p.shape[0]):
        gj = g[j] * av
        s = acc[j] + gj * gj
        acc[j] = s
        p[j] -= lrv * gj / (np.sqrt(s) + epsv)


_adagrad_span = _adagrad_span_impl  # an inlined Numba function once compiled


def _adagrad_dense_impl(p, acc, g, a, lr, eps):
    """One Adagrad pass over flat ``p``, ``acc``, ``g`` (the clip factor ``a``
    applied to ``g`` on the fly): ``acc += (a g)^2; p -= lr (a g) / (sqrt(acc) + eps)``.

    Every operation is in the arrays' dtype, in the same order as
    :func:`_adagrad_dense_numpy`, so both give identical bits.
    """
    n = p.shape[0]
    nspans = (n + _SPAN - 1) // _SPAN
    av, lrv, epsv = p.dtype.type(a), p.dtype.type(lr), p.dtype.type(eps)
    for i in prange(nspans):
        # slices, not index ranges: only this form of the loop vectorises
        lo, hi = i * _SPAN, min(n, (i + 1) * _SPAN)
        _adagrad_span(p[lo:hi], acc[lo:hi], g[lo:hi], av, lrv, epsv)


def _adagrad_rows_impl(p, acc, g, rows, a, lr, eps):
    """:func:`_adagrad_dense_impl` on rows ``rows`` (distinct) of 2-d views."""
    av, lrv, epsv = p.dtype.type(a), p.dtype.type(lr), p.dtype.type(eps)
    for k in prange(rows.shape[0]):
        r = rows[k]
        _adagrad_span(p[r], acc[r], g[r], av, lrv, epsv)


def _serial_and_parallel(numba, impl):
    """``impl`` compiled twice, ``(serial, parallel)``.  Each copy has its own
    qualname: Numba's disk cache names entries by qualname and line, not by
    compile flags, so two dispatchers of one function would load each
    other's machine code (as in ``kernels/cpu.py``)."""
    out = []
    for suffix, parallel in (("_serial", False), ("_parallel", True)):
        fn = types.FunctionType(impl.__code__, impl.__globals__, impl.__name__ + suffix,
                                impl.__defaults__, impl.__closure__)
        fn.__qualname__ = impl.__qualname__ + suffix
        fn.__doc__ = impl.__doc__
        out.append(numba.njit(parallel=parallel, **_JIT)(fn))
    return tuple(out)


def _adagrad_kernels() -> dict:
    """``{"dense": (serial, parallel), "rows": (serial, parallel)}``: the update
    kernels, compiled on first use (and cached on disk)."""
    global _compiled, prange, _adagrad_span
    if _compiled is None:
        import numba

        kernels._cpu_module()  # picks Numba's threading layer before the first parallel launch
        prange = numba.prange
        _adagrad_span = numba.njit(inline="always", **_JIT)(_adagrad_span_impl)
        _compiled = {"dense": _serial_and_parallel(numba, _adagrad_dense_impl),
                     "rows": _serial_and_parallel(numba, _adagrad_rows_impl)}
    return _compiled


def _adagrad_dense_numpy(p, acc, g, a, lr, eps):
    """The NumPy (or CuPy) form of :func:`_adagrad_dense_impl`, for any layout."""
    xp, dt = array_module(p), p.dtype.type
    gc = g * dt(a)
    acc += gc * gc
    p -= dt(lr) * gc / (xp.sqrt(acc) + dt(eps))


def _adagrad_rows_numpy(p, acc, g, rows, a, lr, eps):
    """The NumPy (or CuPy) form of :func:`_adagrad_rows_impl`."""
    xp, dt = array_module(p), p.dtype.type
    gc = g[rows] * dt(a)
    ar = acc[rows]
    ar += gc * gc
    acc[rows] = ar
    p[rows] -= dt(lr) * gc / (xp.sqrt(ar) + dt(eps))


def _numba_ok(*arrays) -> bool:
    """True where the Numba kernels apply: C-contiguous NumPy float arrays and
    the kernel mode 'auto' or 'cpu' (``slimnp.kernels.use``)."""
    return kernels.implementation(*arrays) == "cpu"


def _gpu_ok(*arrays) -> bool:
    """True where the fused GPU pass applies (C-contiguous CuPy arrays)."""
    return kernels.implementation(*arrays) == "gpu"


def adagrad_update(p, acc, g, a, lr, eps, rows=None) -> None:
    """``acc += (a g)^2; p -= lr (a g) / (sqrt(acc) + eps)`` in place.

    ``p``, ``acc``, ``g``: arrays of one float dtype and shape; every element
    is updated (``rows`` None), or, for 2-d arrays, the rows ``rows``
    (distinct integers) only: the other rows of ``p`` and ``acc`` are left as
    they are.  Runs one fused Numba
    pass on NumPy C-contiguous arrays (one CUDA kernel on CuPy ones), the
    NumPy/CuPy expression otherwise; Numba and NumPy give identical results,
    the GPU the same to rounding (it fuses multiply-adds).
    """
    if p.dtype not in (np.float32, np.float64):
        raise TypeError(f"adagrad_update: expected float32 or float64 parameters, got {p.dtype}")
    for name, x in (("acc", acc), ("g", g)):
        if x.dtype != p.dtype or x.shape != p.shape:
            raise ValueError(f"adagrad_update: {name} is {x.dtype}{tuple(x.shape)}, "
                             f"params {p.dtype}{tuple(p.shape)}")
    if rows is None:
        if _numba_ok(p, acc, g):
            kernel = _adagrad_kernels()["dense"][p.size >= PARALLEL_MIN]
            kernel(p.reshape(-1), acc.reshape(-1), g.reshape(-1), float(a), float(lr), float(eps))
        elif _gpu_ok(p, acc, g):
            kernels.adagrad_update(p, acc, g, a, lr, eps)
        else:
            _adagrad_dense_numpy(p, acc, g, a, lr, eps)
    elif rows.shape[0]:
        if p.ndim != 2 or rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ValueError(f"adagrad_update: rows needs 2-d arrays and 1-d integer rows, got "
                             f"arrays of shape {tuple(p.shape)} and rows {rows.dtype}{tuple(rows.shape)}")
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= p.shape[0]:  # the kernel does not check its indices
            raise IndexError(f"adagrad_update: rows must lie in [0, {p.shape[0]}), found [{lo}, {hi}]")
        if _numba_ok(p, acc, g, rows):
            kernel = _adagrad_kernels()["rows"][rows.shape[0] * p.shape[1] >= PARALLEL_MIN]
            kernel(p, acc, g, rows, float(a), float(lr), float(eps))
        elif _gpu_ok(p, acc, g, rows):
            kernels.adagrad_update(p, acc, g, a, lr, eps, rows)
        else:
            _adagrad_rows_numpy(p, acc, g, rows, a, lr, eps)


class Adagrad:
    """Adagrad (Duchi et al. 2011), as TensorFlow's ``AdagradOptimizer``:
    per element ``acc += g^2; theta -= lr * g / (sqrt(acc) + eps)``, with
    ``g`` the gradient after global-norm clipping.

    The accumulator is a flat array like the parameters, filled with
    ``initial_accumulator`` (TensorFlow's default 0.1) on the first step.
    Rows of an embedding gradient that ``segments`` marks as untouched are
    skipped entirely, parameters and accumulator alike (row-wise sparse
    Adagrad, as TensorFlow applies to ``IndexedSlices``): a word that does
    not occur in a batch keeps its accumulator, so its next update is not
    shrunk by steps in which it had no gradient.  Where those rows'
    gradients are exactly zero (always, for ``ParamStore`` row tracking), the
    sparse and the dense update give the same result.

    ``state_dict()`` holds the accumulator (a NumPy array, as large as the
    model) beside the scalars; checkpoints store it as an HDF5 dataset, so a
    resumed run continues bit-for-bit.
    """

    name = "adagrad"

    def __init__(self, clip: float = 5.0, initial_accumulator: float = 0.1, eps: float = 1e-10):
        if not (initial_accumulator >= 0 and eps >= 0):
            raise ValueError(f"Adagrad needs initial_accumulator >= 0 and eps >= 0, "
                             f"got {initial_accumulator} and {eps}")
        if initial_accumulator == 0 and eps == 0:
            raise ValueError("Adagrad with initial_accumulator = 0 and eps = 0 divides 0 by 0 "
                             "for an element whose gradient is still zero; make one of them > 0")
        self.clip = clip
        self.initial_accumulator = float(initial_accumulator)
        self.eps = float(eps)
        self.acc = None  # flat accumulator, allocated on the first step

    def _accumulator(self, params):
        """The accumulator for ``params``: allocated on first use, or a loaded
        one moved to ``params``' array module and dtype."""
        xp = array_module(params)
        acc = self.acc
        if acc is None:
            acc = xp.full(params.shape, self.initial_accumulator, dtype=params.dtype)
        elif tuple(acc.shape) != tuple(params.shape):
            raise ValueError(f"Adagrad accumulator has shape {tuple(acc.shape)} but the parameters "
                             f"{tuple(params.shape)}: the optimizer state belongs to another model")
        elif array_module(acc) is not xp or acc.dtype != params.dtype:
            acc = xp.asarray(acc, dtype=params.dtype)
        self.acc = acc
        return acc

    def step(self, params, grad, lr: float, segments=None) -> float:
        """One update; returns the gradient norm before clipping.

        ``segments`` (``ParamStore.segments()``) restricts the update of
        row-tracked parameters to the rows that received gradient.  Clipping
        is applied on the fly inside the update pass (no scaled copy of the
        gradient).
        """
        acc = self._accumulator(params)
        norm = global_norm(grad, segments)
        a = clip_factor(norm, self.clip)
        for seg in segments or [("dense", 0, grad.shape[0])]:
            p, s, g = _views(params, seg), _views(acc, seg), _views(grad, seg)
            adagrad_update(p, s, g, a, lr, self.eps, None if seg[0] == "dense" else seg[3])
        return norm

    def state_dict(self) -> dict:
        """Scalars, and ``accumulator`` once a step has run.

        The accumulator is returned without a copy for NumPy (it can be
        gigabytes): it changes with the next :meth:`step`, so save or copy it
        before stepping again.
        """
        state = {"name": self.name, "clip": self.clip,
                 "initial_accumulator": self.initial_accumulator, "eps": self.eps}
        if self.acc is not None:
            state["accumulator"] = to_numpy(self.acc)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Take the settings and (a copy of) the accumulator from ``state``."""
        if state.get("name", self.name) != self.name:
            raise ValueError(f"checkpoint optimizer is {state.get('name')!r}, not {self.name!r}")
        self.clip = float(state.get("clip", self.clip))
        self.initial_accumulator = float(state.get("initial_accumulator", self.initial_accumulator))
        self.eps = float(state.get("eps", self.eps))
        acc = state.get("accumulator")
        if acc is None:
            self.acc = None
            return
        acc = np.array(to_numpy(acc), copy=True)
        if acc.ndim != 1 or acc.dtype.kind != "f":
            raise ValueError(f"Adagrad accumulator must be a 1-d float array, "
                             f"got {acc.dtype} of shape {acc.shape}")
        self.acc = acc


def make_optimizer(name: str, clip: float, **kw):
    """The optimizer called ``name`` (one of :data:`OPTIMIZERS`).

    ``kw`` goes to its constructor (``initial_accumulator``, ``eps`` for
    Adagrad; SGD takes none).
    """
    if name == "sgd":
        return SGD(clip, **kw)
    if name == "adagrad":
        return Adagrad(clip, **kw)
    raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}")


class Schedule:
    """Learning-rate schedule, told about each finished epoch.

    ``kind='plateau'`` (Kim et al. 2016, which the paper's code builds on):
    multiply lr by ``decay`` whenever validation perplexity improved by less
    than ``threshold`` over the previous epoch.
    ``kind='epoch'`` (Zaremba et al. 2014): ``lr = lr0 * decay ** max(0,
    epoch - start)`` for the *next* epoch, epochs counted from 1.
    ``kind='constant'``: never changes.
    """

    KINDS = ("plateau", "epoch", "constant")

    def __init__(self, kind: str, lr0: float, decay: float = 0.5,
                 threshold: float = 1.0, start: int = 4):
        if kind not in self.KINDS:
            raise ValueError(f"unknown lr schedule {kind!r}; expected one of {', '.join(self.KINDS)}")
        self.kind, self.lr0, self.decay, self.threshold, self.start = kind, lr0, decay, threshold, start

    def next_lr(self, lr: float, epoch_done: int, prev_val_ppl, val_ppl) -> float:
        """lr for epoch ``epoch_done + 1`` given the epoch that just finished."""
        if self.kind == "epoch":
            return self.lr0 * self.decay ** max(0, epoch_done + 1 - self.start)
        if self.kind == "plateau":
            if prev_val_ppl is not None and val_ppl is not None and math.isfinite(prev_val_ppl):
                if prev_val_ppl - val_ppl < self.threshold:
                    return lr * self.decay
            return lr
        return lr

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lr0": self.lr0, "decay": self.decay,
                "threshold": self.threshold, "start": self.start}

