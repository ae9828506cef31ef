"""Numba kernels against the NumPy reference on random inputs and corner cases."""
import numpy as np
import pytest

from slimnp import kernels
from slimnp.kernels import cpu, reference

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _both(fn_name, make_args):
    """Run reference and cpu on identical fresh copies of the args."""
    out = []
    for impl in (reference, cpu):
        args = make_args()
        res = getattr(impl, fn_name)(*args)
        out.append((res, args))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,H", [(1, 1), (3, 5), (20, 64)])
def test_lstm_pointwise_parity(dtype, B, H, rng):
    xg = (rng.standard_normal((B, 4 * H)) * 3).astype(dtype)
    hg = rng.standard_normal((B, 4 * H)).astype(dtype)
    xg[0, 0] = 100.0  # saturated gates must not overflow into NaN
    xg[-1, -1] = -100.0
    c_prev = rng.standard_normal((B, H)).astype(dtype)
    dh = rng.standard_normal((B, H)).astype(dtype)
    dc = rng.standard_normal((B, H)).astype(dtype)

    def fwd_args():
        return (xg.copy(), hg, c_prev, np.empty((B, 4 * H), dtype), np.empty((B, H), dtype),
                np.empty((B, H), dtype), np.empty((B, H), dtype))

    (_, a_ref), (_, a_cpu) = _both("lstm_pointwise_forward", fwd_args)
    for r, c in zip(a_ref[3:], a_cpu[3:]):
        assert np.all(np.isfinite(c))
        np.testing.assert_allclose(c, r, **TOL[dtype])
    act, tc = a_ref[3], a_ref[6]

    def bwd_args():
        return (act, c_prev, tc, dh, dc.copy(), np.empty((B, 4 * H), dtype))

    (_, b_ref), (_, b_cpu) = _both("lstm_pointwise_backward", bwd_args)
    np.testing.assert_allclose(b_cpu[4], b_ref[4], **TOL[dtype])  # dc -> dc_prev
    np.testing.assert_allclose(b_cpu[5], b_ref[5], **TOL[dtype])  # dgates


def test_lstm_pointwise_in_place_alias(rng):
    """act may alias xg (the LSTM writes gates over its input projections)."""
    B, H = 4, 3
    xg = rng.standard_normal((B, 4 * H)).astype(np.float32)
    hg = rng.standard_normal((B, 4 * H)).astype(np.float32)
    c_prev = rng.standard_normal((B, H)).astype(np.float32)
    outs = []
    for mode in ("reference", "cpu"):
        with kernels.using(mode):
            buf = xg.copy()
            c, h, tc = (np.empty((B, H), np.float32) for _ in range(3))
            kernels.lstm_pointwise_forward(buf, hg, c_prev, buf, c, h, tc)
            outs.append((buf, c, h, tc))
    for r, c in zip(*outs):
        np.testing.assert_allclose(c, r, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_scatter_add_parity(dtype, rng):
    V, D, N = 11, 6, 40
    ids = rng.integers(0, V, N).astype(np.int32)
    ids[:4] = [0, V - 1, 3, 3]  # word 0, word V-1, repeats
    dX = rng.standard_normal((N, D)).astype(dtype)
    W0 = rng.standard_normal((V, D)).astype(dtype)
    (_, ref), (_, got) = _both("embedding_scatter_add", lambda: (W0.copy(), ids, dX))
    np.testing.assert_allclose(got[0], ref[0], **TOL[dtype])
    # and against an explicit loop
    expect = W0.copy()
    for n in range(N):
        expect[ids[n]] += dX[n]
    np.testing.assert_allclose(got[0], expect, **TOL[dtype])


def test_embedding_scatter_add_single_row(rng):
    dW = np.zeros((1, 3))
    kernels.embedding_scatter_add(dW, np.zeros(5, np.int32), np.ones((5, 3)))
    np.testing.assert_array_equal(dW, np.full((1, 3), 5.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,V", [(1, 2), (7, 13), (33, 500)])
def test_softmax_xent_parity(dtype, N, V, rng):
    logits = (rng.standard_normal((N, V)) * 4).astype(dtype)
    logits[0, 0] = 80.0  # large logit: the max-shift keeps exp finite
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[0] = V - 1
    for grad in (True, False):
        (nll_r, a_r), (nll_c, a_c) = _both("softmax_xent", lambda: (logits.copy(), targets, 0.25, grad))
        np.testing.assert_allclose(nll_c, nll_r, rtol=1e-5 if dtype == np.float32 else 1e-12)
        if grad:
            np.testing.assert_allclose(a_c[0], a_r[0], **TOL[dtype])
            # rows of (p - onehot) sum to zero
            np.testing.assert_allclose(a_c[0].sum(axis=1), 0, atol=1e-5)
        else:
            np.testing.assert_array_equal(a_c[0], logits)  # untouched without grad


def test_softmax_normalises(rng):
    """exp(-nll) over every possible target sums to one."""
    logits = rng.standard_normal((1, 9))
    total = sum(np.exp(-kernels.softmax_xent(logits.copy(), np.array([v], np.int32), 1.0, False)[0])
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
    with pytest.raises(ValueError, match="unknown kernel mode"):
        kernels.use("fast")


def test_lstm_segment_kernels_validate_once():
    G = np.zeros((3, 2, 8), np.float32)
    fwd, bwd = kernels.lstm_segment_kernels(G, np.zeros((4, 2, 2), np.float32))
    assert callable(fwd) and callable(bwd)
    with pytest.raises(ValueError, match="expected shape"):
        kernels.lstm_segment_kernels(G, np.zeros((3, 2, 2), np.float32))
    with pytest.raises(TypeError):
        kernels.lstm_segment_kernels(G, np.zeros((4, 2, 2), np.float64))
    with kernels.using("reference"):
        assert kernels.lstm_segment_kernels(G, np.zeros((4, 2, 2), np.float32))[0] is reference.lstm_pointwise_forward
