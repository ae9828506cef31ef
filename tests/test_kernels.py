"""Every compiled kernel against the NumPy reference, on random inputs and
corner cases, and the dispatcher's checks: the kernels' parity tests, all in
this file, with the cases and tolerances of ``tests/backends.py``.

The parity tests take the ``dev`` fixture (``tests/backends.py``): each runs
on Numba (``cpu``), on the GPU kernels' CUDA C through the CPU emulator
(``emu``, ``emu-rev``) and, with a GPU, on CUDA (``cuda``).  Tests with
``backend`` also run the reference itself, against values written out or
against another layout.  ``tol(dev, dtype)`` is each backend's tolerance.
The Numba kernels' serial and parallel variants and their thresholds are
checked in ``test_slim_kernels.py``.

Corner cases throughout: id 0 and V-1, repeated ids, B=1, T=1, sizes that are
not multiples of the 256-thread block, several chunks per softmax row, rows
and columns holding a NaN or an infinity; float32 and float64.
"""
import numpy as np
import pytest

from slimnp import kernels
from slimnp.kernels import cpu, reference
from slimnp.mapping import shuffle_assignment_pools

from backends import DTYPES, GPU, SLIM_CASES, slim_case, tol

# sumsq accumulates in float64; Numba first sums blocks of up to 1,024
# float32 squares in float32 (the GPU adds every square in double)
SUMSQ_REL = {np.float32: 1e-6, np.float64: 1e-12}


def _close(a, b, dtype, dev, sums=False):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               **tol(dev, dtype, sums))


# ---------------------------------------------------------------------------
# kernels vs reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H", [(1, 1), (1, 3), (5, 7), (3, 100)])
@pytest.mark.parametrize("alias", [False, True])
def test_lstm_pointwise(dev, dtype, B, H, alias, rng):
    xg = rng.standard_normal((B, 4 * H)).astype(dtype) * 3
    xg[0, 0] = -200  # sigmoid of a very negative input: 0, not NaN
    xg[-1, -1] = 100  # saturated gates must not overflow into NaN
    hg = rng.standard_normal((B, 4 * H)).astype(dtype)
    c_prev = rng.standard_normal((B, H)).astype(dtype)
    want = [np.empty((B, 4 * H), dtype)] + [np.empty((B, H), dtype) for _ in range(3)]
    reference.lstm_pointwise_forward(xg, hg, c_prev, *want)
    d_xg, d_hg, d_cp = dev.put(xg), dev.put(hg), dev.put(c_prev)
    outs = [d_xg if alias else dev.put(np.zeros((B, 4 * H), dtype))] + \
        [dev.put(np.zeros((B, H), dtype)) for _ in range(3)]
    dev.impl.lstm_pointwise_forward(d_xg, d_hg, d_cp, *outs)
    for got, exp in zip(outs, want):
        assert np.all(np.isfinite(dev.get(got)))
        _close(dev.get(got), exp, dtype, dev)
    act, _, _, tc = want
    dh = rng.standard_normal((B, H)).astype(dtype)
    dc = rng.standard_normal((B, H)).astype(dtype)
    dg_want, dc_want = np.empty((B, 4 * H), dtype), dc.copy()
    reference.lstm_pointwise_backward(act, c_prev, tc, dh, dc_want, dg_want)
    d_dc, d_dg = dev.put(dc), dev.put(np.zeros((B, 4 * H), dtype))
    dev.impl.lstm_pointwise_backward(dev.put(act), d_cp, dev.put(tc), dev.put(dh), d_dc, d_dg)
    _close(dev.get(d_dg), dg_want, dtype, dev)
    _close(dev.get(d_dc), dc_want, dtype, dev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,D,N", [(7, 5, 60), (1, 3, 1), (50, 1, 9), (4, 300, 5)])
def test_embedding_scatter_add(dev, dtype, V, D, N, rng):
    ids = rng.integers(0, V, N).astype(np.int32)
    ids[0] = 0
    ids[-1] = V - 1
    if N > 3:
        ids[1:3] = ids[0]  # repeated ids accumulate
    dX = rng.standard_normal((N, D)).astype(dtype)
    dW = rng.standard_normal((V, D)).astype(dtype)
    want = dW.copy()
    reference.embedding_scatter_add(want, ids, dX)
    got = dev.put(dW)
    dev.impl.embedding_scatter_add(got, dev.put(ids.astype(np.int64)), dev.put(dX))  # int64 ids too
    _close(dev.get(got), want, dtype, dev)
    loop = dW.copy()  # and an explicit loop
    for n in range(N):
        loop[ids[n]] += dX[n]
    _close(dev.get(got), loop, dtype, dev)


def _logits_case(rng, dtype, N, V):
    z = (rng.standard_normal((N, V)) * 3).astype(dtype)
    t = rng.integers(0, V, N).astype(np.int32)
    t[0] = 0
    t[-1] = V - 1
    b = rng.standard_normal(V).astype(dtype)
    return z, t, b


# (N, V): one word; one row; several rows of one block; rows split in chunks;
# many rows of several chunks (the Numba kernel's parallel variant)
XENT_SHAPES = [(1, 1), (1, 5), (3, 17), (3, 257), (2, 5000), (40, 300), (40, 1000), (130, 3001)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", XENT_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_softmax_xent_rows(dev, dtype, N, V, bias, grad, rng):
    z, t, b = _logits_case(rng, dtype, N, V)
    b = b if bias else None
    want_z = z.copy()
    want = reference.softmax_xent(want_z, t, 0.5, grad, b)
    d_z = dev.put(z)
    got = dev.impl.softmax_xent(d_z, dev.put(t), 0.5, grad, None if b is None else dev.put(b))
    assert dev.get(got).dtype == np.float64
    _close(dev.get(got), want, dtype, dev, sums=True)
    if grad:
        _close(dev.get(d_z), want_z, dtype, dev)
        np.testing.assert_allclose(dev.get(d_z).sum(axis=1), 0, atol=1e-5)  # rows of 0.5 (p - onehot)
    elif b is None:
        np.testing.assert_array_equal(dev.get(d_z), z)  # read only without gradient and bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,N", [(1, 1), (5, 1), (257, 3), (3000, 2), (300, 7), (300, 33), (100, 70),
                                 (2000, 70)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("grad", [True, False])
def test_softmax_xent_columns(backend, dtype, V, N, bias, grad, rng):
    """The word-major loss through the dispatcher against the reference's
    row layout (for the reference itself: its two layouts agree)."""
    z, t, b = _logits_case(rng, dtype, N, V)
    b = b if bias else None
    want_z = z.copy()
    want = reference.softmax_xent(want_z, t, 0.5, grad, b)
    zT = backend.put(z.T.copy())  # (for N = 1, ascontiguousarray(z.T) would be a view of z)
    got = kernels.softmax_xent_t(zT, backend.put(t), 0.5, grad, None if b is None else backend.put(b))
    _close(backend.get(got), want, dtype, backend, sums=True)
    if grad:
        _close(backend.get(zT).T, want_z, dtype, backend)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the reference's inf - inf
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(3, 40), (4, 3000)])  # one chunk per row; several
@pytest.mark.parametrize("word_major", [False, True])
def test_softmax_xent_nonfinite_rows_are_nan(backend, dtype, N, V, word_major, rng):
    z, t, _ = _logits_case(rng, dtype, N, V)
    z[0, 7] = np.nan
    z[1, V - 1] = np.inf
    t = backend.put(t)
    if word_major:
        nll = kernels.softmax_xent_t(backend.put(z.T.copy()), t, 1.0, True)
    else:
        nll = kernels.softmax_xent(backend.put(z), t, 1.0, True)
    nll = backend.get(nll)
    assert np.isnan(nll[0]) and np.isnan(nll[1])
    assert np.all(np.isfinite(nll[2:]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,N", [(1, 1), (5, 1), (37, 3), (3000, 2), (300, 33), (9000, 20), (70000, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_log_softmax_columns(backend, dtype, V, N, bias, rng):
    """The column log-softmax (scoring's and generation's) through the
    dispatcher; its columns normalise on every backend, the reference's too."""
    zT = (rng.standard_normal((V, N)) * 3).astype(dtype)
    if V > 1:
        zT[0, 0] = -np.inf  # a word ruled out: probability 0, the column still normalised
    b = rng.standard_normal(V).astype(dtype) if bias else None
    want = zT.copy()
    lse_want = reference.log_softmax_t(want, b)
    d = backend.put(zT)
    lse = backend.get(kernels.log_softmax_t(d, None if b is None else backend.put(b)))
    _close(lse, lse_want, dtype, backend, sums=True)
    if backend.name not in GPU:  # the CPU's normaliser: float64 sums of float32 blocks
        np.testing.assert_allclose(lse, lse_want, rtol=1e-6 if dtype == np.float32 else 1e-12)
    got = backend.get(d)
    assert V == 1 or got[0, 0] == -np.inf
    _close(got, want, dtype, backend, sums=True)
    if V > 1:
        np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(axis=0), 1.0,
                                   rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_log_softmax_columns_nan_propagates(backend):
    z = np.zeros((50, 3), np.float32)
    z[7, 1] = np.nan
    lse = backend.get(kernels.log_softmax_t(backend.put(z)))
    assert np.isnan(lse[1]) and np.isfinite(lse[0]) and np.isfinite(lse[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,S", [(1, 1), (3, 300), (5, 1000)])
@pytest.mark.parametrize("grad", [True, False])
def test_nce_xent(dev, dtype, N, S, grad, rng):
    zt = (rng.standard_normal(N) * 4).astype(dtype)
    lqt = rng.standard_normal(N).astype(dtype)
    ZS = (rng.standard_normal((N, S)) * 4).astype(dtype)
    ZS[0, 0] = 60  # large |d|: exp(-|d|) underflows, no overflow
    lqs = rng.standard_normal(S).astype(dtype)
    want_ZS = ZS.copy()
    want, want_dzt = reference.nce_xent(zt, lqt, want_ZS, lqs, 0.25, grad)
    d_ZS = dev.put(ZS)
    got, dzt = dev.impl.nce_xent(dev.put(zt), dev.put(lqt), d_ZS, dev.put(lqs), 0.25, grad)
    _close(dev.get(got), want, dtype, dev, sums=True)
    if grad:
        _close(dev.get(dzt), want_dzt, dtype, dev)
        _close(dev.get(d_ZS), want_ZS, dtype, dev)
    else:
        assert dzt is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_nce_nonfinite_row_is_nan(dev, dtype, rng):
    ZS = rng.standard_normal((3, 10)).astype(dtype)
    ZS[1, 4] = np.inf
    zt = np.zeros(3, dtype)
    zt[2] = np.nan
    nll, _ = dev.impl.nce_xent(dev.put(zt), dev.put(np.zeros(3, dtype)), dev.put(ZS),
                          dev.put(np.zeros(10, dtype)), 1.0, True)
    nll = dev.get(nll)
    assert np.isfinite(nll[0]) and np.isnan(nll[1]) and np.isnan(nll[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,Mk,V,shared", SLIM_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_slim_gather_sum_t(dev, dtype, K, N, Mk, V, shared, bias, rng):
    """The gather-sum adds bias, k = 0, 1, ... in the reference's order
    (additions only: no FMA), so every backend agrees exactly."""
    PT, idx, b, _ = slim_case(rng, dtype, K, N, Mk, V, shared)
    b = b if bias else None
    want = np.full((V, N), np.nan, dtype)  # out is overwritten, NaNs included
    reference.slim_gather_sum_t(PT, idx, b, want)
    zT = dev.put(np.full((V, N), np.nan, dtype))
    dev.impl.slim_gather_sum_t(dev.put(PT), dev.put(idx), None if b is None else dev.put(b), zT)
    np.testing.assert_array_equal(dev.get(zT), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,Mk,V,shared", SLIM_CASES)
def test_slim_segment_sum_t(dev, dtype, K, N, Mk, V, shared, rng):
    """The segment sum's scatter form (any table; atomics on the GPU) and
    the bias gradient beside it."""
    _, idx, _, dzT = slim_case(rng, dtype, K, N, Mk, V, shared)
    want, db_want = np.full((K, Mk, N), np.nan, dtype), np.empty(V, dtype)
    reference.slim_segment_sum_t(dzT, idx, want, None, db_want)
    GT, db = dev.put(np.full((K, Mk, N), np.nan, dtype)), dev.put(np.full(V, np.nan, dtype))
    dev.impl.slim_segment_sum_t(dev.put(dzT), dev.put(idx), GT, None, db)
    _close(dev.get(GT), want, dtype, dev, sums=True)
    _close(dev.get(db), db_want, dtype, dev, sums=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N,Mk,F", [(3, 7, 5, 4), (1, 1, 1, 9), (2, 33, 300, 2), (4, 9, 20, 10)])
def test_slim_segment_sum_t_inverse_table(dev, dtype, K, N, Mk, F, rng):
    """With the inverted table (every entry has F words) the backward is a
    gather that adds each entry's words in ascending order, as the reference
    does: exact.  Through the dispatcher, with the bias gradient; the same
    call without the table (the scatter form) agrees, on the CPU bit for bit."""
    from slimnp.mapping import inverse_table

    V = Mk * F
    idx = np.stack([rng.permutation(np.arange(V) % Mk) for _ in range(K)]).astype(np.int32)
    inv = inverse_table(idx, Mk)
    assert inv is not None
    dzT = rng.standard_normal((V, N)).astype(dtype)
    want, db_want = np.full((K, Mk, N), np.nan, dtype), np.empty(V, dtype)
    reference.slim_segment_sum_t(dzT, idx, want, None, db_want)
    got = {}
    for table in (inv, None):
        GT, db = dev.put(np.full((K, Mk, N), np.nan, dtype)), dev.put(np.full(V, np.nan, dtype))
        kernels.slim_segment_sum_t(dev.put(dzT), dev.put(idx), GT, None if table is None else dev.put(table), db)
        got["scatter" if table is None else "inverse"] = dev.get(GT)
        _close(dev.get(db), db_want, dtype, dev, sums=True)
    np.testing.assert_array_equal(got["inverse"], want)
    _close(got["scatter"], want, dtype, dev, sums=True)
    if dev.name == "cpu":
        np.testing.assert_array_equal(got["scatter"], got["inverse"])


def _same(a, b, dtype, dev):
    """The optimizer's elementwise passes: the CPU's bits are the
    reference's; the GPU contracts multiply-adds."""
    if dev.name == "cpu":
        np.testing.assert_array_equal(a, b)
    else:
        _close(a, b, dtype, dev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 13, 255, 257, 1000, 70001])
def test_sumsq_axpy(dev, dtype, n, rng):
    x = rng.standard_normal(n).astype(dtype)
    y = rng.standard_normal(n).astype(dtype)
    assert kernels.sumsq(dev.put(x)) == pytest.approx(reference.sumsq(x), rel=SUMSQ_REL[dtype], abs=1e-300)
    want = y.copy()
    reference.axpy(want, -0.3, x)
    d = dev.put(y)
    kernels.axpy(d, -0.3, dev.put(x))
    _same(dev.get(d), want, dtype, dev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,D,rows", [(10, 7, [0, 3, 9]), (5, 1, [4]), (300, 3, list(range(0, 300, 2))),
                                      (4, 2, []), (7000, 10, [0, 1200, 4500, 6000, 6999])])
def test_rows_variants(dev, dtype, V, D, rows, rng):
    x = rng.standard_normal((V, D)).astype(dtype)
    y = rng.standard_normal((V, D)).astype(dtype)
    r = np.array(rows, np.int64)  # ParamStore's row sets can be int64
    assert kernels.sumsq_rows(dev.put(x), dev.put(r)) == pytest.approx(reference.sumsq_rows(x, r),
                                                                        rel=SUMSQ_REL[dtype])
    want = y.copy()
    reference.axpy_rows(want, 0.7, x, r)
    d = dev.put(y)
    kernels.axpy_rows(d, 0.7, dev.put(x), dev.put(r))
    _same(dev.get(d), want, dtype, dev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [None, [0, 2, 5]])
def test_adagrad_update(dev, dtype, rows, rng):
    p = rng.standard_normal((6, 300)).astype(dtype)
    acc = rng.random((6, 300)).astype(dtype) + 0.1
    g = rng.standard_normal((6, 300)).astype(dtype)
    wp, wacc = p.copy(), acc.copy()
    dp, dacc = dev.put(p), dev.put(acc)
    if rows is None:
        reference.adagrad_update(wp, wacc, g, 0.5, 0.1, 1e-7)
        dev.impl.adagrad_update(dp, dacc, dev.put(g), 0.5, 0.1, 1e-7)
    else:
        r = np.array(rows, np.int32)
        reference.adagrad_update(wp, wacc, g, 0.5, 0.1, 1e-7, r)
        dev.impl.adagrad_update(dp, dacc, dev.put(g), 0.5, 0.1, 1e-7, dev.put(r))
    _close(dev.get(dp), wp, dtype, dev)
    _close(dev.get(dacc), wacc, dtype, dev)


# ---------------------------------------------------------------------------
# through the dispatcher, on every backend
# ---------------------------------------------------------------------------
def test_lstm_pointwise_in_place_alias(backend, rng):
    """act may alias xg (the LSTM writes gates over its input projections)."""
    B, H = 4, 3
    xg = rng.standard_normal((B, 4 * H)).astype(np.float32)
    hg = rng.standard_normal((B, 4 * H)).astype(np.float32)
    c_prev = rng.standard_normal((B, H)).astype(np.float32)
    want = [np.empty((B, 4 * H), np.float32)] + [np.empty((B, H), np.float32) for _ in range(3)]
    reference.lstm_pointwise_forward(xg, hg, c_prev, *want)  # separate buffers
    buf = backend.put(xg)
    c, h, tc = (backend.put(np.empty((B, H), np.float32)) for _ in range(3))
    kernels.lstm_pointwise_forward(buf, backend.put(hg), backend.put(c_prev), buf, c, h, tc)
    for got, exp in zip((buf, c, h, tc), want):
        np.testing.assert_allclose(backend.get(got), exp, rtol=2e-5, atol=2e-6)


def test_embedding_scatter_add_single_row(backend):
    dW = backend.put(np.zeros((1, 3)))
    kernels.embedding_scatter_add(dW, backend.put(np.zeros(5, np.int32)), backend.put(np.ones((5, 3))))
    np.testing.assert_array_equal(backend.get(dW), np.full((1, 3), 5.0))


def test_softmax_normalises(backend, rng):
    """exp(-nll) over every possible target sums to one."""
    logits = rng.standard_normal((1, 9))
    total = sum(np.exp(-backend.get(kernels.softmax_xent(backend.put(logits), backend.put(np.array([v], np.int32)),
                                                         1.0, False))[0])
                for v in range(9))
    assert abs(total - 1.0) < 1e-12


def test_dispatcher_validates():
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        kernels.embedding_scatter_add(np.zeros((4, 2)), np.array([4], np.int32), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="expected shape"):
        kernels.embedding_scatter_add(np.zeros((4, 2)), np.array([1], np.int32), np.zeros((1, 3)))
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.softmax_xent(np.zeros((2, 3), np.int64), np.zeros(2, np.int32))
    with pytest.raises(IndexError):
        kernels.softmax_xent(np.zeros((2, 3)), np.array([0, -1], np.int32))
    with pytest.raises(IndexError):
        kernels.axpy_rows(np.zeros((4, 2)), 1.0, np.ones((4, 2)), np.array([4]))
    with pytest.raises(ValueError, match="unknown kernel mode"):
        kernels.use("fast")


def test_inverse_table_shape_checked():
    V, K, Mk = 40, 2, 10
    idx_kv = np.ascontiguousarray(shuffle_assignment_pools(V, K, Mk, 0).T)
    with pytest.raises(ValueError, match="inv"):
        kernels.slim_segment_sum_t(np.zeros((V, 3), np.float32), idx_kv, np.empty((K, Mk, 3), np.float32),
                                   inv=np.zeros((K, 3, Mk), np.int32))


def test_lstm_segment_kernels_validate_once():
    gates = np.zeros((3, 2, 8), np.float32)
    fwd, bwd = kernels.lstm_segment_kernels(gates, np.zeros((4, 2, 2), np.float32))
    assert callable(fwd) and callable(bwd)
    with pytest.raises(ValueError, match="expected shape"):
        kernels.lstm_segment_kernels(gates, np.zeros((3, 2, 2), np.float32))
    with pytest.raises(TypeError):
        kernels.lstm_segment_kernels(gates, np.zeros((4, 2, 2), np.float64))
    with kernels.using("reference"):
        assert kernels.lstm_segment_kernels(gates, np.zeros((4, 2, 2), np.float32))[0] is reference.lstm_pointwise_forward


# ---------------------------------------------------------------------------
# the Numba kernels' float32 exp
# ---------------------------------------------------------------------------
def test_exp32_accuracy_and_no_subnormals():
    import numba as nb

    @nb.njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = cpu._exp(x[i])

    x = np.linspace(-80, 80, 200_001, dtype=np.float32)
    out = np.empty_like(x)
    run(x, out)
    rel = np.abs(out / np.exp(x.astype(np.float64)) - 1)
    assert rel.max() < 3e-6
    # clamped at the ends instead of under/overflowing
    ext = np.array([-1e4, -200, 200, 1e4], np.float32)
    out = np.empty_like(ext)
    run(ext, out)
    assert np.all(out >= np.finfo(np.float32).tiny) and np.all(np.isfinite(out))
