"""Numba CPU kernels.  Same contracts as ``kernels/reference.py``.

Explicit loops with scalar accumulators; the outer loop over rows is a
``prange`` where rows are independent (no two iterations write the same
memory), so the parallel variants are race-free.  Compiled lazily on first
call and cached on disk (``cache=True``).
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

_JIT = dict(nogil=True, cache=True, fastmath=False)


@nb.njit(inline="always")
def _sig(x):
    # exp(-x) overflows to inf for x < -88 (float32): 1/(1+inf) = 0, the limit.
    return 1.0 / (1.0 + math.exp(-x))


@nb.njit(inline="always")
def _tanh(x):
    # tanh via exp: libm's tanh costs ~30 ns here, exp ~5 ns.  Absolute error
    # stays at the dtype's epsilon; both overflow limits give -1 and +1.
    return 2.0 / (1.0 + math.exp(-2.0 * x)) - 1.0


@nb.njit(**_JIT)
def lstm_pointwise_forward(xg, hg, c_prev, act, c, h, tc):
    B, H = c_prev.shape
    for b in nb.prange(B):
        for j in range(H):
            # gate pre-activations for unit j: columns j, H+j, 2H+j, 3H+j
            i = _sig(xg[b, j] + hg[b, j])
            f = _sig(xg[b, H + j] + hg[b, H + j])
            o = _sig(xg[b, 2 * H + j] + hg[b, 2 * H + j])
            g = _tanh(xg[b, 3 * H + j] + hg[b, 3 * H + j])
            act[b, j] = i
            act[b, H + j] = f
            act[b, 2 * H + j] = o
            act[b, 3 * H + j] = g
            cc = f * c_prev[b, j] + i * g
            t = _tanh(cc)
            c[b, j] = cc
            tc[b, j] = t
            h[b, j] = o * t


@nb.njit(**_JIT)
def lstm_pointwise_backward(act, c_prev, tc, dh, dc, dgates):
    B, H = c_prev.shape
    for b in nb.prange(B):
        for j in range(H):
            i = act[b, j]
            f = act[b, H + j]
            o = act[b, 2 * H + j]
            g = act[b, 3 * H + j]
            t = tc[b, j]
            dhj = dh[b, j]
            dct = dc[b, j] + dhj * o * (1 - t * t)
            dgates[b, j] = dct * g * i * (1 - i)
            dgates[b, H + j] = dct * c_prev[b, j] * f * (1 - f)
            dgates[b, 2 * H + j] = dhj * t * o * (1 - o)
            dgates[b, 3 * H + j] = dct * i * (1 - g * g)
            dc[b, j] = dct * f


@nb.njit(**_JIT)
def embedding_scatter_add(dW, ids, dX):
    # Serial over n: repeated ids accumulate in input order, exactly like
    # the reference's np.add.at.  D is the contiguous inner loop.
    N, D = dX.shape
    for n in range(N):
        r = ids[n]
        for d in range(D):
            dW[r, d] += dX[n, d]


def _softmax_xent_rows_impl(logits, targets, scale, compute_grad, nll):
    N, V = logits.shape
    for n in nb.prange(N):
        row = logits[n]
        m = row[0]
        for v in range(1, V):
            if row[v] > m:
                m = row[v]
        t = targets[n]
        zt = row[t]
        s = 0.0  # float64 accumulator: V can be 10^5..10^6 terms
        if compute_grad:
            # one exp per entry: keep exp(z - m) in place, rescale below
            for v in range(V):
                e = math.exp(row[v] - m)
                row[v] = e
                s += e
            k = scale / s
            for v in range(V):
                row[v] *= k
            row[t] -= scale
        else:
            for v in range(V):
                s += math.exp(row[v] - m)
        nll[n] = math.log(s) + m - zt


_softmax_xent_rows = nb.njit(parallel=True, **_JIT)(_softmax_xent_rows_impl)
_softmax_xent_rows_serial = nb.njit(**_JIT)(_softmax_xent_rows_impl)


def softmax_xent(logits, targets, scale, compute_grad=True):
    nll = np.empty(logits.shape[0], dtype=np.float64)
    _softmax_xent_rows(logits, targets, float(scale), bool(compute_grad), nll)
    return nll
