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
# Adagrad (its fused update pass: kernels.adagrad_update)
# --------------------------------------------------------------------------
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
            kernels.adagrad_update(p, s, g, a, lr, self.eps, None if seg[0] == "dense" else seg[3])
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

