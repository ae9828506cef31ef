"""NumPy reference kernels: the specification of every kernel in slimnp.

Each function here is the readable, array-at-a-time statement of a kernel's
contract.  ``kernels/cpu.py`` (Numba) and ``kernels/gpu.py`` (CUDA C through
CuPy) implement the same signatures, dtypes and in-place rules; the
dispatcher in ``kernels/__init__.py`` validates the arguments once and picks
an implementation.  Tests compare them with these on random inputs.  All functions are written against ``xp`` (the array module of their
inputs) so they also serve as the CuPy fallback.

LSTM gate layout (one fused ``(B, 4H)`` row per example)::

    [ i | f | o | g ]      i, f, o: sigmoid gates; g: tanh candidate
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module


def _sigmoid(xp, x, out):
    # 1 / (1 + exp(-x)): for very negative x, exp(-x) overflows to inf and
    # 1 / (1 + inf) = 0, which is the right limit, so the warning is noise.
    with np.errstate(over="ignore"):
        xp.negative(x, out=out)
        xp.exp(out, out=out)
        out += 1
        xp.reciprocal(out, out=out)
    return out


def lstm_pointwise_forward(xg, hg, c_prev, act, c, h, tc):
    """Gate nonlinearities and cell update for one time step.

    Parameters
    ----------
    xg : (B, 4H)  input projection of this step, bias included (``x_t Wx + b``)
    hg : (B, 4H)  recurrent projection (``h_{t-1} Wh``)
    c_prev : (B, H)  previous cell state
    act : (B, 4H)  out: activated gates ``[i f o g]``; may alias ``xg``
    c, h, tc : (B, H)  out: new cell, new hidden, ``tanh(c)``

    Returns nothing; writes ``act``, ``c``, ``h``, ``tc``.
    """
    xp = array_module(xg)
    H = c_prev.shape[1]
    xp.add(xg, hg, out=act)
    _sigmoid(xp, act[:, : 3 * H], act[:, : 3 * H])
    xp.tanh(act[:, 3 * H :], out=act[:, 3 * H :])
    i, f, o, g = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
    xp.multiply(f, c_prev, out=c)
    c += i * g
    xp.tanh(c, out=tc)
    xp.multiply(o, tc, out=h)


def lstm_pointwise_backward(act, c_prev, tc, dh, dc, dgates):
    """Backward of :func:`lstm_pointwise_forward` for one step.

    Parameters
    ----------
    act : (B, 4H)  activated gates saved by the forward
    c_prev : (B, H)  cell state entering the step
    tc : (B, H)  ``tanh(c_t)`` saved by the forward
    dh : (B, H)  total gradient w.r.t. ``h_t`` (from above and from ``t+1``)
    dc : (B, H)  in: gradient w.r.t. ``c_t`` from ``t+1``;
                 out: gradient w.r.t. ``c_{t-1}`` (updated in place)
    dgates : (B, 4H)  out: gradient w.r.t. the gate pre-activations
    """
    H = c_prev.shape[1]
    i, f, o, g = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
    # h = o * tc  ->  do = dh * tc ; dc += dh * o * (1 - tc^2)
    dct = dc + dh * o * (1 - tc * tc)
    di = dct * g
    df = dct * c_prev
    do = dh * tc
    dg = dct * i
    # through the nonlinearities: sigmoid' = s(1-s), tanh' = 1 - t^2
    dgates[:, :H] = di * i * (1 - i)
    dgates[:, H : 2 * H] = df * f * (1 - f)
    dgates[:, 2 * H : 3 * H] = do * o * (1 - o)
    dgates[:, 3 * H :] = dg * (1 - g * g)
    dc[...] = dct * f


def embedding_scatter_add(dW, ids, dX):
    """``dW[ids[n]] += dX[n]`` for every n, repeated ids accumulating.

    dW : (V, D) gradient table, updated in place
    ids : (N,) int32 row ids in ``[0, V)``
    dX : (N, D) gradients of the gathered rows
    """
    xp = array_module(dW)
    xp.add.at(dW, ids, dX)


def softmax_xent(logits, targets, scale, compute_grad=True, bias=None):
    """Fused log-softmax + cross-entropy (+ gradient), row by row.

    Parameters
    ----------
    logits : (N, V) float, scratch: ``bias`` (if given) is added to it in
        place first; if ``compute_grad`` it is then overwritten with
        ``scale * (softmax(logits) - onehot(targets))``, otherwise its
        contents afterwards are unspecified
    targets : (N,) int32 in ``[0, V)``
    scale : float multiplier of the gradient (e.g. ``1/B``)
    bias : (V,) or None, added to every row

    Returns
    -------
    nll : (N,) float64  ``logsumexp(logits[n]) - logits[n, targets[n]]``
    (NaN for a row holding a NaN or an infinity)
    """
    xp = array_module(logits)
    if bias is not None:
        logits += bias
    N = logits.shape[0]
    rows = xp.arange(N)
    m = logits.max(axis=1, keepdims=True)
    e = xp.exp(logits - m)
    s = e.sum(axis=1, keepdims=True)
    lse = (xp.log(s) + m)[:, 0]
    nll = (lse - logits[rows, targets]).astype(xp.float64)
    if compute_grad:
        xp.multiply(e, (scale / s).astype(logits.dtype), out=logits)
        logits[rows, targets] -= logits.dtype.type(scale)
    return nll



def nce_xent(zt, logq_t, ZS, logq_s, scale, compute_grad=True):
    """NCE's logistic loss (+ gradient) over each row's target and S noise words.

    With ``Delta = score - log(S q)`` (Mnih & Teh 2012; scores stand for
    self-normalised log-probabilities), the target is labelled 1 and the
    noise words 0::

        nll[n] = softplus(-(zt[n] - logq_t[n])) + sum_s softplus(ZS[n, s] - logq_s[s])

    Parameters
    ----------
    zt : (N,) float  target scores (bias included)
    logq_t : (N,) same dtype  ``log(S q(target))``
    ZS : (N, S) same dtype, scratch  noise-word scores (bias included); with
        ``compute_grad`` overwritten by ``scale * sigmoid(ZS - logq_s)``,
        the gradient of ``scale * sum(nll)`` with respect to them
    logq_s : (S,) same dtype  ``log(S q(noise word))``
    scale : float multiplier of the gradients

    Returns
    -------
    ``(nll (N,) float64, dzt (N,) or None)``, ``dzt = scale * (sigmoid(zt -
    logq_t) - 1)`` with ``compute_grad``.  A row holding a NaN or an infinity
    gets a NaN loss.
    """
    xp = array_module(ZS)
    dT = zt - logq_t
    dS = ZS - logq_s
    finite = xp.isfinite(dT) & xp.isfinite(dS).all(axis=1)
    with np.errstate(invalid="ignore"):
        nll = xp.logaddexp(0, -dT).astype(xp.float64) + xp.logaddexp(0, dS).astype(xp.float64).sum(axis=1)
    nll[~finite] = xp.nan
    if not compute_grad:
        return nll, None
    dzt = _sigmoid(xp, dT, xp.empty_like(dT))
    dzt -= 1
    dzt *= ZS.dtype.type(scale)
    _sigmoid(xp, dS, ZS)
    ZS *= ZS.dtype.type(scale)
    return nll, dzt

# ---------------------------------------------------------------------------
# Slim output layer (Li et al., "Slim Embedding Layers for Recurrent Neural
# Language Models", AAAI 2018, Algorithm 1), in the word-major layout that
# every caller uses.  The notation (PT, idx_kv, zT) and the dynamic programme
# are written out once, at the top of the slim output layer in
# slimnp/layers.py.
# ---------------------------------------------------------------------------


def slim_gather_sum_t(PT, idx_kv, b, zT):
    """Output logits of the slim layer from the partial products (Algorithm 1, step 2).

    ``zT[w, n] = b[w] + sum_k PT[k, idx_kv[k, w], n]``

    Parameters
    ----------
    PT : (K, Mk, N) float  ``PT[k, j, n] = A[k, j] . h_k[n]``
    idx_kv : (K, V) int32  in ``[0, Mk)``
    b : (V,) float or None  output bias
    zT : (V, N) float  out, overwritten (the logits, one column per row of h)

    The sum runs bias first, then k = 0, 1, ..., K-1; the compiled kernels
    add in the same order (additions only), so they give the same bits.
    """
    xp = array_module(PT)
    if b is None:
        zT[...] = 0
    else:
        zT[...] = b[:, None]
    for k in range(PT.shape[0]):
        zT += xp.take(PT[k], idx_kv[k], axis=0)  # rows of (Mk, N) -> (V, N)


def softmax_xent_t(zT, targets, scale, compute_grad=True, bias=None):
    """:func:`softmax_xent` in the word-major layout: column n of ``zT (V, N)``
    holds row n's logits; ``bias (V,)`` is added down the columns.  The same
    contract otherwise (``zT`` becomes the transposed gradient)."""
    xp = array_module(zT)
    if bias is not None:
        zT += bias[:, None]
    z = xp.ascontiguousarray(zT.T)
    nll = softmax_xent(z, targets, scale, compute_grad)
    if compute_grad:
        zT[...] = z.T
    return nll


def log_softmax_t(zT, bias=None):
    """Column log-softmax in place: ``zT (V, N)`` (+ ``bias (V,)`` down the
    columns) becomes ``log p``; returns each column's logsumexp ``(N,)``
    float64 (the normaliser: scoring and sampling need it, and the top-k)."""
    xp = array_module(zT)
    if bias is not None:
        zT += bias[:, None]
    m = zT.max(axis=0)
    lse = xp.log(xp.exp((zT - m).astype(xp.float64)).sum(axis=0)) + m
    zT -= lse.astype(zT.dtype)
    return lse


def slim_segment_sum_t(dzT, idx_kv, GT, inv=None, db=None):
    """Backward of :func:`slim_gather_sum_t` with respect to ``PT``.

    ``GT[k, j, n] = sum over w with idx_kv[k, w] == j of dzT[w, n]``

    Parameters
    ----------
    dzT : (V, N) float  gradient of the loss w.r.t. the logits ``zT``
    idx_kv : (K, V) int32  in ``[0, Mk)``
    GT : (K, Mk, N) float  out, overwritten (entries no word uses become 0)
    inv : (K, F, Mk) int or None  the same table inverted
        (:func:`slimnp.mapping.inverse_table`, for tables where each entry
        has F words): fast kernels may use it, the result is the same
    db : (V,) float or None  if given, overwritten with the bias gradient
        ``dzT.sum(axis=1)``
    """
    xp = array_module(dzT)
    K, Mk, N = GT.shape
    for k in range(K):
        GT[k] = 0
        xp.add.at(GT[k], idx_kv[k], dzT)
    if db is not None:
        db[...] = dzT.sum(axis=1)


# ---------------------------------------------------------------------------
# Optimizer passes over flat buffers (and over listed rows of a 2-d view).
# ---------------------------------------------------------------------------
def sumsq(x):
    """``sum(x**2)`` accumulated in float64, as a Python float."""
    xp = array_module(x)
    return float(xp.sum(xp.square(x.astype(xp.float64))))


def axpy(y, a, x):
    """``y += a * x`` in place (``a`` a scalar)."""
    y += y.dtype.type(a) * x


def sumsq_rows(x, rows):
    """:func:`sumsq` of rows ``rows`` (distinct) of the 2-d ``x``."""
    return sumsq(x[rows])


def axpy_rows(y, a, x, rows):
    """``y[rows] += a * x[rows]`` for distinct ``rows`` of 2-d ``y``, ``x``."""
    y[rows] += y.dtype.type(a) * x[rows]


def adagrad_update(p, acc, g, a, lr, eps, rows=None):
    """One Adagrad step (Duchi et al. 2011) in place, the clip factor ``a``
    applied to the gradient on the fly::

        acc += (a g)^2;   p -= lr (a g) / (sqrt(acc) + eps)

    Parameters
    ----------
    p, acc, g : arrays of one float dtype and shape (parameters, accumulator,
        gradient); ``p`` and ``acc`` are updated in place
    a, lr, eps : scalars, applied in the arrays' dtype
    rows : None (every element) or (R,) distinct ints: only those rows of
        the 2-d arrays are read and written
    """
    xp, dt = array_module(p), p.dtype.type
    if rows is None:
        gc = g * dt(a)
        acc += gc * gc
        p -= dt(lr) * gc / (xp.sqrt(acc) + dt(eps))
        return
    gc = g[rows] * dt(a)
    ar = acc[rows]
    ar += gc * gc
    acc[rows] = ar
    p[rows] -= dt(lr) * gc / (xp.sqrt(ar) + dt(eps))


# ---------------------------------------------------------------------------
# k-means: the nearest centroid of each row (slimnp.compress)
# ---------------------------------------------------------------------------
def nearest_centroid(scores, c_sq, labels, d2):
    """Given ``scores[i, j] = x_i . c_j`` (b, k) and ``c_sq[j] = |c_j|^2``,
    write ``labels[i] = argmin_j (c_sq[j] - 2 scores[i, j])`` (the first on
    ties) and ``d2[i]`` that minimum (float64; add ``|x_i|^2`` for the
    squared distance)."""
    xp = array_module(scores)
    t = c_sq[None, :].astype(xp.float64) - 2.0 * scores.astype(xp.float64)
    labels[...] = xp.argmin(t, axis=1)
    d2[...] = t[xp.arange(t.shape[0]), labels]


def cluster_sums(X, labels, sums):
    """k-means' update step: ``sums[c] = sum of the rows X[i] with labels[i]
    == c`` (k, d) float64, overwritten, each cluster's rows added in
    ascending i (np.add.at's order)."""
    xp = array_module(X)
    sums[...] = 0
    xp.add.at(sums, labels, X.astype(xp.float64))


def nearest_lists(scores, q_sq, out):
    """Given ``scores[i, j] = x_i . q_j`` (b, L) and ``q_sq[j] = |q_j|^2``,
    write ``out[i]`` (b, n) int32: the n indices j with the smallest
    ``q_sq[j] - 2 scores[i, j]`` (computed in float64), smallest first, the
    lower j first on ties -- the lists an inverted-file search probes."""
    xp = array_module(scores)
    t = q_sq[None, :].astype(xp.float64) - 2.0 * scores.astype(xp.float64)
    out[...] = xp.argsort(t, axis=1, kind="stable")[:, : out.shape[1]]
