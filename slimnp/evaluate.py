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

from .backend import to_numpy


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


def stream_nll(model, x, y, state, bptt: int, out=None, progress=None):
    """The one loop that scores token streams (evaluation, sentence scoring,
    the ranks' shards of validation).

    ``x``, ``y`` : (n, B) int host arrays, time-major: inputs and targets of B
    parallel streams, fed through ``model.nll`` in segments of ``bptt`` steps
    with the state carried (exact; bounds the activations kept).
    ``state`` : the incoming ``(L, 2, B, H)`` state.  ``out`` : optional
    (n, B) float64 host array receiving every token's NLL.  ``progress`` :
    optional callable receiving the time steps done after each segment.

    Returns the total NLL (natural log; per segment a float64 sum, the
    segments added in order) and the final state.
    """
    xp = model.xp
    total = 0.0
    n = x.shape[0]
    for t0 in range(0, n, bptt):
        xs = xp.asarray(np.ascontiguousarray(x[t0 : t0 + bptt]))
        ys = xp.asarray(np.ascontiguousarray(y[t0 : t0 + bptt]))
        nll, state = model.nll(xs, ys, state)
        total += float(nll.sum())
        if out is not None:
            out[t0 : t0 + bptt] = to_numpy(nll)
        if progress is not None:
            progress(t0 + xs.shape[0])
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


def pieces_nll(model, ids, eos_id: int, batch_size: int, bptt: int, lo: int = 0, hi=None,
               progress=None) -> float:
    """Total NLL of pieces ``[lo, hi)`` (default: all) of the cut
    :func:`primed_pieces` makes, each from a zero state; the tail that
    continues the last piece goes with that piece.  ``progress`` receives
    the tokens done."""
    ids, inputs, B, m = primed_pieces(ids, eos_id, batch_size)
    n = int(ids.shape[0])
    hi = B if hi is None else hi
    if hi <= lo:
        return 0.0
    rows = hi - lo
    x = inputs[: B * m].reshape(B, m)[lo:hi].T  # (m, rows) time-major views
    y = ids[: B * m].reshape(B, m)[lo:hi].T
    report = None if progress is None else (lambda t: progress(t * rows))
    total, state = stream_nll(model, x, y, model.zero_state(rows), bptt, progress=report)
    if B * m < n and hi == B:
        # the tail continues the last piece, from its final state
        last = state[:, :, -1:].copy()
        report = None if progress is None else (lambda t: progress(B * m + t))
        t, _ = stream_nll(model, inputs[B * m :, None], ids[B * m :, None], last, bptt, progress=report)
        total += t
    return total


def evaluate_ids(model, ids, eos_id: int, batch_size: int = 1, bptt: int = 100,
                 progress=None) -> EvalResult:
    """Exact NLL and perplexity of ``ids`` (1-D int array) under ``model``.

    ``progress`` is an optional callable receiving the number of tokens done.
    """
    n = int(np.asarray(ids).shape[0])
    return EvalResult(nll=pieces_nll(model, ids, eos_id, batch_size, bptt, progress=progress),
                      tokens=n)


def evaluate_file(model_path, text_path, *, batch_size: int = 1, device: str = "cpu",
                  progress: bool = True) -> dict:
    """``slimnp evaluate``: the exact perplexity of a model file on a text
    file, with the OOV rate and the speed (a dict, as ``--json`` prints it)."""
    import time

    from .modelfile import load_model
    from .progress import Progress

    m, vocab, _ = load_model(model_path, device=device)
    t0 = time.perf_counter()
    enc = vocab.encode_file(text_path)
    prog = Progress(enc.n_tokens, "evaluate", enabled=progress)
    res = evaluate_ids(m, enc.ids, vocab.eos_id, batch_size=batch_size,
                       progress=lambda done: prog.update(done, f"{done:,} tokens"))
    prog.close()
    secs = time.perf_counter() - t0
    return {"model": str(model_path), "file": str(text_path), "perplexity": res.perplexity,
            "loss": res.loss, "tokens": res.tokens, "oov": enc.n_oov, "oov_rate": enc.oov_rate,
            "batch_size": batch_size, "seconds": secs, "tokens_per_s": res.tokens / max(secs, 1e-9)}
