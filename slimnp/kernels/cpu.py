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
from numba import types as nbtypes
from numba.extending import overload

# error_model="numpy": float division follows IEEE (inf/nan), without the
# Python ZeroDivisionError check that costs ~20 ns per division in a loop.
_JIT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy")

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


# 2**n for n in [-127, 127], float32: the exponent step of _exp32 as a table
# lookup (a plain load that the vectoriser can turn into a gather).
_POW2_F32 = np.ldexp(np.float32(1), np.arange(-127, 128)).astype(np.float32)
_F32 = np.float32


@nb.njit(inline="always", fastmath={"contract", "afn"})
def _exp32(x):
    """exp(x) in float32 without a libm call, so loops over it vectorise.

    Cephes-style: x = n ln2 + r with |r| <= ln2/2 (ln2 split in a high part
    exact in float32 and a low correction), a degree-7 polynomial for e^r,
    then the exact scale 2^n.  Relative error about 1e-7 (float32 epsilon);
    arguments are clamped to [-87, 88], where float32 exp under/overflows.
    """
    x = min(max(x, _F32(-87.0)), _F32(88.0))
    n = math.floor(x * _F32(1.4426950408889634) + _F32(0.5))
    r = x - n * _F32(0.693359375) - n * _F32(-2.12194440e-4)
    p = _F32(1.9875691500e-4)
    p = p * r + _F32(1.3981999507e-3)
    p = p * r + _F32(8.3334519073e-3)
    p = p * r + _F32(4.1665795894e-2)
    p = p * r + _F32(1.6666665459e-1)
    p = p * r + _F32(5.0000001201e-1)
    p = p * r * r + r + _F32(1.0)
    return p * _POW2_F32[np.int32(n) + 127]


def _sig(x):  # pragma: no cover - jitted code uses the overload below
    return 1.0 / (1.0 + math.exp(-x))


def _tanh(x):  # pragma: no cover - jitted code uses the overload below
    return 2.0 / (1.0 + math.exp(-2.0 * x)) - 1.0


# Typed by the argument: float32 kernels get the vectorisable exp and float32
# constants (a float64 or integer literal would promote the whole expression
# to float64); float64 (gradient checks) keeps libm's correctly rounded exp.
@overload(_sig, jit_options={"error_model": "numpy"})
def _sig_overload(x):
    if x == nbtypes.float32:
        # for very negative x, e^-x saturates and 1/(1+huge) -> 0
        return lambda x: _F32(1.0) / (_F32(1.0) + _exp32(-x))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@overload(_tanh, jit_options={"error_model": "numpy"})
def _tanh_overload(x):
    # tanh(x) = 2 / (1 + e^-2x) - 1: an exp instead of libm's slow tanh;
    # absolute error at the dtype's epsilon, limits -1 and +1.
    if x == nbtypes.float32:
        return lambda x: _F32(2.0) / (_F32(1.0) + _exp32(_F32(-2.0) * x)) - _F32(1.0)
    return lambda x: 2.0 / (1.0 + math.exp(-2.0 * x)) - 1.0


@nb.njit(**_JIT)
def lstm_pointwise_forward(xg, hg, c_prev, act, c, h, tc):
    B, H = c_prev.shape
    for b in range(B):
        # gates as flat contiguous runs (simple loops the compiler vectorises):
        # columns [0, 3H) are the sigmoid gates i, f, o; [3H, 4H) is g
        for j in range(3 * H):
            act[b, j] = _sig(xg[b, j] + hg[b, j])
        for j in range(3 * H, 4 * H):
            act[b, j] = _tanh(xg[b, j] + hg[b, j])
        for j in range(H):
            cc = act[b, H + j] * c_prev[b, j] + act[b, j] * act[b, 3 * H + j]
            c[b, j] = cc
        for j in range(H):
            t = _tanh(c[b, j])
            tc[b, j] = t
            h[b, j] = act[b, 2 * H + j] * t


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


def _slim_gather_sum_t_impl(PT, idx_kv, b, has_bias, zT):
    # Word-major layout for few rows (inference, scoring): PT (K, Mk, N),
    # zT (V, N).  For each word and pool, the N partials PT[k, j, :] are
    # contiguous (one or two cache lines), so a V*K walk touches V*K lines
    # instead of the row layout's N*V*K scattered floats, and the inner loop
    # over n vectorises.  Words are independent: prange over w is race-free.
    K, Mk, N = PT.shape
    V = idx_kv.shape[1]
    for w in nb.prange(V):
        zw = zT[w]  # (N,)
        if has_bias:
            for n in range(N):
                zw[n] = b[w]
        else:
            for n in range(N):
                zw[n] = 0.0
        for k in range(K):
            p = PT[k, idx_kv[k, w]]  # (N,)
            for n in range(N):
                zw[n] += p[n]


_slim_gather_sum_t_serial, _slim_gather_sum_t_parallel = _serial_and_parallel(_slim_gather_sum_t_impl)


def slim_gather_sum_t(PT, idx_kv, b, zT):
    K, _, N = PT.shape
    V = idx_kv.shape[1]
    has_bias = b is not None
    if not has_bias:
        b = np.empty(0, PT.dtype)
    kernel = _slim_gather_sum_t_parallel if N * V * K > PARALLEL_MIN_GATHER else _slim_gather_sum_t_serial
    kernel(PT, idx_kv, b, has_bias, zT)
