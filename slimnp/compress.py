"""Learned sub-vector assignment: k-means tables, and dense -> slim compression.

A slim output layer whose table is learned is product quantization of the
output matrix ``W (V, H)``: cut every row into K slices of ``d = H/K``; the
k-th slices of all words are clustered into the k-th pool's ``M/K``
centroids, and word w's k-th index is the cluster of its k-th slice.  The
input layer has ONE shared pool: all ``V*K`` slices are clustered together
into M centroids.  Li et al. (2018) fix the table at random before training
and name a data-driven one as future work; this module is that.

``compress_model`` turns a trained dense model into a slim one this way
(LSTM weights and the output bias copied); ``--frequent N`` keeps the N most
frequent words' slices exact, as private pool entries (a few hundred words
carry most tokens).

k-means (:func:`kmeans`): k-means++ seeding on a sample, Lloyd iterations on
that sample, empty clusters re-seeded with the points farthest from their
centroids, then one assignment pass over all points.  The nearest-centroid
search -- the only O(n k d) part -- runs in row blocks: one BLAS GEMM
``X_b C^T`` per block, then the compiled argmin kernel
(:func:`slimnp.kernels.nearest_centroid`).

At the paper's sizes the exact search is out of reach: the output layer of
the 793K-word model at 1/8 has ``k = 99K`` centroids per pool, and one exact
pass over its 793K slices of 256 numbers is 40 TFLOP per pool.  Above
``exact_budget`` the search is approximate, an inverted file
(:func:`nearest_ivf`, the coarse quantiser of Jegou et al. 2011): the
centroids are themselves clustered into ``~sqrt(k)`` lists, each point
compares itself with the ``nprobe`` nearest lists' centroids only, and the
work is one GEMM per list over the points that probe it -- about
``nprobe/sqrt(k)`` of the exact flops (1/40 at 99K).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

import numpy as np

from . import kernels


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, d)
    labels: np.ndarray  # (n,) int32: nearest centroid of every point
    inertia: float  # sum of squared distances to the assigned centroids (all points)
    iterations: int  # Lloyd iterations run
    seeding: str  # 'k-means++' or 'uniform' (k-means++ too costly at this size)
    sample: int  # points the centroids were fitted on
    history: list = dataclasses.field(default_factory=list)  # the sample's inertia per iteration
    search: str = "exact"  # 'exact', or 'ivf(lists, nprobe)' above exact_budget


def nearest(X, C, block: int = 4096):
    """Nearest centroid of every row: ``(labels (n,) int32, d2 (n,) float64)``.

    ``|x - c|^2 = |x|^2 - 2 x.c + |c|^2``: a GEMM per block of rows, then the
    argmin kernel; the ``(block, k)`` score matrix is the only temporary.
    """
    n, k = X.shape[0], C.shape[0]
    c_sq = np.einsum("ij,ij->i", C, C, dtype=np.float64).astype(X.dtype)
    labels = np.empty(n, np.int32)
    d2 = np.empty(n, np.float64)
    block = max(1, min(block, (1 << 25) // max(k, 1)))  # scores <= 128 MB (float32)
    scores = np.empty((min(block, n), k), X.dtype)
    for i in range(0, n, block):
        j = min(i + block, n)
        s = scores[: j - i]
        np.matmul(X[i:j], C.T, out=s)
        kernels.nearest_centroid(s, c_sq, labels[i:j], d2[i:j])
    return labels, _add_row_norms(d2, X)


class CoarseIndex:
    """An inverted file over centroids ``C (k, d)``: ``L ~ sqrt(k)`` coarse
    centres ``Q`` (k-means on the centroids themselves, exact: L is small)
    and, for each, the centroids nearest to it (``order[start[j]:start[j+1]]``)."""

    def __init__(self, C, seed: int = 0, lists: int | None = None):
        k = C.shape[0]
        L = max(1, min(k, lists or int(round(math.sqrt(k)))))
        r = kmeans(C, L, seed=seed, iters=8, pp_budget=0, exact_budget=math.inf)
        self.Q, self.lists = r.centroids, L
        self._set(r.labels)

    def _set(self, labels) -> None:
        self.order = np.argsort(labels, kind="stable").astype(np.int64)
        self.start = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=self.lists))])

    def relist(self, C) -> "CoarseIndex":
        """The same coarse centres, each of ``C``'s (moved) centroids put in
        its nearest one's list: Lloyd's centroids move little from one
        iteration to the next, so the lists are redrawn, not re-clustered."""
        self._set(nearest(C, self.Q)[0])
        return self


def nearest_ivf(X, C, *, nprobe: int = 8, index: CoarseIndex | None = None, seed: int = 0,
                block: int = 4096, previous=None):
    """Approximately nearest centroid of every row, as :func:`nearest` returns it.

    Each row is compared with the centroids of its ``nprobe`` nearest lists
    of ``index`` (a :class:`CoarseIndex` of ``C``, built here when not
    given): exact when its nearest centroid lies in one of them, else the
    nearest among those probed.  The work is grouped by list: the rows that
    probe list j form one GEMM with list j's centroids, then the argmin
    kernel, and a row keeps the best over its lists (the lower list first on
    ties, so the result does not depend on anything but the inputs).
    ``previous``: labels (n,) each row keeps unless a probed centroid is
    nearer -- Lloyd's objective then never increases, as with the exact search.
    """
    n = X.shape[0]
    index = index or CoarseIndex(C, seed=seed)
    nprobe = max(1, min(nprobe, index.lists))
    probes = _top_lists(X, index.Q, nprobe, block)
    c_sq = np.einsum("ij,ij->i", C, C, dtype=np.float64).astype(X.dtype)
    best = np.full(n, np.inf)
    labels = np.zeros(n, np.int32)
    if previous is not None:
        labels[:] = previous
        for i in range(0, n, block):  # c_sq - 2 x.c of the previous centroid
            p = labels[i:i + block]
            best[i:i + block] = c_sq[p] - 2.0 * np.einsum("ij,ij->i", X[i:i + block], C[p],
                                                          dtype=np.float64)
    # rows grouped by probed list: one stable sort of the (n * nprobe) probes
    flat = probes.ravel()
    by_list = np.argsort(flat, kind="stable")
    rows_of = (by_list // nprobe).astype(np.int64)
    bounds = np.searchsorted(flat[by_list], np.arange(index.lists + 1))
    # scratch reused by every list (no allocation per block of rows)
    widest = int(np.diff(index.start).max())
    xbuf = np.empty((block, X.shape[1]), X.dtype)
    sbuf = np.empty(block * widest, X.dtype)
    lab, d2 = np.empty(block, np.int32), np.empty(block, np.float64)
    for j in range(index.lists):
        rows = rows_of[bounds[j]:bounds[j + 1]]
        cents = index.order[index.start[j]:index.start[j + 1]]
        if rows.size == 0 or cents.size == 0:
            continue
        Cj, cj_sq = C[cents], c_sq[cents]
        for i in range(0, rows.size, block):
            r = rows[i:i + block]
            m = r.size
            np.take(X, r, axis=0, out=xbuf[:m])
            s = np.matmul(xbuf[:m], Cj.T, out=sbuf[: m * cents.size].reshape(m, cents.size))
            kernels.nearest_centroid(s, cj_sq, lab[:m], d2[:m])
            better = d2[:m] < best[r]
            best[r[better]] = d2[:m][better]
            labels[r[better]] = cents[lab[:m][better]]
    return labels, _add_row_norms(best, X)


def _add_row_norms(d2, X):
    """``d2 + |x|^2`` per row, floored at 0 (rounding can make a squared
    distance slightly negative): the squared distances from the argmin
    kernel's ``c_sq - 2 x.c``."""
    d2 += np.einsum("ij,ij->i", X, X, dtype=np.float64)
    np.maximum(d2, 0.0, out=d2)
    return d2


def _top_lists(X, Q, nprobe: int, block: int):
    """The ``nprobe`` coarse centres nearest each row (n, nprobe), nearest first."""
    n = X.shape[0]
    q_sq = np.einsum("ij,ij->i", Q, Q, dtype=np.float64).astype(X.dtype)
    out = np.empty((n, nprobe), np.int32)
    scores = np.empty((min(block, n), Q.shape[0]), X.dtype)
    for i in range(0, n, block):
        s = scores[: min(block, n - i)]
        np.matmul(X[i:i + block], Q.T, out=s)
        kernels.nearest_lists(s, q_sq, out[i:i + block])
    return out


def _kmeanspp(X, k, rng):
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre drawn
    with probability proportional to the squared distance to the nearest
    centre so far.  O(n k d)."""
    n = X.shape[0]
    first = int(rng.integers(n))
    C = np.empty((k, X.shape[1]), X.dtype)
    C[0] = X[first]
    d2 = ((X - C[0]) ** 2).sum(axis=1, dtype=np.float64)
    for c in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: the rest are duplicates
            C[c:] = X[rng.integers(n, size=k - c)]
            break
        i = int(np.searchsorted(np.cumsum(d2), rng.random() * total))
        C[c] = X[min(i, n - 1)]
        np.minimum(d2, ((X - C[c]) ** 2).sum(axis=1, dtype=np.float64), out=d2)
    return C


def _update(X, labels, k, C_old):
    """Cluster means; empty clusters keep their old centroid (repaired below)."""
    counts = np.bincount(labels, minlength=k)
    sums = np.empty((k, X.shape[1]), np.float64)
    kernels.cluster_sums(X, labels, sums)  # np.add.at's order, in a fraction of its time
    C = C_old.astype(np.float64)  # a copy
    nz = counts > 0
    C[nz] = sums[nz] / counts[nz, None]
    return C.astype(X.dtype), counts


def _repair(X, C, counts, d2):
    """Re-seed every empty cluster with one of the points farthest from their
    centroids (distinct points, farthest first): a standard, deterministic fix."""
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        far = np.argsort(-d2, kind="stable")[: empty.size]
        C[empty[: far.size]] = X[far]
    return int(empty.size)


def kmeans(X, k: int, *, seed: int = 0, iters: int | None = None, tol: float = 1e-4,
           sample: int | None = None, pp_budget: float = 2e9, exact_budget: float = 2e11,
           nprobe: int = 8, on_iteration=None) -> KMeansResult:
    """Cluster the rows of ``X (n, d)`` into ``k`` centroids.

    Parameters
    ----------
    X : (n, d) float32 or float64 points
    k : clusters, ``1 <= k <= n``
    seed : the generator of the sample and the seeding: same seed, same result
    iters : at most this many Lloyd iterations on the sample (default 25
        with the exact search, 10 with the inverted file)
    tol : stop when the sample's inertia improves by less than this fraction
    sample : fit the centroids on this many points drawn without replacement
        (default: all points up to ``max(64 k, 100_000)``, or ``max(4 k,
        100_000)`` when the search is approximate); one assignment pass over
        every point follows
    pp_budget : k-means++ seeding costs about ``sample * k * d`` flops; above
        this the seeds are distinct random sample points instead ('uniform')
    exact_budget : an exact assignment pass costs about ``2 n k d`` flops;
        above this every pass searches an inverted file instead
        (:func:`nearest_ivf`, rebuilt each iteration) probing ``nprobe``
        of its ``~sqrt(k)`` lists
    on_iteration : called as ``on_iteration(iteration, iters, inertia)``
        after each Lloyd iteration (a progress line)

    Returns
    -------
    :class:`KMeansResult`
    """
    X = np.ascontiguousarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float32)
    n, d = X.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means: k={k} clusters need 1 <= k <= n={n} points")
    rng = np.random.Generator(np.random.PCG64(seed))
    exact = 2.0 * n * k * d <= exact_budget
    default = max(64 * k, 100_000) if exact else max(4 * k, 100_000)
    m = n if sample is None and n <= default else min(n, sample or default)
    S = X if m == n else X[np.sort(rng.choice(n, m, replace=False))]
    if m * k * d <= pp_budget:
        C, seeding = _kmeanspp(S, k, rng), "k-means++"
    else:
        C, seeding = S[rng.choice(m, k, replace=False)].copy(), "uniform"
    if exact:
        search, assign = "exact", nearest
    else:
        search = f"ivf({max(1, int(round(math.sqrt(k))))}, {nprobe})"

        index = None

        def assign(P, C, previous=None):  # the coarse centres fitted once, the lists redrawn
            nonlocal index
            index = CoarseIndex(C, seed=seed + 1) if index is None else index.relist(C)
            return nearest_ivf(P, C, nprobe=nprobe, index=index, previous=previous)
    iters = iters or (25 if exact else 10)
    prev, it, history, labels = math.inf, 0, [], None
    for it in range(1, iters + 1):
        labels, d2 = assign(S, C) if exact or labels is None else assign(S, C, labels)
        inertia = float(d2.sum())
        history.append(inertia)
        if on_iteration is not None:
            on_iteration(it, iters, inertia)
        C, counts = _update(S, labels, k, C)
        _repair(S, C, counts, d2)
        if math.isfinite(prev) and prev - inertia <= tol * prev and not (counts == 0).any():
            break
        prev = inertia
    labels, d2 = assign(X, C)
    return KMeansResult(C, labels, float(d2.sum()), it, seeding, m, history, search)


# ---------------------------------------------------------------------------
# dense -> slim
# ---------------------------------------------------------------------------
def _frequent_ids(counts, N: int):
    """The ``N`` most frequent word ids (ties: lower id first), sorted."""
    if N <= 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-np.asarray(counts, np.int64), kind="stable")
    return np.sort(order[:N])


def output_tables(W, K: int, Mk: int, frequent, seed: int, progress=None, **kw):
    """Product quantization of ``W (V, H)``: pools ``A (K, Mk + F, d)`` and the
    table ``idx (V, K)``.  The ``F = len(frequent)`` frequent words get
    private entries ``Mk .. Mk + F - 1`` of every pool holding their exact
    slices; k-means clusters the other words' slices."""
    V, H = W.shape
    d = H // K
    F = len(frequent)
    rest = np.setdiff1d(np.arange(V), frequent)
    A = np.empty((K, Mk + F, d), W.dtype)
    idx = np.empty((V, K), np.int32)
    stats = []
    for k in range(K):
        sl = W[:, k * d : (k + 1) * d]
        tick = None if progress is None else \
            (lambda i, n, inertia, k=k: progress(k + i / n, f"pool {k + 1}/{K}, iteration {i}"))
        r = kmeans(sl[rest], min(Mk, len(rest)), seed=seed * 1000 + k, on_iteration=tick, **kw)
        A[k, : r.centroids.shape[0]] = r.centroids
        A[k, r.centroids.shape[0] : Mk] = 0  # when fewer words than entries
        A[k, Mk:] = sl[frequent]
        idx[rest, k] = r.labels
        idx[frequent, k] = Mk + np.arange(F)
        stats.append(r)
    return A, idx, stats


def input_tables(E, K: int, M: int, frequent, seed: int, progress=None, **kw):
    """One pool for all positions: ``A (M + F*K, d)`` and ``idx (V, K)``; the
    frequent words' K slices each get a private row."""
    V, H = E.shape
    d = H // K
    F = len(frequent)
    rest = np.setdiff1d(np.arange(V), frequent)
    slices = E[rest].reshape(len(rest) * K, d)  # row w*K + k: word w's k-th slice
    tick = None if progress is None else (lambda i, n, inertia: progress(i / n, f"iteration {i}"))
    r = kmeans(slices, min(M, slices.shape[0]), seed=seed, on_iteration=tick, **kw)
    A = np.zeros((M + F * K, d), E.dtype)
    A[: r.centroids.shape[0]] = r.centroids
    A[M:] = E[frequent].reshape(F * K, d)
    idx = np.empty((V, K), np.int32)
    idx[rest] = r.labels.reshape(len(rest), K)
    idx[frequent] = M + np.arange(F * K).reshape(F, K)
    return A, idx, [r]


def compress_model(model, counts, *, input_k=None, input_ratio=None, output_k=None,
                   output_ratio=None, frequent: int = 0, seed: int = 0, source_sha256=None,
                   log=lambda m: None, progress: bool = False, **kmeans_kw):
    """A slim :class:`~slimnp.model.LanguageModel` made from a dense one.

    ``input_k``/``input_ratio`` (and the output pair): K and the pool size as
    a share of the dense table, as ``slimnp train`` takes them (``M =
    ratio*K*V`` in, ``M/K = ratio*V`` out), before the ``frequent`` words'
    private entries (which add ``frequent*K`` to M on either side).  A side
    whose K is None stays as it is.  ``progress``: a progress line per
    layer on stderr (pools and Lloyd iterations done, ETA).  Returns
    ``(slim model, report dict)``.
    """
    from .model import LanguageModel
    from .progress import Progress

    c = model.config
    if c.input != "dense" or c.output != "full" or c.tie:
        raise ValueError("compress takes a dense, untied model (input dense, output full)")
    if c.embedding_size:
        raise ValueError("compress takes a model without --embedding-size projections")
    V, H = c.vocab_size, c.hidden
    params = model.params_numpy()
    freq = _frequent_ids(counts, frequent) if frequent else np.zeros(0, np.int64)
    F = len(freq)
    new = {}
    tables = {}
    report = {"frequent": F, "kmeans": {"iters": kmeans_kw.get("iters") or "auto",
                                        "tol": kmeans_kw.get("tol", 1e-4), "seed": seed}}
    if frequent:
        share = float(np.asarray(counts, np.float64)[freq].sum() / max(np.sum(counts), 1))
        report["frequent_token_share"] = share
    t0 = time.perf_counter()
    if F >= V:
        raise ValueError(f"--frequent {F} leaves no word to cluster (V = {V})")
    if output_k:
        K = int(output_k)
        if H % K:
            raise ValueError(f"--output-k {K} must divide the hidden size {H}")
        Mk = max(1, round(output_ratio * V))
        if F > Mk:
            raise ValueError(f"--output-ratio {output_ratio:g} gives {Mk} entries per pool, fewer than "
                             f"the {F} private ones --frequent {F} adds: the frequent words would "
                             "outweigh the compressed pool; raise the ratio or lower --frequent")
        with Progress(K, "output k-means", enabled=progress) as bar:
            A, idx, stats = output_tables(params["output/W"], K, Mk, freq, seed, progress=bar.update,
                                          **kmeans_kw)
        new["output/A"] = A
        tables["output/idx"] = idx
        new["output/b"] = params["output/b"]
        report["output"] = {"K": K, "M": K * (Mk + F), "clustered_M": K * Mk,
                            "private_entries": K * F, "seeding": stats[0].seeding,
                            "search": stats[0].search, "iterations": [s.iterations for s in stats],
                            "distortion": _distortion(params["output/W"], A, idx)}
        log(f"output: K={K}, {K}x{Mk} clustered + {K}x{F} private entries, "
            f"relative distortion {report['output']['distortion']:.4f}")
    if input_k:
        K = int(input_k)
        if H % K:
            raise ValueError(f"--input-k {K} must divide the hidden size {H}")
        M = max(1, round(input_ratio * K * V))
        if F * K > M:
            raise ValueError(f"--input-ratio {input_ratio:g} gives a pool of {M}, fewer than the "
                             f"{F * K} private entries --frequent {F} adds (K = {K} each); raise the "
                             "ratio or lower --frequent")
        with Progress(1, "input k-means", enabled=progress) as bar:
            A, idx, stats = input_tables(params["embedding/W"], K, M, freq, seed + 1, progress=bar.update,
                                         **kmeans_kw)
        new["embedding/A"] = A
        tables["input/idx"] = idx
        report["input"] = {"K": K, "M": M + F * K, "clustered_M": M, "private_entries": F * K,
                           "seeding": stats[0].seeding, "search": stats[0].search,
                           "iterations": [stats[0].iterations],
                           "distortion": _distortion(params["embedding/W"], A, idx)}
        log(f"input: K={K}, {M} clustered + {F * K} private entries, "
            f"relative distortion {report['input']['distortion']:.4f}")
    report["seconds"] = time.perf_counter() - t0
    info = {"kind": "learned", "method": "k-means", **report["kmeans"], "frequent": F,
            **{f"{side}_search": report[side]["search"] for side in ("output", "input") if side in report}}
    if source_sha256:
        info["source_sha256"] = source_sha256
    fields = {"mapping": "learned", "mapping_seed": seed, "mapping_info": json.dumps(info, sort_keys=True)}
    if "output/A" in new:
        fields.update(output="slim", output_k=report["output"]["K"], output_m=report["output"]["M"])
    if "embedding/A" in new:
        fields.update(input="slim", input_k=report["input"]["K"], input_m=report["input"]["M"])
    cfg = dataclasses.replace(c, **fields)
    slim = LanguageModel(cfg, device=model.device, mapping=tables)
    for name, arr in params.items():
        if name in slim.store.params and name not in new:
            new[name] = arr  # LSTM weights, and the untouched dense side
    slim.load_params(new)
    report["parameters"] = {"before": model.num_parameters, "after": slim.num_parameters}
    return slim, report


def _distortion(W, A, idx) -> float:
    """``|W - W_hat|_F / |W|_F`` of the vectors rebuilt from the pools
    (:func:`slimnp.layers.slim_matrix`: ``A`` one pool or K of them)."""
    from .layers import slim_matrix

    What = slim_matrix(A, idx)
    return float(np.linalg.norm(W - What) / max(np.linalg.norm(W), 1e-30))


def compress_file(model_path, out, *, input_k=None, input_ratio=None, output_k=None,
                  output_ratio=None, frequent: int = 0, valid=None, seed: int = 0, iters=None,
                  force: bool = False, log=print, progress: bool = True) -> dict:
    """``slimnp compress``: the dense model in file ``model_path`` as a slim
    model with learned tables (:func:`compress_model`), written to ``out``.

    ``valid``: a text file to report the perplexity on before and after
    (batch 10).  Returns the report; ``log`` gets a summary line.  ``out`` is
    checked before the k-means (a folder that cannot be written costs
    seconds) and is not overwritten unless ``force``.
    """
    from pathlib import Path

    from ._atomic import check_output, file_sha256
    from .evaluate import evaluate_ids
    from .modelfile import load_model, save_model
    from .trainer import TrainingError

    out = Path(out)
    check_output(out)
    if out.exists() and not force:
        raise TrainingError(f"{out} exists; pass --force to overwrite it")
    dense, vocab, _ = load_model(model_path)
    counts = vocab.counts if vocab.counts is not None else np.ones(len(vocab), np.int64)
    valid_ids = vocab.encode_file(valid).ids if valid else None
    report = {}
    if valid_ids is not None:
        report["valid_ppl_before"] = evaluate_ids(dense, valid_ids, vocab.eos_id, batch_size=10).perplexity
    slim, rep = compress_model(dense, counts, input_k=input_k, input_ratio=input_ratio,
                               output_k=output_k, output_ratio=output_ratio, frequent=frequent,
                               seed=seed, source_sha256=file_sha256(model_path), log=log, iters=iters,
                               progress=progress)
    report.update(rep)
    if valid_ids is not None:
        report["valid_ppl_after"] = evaluate_ids(slim, valid_ids, vocab.eos_id, batch_size=10).perplexity
    save_model(out, slim, vocab, compressed_from={"file": str(Path(model_path).resolve()), **rep})
    p = report["parameters"]
    line = (f"wrote {out}: {p['after']:,} parameters (dense {p['before']:,}, "
            f"{p['after'] / p['before']:.3f}); k-means {report['seconds']:.1f} s")
    if frequent:
        line += (f"; {report['frequent']} frequent words ({report['frequent_token_share'] * 100:.1f}% "
                 f"of the training tokens) kept exact")
    if valid_ids is not None:
        line += (f"; valid ppl {report['valid_ppl_before']:.2f} -> {report['valid_ppl_after']:.2f} "
                 "(batch 10, before fine-tuning)")
    log(line)
    return report
