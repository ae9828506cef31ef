"""Slim output-layer kernels and the parallel embedding scatter, Numba vs the NumPy spec.

Notation (reference.py): P (K, N, Mk) partial products, idx_kv (K, V) pool
entries in [0, Mk), z (N, V) logits, G (K, N, Mk) gradient w.r.t. P.
"""
import numpy as np
import pytest

from slimnp import kernels
from slimnp.kernels import cpu, reference

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}
# segment sums add up to V terms into one entry; the reference accumulates
# them in float64 (bincount), the kernel in the array's dtype
SEG_TOL = {np.float32: dict(rtol=1e-4, atol=1e-4), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _gather_variants():
    """Every implementation of slim_gather_sum under the reference signature."""
    def compiled(kernel):
        def run(P, idx_kv, b, z):
            has_bias = b is not None
            kernel(P, idx_kv, b if has_bias else np.empty(0, P.dtype), has_bias, z)
        return run
    return {"cpu": cpu.slim_gather_sum,
            "serial": compiled(cpu._slim_gather_sum_serial),
            "parallel": compiled(cpu._slim_gather_sum_parallel)}


SEGMENT_VARIANTS = {"cpu": cpu.slim_segment_sum,
                    "serial": cpu._slim_segment_sum_serial,
                    "parallel": cpu._slim_segment_sum_parallel}


def _slim_case(rng, dtype, K, N, Mk, V, bias=True, shared=False):
    P = rng.standard_normal((K, N, Mk)).astype(dtype)
    idx_kv = rng.integers(0, Mk, (K, V)).astype(np.int32)
    idx_kv[:, 0] = 0  # first pool entry, used by word 0
    idx_kv[:, -1] = Mk - 1  # last pool entry, used by word V-1
    if shared:  # a third of the vocabulary on one entry of every pool
        idx_kv[:, ::3] = Mk // 2
    b = rng.standard_normal(V).astype(dtype) if bias else None
    dz = rng.standard_normal((N, V)).astype(dtype)
    return P, idx_kv, b, dz


# (K, N, Mk, V, bias, shared): generic; K=1; N=1 (B=1) without bias;
# pools of size 1 (every index 0); heavy sharing; one word
CASES = [(3, 7, 5, 40, True, False), (1, 4, 6, 6, True, False), (4, 1, 3, 25, False, False),
         (2, 5, 1, 30, True, False), (5, 9, 8, 300, True, True), (2, 3, 4, 1, True, False)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,N,Mk,V,bias,shared", CASES)
def test_slim_gather_sum_parity(dtype, K, N, Mk, V, bias, shared, rng):
    P, idx_kv, b, _ = _slim_case(rng, dtype, K, N, Mk, V, bias, shared)
    expect = np.full((N, V), np.nan, dtype)  # out is overwritten, NaNs included
    reference.slim_gather_sum(P, idx_kv, b, expect)
    for name, fn in _gather_variants().items():
        z = np.full((N, V), np.nan, dtype)
        fn(P, idx_kv, b, z)
        np.testing.assert_allclose(z, expect, **TOL[dtype], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,N,Mk,V,bias,shared", CASES)
def test_slim_segment_sum_parity(dtype, K, N, Mk, V, bias, shared, rng):
    _, idx_kv, _, dz = _slim_case(rng, dtype, K, N, Mk, V, bias, shared)
    expect = np.full((K, N, Mk), np.nan, dtype)
    reference.slim_segment_sum(dz, idx_kv, expect)
    for name, fn in SEGMENT_VARIANTS.items():
        G = np.full((K, N, Mk), np.nan, dtype)  # the kernel zero-fills
        fn(dz, idx_kv, G)
        np.testing.assert_allclose(G, expect, **SEG_TOL[dtype], err_msg=name)


def test_slim_kernels_against_loops(backend, rng):
    """Both equations written as plain Python loops on a tiny case."""
    K, N, Mk, V = 2, 3, 3, 5
    P, idx_kv, b, dz = _slim_case(rng, np.float64, K, N, Mk, V, shared=True)
    z_loop = np.zeros((N, V))
    G_loop = np.zeros((K, N, Mk))
    for n in range(N):
        for w in range(V):
            z_loop[n, w] = b[w]
            for k in range(K):
                z_loop[n, w] += P[k, n, idx_kv[k, w]]
                G_loop[k, n, idx_kv[k, w]] += dz[n, w]
    put = backend.put
    z, G = put(np.empty((N, V))), put(np.empty((K, N, Mk)))
    kernels.slim_gather_sum(put(P), put(idx_kv), put(b), z)
    kernels.slim_segment_sum(put(dz), put(idx_kv), G)
    np.testing.assert_allclose(backend.get(z), z_loop, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(backend.get(G), G_loop, rtol=1e-14, atol=1e-14)


def test_slim_segment_sum_is_adjoint(backend, rng):
    """<dz, gather(P) - b> == <segment_sum(dz), P>: the backward is the transpose."""
    K, N, Mk, V = 4, 6, 7, 50
    P, idx_kv, b, dz = _slim_case(rng, np.float64, K, N, Mk, V, shared=True)
    put = backend.put
    z, G = put(np.empty((N, V))), put(np.empty((K, N, Mk)))
    kernels.slim_gather_sum(put(P), put(idx_kv), put(b), z)
    kernels.slim_segment_sum(put(dz), put(idx_kv), G)
    z, G = backend.get(z), backend.get(G)
    assert abs(np.sum(dz * (z - b)) - np.sum(G * P)) < 1e-10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_slim_without_sharing_is_dense(backend, dtype, rng):
    """K=1, Mk=V, idx=arange(V): the slim logits are P[0] + b, exactly, and G[0] = dz."""
    N, V = 5, 12
    P = rng.standard_normal((1, N, V)).astype(dtype)
    b = rng.standard_normal(V).astype(dtype)
    dz = rng.standard_normal((N, V)).astype(dtype)
    idx_kv = np.arange(V, dtype=np.int32)[None, :]
    put = backend.put
    z, G = put(np.empty((N, V), dtype)), put(np.empty((1, N, V), dtype))
    kernels.slim_gather_sum(put(P), put(idx_kv), put(b), z)
    kernels.slim_segment_sum(put(dz), put(idx_kv), G)
    np.testing.assert_array_equal(backend.get(z), P[0] + b)
    np.testing.assert_array_equal(backend.get(G)[0], dz)


def _record(monkeypatch, calls, *names):
    """Wrap the cpu module's kernels ``names`` to note each call in ``calls``."""
    for name in names:
        fn = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _fn=fn, _name=name: (calls.append(_name), _fn(*a))[1])


@pytest.mark.parametrize("threshold,variant", [(0, "parallel"), (10**12, "serial")])
def test_slim_dispatch_uses_parallel_path(monkeypatch, rng, threshold, variant):
    """Thresholds at zero route the dispatcher to the parallel variants (and
    out of reach, to the serial ones); either gives the reference's result."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_GATHER", threshold)
    calls = []
    _record(monkeypatch, calls, "_slim_gather_sum_serial", "_slim_gather_sum_parallel",
            "_slim_segment_sum_serial", "_slim_segment_sum_parallel")
    P, idx_kv, b, dz = _slim_case(rng, np.float64, 3, 4, 5, 20)
    z_ref, z = np.empty((4, 20)), np.empty((4, 20))
    G_ref, G = np.empty((3, 4, 5)), np.empty((3, 4, 5))
    reference.slim_gather_sum(P, idx_kv, b, z_ref)
    reference.slim_segment_sum(dz, idx_kv, G_ref)
    with kernels.using("cpu"):
        kernels.slim_gather_sum(P, idx_kv, b, z)
        kernels.slim_segment_sum(dz, idx_kv, G)
    assert calls == [f"_slim_gather_sum_{variant}", f"_slim_segment_sum_{variant}"]
    np.testing.assert_allclose(z, z_ref, **TOL[np.float64])
    np.testing.assert_allclose(G, G_ref, **TOL[np.float64])


def test_slim_dispatcher_validates():
    P, idx, b, z, G = (np.zeros((2, 3, 4)), np.zeros((2, 5), np.int32), np.zeros(5),
                       np.zeros((3, 5)), np.zeros((2, 3, 4)))
    kernels.slim_gather_sum(P, idx, b, z)  # the valid call
    kernels.slim_gather_sum(P, idx, None, z)
    kernels.slim_segment_sum(z, idx, G)
    with pytest.raises(ValueError, match=r"3-d array \(K, N, Mk\)"):
        kernels.slim_gather_sum(P[0], idx, b, z)
    with pytest.raises(ValueError, match="K = 2"):
        kernels.slim_gather_sum(P, idx.T.copy(), b, z)  # a (V, K) table
    with pytest.raises(ValueError, match=r"z: expected shape \(3, 5\)"):
        kernels.slim_gather_sum(P, idx, b, np.zeros((3, 6)))
    with pytest.raises(ValueError, match=r"b: expected shape \(5,\)"):
        kernels.slim_gather_sum(P, idx, np.zeros(4), z)
    with pytest.raises(IndexError, match=r"\[0, 4\).*found range \[4, 4\]"):
        kernels.slim_gather_sum(P, np.full((2, 5), 4, np.int32), b, z)
    bad = idx.copy()
    bad[1, 3] = -1
    with pytest.raises(IndexError, match=r"found range \[-1, 0\]"):
        kernels.slim_segment_sum(z, bad, G)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.slim_gather_sum(P.astype(np.float16), idx, None, z.astype(np.float16))
    with pytest.raises(TypeError, match="does not match"):
        kernels.slim_gather_sum(P, idx, b, z.astype(np.float32))
    with pytest.raises(TypeError, match="integer table"):
        kernels.slim_segment_sum(z, idx.astype(np.float64), G)
    with pytest.raises(ValueError, match=r"dz: expected shape \(3, 5\)"):
        kernels.slim_segment_sum(np.zeros((3, 4)), idx, G)


# --- embedding_scatter_add: the parallel (row-grouped) path -----------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
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
    np.testing.assert_allclose(parallel, expect, **TOL[dtype])
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,Mk,N,V,bias", [(1, 1, 1, 5, True), (3, 7, 4, 40, True), (8, 50, 20, 300, False)])
def test_gather_sum_word_major_layout(backend, dtype, K, Mk, N, V, bias):
    """The word-major kernel equals the row-major one on the transposed table."""
    rng = np.random.default_rng(K * 100 + N)
    P = rng.standard_normal((K, N, Mk)).astype(dtype)
    idx = rng.integers(0, Mk, (K, V)).astype(np.int32)
    idx[:, 0] = 0
    idx[:, -1] = Mk - 1
    b = rng.standard_normal(V).astype(dtype) if bias else None
    z = np.empty((N, V), dtype)
    reference.slim_gather_sum(P, idx, b, z)
    PT = np.ascontiguousarray(P.transpose(0, 2, 1))
    zT = backend.put(np.empty((V, N), dtype))
    kernels.slim_gather_sum_t(backend.put(PT), backend.put(idx), None if b is None else backend.put(b), zT)
    np.testing.assert_allclose(backend.get(zT).T, z, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    if backend.name == "cpu":  # both compiled variants, whichever the size picks
        for fn in (cpu._slim_gather_sum_t_serial, cpu._slim_gather_sum_t_parallel):
            zT = np.empty((V, N), dtype)
            fn(PT, idx, b if bias else np.empty(0, dtype), bias, zT)
            np.testing.assert_allclose(zT.T, z, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    with pytest.raises(ValueError):
        kernels.slim_gather_sum_t(PT, idx, b, np.empty((N, V), dtype) if N != V else np.empty((V, N + 1), dtype))


# Word-major kernels prefetch the rows of the word (or entry) a few steps
# ahead: the prefetch distance must stop at the last word, rows shorter than a
# cache line and longer than the prefetched lines must both come out exact,
# and the last pool entry (the row ending the array) must be reachable.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K,N,Mk,V", [(2, 1, 3, 5), (3, 200, 7, 50), (4, 5, 2, cpu._PREFETCH_WORDS),
                                      (2, 17, 9, cpu._PREFETCH_WORDS + 1), (1, 3, 1, 1)])
def test_word_major_prefetching_kernels_exact(dtype, K, N, Mk, V, rng):
    idx_kv = rng.integers(0, Mk, (K, V)).astype(np.int32)
    idx_kv[:, -1] = Mk - 1
    PT = rng.standard_normal((K, Mk, N)).astype(dtype)
    b = rng.standard_normal(V).astype(dtype)
    want = np.full((V, N), np.nan, dtype)
    reference.slim_gather_sum_t(PT, idx_kv, b, want)
    u = cpu._unsigned(idx_kv)
    for kernel in (cpu._slim_gather_sum_t_serial, cpu._slim_gather_sum_t_parallel):
        zT = np.full((V, N), np.nan, dtype)
        kernel(PT, u, b, True, zT)
        np.testing.assert_array_equal(zT, want)  # same order of additions: bit-exact
    dzT = rng.standard_normal((V, N)).astype(dtype)
    want_g = np.full((K, Mk, N), np.nan, dtype)
    want_db = np.full(V, np.nan, dtype)
    reference.slim_segment_sum_t(dzT, idx_kv, want_g, None, want_db)
    GT, db = np.full((K, Mk, N), np.nan, dtype), np.full(V, np.nan, dtype)
    cpu.slim_segment_sum_t(dzT, idx_kv, GT, None, db)  # scatter form (any table)
    np.testing.assert_allclose(GT, want_g, **SEG_TOL[dtype])
    np.testing.assert_allclose(db, want_db, **SEG_TOL[dtype])
    if V % Mk == 0:  # uniform fan-out: the inverse-table form, exact
        from slimnp.mapping import inverse_table

        idx_u = np.stack([rng.permutation(np.arange(V) % Mk) for _ in range(K)]).astype(np.int32)
        inv = inverse_table(idx_u, Mk)
        want_u = np.full((K, Mk, N), np.nan, dtype)
        reference.slim_segment_sum_t(dzT, idx_u, want_u)
        GT = np.full((K, Mk, N), np.nan, dtype)
        cpu.slim_segment_sum_t(dzT, idx_u, GT, inv, None)
        np.testing.assert_array_equal(GT, want_u)
