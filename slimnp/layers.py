"""Layers: pure forward/backward pairs underneath, small layer objects on top.

Notation (Zaremba et al. 2014, which the slim-embeddings paper follows):
``T`` time steps of a BPTT segment, ``B`` parallel streams, ``D`` input size,
``H`` hidden size, ``V`` vocabulary.  Sequences are time-major: ``(T, B, ...)``.

The pure functions (``lstm_forward`` / ``lstm_backward``, ...) keep exactly
what their backward needs and return gradients; the layer objects own views
into the model's flat parameter and gradient buffers (:class:`ParamStore`) and
*accumulate* into the gradient views, so one buffer holds every gradient of a
step (one norm for clipping, one allreduce for data parallelism).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .backend import array_module


# ----------------------------------------------------------------------------
# Parameter storage
# ----------------------------------------------------------------------------
class ParamStore:
    """Every parameter in one flat buffer, every gradient in another.

    Layers ``add`` named shapes while the model is built; ``allocate`` then
    creates the two flat buffers and hands out reshaped views, so
    ``store.data`` / ``store.grad`` can be updated, clipped, saved or
    all-reduced as single arrays.
    """

    def __init__(self, xp=np, dtype=np.float32):
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.shapes: dict[str, tuple] = {}
        self.data = None
        self.grad = None
        self.params: dict[str, object] = {}
        self.grads: dict[str, object] = {}

    def add(self, name: str, shape) -> None:
        if self.data is not None:
            raise RuntimeError("ParamStore.add after allocate")
        if name in self.shapes:
            raise ValueError(f"duplicate parameter name {name!r}")
        self.shapes[name] = tuple(int(s) for s in shape)

    def allocate(self) -> None:
        sizes = [int(np.prod(s)) for s in self.shapes.values()]
        total = sum(sizes)
        self.data = self.xp.zeros(total, dtype=self.dtype)
        self.grad = self.xp.zeros(total, dtype=self.dtype)
        off = 0
        for (name, shape), n in zip(self.shapes.items(), sizes):
            self.params[name] = self.data[off : off + n].reshape(shape)
            self.grads[name] = self.grad[off : off + n].reshape(shape)
            off += n

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes.values()))

    def zero_grad(self) -> None:
        self.grad.fill(0)

    def __getitem__(self, name):
        return self.params[name]


# ----------------------------------------------------------------------------
# Dropout (inverted: scale at training time so evaluation is the identity)
# ----------------------------------------------------------------------------
def dropout_mask(rng, shape, p, dtype=np.float32, xp=np):
    """A ``{0, 1/(1-p)}`` mask drawn from the host generator ``rng``."""
    keep = rng.random(shape, dtype=np.float32) >= p
    return xp.asarray(keep.astype(dtype) * dtype(1.0 / (1.0 - p)))


# ----------------------------------------------------------------------------
# LSTM
# ----------------------------------------------------------------------------
@dataclass
class LSTMCache:
    x: object  # (T, B, D) inputs
    G: object  # (T, B, 4H) activated gates [i f o g]
    hs: object  # (T+1, B, H) hs[0] = h0, hs[t+1] = h_t
    cs: object  # (T+1, B, H) cs[0] = c0
    tcs: object  # (T, B, H) tanh(c_t)


def lstm_forward(x, h0, c0, Wx, Wh, b):
    """Run one LSTM layer over a segment.

    ``G_t = x_t Wx + h_{t-1} Wh + b``, gates ``[i f o g]`` as in
    :mod:`slimnp.kernels.reference`; ``c_t = f c_{t-1} + i g``,
    ``h_t = o tanh(c_t)``.

    Parameters
    ----------
    x : (T, B, D);  h0, c0 : (B, H);  Wx : (D, 4H);  Wh : (H, 4H);  b : (4H,)

    Returns
    -------
    h_seq : (T, B, H) (a view of the cache), ``(hT, cT)``, cache
    """
    xp = array_module(x)
    T, B, D = x.shape
    H = h0.shape[1]
    dt = Wx.dtype
    # All input projections of the segment in one GEMM; the recurrence then
    # only adds h_{t-1} Wh, computed into one reused (B, 4H) buffer.
    G = (x.reshape(T * B, D) @ Wx).reshape(T, B, 4 * H)
    G += b
    hs = xp.empty((T + 1, B, H), dtype=dt)
    cs = xp.empty((T + 1, B, H), dtype=dt)
    tcs = xp.empty((T, B, H), dtype=dt)
    hs[0] = h0
    cs[0] = c0
    hg = xp.empty((B, 4 * H), dtype=dt)
    for t in range(T):
        xp.matmul(hs[t], Wh, out=hg)
        # act (= G[t], in place) , c_t, h_t, tanh(c_t)
        kernels.lstm_pointwise_forward(G[t], hg, cs[t], G[t], cs[t + 1], hs[t + 1], tcs[t])
    cache = LSTMCache(x=x, G=G, hs=hs, cs=cs, tcs=tcs)
    return hs[1:], (hs[T], cs[T]), cache


def lstm_backward(dh_seq, cache: LSTMCache, Wx, Wh, dhT=None, dcT=None):
    """Backward of :func:`lstm_forward` over the whole segment.

    Parameters
    ----------
    dh_seq : (T, B, H) gradient w.r.t. every output ``h_t`` (from above)
    dhT, dcT : (B, H) or None, gradient w.r.t. the final state (from the
        next segment; None means zero, i.e. truncated BPTT)

    Returns
    -------
    dx : (T, B, D), dh0 : (B, H), dc0 : (B, H), dWx : (D, 4H), dWh : (H, 4H), db : (4H,)
    """
    xp = array_module(dh_seq)
    x, G, hs, cs, tcs = cache.x, cache.G, cache.hs, cache.cs, cache.tcs
    T, B, H = dh_seq.shape
    D = x.shape[2]
    dt = G.dtype
    dG = xp.empty((T, B, 4 * H), dtype=dt)
    dh_next = xp.zeros((B, H), dtype=dt) if dhT is None else dhT.astype(dt, copy=True)
    dc = xp.zeros((B, H), dtype=dt) if dcT is None else dcT.astype(dt, copy=True)
    dh = xp.empty((B, H), dtype=dt)
    WhT = Wh.T
    for t in range(T - 1, -1, -1):
        # total gradient into h_t: from the layer above and from step t+1
        xp.add(dh_seq[t], dh_next, out=dh)
        # dG[t] and (in place) dc: dc_t -> dc_{t-1}
        kernels.lstm_pointwise_backward(G[t], cs[t], tcs[t], dh, dc, dG[t])
        # undo "+ h_{t-1} Wh": gradient flowing into h_{t-1}
        xp.matmul(dG[t], WhT, out=dh_next)
    dG2 = dG.reshape(T * B, 4 * H)
    # weight gradients of the whole segment: one GEMM each
    dWx = x.reshape(T * B, D).T @ dG2
    dWh = hs[:T].reshape(T * B, H).T @ dG2
    db = dG2.sum(axis=0)
    dx = (dG2 @ Wx.T).reshape(T, B, D)
    return dx, dh_next, dc, dWx, dWh, db


class LSTM:
    """One LSTM layer whose parameters live in a :class:`ParamStore`."""

    def __init__(self, store: ParamStore, name: str, D: int, H: int):
        self.store, self.name, self.D, self.H = store, name, D, H
        store.add(f"{name}/Wx", (D, 4 * H))
        store.add(f"{name}/Wh", (H, 4 * H))
        store.add(f"{name}/b", (4 * H,))

    def forward(self, x, h0, c0):
        p = self.store.params
        return lstm_forward(x, h0, c0, p[f"{self.name}/Wx"], p[f"{self.name}/Wh"], p[f"{self.name}/b"])

    def backward(self, dh_seq, cache, dhT=None, dcT=None):
        p, g = self.store.params, self.store.grads
        dx, dh0, dc0, dWx, dWh, db = lstm_backward(
            dh_seq, cache, p[f"{self.name}/Wx"], p[f"{self.name}/Wh"], dhT, dcT
        )
        g[f"{self.name}/Wx"] += dWx
        g[f"{self.name}/Wh"] += dWh
        g[f"{self.name}/b"] += db
        return dx, dh0, dc0


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
    """Dense input embedding ``W: (V, D)``."""

    def __init__(self, store: ParamStore, name: str, V: int, D: int):
        self.store, self.name, self.V, self.D = store, name, V, D
        store.add(f"{name}/W", (V, D))

    def forward(self, ids):
        return embedding_forward(self.store.params[f"{self.name}/W"], ids)

    def backward(self, ids, dX):
        embedding_backward(self.store.grads[f"{self.name}/W"], ids, dX)


# ----------------------------------------------------------------------------
# Full softmax output layer
# ----------------------------------------------------------------------------
def softmax_forward_backward(h, W, b, targets, scale, compute_grad=True):
    """Cross-entropy of ``softmax(h W^T + b)`` and its gradients.

    Parameters
    ----------
    h : (N, H) hidden states;  W : (V, H) output embeddings;  b : (V,)
    targets : (N,) int;  scale : gradient multiplier (``1/B`` for Zaremba's
        "sum over time, mean over batch" loss)

    Returns
    -------
    nll : (N,) float64 per-row negative log-likelihood, and, if
    ``compute_grad``, ``(dh (N, H), dW (V, H), db (V,))`` else None.
    """
    logits = h @ W.T  # (N, V)
    logits += b
    nll = kernels.softmax_xent(logits, targets, scale, compute_grad)
    if not compute_grad:
        return nll, None
    dlogits = logits  # overwritten in place by the kernel
    return nll, (dlogits @ W, dlogits.T @ h, dlogits.sum(axis=0))


class Softmax:
    """Full softmax output layer ``W: (V, H)``, ``b: (V,)``."""

    def __init__(self, store: ParamStore, name: str, V: int, H: int):
        self.store, self.name, self.V, self.H = store, name, V, H
        store.add(f"{name}/W", (V, H))
        store.add(f"{name}/b", (V,))

    def loss(self, h, targets, scale=1.0, compute_grad=True, chunk=None):
        """Per-row NLL ``(N,)``; with ``compute_grad`` also returns ``dh``.

        Evaluation (``compute_grad=False``) runs in row chunks so a large
        vocabulary never needs an ``(N, V)`` buffer.
        """
        p, g = self.store.params, self.store.grads
        W, b = p[f"{self.name}/W"], p[f"{self.name}/b"]
        if not compute_grad:
            xp = array_module(h)
            N = h.shape[0]
            chunk = chunk or max(1, (1 << 24) // max(self.V, 1))
            return xp.concatenate([
                softmax_forward_backward(h[i : i + chunk], W, b, targets[i : i + chunk], 1.0, False)[0]
                for i in range(0, N, chunk)
            ]), None
        nll, (dh, dW, db) = softmax_forward_backward(h, W, b, targets, scale, True)
        g[f"{self.name}/W"] += dW
        g[f"{self.name}/b"] += db
        return nll, dh
