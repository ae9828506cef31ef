"""Slim output-layer kernels and the parallel embedding scatter: the equations
as loops, their invariants, the dispatcher's checks, the slim inference path,
and the Numba kernels' serial and parallel variants against the NumPy spec.

Notation (the top of the slim output layer in ``slimnp/layers.py``), one
layout: PT (K, Mk, N) partial products, idx_kv (K, V) pool entries in [0,
Mk), zT (V, N) logits, GT (K, Mk, N) the gradient w.r.t. PT.  Every
backend's parity with the reference is tested in ``test_kernels.py``, with
the cases and tolerances of ``backends.py``.
"""
import numpy as np
import pytest

from slimnp import kernels
from slimnp.kernels import cpu, reference

from backends import DTYPES, SLIM_CASES, slim_case, tol


def test_slim_kernels_against_loops(backend, rng):
    """Both equations written as plain Python loops on a tiny case."""
    K, N, Mk, V = 2, 3, 3, 5
    PT, idx_kv, b, dzT = slim_case(rng, np.float64, K, N, Mk, V, shared=True)
    zT_loop = np.zeros((V, N))
    GT_loop = np.zeros((K, Mk, N))
    for w in range(V):
        for n in range(N):
            zT_loop[w, n] = b[w]
            for k in range(K):
                zT_loop[w, n] += PT[k, idx_kv[k, w], n]
                GT_loop[k, idx_kv[k, w], n] += dzT[w, n]
    put = backend.put
    zT, GT = put(np.empty((V, N))), put(np.empty((K, Mk, N)))
    kernels.slim_gather_sum_t(put(PT), put(idx_kv), put(b), zT)
    kernels.slim_segment_sum_t(put(dzT), put(idx_kv), GT)
    np.testing.assert_allclose(backend.get(zT), zT_loop, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(backend.get(GT), GT_loop, rtol=1e-14, atol=1e-14)


def test_slim_segment_sum_is_adjoint(backend, rng):
    """<dzT, gather(PT) - b> == <segment_sum(dzT), PT>: the backward is the transpose."""
    K, N, Mk, V = 4, 6, 7, 50
    PT, idx_kv, b, dzT = slim_case(rng, np.float64, K, N, Mk, V, shared=True)
    put = backend.put
    zT, GT = put(np.empty((V, N))), put(np.empty((K, Mk, N)))
    kernels.slim_gather_sum_t(put(PT), put(idx_kv), put(b), zT)
    kernels.slim_segment_sum_t(put(dzT), put(idx_kv), GT)
    zT, GT = backend.get(zT), backend.get(GT)
    assert abs(np.sum(dzT * (zT - b[:, None])) - np.sum(GT * PT)) < 1e-10


@pytest.mark.parametrize("dtype", DTYPES)
def test_slim_without_sharing_is_dense(backend, dtype, rng):
    """K=1, Mk=V, idx=arange(V): the slim logits are PT[0] + b, exactly, and GT[0] = dzT."""
    N, V = 5, 12
    PT = rng.standard_normal((1, V, N)).astype(dtype)
    b = rng.standard_normal(V).astype(dtype)
    dzT = rng.standard_normal((V, N)).astype(dtype)
    idx_kv = np.arange(V, dtype=np.int32)[None, :]
    put = backend.put
    zT, GT = put(np.empty((V, N), dtype)), put(np.empty((1, V, N), dtype))
    kernels.slim_gather_sum_t(put(PT), put(idx_kv), put(b), zT)
    kernels.slim_segment_sum_t(put(dzT), put(idx_kv), GT)
    np.testing.assert_array_equal(backend.get(zT), PT[0] + b[:, None])
    np.testing.assert_array_equal(backend.get(GT)[0], dzT)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,N", [(1, 1), (37, 3), (9000, 20)])
def test_slim_log_probs_t_equal_the_dense_product(backend, dtype, V, N, rng):
    """The slim inference path (K GEMMs, the gather-sum with the bias, the
    column log-softmax: what scoring computes, and generation for each drawn
    word) against the log-softmax of the dense product of the same vectors."""
    from slimnp.layers import slim_log_probs_t

    K, d, Mk = 2, 3, max(1, V // 3)
    b = rng.standard_normal(V).astype(dtype)
    A = rng.standard_normal((K, Mk, d)).astype(dtype)
    idx_kv = rng.integers(0, Mk, (K, V)).astype(np.int32)
    h = rng.standard_normal((N, K * d)).astype(dtype)
    W = np.concatenate([A[k][idx_kv[k]] for k in range(K)], axis=1)  # (V, H)
    logits = h @ W.T + b
    want = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))
    logp, _ = slim_log_probs_t(h, A, idx_kv, b)
    np.testing.assert_allclose(logp.T, want, rtol=1e-4 if dtype == np.float32 else 1e-10, atol=1e-4)


def _record(monkeypatch, calls, *names):
    """Wrap the cpu module's kernels ``names`` to note each call in ``calls``."""
    for name in names:
        fn = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _fn=fn, _name=name: (calls.append(_name), _fn(*a))[1])


@pytest.mark.parametrize("threshold,variant", [(0, "parallel"), (10**12, "serial")])
def test_slim_dispatch_uses_parallel_path(monkeypatch, rng, threshold, variant):
    """Thresholds at zero route the dispatcher to the gather-sum's parallel
    variant (and out of reach, to the serial one); either gives the
    reference's bits.  (The segment sums are parallel kernels only.)"""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_GATHER", threshold)
    calls = []
    _record(monkeypatch, calls, "_slim_gather_sum_t_serial", "_slim_gather_sum_t_parallel")
    PT, idx_kv, b, _ = slim_case(rng, np.float64, 3, 4, 5, 20)
    want, zT = np.empty((20, 4)), np.empty((20, 4))
    reference.slim_gather_sum_t(PT, idx_kv, b, want)
    with kernels.using("cpu"):
        kernels.slim_gather_sum_t(PT, idx_kv, b, zT)
    assert calls == [f"_slim_gather_sum_t_{variant}"]
    np.testing.assert_array_equal(zT, want)


def test_slim_dispatcher_validates(rng):
    PT, idx, b, zT, GT = (np.zeros((2, 4, 3)), np.zeros((2, 5), np.int32), np.zeros(5),
                          np.zeros((5, 3)), np.zeros((2, 4, 3)))
    kernels.slim_gather_sum_t(PT, idx, b, zT)  # the valid calls
    kernels.slim_gather_sum_t(PT, idx, None, zT)
    kernels.slim_segment_sum_t(zT, idx, GT, None, np.zeros(5))
    with pytest.raises(ValueError, match=r"3-d array \(K, Mk, N\)"):
        kernels.slim_gather_sum_t(PT[0], idx, b, zT)
    with pytest.raises(ValueError, match="K = 2"):
        kernels.slim_gather_sum_t(PT, idx.T.copy(), b, zT)  # a (V, K) table
    with pytest.raises(ValueError, match=r"zT: expected shape \(5, 3\)"):
        kernels.slim_gather_sum_t(PT, idx, b, np.zeros((3, 5)))  # (N, V): the layout that is not
    with pytest.raises(ValueError, match=r"b: expected shape \(5,\)"):
        kernels.slim_gather_sum_t(PT, idx, np.zeros(4), zT)
    with pytest.raises(IndexError, match=r"\[0, 4\).*found range \[4, 4\]"):
        kernels.slim_gather_sum_t(PT, np.full((2, 5), 4, np.int32), b, zT)
    bad = idx.copy()
    bad[1, 3] = -1
    with pytest.raises(IndexError, match=r"found range \[-1, 0\]"):
        kernels.slim_segment_sum_t(zT, bad, GT)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.slim_gather_sum_t(PT.astype(np.float16), idx, None, zT.astype(np.float16))
    with pytest.raises(TypeError, match="does not match"):
        kernels.slim_gather_sum_t(PT, idx, b, zT.astype(np.float32))
    with pytest.raises(TypeError, match="integer table"):
        kernels.slim_segment_sum_t(zT, idx.astype(np.float64), GT)
    with pytest.raises(ValueError, match=r"dzT: expected shape \(5, 3\)"):
        kernels.slim_segment_sum_t(np.zeros((4, 3)), idx, GT)
    with pytest.raises(ValueError, match=r"db: expected shape \(5,\)"):
        kernels.slim_segment_sum_t(zT, idx, GT, None, np.zeros(4))


# --- embedding_scatter_add: the parallel (row-grouped) path -----------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,D,N", [(11, 6, 40), (1, 3, 9), (500, 4, 300), (50, 1, 1)])
def test_embedding_scatter_add_parallel(dtype, V, D, N, rng):
    ids = rng.integers(0, V, N).astype(np.int32)
    ids[: min(N, 4)] = [0, V - 1, V // 2, V // 2][: min(N, 4)]  # ends and a repeat
    if N > 10:
        ids[::5] = V - 1  # one row receiving many entries
    dX = rng.standard_normal((N, D)).astype(dtype)
    W0 = rng.standard_normal((V, D)).astype(dtype)
    expect = W0.copy()
    reference.embedding_scatter_add(expect, ids, dX)
    serial, parallel = W0.copy(), W0.copy()
    cpu._embedding_scatter_add_serial(serial, ids, dX)
    cpu._embedding_scatter_add_parallel(parallel, ids, dX)
    np.testing.assert_allclose(parallel, expect, **tol("cpu", dtype))
    # same additions in the same order per row: identical bits
    np.testing.assert_array_equal(parallel, serial)


def test_embedding_scatter_add_dispatch_parallel(monkeypatch, rng):
    """Slim input layer shape: N*K sub-ids into a pool of M rows of size d, forced parallel."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_SCATTER", 0)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_SCATTER_ROW", 0)
    M, d, NK = 40, 5, 600
    ids = rng.integers(0, M, NK).astype(np.int32)
    dX = rng.standard_normal((NK, d))
    expect, got = np.zeros((M, d)), np.zeros((M, d))
    cpu._embedding_scatter_add_serial(expect, ids, dX)
    with kernels.using("cpu"):
        kernels.embedding_scatter_add(got, ids, dX)
    np.testing.assert_array_equal(got, expect)


# Word-major kernels prefetch the rows of the word (or entry) a few steps
# ahead: the prefetch distance must stop at the last word, rows shorter than a
# cache line and longer than the prefetched lines must both come out exact,
# and the last pool entry (the row ending the array) must be reachable.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,Mk,V", [(2, 1, 3, 5), (3, 200, 7, 50), (4, 5, 2, cpu._PREFETCH_WORDS),
                                      (2, 17, 9, cpu._PREFETCH_WORDS + 1), (1, 3, 1, 1)]
                         + [(K, N, Mk, V) for K, N, Mk, V, _ in SLIM_CASES]
                         + [(1, 1, 1, 5), (3, 4, 7, 40), (8, 20, 50, 300)])
@pytest.mark.parametrize("bias", [False, True])
def test_word_major_prefetching_kernels_exact(dtype, K, N, Mk, V, bias, rng):
    """Both compiled variants of the gather-sum, whichever the size would
    pick, give the reference's bits; the segment sum's two forms."""
    idx_kv = rng.integers(0, Mk, (K, V)).astype(np.int32)
    idx_kv[:, -1] = Mk - 1
    PT = rng.standard_normal((K, Mk, N)).astype(dtype)
    b = rng.standard_normal(V).astype(dtype) if bias else None
    want = np.full((V, N), np.nan, dtype)
    reference.slim_gather_sum_t(PT, idx_kv, b, want)
    u = cpu._unsigned(idx_kv)
    for kernel in (cpu._slim_gather_sum_t_serial, cpu._slim_gather_sum_t_parallel):
        zT = np.full((V, N), np.nan, dtype)
        kernel(PT, u, b if bias else np.empty(0, dtype), bias, zT)
        np.testing.assert_array_equal(zT, want)  # same order of additions: bit-exact
    dzT = rng.standard_normal((V, N)).astype(dtype)
    want_g = np.full((K, Mk, N), np.nan, dtype)
    want_db = np.full(V, np.nan, dtype)
    reference.slim_segment_sum_t(dzT, idx_kv, want_g, None, want_db)
    GT, db = np.full((K, Mk, N), np.nan, dtype), np.full(V, np.nan, dtype)
    cpu.slim_segment_sum_t(dzT, idx_kv, GT, None, db)  # scatter form (any table)
    np.testing.assert_allclose(GT, want_g, **tol("cpu", dtype, sums=True))
    np.testing.assert_allclose(db, want_db, **tol("cpu", dtype, sums=True))
    if V % Mk == 0:  # uniform fan-out: the inverse-table form, exact
        from slimnp.mapping import inverse_table

        idx_u = np.stack([rng.permutation(np.arange(V) % Mk) for _ in range(K)]).astype(np.int32)
        inv = inverse_table(idx_u, Mk)
        want_u = np.full((K, Mk, N), np.nan, dtype)
        reference.slim_segment_sum_t(dzT, idx_u, want_u)
        GT = np.full((K, Mk, N), np.nan, dtype)
        cpu.slim_segment_sum_t(dzT, idx_u, GT, inv, None)
        np.testing.assert_array_equal(GT, want_u)
