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

The same frequency bands serve two more layers (one ``cutoffs`` and one
``div_value`` for both sides of a model: tying needs them equal, and a
model has one vocabulary order):

* :class:`AdaptiveEmbedding`, the adaptive input (Baevski and Auli, ICLR
  2019, "Adaptive input representations for neural language modeling").
  Band 0 is the head's words with ``E``-sized vectors, band ``j = 1 .. n``
  tail cluster ``j - 1``'s words with vectors of size ``d_{j-1}`` (the
  output's ``E // div_value ** j``) and a projection to ``E``::

      band0/W     (c_0, E)          x[w] = band0/W[w]                   w < c_0
      band{j}/W   (V_{j-1}, d_{j-1})  x[w] = band{j}/W[w - c_{j-1}] band{j}/proj
      band{j}/proj (d_{j-1}, E)

  fairseq's ``AdaptiveInput`` gives band 0 an ``E x E`` projection too
  (and leaves it untied when the output shares the bands); band 0 has none
  here: its vectors are already ``E`` long.
* Tied (fairseq's ``tie_adaptive_weights`` with ``tie_adaptive_proj``): the
  bands use the output's parameters instead of their own.  Band 0's vectors
  are the head words' rows of ``head/W`` (its first ``c_0`` rows), band
  ``j``'s are tail cluster ``j - 1``'s (``tail{j-1}/W``, or its pools), and
  its projection is ``tail{j-1}/proj`` ``(d, E)`` used the other way round:
  the output maps ``h`` to ``h P^T``, the input a band vector ``e`` to ``e P``.
* Slim tail clusters (``tail_m``): tail cluster ``i``'s word vectors are
  slim embeddings (Li, Kang and Zhang, AAAI 2018): word ``w``'s ``d_i``
  numbers are the concatenation of ``K`` sub-vectors, the ``k``-th from the
  cluster's own pool ``k``, and its logits come from the paper's dynamic
  programming (:func:`slimnp.layers.slim_softmax_loss_t`) instead of the
  ``(V_i, d_i)`` matrix::

      tail{i}/A   (K, M_i/K, d_i/K)  K disjoint pools, M_i entries in all
      table output/tail{i}/idx (V_i, K)  word w - c_i's entry in each pool
                                          (:func:`slimnp.mapping.output_table`)

  The head stays dense (its words are the frequent ones); ``K`` divides
  every ``d_i``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import kernels
from .backend import array_module
from .buffers import ParamStore, Workspace
from .layers import _eval_chunks, column_sums, slim_log_probs_t, slim_softmax_loss_t
from .mapping import inverse_table

#: ModelConfig defaults (PyTorch has none; these suit vocabularies of 10K-1M words)
DEFAULT_CUTOFFS = (2000, 10000)
DEFAULT_DIV_VALUE = 4.0


def tail_dims(E: int, n: int, div_value: float) -> list:
    """``d_i = E // div_value ** (i + 1)`` for the ``n`` tail clusters
    (PyTorch's ``int(in_features // (div_value ** (i + 1)))``)."""
    return [int(E // (div_value ** (i + 1))) for i in range(n)]


def clusters(V: int, cutoffs) -> list:
    """``[(c_i, c_{i+1})]``: the word-id range of each tail cluster (the last ends at ``V``)."""
    c = [int(x) for x in cutoffs] + [V]
    return list(zip(c[:-1], c[1:]))


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


def tail_problems(V: int, E: int, cutoffs, div_value, K, tail_m) -> list:
    """What is wrong with slim tail clusters of ``K`` sub-vectors and pool
    totals ``tail_m`` (one per cluster) on valid bands (see
    :func:`config_problems`); empty when they can be built."""
    n = len(cutoffs)
    if isinstance(tail_m, (str, bytes)) or not hasattr(tail_m, "__len__") or \
            not all(isinstance(m, numbers.Integral) and not isinstance(m, bool) for m in tail_m):
        return [f"tail_m must be a list of pool sizes, one per tail cluster, got {tail_m!r}"]
    if len(tail_m) != n:
        return [f"output K={K} with output 'adaptive' means slim tail clusters: tail_m needs one "
                f"pool size per tail cluster ({n}), got {len(tail_m)}"]
    dims = tail_dims(E, n, div_value)
    if isinstance(K, bool) or not isinstance(K, numbers.Integral) or K < 1 or any(d % K for d in dims):
        fits = [k for k in range(1, min(dims) + 1) if not any(d % k for d in dims)]
        return [f"output K={K} must divide every tail cluster's vector size {dims} (E={E}, "
                f"div_value={div_value:g}); K in {fits} would"]
    problems = []
    for i, (m, (lo, hi)) in enumerate(zip(tail_m, clusters(V, cutoffs))):
        if m < K or m % K:
            problems.append(f"tail cluster {i} M={m} must be a positive multiple of K={K}")
        elif m // K > hi - lo:
            problems.append(f"tail cluster {i} M/K={m // K} must be <= its {hi - lo} words")
    return problems


def buffer_elements(rows: int, V: int, E: int, cutoffs, div_value, K: int = 1, tail_m=()) -> int:
    """Values of the layer's per-call buffers for ``rows`` hidden states (the
    memory estimate, :mod:`slimnp.memory`): head logits and ``dh``, and at
    worst every row in the widest cluster (gathered rows, projections, their
    gradients and a logits chunk of at most ``2**26`` values); with slim
    tails also a chunk's partial products ``(K, M_i/K, rows)`` and the
    cluster's ``(V_i,)`` bias gradient the DP computes."""
    c = list(cutoffs) + [V]
    widest = max(b - a for a, b in zip(c, c[1:]))
    d0 = tail_dims(E, len(cutoffs), div_value)[0]
    chunk = _eval_chunks(rows, widest)[0]
    n = rows * (c[0] + len(cutoffs) + 2 * E + 2 * d0) + (chunk[1] - chunk[0]) * widest
    if tail_m:
        n += max(min(rows, _eval_chunks(rows, hi - lo)[0][1]) * m + (hi - lo)
                 for m, (lo, hi) in zip(tail_m, clusters(V, cutoffs)))
    return n


class _Scratch(Workspace):
    """A :class:`Workspace` whose buffers only grow: ``get`` hands out a
    C-contiguous prefix of one flat buffer per name, so the tail clusters'
    logits (and the slim tails' partial products), whose row counts change
    every step and every cluster, reuse one allocation."""

    def get(self, name: str, shape, dtype):
        shape = tuple(int(s) for s in shape)
        size = math.prod(shape)
        a = self._bufs.get(name)
        if a is None or a.size < size or a.dtype != dtype:
            a = self._bufs[name] = None  # drop the old buffer before allocating its successor
            a = self._bufs[name] = self.xp.empty(size, dtype=dtype)
        return a[:size].reshape(shape)


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

    ``tail_m``: slim tail clusters (see the module docstring), cluster
    ``i``'s ``tail_k`` pools holding ``tail_m[i]`` entries in all, with
    ``tables[i]`` ``(V_i, K)`` its assignment table (entries local to each
    pool, :func:`slimnp.mapping.output_table`); empty: dense tails.
    """

    def __init__(self, store: ParamStore, name: str, V: int, E: int, cutoffs=DEFAULT_CUTOFFS,
                 div_value: float = DEFAULT_DIV_VALUE, head_bias: bool = False, tail_k: int = 1,
                 tail_m=(), tables=None):
        problems = config_problems(V, E, cutoffs, div_value)
        if not problems and (tail_m or tail_k != 1):
            problems = tail_problems(V, E, cutoffs, div_value, tail_k, tail_m)
            if not problems and [np.shape(t) for t in tables or ()] != \
                    [(hi - lo, tail_k) for lo, hi in clusters(V, cutoffs)]:
                problems = [f"slim tails need one (V_i, K={tail_k}) table per tail cluster"]
        if problems:
            raise ValueError("invalid adaptive softmax: " + "; ".join(problems))
        xp = store.xp
        self.store, self.name, self.V, self.E = store, name, V, E
        self.cutoffs = [int(c) for c in cutoffs] + [V]  # c_0 .. c_n
        self.n = len(cutoffs)  # tail clusters
        self.c0 = self.cutoffs[0]
        self.head_size = self.c0 + self.n
        self.dims = tail_dims(E, self.n, div_value)
        self.head_bias = bool(head_bias)
        self.slim = bool(tail_m)
        self.K = int(tail_k)
        store.add(f"{name}/head/W", (self.head_size, E))
        if self.head_bias:
            store.add(f"{name}/head/b", (self.head_size,))
        for i, d in enumerate(self.dims):
            store.add(f"{name}/tail{i}/proj", (d, E))
            if self.slim:
                store.add(f"{name}/tail{i}/A", (self.K, int(tail_m[i]) // self.K, d // self.K))
            else:
                store.add(f"{name}/tail{i}/W", (self.cutoffs[i + 1] - self.cutoffs[i], d))
        if self.slim:
            # per cluster: the (K, V_i) table, k-major as the DP's kernels read
            # it, and its inverse (None unless every pool entry has the same
            # number of words), on the parameters' device
            kv = [np.ascontiguousarray(np.asarray(t, dtype=np.int32).T) for t in tables]
            inv = [inverse_table(t, int(m) // self.K) for t, m in zip(kv, tail_m)]
            self._idx_kv = [xp.asarray(t) for t in kv]
            self._inv = [None if t is None else xp.asarray(t) for t in inv]
        # the cutoffs c_0 .. c_{n-1} on the parameters' device (for searchsorted)
        self._cuts = xp.asarray(np.asarray(self.cutoffs[:-1], dtype=np.int32))
        self.ws = Workspace(xp)
        self.tail_ws = _Scratch(xp)  # the clusters' logits (and partial products), grown to the largest

    # -- parameters ----------------------------------------------------------------
    def _head(self):
        p, n = self.store.params, self.name
        return p[f"{n}/head/W"], (p[f"{n}/head/b"] if self.head_bias else None)

    def _tail(self, i):
        """``(proj (d_i, E), W (V_i, d_i))``, or ``(proj, A (K, M_i/K, d_i/K))`` for slim tails."""
        p, n = self.store.params, self.name
        return p[f"{n}/tail{i}/proj"], p[f"{n}/tail{i}/{'A' if self.slim else 'W'}"]

    def tail_rows(self, i):
        """Slim tails: ``(V_i, K)`` rows of cluster ``i``'s K pools seen as one
        ``(M_i, d_i/K)`` array (word ``c_i + v``'s k-th sub-vector is row
        ``idx[v, k] + k M_i/K``), on the parameters' device."""
        xp = self.store.xp
        K, Mk = self.K, self.store.shapes[f"{self.name}/tail{i}/A"][1]
        return xp.ascontiguousarray((self._idx_kv[i] + (xp.arange(K, dtype=np.int32) * Mk)[:, None]).T)

    def _slim_tail(self, i, p, t, scale, compute_grad):
        """Rows ``p (n, d_i)`` of slim cluster ``i`` with targets ``t`` (local
        ids): their NLL and, with ``compute_grad``, ``dp (n, d_i)``
        (accumulating the pools' gradient).  The paper's DP on the cluster's
        pools (:func:`slimnp.layers.slim_softmax_loss_t`; no bias)."""
        A = self.store.params[f"{self.name}/tail{i}/A"]
        nll, grads = slim_softmax_loss_t(p, A, None, self._idx_kv[i], t, scale, compute_grad,
                                         self._inv[i], self.tail_ws)
        if not compute_grad:
            return nll, None
        dp, dPT, pk, _ = grads
        self.store.accumulate(f"{self.name}/tail{i}/A", dPT, pk)  # dA_k = dPT_k p_k
        return nll, dp

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
            P, W = self._tail(i)  # (d_i, E), (V_i, d_i) or the pools
            hi = xp.take(h, rows, axis=0)  # (N_i, E)
            ti = (xp.take(targets, rows) - lo).astype(np.int32)  # (N_i,) within the cluster
            p = hi @ P.T  # (N_i, d_i)
            nll_i = xp.empty(Ni, dtype=np.float64)
            dp = xp.empty_like(p) if compute_grad else None
            # the (N_i, V_i) logits in row chunks under 2**26 values (a large cluster)
            for a, b in _eval_chunks(Ni, Vi):
                if self.slim:
                    nll_i[a:b], g = self._slim_tail(i, p[a:b], ti[a:b], scale, compute_grad)
                    if compute_grad:
                        dp[a:b] = g
                    continue
                u = xp.matmul(p[a:b], W.T, out=self.tail_ws.get("tail", (b - a, Vi), h.dtype))
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
            if self.slim:  # word-major (V_i, N) log-probabilities by the DP
                u = slim_log_probs_t(h @ P.T, W, self._idx_kv[i], None, ws=self.tail_ws)[0].T
                u = u + g[:, c0 + i : c0 + i + 1]
            else:
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


# ---------------------------------------------------------------------------
# The adaptive input
# ---------------------------------------------------------------------------
@dataclass
class _Band:
    """One band of the adaptive input: the words ``[lo, hi)``, their vectors
    (the parameter ``W``: rows ``w - lo``, or with ``rows`` a slim cluster's
    pools, word ``w``'s sub-vectors at ``rows[w - lo]``) and the projection
    ``proj (d, E)`` to the word-vector size (None for band 0)."""

    lo: int
    hi: int
    W: str
    proj: str | None = None
    rows: object = None  # (V_j, K) rows of the pools seen as one (M, d/K) array


class AdaptiveEmbedding:
    """Input layer: adaptive input representations (Baevski and Auli, ICLR
    2019), on the bands of the adaptive softmax (see the module docstring).

    ``x[w] = band0/W[w]`` for the ``c_0`` head words, ``x[w] =
    band{j}/W[w - c_{j-1}] @ band{j}/proj`` for band ``j``'s words (tail
    cluster ``j - 1``'s): ``(V_{j-1}, d_{j-1})`` vectors, ``d_{j-1} = E //
    div_value**j``, projected to ``E``.

    ``tied``: an :class:`AdaptiveSoftmax` over the same ``V``, ``E`` and
    bands whose parameters the bands use instead of their own: band 0 the
    first ``c_0`` rows of its ``head/W``, band ``j`` the vectors (or slim
    pools) and projection of its tail cluster ``j - 1``.  The gradients from
    both sides add up in the shared parameters.
    """

    def __init__(self, store: ParamStore, name: str, V: int, E: int, cutoffs=DEFAULT_CUTOFFS,
                 div_value: float = DEFAULT_DIV_VALUE, tied: AdaptiveSoftmax | None = None):
        problems = config_problems(V, E, cutoffs, div_value)
        if problems:
            raise ValueError("invalid adaptive input: " + "; ".join(problems))
        cut = [0] + [int(c) for c in cutoffs] + [V]  # band j: [cut[j], cut[j+1])
        dims = [E] + tail_dims(E, len(cutoffs), div_value)
        if tied is not None and (tied.V, tied.E, tied.cutoffs, tied.dims) != (V, E, cut[1:], dims[1:]):
            raise ValueError("a tied adaptive input needs the output's V, E, cutoffs and div_value")
        self.store, self.name, self.V, self.E = store, name, V, E
        self.dims = dims
        self.bands = []
        for j, d in enumerate(dims):
            lo, hi = cut[j], cut[j + 1]
            if tied is None:
                store.add(f"{name}/band{j}/W", (hi - lo, d))
                if j:
                    store.add(f"{name}/band{j}/proj", (d, E))
                band = _Band(lo, hi, f"{name}/band{j}/W", f"{name}/band{j}/proj" if j else None)
            elif j == 0:
                band = _Band(lo, hi, f"{tied.name}/head/W")  # the head words' rows come first
            else:
                t = f"{tied.name}/tail{j - 1}"
                band = _Band(lo, hi, f"{t}/A" if tied.slim else f"{t}/W", f"{t}/proj",
                             tied.tail_rows(j - 1) if tied.slim else None)
            self.bands.append(band)
        # the band starts c_0 .. c_{n-1} on the parameters' device (for searchsorted)
        self._cuts = store.xp.asarray(np.asarray(cut[1:-1], dtype=np.int32))
        self._cache = None

    def _gather(self, band: _Band, local):
        """Band vectors ``(N_j, d)`` of the words ``lo + local``; and their
        pool rows ``(N_j, K)`` for a slim band (None otherwise)."""
        xp, W = self.store.xp, self.store.params[band.W]
        if band.rows is None:
            return xp.take(W, local, axis=0), None
        sub = xp.take(band.rows, local, axis=0)  # (N_j, K)
        return xp.take(W.reshape(-1, W.shape[-1]), sub, axis=0).reshape(local.size, -1), sub

    def forward(self, ids):
        """Word vectors ``(T, B, E)`` of ``ids (T, B)``."""
        xp, p = self.store.xp, self.store.params
        T, B = ids.shape
        flat = ids.reshape(-1)
        band_of = xp.searchsorted(self._cuts, flat, side="right")  # (T B,) band of each word
        X = xp.empty((flat.size, self.E), dtype=self.store.dtype)
        self._cache = []  # per band: (rows, local ids, pool rows, band vectors), or None
        for j, band in enumerate(self.bands):
            rows = xp.flatnonzero(band_of == j)  # (N_j,)
            if rows.size == 0:
                self._cache.append(None)
                continue
            local = (xp.take(flat, rows) - band.lo).astype(np.int32)
            e, sub = self._gather(band, local)  # (N_j, d)
            X[rows] = e if band.proj is None else e @ p[band.proj]
            self._cache.append((rows, local, sub, e))
        return X.reshape(T, B, self.E)

    def backward(self, ids, dX):
        """Accumulate the gradients of the last :meth:`forward` (``ids``) from ``dX (T, B, E)``."""
        store, xp = self.store, self.store.xp
        dX = dX.reshape(-1, self.E)
        for band, cached in zip(self.bands, self._cache):
            if cached is None:
                continue
            rows, local, sub, e = cached
            dy = xp.take(dX, rows, axis=0)  # (N_j, E)
            if band.proj is None:
                de = dy
            else:
                de = dy @ store.params[band.proj].T  # (N_j, d)
                store.accumulate(band.proj, e.T, dy)  # d proj = e^T dy
            if sub is None:  # rows local of the band's (V_j, d) vectors
                g = store.grad_rows(band.W, xp.unique(local))
                kernels.embedding_scatter_add(g, local, de)
            else:  # sub-vectors into the pool rows they came from
                g = store.grad_rows(band.W, xp.unique(sub))
                g = g.reshape(-1, g.shape[-1])
                kernels.embedding_scatter_add(g, sub.reshape(-1), de.reshape(-1, g.shape[1]))
