"""Optimizers and learning-rate schedules over flat parameter buffers.

An optimizer sees the model's two flat buffers (``store.data``,
``store.grad``), so clipping is one norm and an update is a handful of
vector ops, whatever the number of layers.  Its state is a dict of arrays and
scalars that checkpoints store and restore; Adagrad (per-element
accumulators) drops in behind the same interface.
"""
from __future__ import annotations

import math

from .backend import array_module


def clip_global_norm(grad, max_norm: float) -> float:
    """Scale ``grad`` in place so its L2 norm is at most ``max_norm``.

    Returns the norm before clipping (``max_norm <= 0`` disables clipping).
    """
    xp = array_module(grad)
    norm = float(xp.sqrt(xp.dot(grad, grad)))
    if max_norm > 0 and norm > max_norm:
        grad *= grad.dtype.type(max_norm / norm)
    return norm


class SGD:
    """Plain SGD: ``theta -= lr * g`` (after global-norm clipping)."""

    name = "sgd"

    def __init__(self, clip: float = 5.0):
        self.clip = clip

    def step(self, params, grad, lr: float) -> float:
        norm = clip_global_norm(grad, self.clip)
        # in place, no temporary of the parameter size: grad is scratch now
        grad *= grad.dtype.type(-lr)
        params += grad
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

