"""Numba CPU kernels.  Same contracts as ``kernels/reference.py``.

Explicit loops with scalar accumulators; the outer loop over rows is a
``prange`` where rows are independent (no two iterations write the same
memory), so the parallel variants are race-free.  Compiled lazily on first
call and cached on disk (``cache=True``).
"""
from __future__ import annotations

import math
import types

import numba as nb
import numpy as np

_JIT = dict(nogil=True, cache=True, fastmath=False)

# Work (inner-loop iterations) above which a kernel runs its ``parallel=True``
# variant; below it waking the thread pool costs more than it saves.  Measured
# serially: ~1.5-2 ns per gathered term, ~0.3-0.4 ns per scattered element, so
# 10^6 terms is 0.3-2 ms of work; a parallel launch costs tens of microseconds
# on an idle machine and up to a scheduler slice (~8-24 ms seen) when the
# cores are already busy.  Module globals, read at each call: tests and
# benchmarks may override them.
PARALLEL_MIN_GATHER = 1_000_000  # N * V * K for the slim gather / segment sums
PARALLEL_MIN_SCATTER = 1_000_000  # N * D for embedding_scatter_add


def _serial_and_parallel(impl):
    """Compile one plain function twice: ``(serial, parallel)`` dispatchers.

    Each copy gets its own ``__qualname__``: Numba's on-disk cache names its
    files by qualname and line and keys entries by signature and bytecode, not
    by compile flags, so two dispatchers of one function object would load
    each other's cached machine code (a serial kernel served as the parallel
    one, or the reverse).
    """
    out = []
    for suffix, extra in (("_serial", {}), ("_parallel", {"parallel": True})):
        fn = types.FunctionType(impl.__code__, impl.__globals__, impl.__name__ + suffix,
                                impl.__defaults__, impl.__closure__)
        fn.__qualname__ = impl.__qualname__ + suffix
        fn.__doc__ = impl.__doc__
        out.append(nb.njit(**extra, **_JIT)(fn))
    return tuple(out)


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
def _embedding_scatter_add_serial(dW, ids, dX):
    # Serial over n: repeated ids accumulate in input order, exactly like
    # the reference's np.add.at.  D is the contiguous inner loop.
    N, D = dX.shape
    for n in range(N):
        r = ids[n]
        for d in range(D):
            dW[r, d] += dX[n, d]


@nb.njit(parallel=True, **_JIT)
def _embedding_scatter_add_parallel(dW, ids, dX):
    # Race-free parallel scatter: group the N entries by target row with a
    # stable counting sort (CSR layout), then give each distinct row to one
    # thread.  Within a row the entries are summed in input order, so every
    # element of dW sees exactly the additions of the serial kernel in the
    # same order: the two paths agree bit for bit.
    N, D = dX.shape
    V = dW.shape[0]
    # offsets[r] .. offsets[r+1]: the slice of `order` holding row r's entries
    offsets = np.zeros(V + 1, np.int64)  # (V+1,)
    for n in range(N):
        offsets[ids[n] + 1] += 1
    n_rows = 0  # distinct rows touched
    for r in range(V):
        if offsets[r + 1] > 0:
            n_rows += 1
        offsets[r + 1] += offsets[r]
    order = np.empty(N, np.int64)  # (N,) entry numbers grouped by row
    fill = offsets[:V].copy()  # (V,) next free slot of each row
    for n in range(N):  # ascending n: stable, keeps input order per row
        r = ids[n]
        order[fill[r]] = n
        fill[r] += 1
    rows = np.empty(n_rows, np.int64)  # (n_rows,) the distinct rows, ascending
    i = 0
    for r in range(V):
        if offsets[r + 1] > offsets[r]:
            rows[i] = r
            i += 1
    # each iteration owns row rows[i] of dW: no two threads write one row
    for i in nb.prange(n_rows):
        r = rows[i]
        for e in range(offsets[r], offsets[r + 1]):
            n = order[e]
            for d in range(D):
                dW[r, d] += dX[n, d]


def embedding_scatter_add(dW, ids, dX):
    N, D = dX.shape
    if N * D > PARALLEL_MIN_SCATTER:
        _embedding_scatter_add_parallel(dW, ids, dX)
    else:
        _embedding_scatter_add_serial(dW, ids, dX)


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


_softmax_xent_rows_serial, _softmax_xent_rows = _serial_and_parallel(_softmax_xent_rows_impl)


def softmax_xent(logits, targets, scale, compute_grad=True):
    nll = np.empty(logits.shape[0], dtype=np.float64)
    N, V = logits.shape
    # small calls (evaluation with B=1, tests) do not wake the thread pool
    kernel = _softmax_xent_rows if N * V >= PARALLEL_MIN_GATHER else _softmax_xent_rows_serial
    kernel(logits, targets, float(scale), bool(compute_grad), nll)
    return nll


# ---------------------------------------------------------------------------
# Slim output layer, step 2 of Algorithm 1 (Li et al. 2018); the notation and
# the meaning of P and idx_kv are in reference.py above slim_gather_sum.
# ---------------------------------------------------------------------------


def _slim_gather_sum_impl(P, idx_kv, b, has_bias, z):
    # P (K, N, Mk), idx_kv (K, V), b (V,) [read only if has_bias], z (N, V).
    # Rows n are independent, so prange over n is race-free.  Per row: pool k
    # outer, word w inner.  The row P[k, n, :] is Mk floats (0.4-4 kB) and
    # stays in L1 while idx_kv[k, :] and z[n, :] stream contiguously.
    # Accumulation order per entry (bias, k = 0, 1, ...) matches the reference.
    K, N, Mk = P.shape
    V = idx_kv.shape[1]
    for n in nb.prange(N):
        zn = z[n]  # (V,)
        if has_bias:
            for w in range(V):
                zn[w] = b[w]
        else:
            for w in range(V):
                zn[w] = 0.0
        for k in range(K):
            pkn = P[k, n]  # (Mk,)
            ik = idx_kv[k]  # (V,)
            for w in range(V):
                zn[w] += pkn[ik[w]]


_slim_gather_sum_serial, _slim_gather_sum_parallel = _serial_and_parallel(_slim_gather_sum_impl)


def slim_gather_sum(P, idx_kv, b, z):
    K, N, _ = P.shape
    V = idx_kv.shape[1]
    has_bias = b is not None
    if not has_bias:  # one compiled signature: pass a dummy array, never read
        b = np.empty(0, P.dtype)
    kernel = _slim_gather_sum_parallel if N * V * K > PARALLEL_MIN_GATHER else _slim_gather_sum_serial
    kernel(P, idx_kv, b, has_bias, z)


def _slim_segment_sum_impl(dz, idx_kv, G):
    # dz (N, V), idx_kv (K, V), G (K, N, Mk) zero-filled here.
    # The adjoint of the gather: each logit gradient dz[n, w] goes back to the
    # K partial products it was summed from.  Iteration n writes only
    # G[:, n, :], so prange over n is race-free; the scattered row G[k, n, :]
    # (Mk floats) stays in L1 while dz[n, :] and idx_kv[k, :] stream.
    K, N, Mk = G.shape
    V = dz.shape[1]
    for n in nb.prange(N):
        dzn = dz[n]  # (V,)
        for k in range(K):
            gkn = G[k, n]  # (Mk,)
            for j in range(Mk):
                gkn[j] = 0.0
            ik = idx_kv[k]  # (V,)
            for w in range(V):  # ascending w: same order as the reference
                gkn[ik[w]] += dzn[w]


_slim_segment_sum_serial, _slim_segment_sum_parallel = _serial_and_parallel(_slim_segment_sum_impl)


def slim_segment_sum(dz, idx_kv, G):
    K, N, _ = G.shape
    V = dz.shape[1]
    kernel = _slim_segment_sum_parallel if N * V * K > PARALLEL_MIN_GATHER else _slim_segment_sum_serial
    kernel(dz, idx_kv, G)
