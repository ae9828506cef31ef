"""Layers: pure forward/backward pairs underneath, small layer objects on top.

Notation (Zaremba et al. 2014, which the slim-embeddings paper follows):
``T`` time steps of a BPTT segment, ``B`` parallel streams, ``D`` input size,
``H`` hidden size, ``V`` vocabulary.  Sequences are time-major: ``(T, B, ...)``.

The pure functions (``lstm_forward`` / ``lstm_backward_gates``, ...) keep
exactly what their backward needs and return gradients; the layer objects own
views into the model's flat parameter and gradient buffers
(:class:`ParamStore`) and *accumulate* into the gradient views, so one buffer
holds every gradient of a step (one norm for clipping, one allreduce for data
parallelism).  Each layer has one forward and one backward, which training,
the pipeline over layers (:mod:`slimnp.threaded_lstm`), evaluation and the
gradient checks all run.

The layers' storage, :class:`~slimnp.buffers.ParamStore` (the flat
buffers) and :class:`~slimnp.buffers.Workspace` (scratch arrays kept across
steps), is in :mod:`slimnp.buffers`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .backend import array_module
from .buffers import ParamStore, Workspace
from .mapping import inverse_table


# ----------------------------------------------------------------------------
# Dropout (inverted: scale at training time so evaluation is the identity)
# ----------------------------------------------------------------------------
def dropout_mask(rng, shape, p, dtype=np.float32, xp=np):
    """A ``{0, 1/(1-p)}`` mask drawn from the host generator ``rng``."""
    keep = rng.random(shape, dtype=np.float32) >= p
    return xp.asarray(keep.astype(dtype) * dtype(1.0 / (1.0 - p)))


# ----------------------------------------------------------------------------
# LSTM
#
# Notation: at time step t of a segment (t = 0 .. T-1), with gates [i f o g]
# as in slimnp.kernels.reference,
#
#     G_t = x_t Wx + b + h_{t-1} Wh        (B, 4H) pre-activations
#     c_t = f c_{t-1} + i g,   h_t = o tanh(c_t)
#
# The forward and the backward time loops below are the only ones in slimnp:
# the sequential path runs them over the whole segment (t0, t1) = (0, T),
# the pipeline over layers (slimnp.threaded_lstm) over time chunks of it.
# ----------------------------------------------------------------------------
@dataclass
class LSTMCache:
    """What one layer's backward needs of its forward over a segment."""

    x: object  # (T, B, D) inputs
    gates: object  # (T, B, 4H) input projections x_t Wx + b, then (in place) the activated gates [i f o g]
    hs: object  # (T+1, B, H) hs[0] = h0, hs[t+1] = h_t
    cs: object  # (T+1, B, H) cs[0] = c0
    tcs: object  # (T, B, H) tanh(c_t)


def lstm_cache(x, h0, c0, dtype) -> LSTMCache:
    """Buffers (of the weights' ``dtype``) for one layer's forward over the
    segment ``x : (T, B, D)``, starting from the state ``h0, c0 : (B, H)``."""
    xp = array_module(x)
    T, B, _ = x.shape
    H = h0.shape[1]
    dt = dtype
    hs = xp.empty((T + 1, B, H), dtype=dt)
    cs = xp.empty((T + 1, B, H), dtype=dt)
    hs[0] = h0
    cs[0] = c0
    return LSTMCache(x=x, gates=xp.empty((T, B, 4 * H), dtype=dt), hs=hs, cs=cs,
                     tcs=xp.empty((T, B, H), dtype=dt))


def lstm_forward_steps(cache: LSTMCache, Wx, Wh, b, t0: int, t1: int, hg, step) -> None:
    """Forward through time steps ``t0 .. t1-1`` (the forward time loop).

    The input projections of the steps in one GEMM, ``gates[t0:t1] =
    x[t0:t1] Wx + b``; then, step by step, ``h_{t-1} Wh`` into the reused
    buffer ``hg`` ``(B, 4H)`` and the pointwise kernel ``step``
    (:func:`slimnp.kernels.lstm_segment_kernels`), which adds the two,
    writes the activated gates over ``gates[t]`` and ``c_t``, ``h_t``,
    ``tanh(c_t)`` into the cache.  Needs ``hs[t0], cs[t0]`` (the state
    entering step t0).
    """
    xp = array_module(cache.gates)
    gates, hs, cs, tcs = cache.gates, cache.hs, cache.cs, cache.tcs
    H4, D = gates.shape[2], cache.x.shape[2]
    xp.matmul(cache.x[t0:t1].reshape(-1, D), Wx, out=gates[t0:t1].reshape(-1, H4))
    gates[t0:t1] += b
    for t in range(t0, t1):
        xp.matmul(hs[t], Wh, out=hg)  # (B, 4H): the recurrent part of G_t
        step(gates[t], hg, cs[t], gates[t], cs[t + 1], hs[t + 1], tcs[t])


def lstm_backward_steps(dh_seq, cache: LSTMCache, WhT, t0: int, t1: int, dh_next, dc, dh, dgates,
                        step) -> None:
    """BPTT through time steps ``t1-1`` down to ``t0`` (the backward time loop).

    dh_seq : (T, B, H) gradient w.r.t. each output ``h_t`` from above;
    WhT : (4H, H) ``Wh`` transposed, C-contiguous (a row-major operand runs
    faster at small B); dh_next, dc : (B, H) in: the gradients w.r.t.
    ``h_{t1-1}`` from step t1 and w.r.t. ``c_{t1-1}``; out (in place): those
    w.r.t. ``h_{t0-1}`` and ``c_{t0-1}``; dh : (B, H) scratch; dgates : (T,
    B, 4H) out: rows t0 .. t1-1 get the gradients w.r.t. the pre-activations
    ``G_t``.
    """
    xp = array_module(dgates)
    gates, cs, tcs = cache.gates, cache.cs, cache.tcs
    for t in range(t1 - 1, t0 - 1, -1):
        # total gradient into h_t: from the layer above and from step t+1
        xp.add(dh_seq[t], dh_next, out=dh)
        # dgates[t] and (in place) dc: dc_t -> dc_{t-1}
        step(gates[t], cs[t], tcs[t], dh, dc, dgates[t])
        # undo "+ h_{t-1} Wh": the gradient flowing into h_{t-1}
        xp.matmul(dgates[t], WhT, out=dh_next)


def lstm_forward(x, h0, c0, Wx, Wh, b):
    """Run one LSTM layer over a segment (see the notation above).

    Parameters
    ----------
    x : (T, B, D);  h0, c0 : (B, H);  Wx : (D, 4H);  Wh : (H, 4H);  b : (4H,)

    Returns
    -------
    h_seq : (T, B, H) (a view of the cache), ``(hT, cT)``, cache
    """
    xp = array_module(x)
    T, B, _ = x.shape
    cache = lstm_cache(x, h0, c0, Wx.dtype)
    step, _ = kernels.lstm_segment_kernels(cache.gates, cache.cs)  # checked once, not T times
    hg = xp.empty((B, Wh.shape[1]), dtype=Wh.dtype)
    lstm_forward_steps(cache, Wx, Wh, b, 0, T, hg, step)
    return cache.hs[1:], (cache.hs[T], cache.cs[T]), cache


def lstm_backward_gates(dh_seq, cache: LSTMCache, Wh, dhT=None, dcT=None):
    """BPTT through one segment down to the pre-activation gates.

    Parameters
    ----------
    dh_seq : (T, B, H) gradient w.r.t. every output ``h_t`` (from above)
    dhT, dcT : (B, H) or None, gradient w.r.t. the final state (from the
        next segment; None means zero, i.e. truncated BPTT)

    Returns
    -------
    dgates : (T, B, 4H) gradient w.r.t. the gate pre-activations, dh0, dc0 : (B, H)
    """
    xp = array_module(dh_seq)
    T, B, H = dh_seq.shape
    dt = cache.gates.dtype
    dgates = xp.empty((T, B, 4 * H), dtype=dt)
    dh_next = xp.zeros((B, H), dtype=dt) if dhT is None else dhT.astype(dt, copy=True)
    dc = xp.zeros((B, H), dtype=dt) if dcT is None else dcT.astype(dt, copy=True)
    _, step = kernels.lstm_segment_kernels(cache.gates, cache.cs)
    lstm_backward_steps(dh_seq, cache, xp.ascontiguousarray(Wh.T), 0, T, dh_next, dc,
                        xp.empty((B, H), dtype=dt), dgates, step)
    return dgates, dh_next, dc


class LSTM:
    """One LSTM layer whose parameters live in a :class:`ParamStore`."""

    def __init__(self, store: ParamStore, name: str, D: int, H: int):
        self.store, self.name, self.D, self.H = store, name, D, H
        store.add(f"{name}/Wx", (D, 4 * H))
        store.add(f"{name}/Wh", (H, 4 * H))
        store.add(f"{name}/b", (4 * H,))

    def weights(self):
        """``(Wx (D, 4H), Wh (H, 4H), b (4H,))``."""
        p, n = self.store.params, self.name
        return p[f"{n}/Wx"], p[f"{n}/Wh"], p[f"{n}/b"]

    def forward(self, x, h0, c0):
        """:func:`lstm_forward` with this layer's weights."""
        return lstm_forward(x, h0, c0, *self.weights())

    def weight_grads(self, cache, dgates) -> None:
        """Accumulate ``dWx, dWh, db`` of a segment from its gate gradients
        ``(T, B, 4H)``: one GEMM each, written straight into the gradient buffer."""
        store, n = self.store, self.name
        T, B, H4 = dgates.shape
        dg2 = dgates.reshape(T * B, H4)
        store.accumulate(f"{n}/Wx", cache.x.reshape(T * B, self.D).T, dg2)
        store.accumulate(f"{n}/Wh", cache.hs[:T].reshape(T * B, self.H).T, dg2)
        store.accumulate(f"{n}/b", column_sums(dg2))

    def backward(self, dh_seq, cache, dhT=None, dcT=None):
        """Accumulate the weight gradients; return ``dx (T, B, D), dh0, dc0 (B, H)``."""
        Wx, Wh, _ = self.weights()
        dgates, dh0, dc0 = lstm_backward_gates(dh_seq, cache, Wh, dhT, dcT)
        self.weight_grads(cache, dgates)
        T, B, H4 = dgates.shape
        dx = (dgates.reshape(T * B, H4) @ Wx.T).reshape(T, B, self.D)
        return dx, dh0, dc0


# ----------------------------------------------------------------------------
# Projection (the PM baseline's E x H and H x E maps; no bias)
# ----------------------------------------------------------------------------
class Projection:
    """A learned linear map ``Y = X W``, ``W: (D_in, D_out)``, over the last axis."""

    def __init__(self, store: ParamStore, name: str, D_in: int, D_out: int):
        self.store, self.name, self.D_in, self.D_out = store, name, D_in, D_out
        store.add(f"{name}/W", (D_in, D_out))

    def forward(self, x):
        """x : (..., D_in) -> (..., D_out)."""
        W = self.store.params[f"{self.name}/W"]
        return (x.reshape(-1, self.D_in) @ W).reshape(*x.shape[:-1], self.D_out)

    def backward(self, x, dy):
        """Accumulate ``dW += X^T dY``; return ``dX = dY W^T`` (..., D_in)."""
        W = self.store.params[f"{self.name}/W"]
        x2, dy2 = x.reshape(-1, self.D_in), dy.reshape(-1, self.D_out)
        self.store.accumulate(f"{self.name}/W", x2.T, dy2)
        return (dy2 @ W.T).reshape(*dy.shape[:-1], self.D_in)


# ----------------------------------------------------------------------------
# Dense embedding
# ----------------------------------------------------------------------------
def embedding_forward(W, ids):
    """``X[t, b] = W[ids[t, b]]``.  W : (V, D), ids : (T, B) int -> (T, B, D)."""
    xp = array_module(W)
    return xp.take(W, ids, axis=0)


def embedding_backward(dW, ids, dX):
    """Accumulate ``dX`` (T, B, D) into rows ``ids`` (T, B) of ``dW`` (V, D)."""
    D = dW.shape[1]
    kernels.embedding_scatter_add(dW, ids.reshape(-1), dX.reshape(-1, D))


class Embedding:
    """Dense input embedding ``W: (V, D)``.

    ``param`` names an existing ``(V, D)`` parameter to use instead of a new
    one (weight tying with the output layer).
    """

    def __init__(self, store: ParamStore, name: str, V: int, D: int, param: str | None = None):
        self.store, self.name, self.V, self.D = store, name, V, D
        self.param = param or f"{name}/W"
        if param is None:
            store.add(self.param, (V, D))

    def forward(self, ids):
        return embedding_forward(self.store.params[self.param], ids)

    def backward(self, ids, dX):
        rows = self.store.xp.unique(ids)
        embedding_backward(self.store.grad_rows(self.param, rows), ids, dX)


# ----------------------------------------------------------------------------
# Full softmax output layer
# ----------------------------------------------------------------------------
def softmax_loss(h, W, b, targets, scale, compute_grad=True, out=None):
    """Cross-entropy of ``softmax(h W^T + b)``, and the logits' gradient.

    h : (N, H);  W : (V, H);  b : (V,);  targets : (N,) int;  scale : the
    gradient multiplier (``1/B`` for Zaremba's "sum over time, mean over
    batch" loss);  out : optional (N, V) buffer for the logits (reused
    across steps by the layer).

    Returns ``nll (N,)`` float64 and the buffer holding ``dlogits`` (N, V)
    if ``compute_grad`` (else scratch).
    """
    xp = array_module(h)
    logits = xp.matmul(h, W.T, out=out)  # (N, V)
    nll = kernels.softmax_xent(logits, targets, scale, compute_grad, bias=b)
    return nll, logits


def _add_at(a, ids, v):
    """``a[ids] += v`` for 1-d ``a``, repeated ids accumulating: ``np.add.at``
    on the CPU; on the GPU the atomic scatter kernel, with ``a`` and ``v``
    seen as one-column tables."""
    xp = array_module(a)
    if xp is np:
        np.add.at(a, ids, v)
    else:
        kernels.embedding_scatter_add(a.reshape(-1, 1), ids, xp.ascontiguousarray(v).reshape(-1, 1))


def column_sums(a):
    """``a.sum(axis=0)`` of a 2-d array as one BLAS matrix-vector product
    (measured 0.5 ms instead of 1.2 ms for (700, 10000) float32)."""
    xp = array_module(a)
    return xp.matmul(xp.ones(a.shape[0], dtype=a.dtype), a)


def _eval_chunks(N, V, chunk=None):
    """Row ranges for evaluation so the (rows, V) logits stay under 256 MB.

    Each chunk reads the whole output matrix again, so chunks are as large
    as memory allows (config D, V = 100K: 64 MB chunks made evaluation 25%
    slower than one 160 MB buffer)."""
    chunk = chunk or max(1, (1 << 26) // max(V, 1))
    return [(i, min(i + chunk, N)) for i in range(0, N, chunk)]


def full_softmax_step(ws, h, W, b, targets, scale, compute_grad, chunk=None):
    """The full softmax of ``h W^T + b`` with a layer's workspace ``ws``.

    Evaluation (``compute_grad=False``) runs in row chunks so a large
    vocabulary never needs an ``(N, V)`` buffer: returns ``(nll, None,
    None)``.  Training returns ``nll``, ``dlogits (N, V)`` and ``dh (N, H)``
    (both in ``ws``, valid until the next call); ``W``'s gradient is the
    caller's (``dlogits^T h``).
    """
    xp, N, V = array_module(h), h.shape[0], W.shape[0]
    if not compute_grad:
        nll = xp.empty(N, dtype=np.float64)
        for i, j in (spans := _eval_chunks(N, V, chunk)):
            # one buffer of the first (largest) span's rows, sliced for the last
            buf = ws.get("logits", (spans[0][1], V), h.dtype)[: j - i]
            nll[i:j] = softmax_loss(h[i:j], W, b, targets[i:j], 1.0, False, buf)[0]
        return nll, None, None
    buf = ws.get("logits", (N, V), h.dtype)
    nll, dlogits = softmax_loss(h, W, b, targets, scale, True, buf)
    dh = xp.matmul(dlogits, W, out=ws.get("dh", (N, W.shape[1]), h.dtype))
    return nll, dlogits, dh


class Softmax:
    """Full softmax output layer ``W: (V, H)``, ``b: (V,)``."""

    def __init__(self, store: ParamStore, name: str, V: int, H: int):
        self.store, self.name, self.V, self.H = store, name, V, H
        store.add(f"{name}/W", (V, H))
        store.add(f"{name}/b", (V,))
        self.ws = Workspace(store.xp)

    def loss(self, h, targets, scale=1.0, compute_grad=True, chunk=None):
        """Per-row NLL ``(N,)``; with ``compute_grad`` also returns ``dh``.

        ``dh`` lives in the layer's workspace (valid until the next call).
        Evaluation (``compute_grad=False``) runs in row chunks so a large
        vocabulary never needs an ``(N, V)`` buffer.
        """
        store = self.store
        W, b = store.params[f"{self.name}/W"], store.params[f"{self.name}/b"]
        nll, dlogits, dh = full_softmax_step(self.ws, h, W, b, targets, scale, compute_grad, chunk)
        if compute_grad:
            store.accumulate(f"{self.name}/W", dlogits.T, h)
            store.accumulate(f"{self.name}/b", column_sums(dlogits))
        return nll, dh

    # -- sampled objectives (slimnp.sampled_losses) ---------------------------------
    def candidates(self, ids):
        """Output vectors ``(C, H)`` and biases ``(C,)`` of words ``ids``."""
        p = self.store.params
        return p[f"{self.name}/W"][ids], p[f"{self.name}/b"][ids]

    def candidate_grads(self, ids, dW, db):
        """Accumulate the gradients of :meth:`candidates` (repeated ids add up);
        only the rows of ``ids`` are touched (row-tracked, see ParamStore)."""
        store, xp = self.store, self.store.xp
        g = store.grad_rows(f"{self.name}/W", xp.unique(ids))
        kernels.embedding_scatter_add(g, ids, xp.ascontiguousarray(dW))
        _add_at(store.grad_view(f"{self.name}/b"), ids, db)

    def logits(self, h):
        p = self.store.params
        return h @ p[f"{self.name}/W"].T + p[f"{self.name}/b"]


# ----------------------------------------------------------------------------
# Slim embeddings (Li, Kang and Zhang, AAAI 2018); tables in slimnp.mapping
# ----------------------------------------------------------------------------
def slim_embedding_forward(A, idx, ids):
    """Input vectors as concatenated pool rows.

    A : (M, d) shared pool;  idx : (V, K) pool row of each word's k-th part;
    ids : (T, B) word ids.  Returns ``X : (T, B, K*d)`` with
    ``X[t, b, k*d:(k+1)*d] = A[idx[ids[t, b], k]]``, and the gathered
    sub-vector ids ``(T, B, K)`` that the backward needs.
    """
    xp = array_module(A)
    sub = xp.take(idx, ids, axis=0)  # (T, B, K)
    X = xp.take(A, sub, axis=0)  # (T, B, K, d)
    T, B, K, d = X.shape
    return X.reshape(T, B, K * d), sub


def slim_embedding_backward(dA, sub, dX):
    """``dA[sub[t, b, k]] += dX[t, b, k*d:(k+1)*d]`` (repeated rows accumulate)."""
    d = dA.shape[1]
    kernels.embedding_scatter_add(dA, sub.reshape(-1), dX.reshape(-1, d))


def slim_matrix(A, idx, out=None):
    """The ``V x H`` word vectors that a slim layer's pools and table stand for.

    A : (M, d) the input layer's one shared pool, or (K, M/K, d) the output
    layer's K disjoint pools;  idx : (V, K) integer table (the layouts of
    :mod:`slimnp.mapping`).  Returns ``W : (V, K*d)`` with

    * one pool:  ``W[w] = [A[idx[w, 0]] | ... | A[idx[w, K-1]]]``
    * K pools:   ``W[w] = [A[0, idx[w, 0]] | ... | A[K-1, idx[w, K-1]]]``

    one gather of ``V*K`` pool rows (the K pools are read as one ``(M, d)``
    array, pool k's rows starting at ``k*M/K``).  ``out``: an optional
    C-contiguous ``(V, K*d)`` buffer of A's dtype, written and returned.
    The slim layers exist not to hold this matrix: it is built to check or
    convert a model (:func:`slimnp.inference.expand_dense`, the distortion
    of :mod:`slimnp.compress`) and by the output layer's ``dense`` strategy.
    """
    xp = array_module(A)
    V, K = idx.shape
    if A.ndim == 3:
        if A.shape[0] != K:
            raise ValueError(f"{A.shape[0]} pools but the table has K = {K} columns")
        _, Mk, d = A.shape
        idx = idx + xp.arange(K) * Mk  # (V, K) rows of the pools seen as one
        A = A.reshape(K * Mk, d)
    d = A.shape[1]
    if out is None:
        out = xp.empty((V, K * d), dtype=A.dtype)
    elif out.shape != (V, K * d) or out.dtype != A.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous ({V}, {K * d}) {A.dtype} array, got "
                         f"{out.shape} {out.dtype}")
    xp.take(A, idx.reshape(-1), axis=0, out=out.reshape(V * K, d))
    return out


class SlimEmbedding:
    """Input layer: each word is K sub-vectors from ONE shared pool ``A: (M, H/K)``.

    Parameters: ``M*H/K`` instead of ``V*H``.  ``idx: (V, K)`` holds rows of
    ``A`` (for a tied model: rows of the output pools seen as one ``(M, d)``
    array, i.e. ``k*M/K + idx_out[w, k]``).  ``param`` names the pool in the
    store (a tied model passes the output layer's).
    """

    def __init__(self, store: ParamStore, name: str, V: int, H: int, K: int, M: int, idx,
                 param: str | None = None):
        self.store, self.name, self.V, self.H, self.K, self.M = store, name, V, H, K, M
        self.d = H // K
        self.idx = store.xp.asarray(idx)  # (V, K), on the parameters' device
        self.param = param or f"{name}/A"
        if param is None:
            store.add(self.param, (M, self.d))
        self._sub = None

    def _pool(self):
        return self.store.params[self.param].reshape(self.M, self.d)

    def forward(self, ids):
        X, self._sub = slim_embedding_forward(self._pool(), self.idx, ids)
        return X

    def backward(self, ids, dX):
        g = self.store.grad_rows(self.param, self.store.xp.unique(self._sub))
        slim_embedding_backward(g.reshape(self.M, self.d), self._sub, dX)


# ----------------------------------------------------------------------------
# Slim output layer (Li, Kang and Zhang, AAAI 2018, Algorithm 1): logits by
# dynamic programming
#
# Word w's output vector is the concatenation of K sub-vectors, the k-th taken
# from its own pool A[k] : (Mk, d), Mk = M / K, d = H / K (the layer's
# parameter A : (K, Mk, d)):
#
#     u_w = [ A[0, idx_kv[0, w]] | A[1, idx_kv[1, w]] | ... | A[K-1, idx_kv[K-1, w]] ]
#
# so with each hidden vector split the same way, h[n] = [h_0[n] | ... | h_{K-1}[n]],
#
#     zT[w, n] = b[w] + sum_k h_k[n] . A[k, idx_kv[k, w]] = b[w] + sum_k PT[k, idx_kv[k, w], n]
#
# Step 1: PT[k] = A[k] @ h_k.T, K small GEMMs costing N*M*d in all instead of
# N*V*H: every distinct partial product, once.  Step 2
# (kernels.slim_gather_sum_t): gather and sum, N*V*K adds; the V x H matrix
# is never formed.  Backward (kernels.slim_segment_sum_t): dPT[k, j, n] =
# the sum of dzT[w, n] over the words w with idx_kv[k, w] == j, then
# dA[k] = dPT[k] @ h_k and dh_k = dPT[k].T @ A[k].
#
#     PT     : (K, Mk, N)  partial dot products, pool-entry major: the N
#                          partials of one entry lie together, so the
#                          gather-sum reads one contiguous run per (word, pool)
#     idx_kv : (K, V) int  pool entry of word w at position k, in [0, Mk)
#                          (k-major so that one pool's column of indices is
#                          contiguous: the kernels sweep it once per row)
#     zT     : (V, N)      the logits, word-major: column n for h[n]; dzT
#                          its gradient
#
# One layout serves every use: training, evaluation and scoring run the
# column softmax on zT, and generation samples from its columns
# (SlimSoftmax.logits hands out the (N, V) transposed view).
# ----------------------------------------------------------------------------
def slim_logits_t(h, A, idx_kv, b, out=None, ws=None):
    """Logits of the slim output layer by dynamic programming (Algorithm 1),
    word-major: ``zT (V, N)``, column n for ``h[n]``.

    h : (N, H);  A : (K, M/K, d) the K disjoint pools;  idx_kv : (K, V);
    b : (V,) or None.  ``zT[w, n] = b[w] + sum_k h_k[n] . A[k, idx_kv[k, w]]``
    from the K GEMMs ``PT[k] = A[k] h_k^T`` ``(K, M/K, N)`` and the K-term
    gather-sum per word (the notation above).  Cost ``O(N M H / K + N V
    K)``.  ``out``: an optional (V, N) buffer; ``ws``: a :class:`Workspace`
    holding the partial products (at V = 800K a fresh 60 MB buffer per call
    costs its page faults every time).  Returns ``zT`` and ``PT``.
    """
    xp = array_module(h)
    K, Mk, d = A.shape
    N = h.shape[0]
    ws = ws or Workspace(xp)
    PT = xp.matmul(A, h.reshape(N, K, d).transpose(1, 2, 0),
                   out=ws.get("PT", (K, Mk, N), h.dtype))  # (K, Mk, N)
    zT = ws.get("zT", (idx_kv.shape[1], N), h.dtype) if out is None else out
    kernels.slim_gather_sum_t(PT, idx_kv, b, zT)
    return zT, PT


def slim_logits(h, A, idx_kv, b):
    """:func:`slim_logits_t` seen row by row: ``z (N, V)``, a transposed view
    of the word-major logits (what :meth:`SlimSoftmax.logits` returns; no
    copy and no second layout).  Returns ``z`` and ``PT``."""
    zT, PT = slim_logits_t(h, A, idx_kv, b)
    return zT.T, PT


def slim_log_probs_t(h, A, idx_kv, b, out=None, ws=None):
    """Log-probabilities of the whole vocabulary for a few hidden states.

    Word-major: returns ``logp (V, N)`` (column n for ``h[n]``) and each
    column's logsumexp ``(N,)``; ``out`` and ``ws`` as in
    :func:`slim_logits_t`.  The inference path of the paper's Table 7: K
    GEMMs, the gather-sum with the bias, an in-place column log-softmax.
    """
    zT, _ = slim_logits_t(h, A, idx_kv, b, out, ws)
    return zT, kernels.log_softmax_t(zT)


def slim_softmax_loss_t(h, A, b, idx_kv, targets, scale, compute_grad=True, inv=None, ws=None):
    """Cross-entropy of the slim softmax and its gradients, in the word-major
    layout (what the layer trains and evaluates with).

    ``PT[k] = A[k] h_k^T`` ``(K, Mk, N)``; logits ``zT (V, N)``, one column
    per row of ``h``; the column softmax; then ``dPT (K, Mk, N)``, the
    gradient w.r.t. the partial products (the segment sum of ``dzT`` by
    ``idx_kv[k]``, written over ``PT``), gives ``dA_k = dPT_k h_k`` and
    ``dh_k = dPT_k^T A_k``.  Every kernel then streams contiguous runs of N
    floats instead of gathering single ones.  ``ws``: a :class:`Workspace`
    for the two large buffers.

    Returns ``nll (N,)`` and, with ``compute_grad``, ``(dh (N, H), dPT,
    hk (K, N, d), db (V,))``: ``dA = dPT @ hk`` is left to the caller, which
    can compute it straight into a gradient buffer.
    """
    xp = array_module(h)
    K, Mk, d = A.shape
    N, V = h.shape[0], idx_kv.shape[1]
    zT, PT = slim_logits_t(h, A, idx_kv, None, ws=ws)
    h3 = h.reshape(N, K, d)
    nll = kernels.softmax_xent_t(zT, targets, scale, compute_grad, bias=b)
    if not compute_grad:
        return nll, None
    dPT = PT  # the partial products are spent: reuse their buffer
    db = xp.empty(V, dtype=h.dtype)
    kernels.slim_segment_sum_t(zT, idx_kv, dPT, inv, db)
    dh3 = xp.empty((N, K, d), dtype=h.dtype)
    xp.matmul(dPT.transpose(0, 2, 1), A, out=dh3.transpose(1, 0, 2))  # (K, N, d) view
    return nll, (dh3.reshape(N, K * d), dPT, h3.transpose(1, 0, 2), db)


# Sub-vectors of at most this many numbers make the dynamic programming cost
# more than the matrix it avoids (``bench/output_strategy.py``, one thread,
# V = 10K, H = 200, N = 400, 1/8: the DP over the rebuilt matrix took 0.46x,
# 0.70x, 0.67x the time at d = 50, 25, 20 and 2.1x, 3.6x, 12x at d = 10, 5,
# 1; at V = 33K: 0.92x at d = 25, 1.7x at 10, 3.2x at 5).  With d = H/K
# numbers per sub-vector, the DP's gather-sum and segment sum each move K*V
# rows of N partial products (K*V*N numbers, H/d times as many as the logits)
# at memory speed, while rebuilding the V x H matrix from the pools costs one
# gather of V*H numbers and leaves the logits to GEMMs.  HashNet (K = H,
# d = 1) is the extreme case.  Below DENSE_MIN_ELEMENTS both take
# microseconds and the paper's method is kept; above DENSE_MAX_ELEMENTS the
# rebuilt matrix would cost the memory the slim layer saves.
DENSE_MAX_SUBVECTOR = 10
DENSE_MIN_ELEMENTS = 1 << 16
DENSE_MAX_ELEMENTS = 1 << 26  # 256 MB of float32


def slim_output_strategy(V: int, H: int, K: int) -> str:
    """``"dense"`` (rebuild the ``V x H`` matrix, then a full softmax) or
    ``"dp"`` (the paper's dynamic programming) for a slim output layer."""
    short = H // K <= DENSE_MAX_SUBVECTOR
    return "dense" if short and DENSE_MIN_ELEMENTS <= V * H <= DENSE_MAX_ELEMENTS else "dp"


class SlimSoftmax:
    """Output layer: word w's vector is ``[A[0, idx[w,0]], ..., A[K-1, idx[w,K-1]]]``.

    ``A: (K, M/K, H/K)`` (K disjoint pools), ``b: (V,)``; ``idx: (V, K)`` local
    to each pool.  Parameters ``M*H/K + V``.

    ``strategy`` chooses how the full softmax is computed (the same function,
    up to float32 rounding): ``"dp"`` by the paper's dynamic programming,
    ``"dense"`` by rebuilding the ``V x H`` word vectors from the pools each
    call (one gather), a full softmax, and a scatter-add of the matrix's
    gradient back into the pools -- cheaper when sub-vectors are a few
    numbers long (HashNet's K = H).  ``"auto"``: :func:`slim_output_strategy`.
    """

    def __init__(self, store: ParamStore, name: str, V: int, H: int, K: int, M: int, idx,
                 strategy: str = "auto"):
        self.store, self.name, self.V, self.H, self.K, self.M = store, name, V, H, K, M
        self.Mk, self.d = M // K, H // K
        if strategy == "auto":
            strategy = slim_output_strategy(V, H, K)
        if strategy not in ("dp", "dense"):
            raise ValueError(f"strategy must be 'auto', 'dp' or 'dense', not {strategy!r}")
        self.strategy = strategy
        idx_kv = np.ascontiguousarray(np.asarray(idx).T)  # (K, V): row k read contiguously
        # the DP's backward reads the inverse table (None unless uniform fan-out)
        inv = inverse_table(idx_kv, self.Mk) if strategy == "dp" else None
        # on the parameters' device (a no-op for NumPy)
        self.idx_kv = store.xp.asarray(idx_kv)
        self.inv = None if inv is None else store.xp.asarray(inv)
        # dense: each word's K rows of the pools seen as one (M, d) array,
        # word-major (int32: M < 2**31; half the int64 table's V*K*8 bytes)
        self._all_rows = (None if strategy == "dp"
                          else self._rows(store.xp.arange(V)).reshape(-1).astype(np.int32))
        self.ws = Workspace(store.xp)
        store.add(f"{name}/A", (K, self.Mk, self.d))
        store.add(f"{name}/b", (V,))

    def loss(self, h, targets, scale=1.0, compute_grad=True, chunk=None):
        if self.strategy == "dense":
            return self._dense_loss(h, targets, scale, compute_grad, chunk)
        p = self.store.params
        A, b = p[f"{self.name}/A"], p[f"{self.name}/b"]
        xp, N = self.store.xp, h.shape[0]
        if not compute_grad:
            nll = xp.empty(N, dtype=np.float64)
            for i, j in _eval_chunks(N, self.V, chunk):
                nll[i:j] = slim_softmax_loss_t(h[i:j], A, b, self.idx_kv, targets[i:j], 1.0, False,
                                               ws=self.ws)[0]
            return nll, None
        nll, (dh, dPT, hk, db) = slim_softmax_loss_t(h, A, b, self.idx_kv, targets, scale, True,
                                                     self.inv, self.ws)
        self.store.accumulate(f"{self.name}/A", dPT, hk)  # dA = dPT @ hk, one batched GEMM
        self.store.accumulate(f"{self.name}/b", db)
        return nll, dh

    def _weights(self):
        """The ``(V, H)`` word vectors, gathered from the pools into the workspace."""
        A = self.store.params[f"{self.name}/A"].reshape(self.K * self.Mk, self.d)
        W = self.ws.get("W", (self.V, self.H), A.dtype)
        # the rows cached as one pool's: no (V, K) table of offsets per call
        return slim_matrix(A, self._all_rows.reshape(self.V, self.K), out=W)

    def _dense_loss(self, h, targets, scale, compute_grad, chunk):
        """:meth:`loss` with the ``V x H`` matrix rebuilt: the full softmax's
        arithmetic, then ``dW`` scattered back into the pool rows it came from."""
        store, xp = self.store, self.store.xp
        W, b = self._weights(), store.params[f"{self.name}/b"]
        nll, dlogits, dh = full_softmax_step(self.ws, h, W, b, targets, scale, compute_grad, chunk)
        if not compute_grad:
            return nll, None
        dW = xp.matmul(dlogits.T, h, out=W)  # the rebuilt matrix is spent: reuse its buffer
        g = store.grad_view(f"{self.name}/A").reshape(self.K * self.Mk, self.d)
        kernels.embedding_scatter_add(g, self._all_rows, dW.reshape(self.V * self.K, self.d))
        store.accumulate(f"{self.name}/b", column_sums(dlogits))
        return nll, dh

    # -- sampled objectives (slimnp.sampled_losses) ---------------------------------
    def _rows(self, ids):
        """Global rows ``(C, K)`` of the K pools seen as one ``(M, d)`` array."""
        xp = self.store.xp
        return (self.idx_kv[:, ids] + (xp.arange(self.K) * self.Mk)[:, None]).T

    def candidates(self, ids):
        """Output vectors ``(C, H)`` (concatenated pool rows) and biases ``(C,)``."""
        p = self.store.params
        A = p[f"{self.name}/A"].reshape(self.K * self.Mk, self.d)
        return A[self._rows(ids)].reshape(len(ids), self.H), p[f"{self.name}/b"][ids]

    def candidate_grads(self, ids, dW, db):
        """Scatter-add the candidates' gradients into the pools (each word's k-th
        slice into its k-th pool row) and the bias; only those rows are touched."""
        store, xp = self.store, self.store.xp
        rows = self._rows(ids).reshape(-1)  # (C*K,)
        g = store.grad_rows(f"{self.name}/A", xp.unique(rows))
        kernels.embedding_scatter_add(g.reshape(self.K * self.Mk, self.d), rows,
                                      xp.ascontiguousarray(dW).reshape(-1, self.d))
        _add_at(store.grad_view(f"{self.name}/b"), ids, db)

    def logits(self, h):
        p = self.store.params
        if self.strategy == "dense":
            return h @ self._weights().T + p[f"{self.name}/b"]
        return slim_logits(h, p[f"{self.name}/A"], self.idx_kv, p[f"{self.name}/b"])[0]
