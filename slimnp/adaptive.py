"""The adaptive softmax (Grave, Joulin, Cissé, Grangier and Jégou, ICML 2017,
"Efficient softmax approximation for GPUs"), with the semantics of PyTorch's
``torch.nn.AdaptiveLogSoftmaxWithLoss``.

The vocabulary is ordered by training frequency (:class:`slimnp.data.Vocabulary`
puts the most frequent word at id 0), so the ``cutoffs`` split it into a
*head* of frequent words and *tail clusters* of rarer ones.

Notation: ``N`` rows (hidden states), ``E`` their size (the word-vector size
of :class:`slimnp.model.ModelConfig`), ``V`` words; cutoffs ``c_0 < c_1 <
... < c_{n-1} < V`` and ``c_n = V``; tail cluster ``i`` (``i = 0 .. n-1``)
holds the words ``[c_i, c_{i+1})``, ``V_i = c_{i+1} - c_i`` of them::

    head/W  (c_0 + n, E)   logits of the c_0 head words, then one per cluster
    head/b  (c_0 + n,)     only with head_bias (PyTorch's default: none)
    tail{i}/proj  (d_i, E) d_i = E // div_value ** (i + 1); no bias
    tail{i}/W   (V_i, d_i) the cluster's words; no bias

(rows are outputs, like ``nn.Linear.weight`` and the full softmax's
``output/W``), and with ``g = log_softmax(h head/W^T + head/b)``::

    log p(w | h) = g[w]                                        w < c_0
    log p(w | h) = g[c_0 + i] + log_softmax(h P_i^T W_i^T)[w - c_i]    c_i <= w < c_{i+1}

The training loss of a row needs the head and the target's cluster only, so
a step computes the ``(N, c_0 + n)`` head logits and, for each cluster with
targets in the batch, ``(N_i, V_i)`` logits of its ``N_i`` rows; the
backward runs the same GEMMs transposed.  Evaluation computes the same exact
NLL (no approximation: the model's distribution *is* this factorisation);
:meth:`AdaptiveSoftmax.log_probs` gives every word's log-probability for
scoring all words and generation.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from . import kernels
from .backend import array_module
from .buffers import ParamStore, Workspace
from .layers import _eval_chunks, column_sums

#: ModelConfig defaults (PyTorch has none; these suit vocabularies of 10K-1M words)
DEFAULT_CUTOFFS = (2000, 10000)
DEFAULT_DIV_VALUE = 4.0


def tail_dims(E: int, n: int, div_value: float) -> list:
    """``d_i = E // div_value ** (i + 1)`` for the ``n`` tail clusters
    (PyTorch's ``int(in_features // (div_value ** (i + 1)))``)."""
    return [int(E // (div_value ** (i + 1))) for i in range(n)]


def config_problems(V: int, E: int, cutoffs, div_value) -> list:
    """What is wrong with an adaptive softmax over ``V`` words of size ``E``
    (one short sentence per problem; empty when it can be built)."""
    if isinstance(cutoffs, (str, bytes)) or not hasattr(cutoffs, "__len__"):
        return [f"cutoffs must be a list of word ids, got {cutoffs!r}"]
    if not cutoffs:
        return ["cutoffs must name at least one cutoff (the head's size)"]
    if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in cutoffs):
        return [f"cutoffs must be integers, got {list(cutoffs)!r}"]
    problems = []
    c = [int(x) for x in cutoffs]
    if any(b <= a for a, b in zip(c, c[1:])):
        problems.append(f"cutoffs {c} must be strictly increasing")
    bad = [x for x in c if not 0 < x < V]
    if bad:
        problems.append(f"cutoffs must lie in [1, V-1] = [1, {V - 1}] (V={V}), got {bad[0]}")
    if isinstance(div_value, bool) or not isinstance(div_value, numbers.Real) \
            or not (math.isfinite(div_value) and div_value > 0):
        problems.append(f"div_value must be a number > 0, got {div_value!r}")
    elif not problems:
        d = tail_dims(E, len(c), div_value)
        if d[-1] < 1:
            i = next(i for i, x in enumerate(d) if x < 1)
            problems.append(f"tail cluster {i + 1} would have size {E} // {div_value:g}^{i + 1} = 0 "
                            f"(E={E}): use fewer cutoffs or a smaller div_value")
    return problems


def buffer_elements(rows: int, V: int, E: int, cutoffs, div_value) -> int:
    """Values of the layer's per-call buffers for ``rows`` hidden states (the
    memory estimate, :mod:`slimnp.memory`): head logits and ``dh``, and at
    worst every row in the widest cluster (gathered rows, projections, their
    gradients and a logits chunk of at most ``2**26`` values)."""
    c = list(cutoffs) + [V]
    widest = max(b - a for a, b in zip(c, c[1:]))
    d0 = tail_dims(E, len(cutoffs), div_value)[0]
    chunk = _eval_chunks(rows, widest)[0]
    return rows * (c[0] + len(cutoffs) + 2 * E + 2 * d0) + (chunk[1] - chunk[0]) * widest


def _log_softmax_rows(z):
    """Row log-softmax of ``z (N, C)`` in place; returns ``z``."""
    xp = array_module(z)
    z -= z.max(axis=1, keepdims=True)
    z -= xp.log(xp.exp(z).sum(axis=1, keepdims=True))
    return z


class AdaptiveSoftmax:
    """Output layer: the adaptive softmax (see the module docstring).

    The interface of the other output layers (:class:`slimnp.layers.Softmax`):
    :meth:`loss` (training and evaluation), :meth:`logits` (generation) and,
    beyond them, :meth:`log_probs` ``(N, V)``.  The sampled objectives need
    one vector per word and are refused (:meth:`candidates`).
    """

    def __init__(self, store: ParamStore, name: str, V: int, E: int, cutoffs=DEFAULT_CUTOFFS,
                 div_value: float = DEFAULT_DIV_VALUE, head_bias: bool = False):
        problems = config_problems(V, E, cutoffs, div_value)
        if problems:
            raise ValueError("invalid adaptive softmax: " + "; ".join(problems))
        self.store, self.name, self.V, self.E = store, name, V, E
        self.cutoffs = [int(c) for c in cutoffs] + [V]  # c_0 .. c_n
        self.n = len(cutoffs)  # tail clusters
        self.c0 = self.cutoffs[0]
        self.head_size = self.c0 + self.n
        self.dims = tail_dims(E, self.n, div_value)
        self.head_bias = bool(head_bias)
        store.add(f"{name}/head/W", (self.head_size, E))
        if self.head_bias:
            store.add(f"{name}/head/b", (self.head_size,))
        for i, d in enumerate(self.dims):
            store.add(f"{name}/tail{i}/proj", (d, E))
            store.add(f"{name}/tail{i}/W", (self.cutoffs[i + 1] - self.cutoffs[i], d))
        # the cutoffs c_0 .. c_{n-1} on the parameters' device (for searchsorted)
        self._cuts = store.xp.asarray(np.asarray(self.cutoffs[:-1], dtype=np.int32))
        self.ws = Workspace(store.xp)
        self._cap = 0  # size of the tail logits buffer (grows to the largest chunk seen)

    # -- parameters ----------------------------------------------------------------
    def _head(self):
        p, n = self.store.params, self.name
        return p[f"{n}/head/W"], (p[f"{n}/head/b"] if self.head_bias else None)

    def _tail(self, i):
        p, n = self.store.params, self.name
        return p[f"{n}/tail{i}/proj"], p[f"{n}/tail{i}/W"]

    def _tail_logits(self, rows: int, cols: int, dtype):
        """A ``(rows, cols)`` C-contiguous scratch array, one buffer for every cluster."""
        self._cap = max(self._cap, rows * cols)
        return self.ws.get("tail", (self._cap,), dtype)[: rows * cols].reshape(rows, cols)

    # -- the loss ------------------------------------------------------------------
    def loss(self, h, targets, scale=1.0, compute_grad=True, chunk=None):
        """Per-row NLL ``(N,)`` float64; with ``compute_grad`` also ``dh (N, E)``
        (the gradient of ``scale * sum(nll)``; parameter gradients accumulate
        into the store).  ``dh`` lives in the layer's workspace (valid until
        the next call).  Evaluation (``compute_grad=False``) runs in row
        chunks of ``chunk`` rows (default: the head logits under 2**26 values).
        """
        xp, N = self.store.xp, h.shape[0]
        if compute_grad:
            return self._loss(h, targets, scale, True)
        nll = xp.empty(N, dtype=np.float64)
        for i, j in _eval_chunks(N, self.head_size, chunk):
            nll[i:j] = self._loss(h[i:j], targets[i:j], 1.0, False)[0]
        return nll, None

    def _loss(self, h, targets, scale, compute_grad):
        store, xp, name = self.store, self.store.xp, self.name
        N, c0 = h.shape[0], self.c0
        Wh, bh = self._head()
        # cl[n] = 0 for a head word, i + 1 for a word of tail cluster i
        cl = xp.searchsorted(self._cuts, targets, side="right")  # (N,)
        head_t = xp.where(cl == 0, targets, c0 - 1 + cl).astype(np.int32)  # (N,) head class
        # head: logits (N, c0 + n), overwritten by their gradient
        z = xp.matmul(h, Wh.T, out=self.ws.get("head", (N, self.head_size), h.dtype))
        nll = kernels.softmax_xent(z, head_t, scale, compute_grad, bias=bh)
        if compute_grad:
            dh = xp.matmul(z, Wh, out=self.ws.get("dh", (N, self.E), h.dtype))  # (N, E)
            store.accumulate(f"{name}/head/W", z.T, h)
            if self.head_bias:
                store.accumulate(f"{name}/head/b", column_sums(z))
        # tails: only the clusters some row's target falls in
        for i in range(self.n):
            rows = xp.flatnonzero(cl == i + 1)  # (N_i,)
            Ni = int(rows.size)
            if Ni == 0:
                continue
            lo, Vi = self.cutoffs[i], self.cutoffs[i + 1] - self.cutoffs[i]
            P, W = self._tail(i)  # (d_i, E), (V_i, d_i)
            hi = xp.take(h, rows, axis=0)  # (N_i, E)
            ti = (xp.take(targets, rows) - lo).astype(np.int32)  # (N_i,) within the cluster
            p = hi @ P.T  # (N_i, d_i)
            nll_i = xp.empty(Ni, dtype=np.float64)
            dp = xp.empty_like(p) if compute_grad else None
            # the (N_i, V_i) logits in row chunks under 2**26 values (a large cluster)
            for a, b in _eval_chunks(Ni, Vi):
                u = xp.matmul(p[a:b], W.T, out=self._tail_logits(b - a, Vi, h.dtype))
                nll_i[a:b] = kernels.softmax_xent(u, ti[a:b], scale, compute_grad)
                if compute_grad:  # u now holds dlogits
                    store.accumulate(f"{name}/tail{i}/W", u.T, p[a:b])
                    xp.matmul(u, W, out=dp[a:b])
            nll[rows] += nll_i
            if compute_grad:
                store.accumulate(f"{name}/tail{i}/proj", dp.T, hi)
                dh[rows] += dp @ P  # rows are distinct: no scatter-add needed
        return nll, (dh if compute_grad else None)

    # -- every word's probability --------------------------------------------------
    def log_probs(self, h):
        """``log p(w | h[n])`` of every word: ``(N, V)`` (each row's exponentials sum to 1)."""
        xp = self.store.xp
        N, c0 = h.shape[0], self.c0
        Wh, bh = self._head()
        g = h @ Wh.T  # (N, c0 + n)
        if bh is not None:
            g += bh
        _log_softmax_rows(g)
        out = xp.empty((N, self.V), dtype=h.dtype)
        out[:, :c0] = g[:, :c0]
        for i in range(self.n):
            P, W = self._tail(i)
            u = _log_softmax_rows((h @ P.T) @ W.T)  # (N, V_i)
            u += g[:, c0 + i : c0 + i + 1]
            out[:, self.cutoffs[i] : self.cutoffs[i + 1]] = u
        return out

    def logits(self, h):
        """Scores for sampling: the log-probabilities (``softmax`` of them is
        the model's distribution; there is no single logits matrix)."""
        return self.log_probs(h)

    # -- sampled objectives: not for this layer ------------------------------------
    def candidates(self, ids):
        raise ValueError("the sampled losses (is, nce) need one output vector per word; the adaptive "
                         "softmax trains its exact loss (use loss 'softmax')")

    candidate_grads = candidates
