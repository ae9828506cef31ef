"""Exact perplexity of a token stream under a model.

Every token of the stream is predicted: the first from the ``<eos>`` prime
and a zero state (the file starts where a sentence ended), each later one from
the whole history.  With ``batch_size=1`` that is the exact sequential
likelihood; with ``B > 1`` the stream is cut into B contiguous pieces run in
parallel, each restarting from the zero state (faster, a close approximation;
the tail that does not divide evenly continues the last piece).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class EvalResult:
    nll: float  # total natural-log loss
    tokens: int  # predicted tokens

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")


def _run(model, x_bn, y_bn, state, bptt, progress=None, done0=0):
    """Feed ``(B, n)`` inputs/targets through in segments; returns (nll, state)."""
    xp = model.xp
    total = 0.0
    n = x_bn.shape[1]
    for s in range(0, n, bptt):
        x = xp.asarray(np.ascontiguousarray(x_bn[:, s : s + bptt].T))
        y = xp.asarray(np.ascontiguousarray(y_bn[:, s : s + bptt].T))
        nll, state = model.nll(x, y, state)
        total += float(nll.sum())
        if progress is not None:
            progress(done0 + x.size)
            done0 += x.size
    return total, state


def primed_pieces(ids, eos_id: int, batch_size: int):
    """``(ids, inputs, B, m)``: the targets as int32, the inputs (``<eos>``
    then ``ids[:-1]``) and the cut into ``B`` pieces of ``m`` tokens (the
    ``n - B m`` left over continue the last piece)."""
    ids = np.asarray(ids, dtype=np.int32)
    n = int(ids.shape[0])
    if n == 0:
        raise ValueError("cannot evaluate an empty token stream")
    inputs = np.empty(n, dtype=np.int32)
    inputs[0] = eos_id
    inputs[1:] = ids[:-1]
    B = max(1, min(int(batch_size), n))
    return ids, inputs, B, n // B


def evaluate_ids(model, ids, eos_id: int, batch_size: int = 1, bptt: int = 100,
                 progress=None) -> EvalResult:
    """Exact NLL and perplexity of ``ids`` (1-D int array) under ``model``.

    ``progress`` is an optional callable receiving the number of tokens done.
    """
    ids, inputs, B, m = primed_pieces(ids, eos_id, batch_size)
    n = int(ids.shape[0])
    state = model.zero_state(B)
    total, state = _run(model, inputs[: B * m].reshape(B, m), ids[: B * m].reshape(B, m),
                        state, bptt, progress)
    if B * m < n:
        # the tail continues the last piece, from its final state
        last = state[:, :, B - 1 : B].copy()
        t, _ = _run(model, inputs[B * m :].reshape(1, -1), ids[B * m :].reshape(1, -1),
                    last, bptt, progress, B * m)
        total += t
    return EvalResult(nll=total, tokens=n)
