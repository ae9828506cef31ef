"""Optimizers and learning-rate schedules over flat parameter buffers.

An optimizer sees the model's two flat buffers (``store.data``,
``store.grad``), so clipping is one norm and an update is a handful of
vector ops, whatever the number of layers.  Its state is a dict of arrays and
scalars that checkpoints store and restore; Adagrad (per-element
accumulators) drops in behind the same interface.
"""
from __future__ import annotations

import math

from . import kernels


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


def make_optimizer(name: str, clip: float):
    if name == "sgd":
        return SGD(clip)
    raise ValueError(f"unknown optimizer {name!r}; available: sgd")


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

