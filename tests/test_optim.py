"""slimnp.optim: SGD's clipped update (dense and row-wise); Adagrad's update
rule, row-wise sparse updates, clipping, the Numba kernels against their NumPy
form, checkpoints and a bit-exact resume; global-norm clipping and the
learning-rate schedules."""
import math
import signal

import numpy as np
import pytest

from slimnp import io as sio
from slimnp import kernels
from slimnp.kernels import adagrad_update, cpu, reference
from slimnp.optim import SGD, Adagrad, Schedule, clip_global_norm, make_optimizer
from slimnp.trainer import TrainConfig, resume_training, run_training
from slimnp.options import configs

from helpers import TINY_HP, tiny_corpus


def _rows_problem(rng, dtype):
    """A flat buffer: a dense part (7), a (6, 5) row-tracked part, a dense part (3)."""
    n = 7 + 30 + 3
    p = rng.standard_normal(n).astype(dtype)
    rows = np.array([1, 4], np.int64)
    g = rng.standard_normal(n).astype(dtype)
    segments = [("dense", 0, 7), ("rows", 7, (6, 5), rows), ("dense", 37, 3)]
    return p, g, rows, segments


# -- SGD ----------------------------------------------------------------------
def test_sgd_step_is_the_clipped_update_and_leaves_the_gradient():
    """``theta -= lr * min(1, clip / |g|) * g`` in one fused pass: the norm
    returned is the one before clipping, the gradient buffer is not scaled;
    ``clip`` 0 disables clipping."""
    g = np.array([3.0, 0.0, -4.0])  # norm 5
    for clip, factor in ((1.0, 0.2), (10.0, 1.0), (0.0, 1.0)):
        p = np.array([1.0, 2.0, 3.0])
        assert SGD(clip=clip).step(p, g, 0.5) == 5.0
        a = -0.5 * factor
        assert p.tolist() == [1.0 + a * 3.0, 2.0, 3.0 + a * -4.0]
        assert g.tolist() == [3.0, 0.0, -4.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_rows_segments_equal_the_dense_step(rng, dtype):
    """With ``segments`` the norm and the update read only the tracked rows
    (junk elsewhere is never read), and equal the dense step of a gradient
    that is zero outside them."""
    p, g, rows, segments = _rows_problem(rng, dtype)
    untouched = np.setdiff1d(np.arange(6), rows)
    g_dense, g_sparse = g.copy(), g.copy()
    g_dense[7:37].reshape(6, 5)[untouched] = 0
    g_sparse[7:37].reshape(6, 5)[untouched] = 1e6
    p_ref, p_sp = p.copy(), p.copy()
    n_ref = SGD(clip=1.0).step(p_ref, g_dense, 0.3)
    n_sp = SGD(clip=1.0).step(p_sp, g_sparse, 0.3, segments)
    assert n_sp == pytest.approx(n_ref, rel=1e-6 if dtype == np.float32 else 1e-14)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(p_sp, p_ref, **tol)
    assert np.array_equal(p_sp[7:37].reshape(6, 5)[untouched], p[7:37].reshape(6, 5)[untouched])


def test_sgd_state_dict_and_the_wrong_optimizer():
    opt = make_optimizer("sgd", 2.5)
    assert isinstance(opt, SGD) and opt.state_dict() == {"name": "sgd", "clip": 2.5}
    other = SGD(clip=5.0)
    other.load_state_dict(opt.state_dict())
    assert other.clip == 2.5
    with pytest.raises(ValueError, match="checkpoint optimizer is 'adagrad', not 'sgd'"):
        other.load_state_dict(Adagrad(clip=1.0).state_dict())


# -- clipping and the learning-rate schedules ---------------------------------
def test_clip_and_schedules():
    g = np.array([3.0, 4.0])
    assert clip_global_norm(g, 1.0) == 5.0
    np.testing.assert_allclose(g, [0.6, 0.8])
    z = Schedule("epoch", 1.0, 0.5, start=4)
    assert [z.next_lr(None, e, None, None) for e in range(1, 8)] == [1, 1, 1, 0.5, 0.25, 0.125, 0.0625]
    k = Schedule("plateau", 1.0, 0.5, threshold=1.0)
    assert k.next_lr(1.0, 1, float("inf"), 100.0) == 1.0
    assert k.next_lr(1.0, 2, 100.0, 99.5) == 0.5
    assert k.next_lr(1.0, 2, 100.0, 90.0) == 1.0


# -- Adagrad ------------------------------------------------------------------
def test_one_step_matches_hand_computation():
    p = np.array([1.0, 2.0, 3.0, -4.0])
    g = np.array([0.5, -1.0, 2.0, 0.0])
    opt = Adagrad(clip=0.0, initial_accumulator=0.1, eps=1e-10)
    norm = opt.step(p, g, 0.1)
    assert norm == math.sqrt(0.25 + 1.0 + 4.0)
    # Python floats are IEEE doubles: the same operations, the same bits.
    acc = [0.1 + 0.25, 0.1 + 1.0, 0.1 + 4.0, 0.1]
    want = [1.0 - 0.1 * 0.5 / (math.sqrt(acc[0]) + 1e-10),
            2.0 - 0.1 * -1.0 / (math.sqrt(acc[1]) + 1e-10),
            3.0 - 0.1 * 2.0 / (math.sqrt(acc[2]) + 1e-10),
            -4.0]
    assert p.tolist() == want
    assert opt.acc.tolist() == acc
    # a second step keeps accumulating
    opt.step(p, g, 0.1)
    acc2 = [a + x * x for a, x in zip(acc, g.tolist())]
    assert opt.acc.tolist() == acc2
    assert p[0] == want[0] - 0.1 * 0.5 / (math.sqrt(acc2[0]) + 1e-10)


def test_float32_step_stays_float32():
    p = np.array([1.0, -2.0], np.float32)
    g = np.array([0.25, 3.0], np.float32)
    opt = Adagrad(clip=0.0)
    opt.step(p, g, 0.5)
    f = np.float32
    acc = np.array([f(0.1) + f(0.25) * f(0.25), f(0.1) + f(3.0) * f(3.0)], np.float32)
    want = np.array([1.0, -2.0], np.float32) - f(0.5) * g / (np.sqrt(acc) + f(1e-10))
    assert opt.acc.dtype == np.float32 and p.dtype == np.float32
    assert np.array_equal(opt.acc, acc) and np.array_equal(p, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_segments_touch_only_their_rows(rng, dtype):
    p, g, rows, segments = _rows_problem(rng, dtype)
    # the dense reference sees a gradient that is zero outside the rows ...
    g_dense = g.copy()
    untouched = np.setdiff1d(np.arange(6), rows)
    g_dense[7:37].reshape(6, 5)[untouched] = 0
    # ... the sparse optimizer sees junk there, which it must never read
    g_sparse = g.copy()
    g_sparse[7:37].reshape(6, 5)[untouched] = 1e6
    ref, opt = Adagrad(clip=0.0), Adagrad(clip=0.0)
    p_ref, p_sp = p.copy(), p.copy()
    for step in range(3):  # the accumulator carries over between steps
        ref.step(p_ref, g_dense, 0.3)
        opt.step(p_sp, g_sparse, 0.3, segments)
    # untouched rows: parameters and accumulator exactly as they were
    P, A = p_sp[7:37].reshape(6, 5), opt.acc[7:37].reshape(6, 5)
    assert np.array_equal(P[untouched], p[7:37].reshape(6, 5)[untouched])
    assert np.all(A[untouched] == dtype(0.1))
    # touched rows and dense parts: the dense computation, bit for bit (a zero
    # gradient leaves an element and its accumulator unchanged in Adagrad)
    assert np.array_equal(p_sp, p_ref)
    assert np.array_equal(opt.acc, ref.acc)
    assert not np.array_equal(P[rows], p[7:37].reshape(6, 5)[rows])


def test_clipping_comes_before_accumulation():
    g = np.array([6.0, 8.0])  # norm 10
    p = np.zeros(2)
    opt = Adagrad(clip=1.0, initial_accumulator=0.1, eps=0.0)
    assert opt.step(p, g, 1.0) == 10.0
    gc = g * 0.1  # the clipped gradient, norm 1
    np.testing.assert_allclose(opt.acc, 0.1 + gc * gc, rtol=1e-15)
    np.testing.assert_allclose(p, -gc / np.sqrt(0.1 + gc * gc), rtol=1e-15)
    # an unclipped accumulator would hold 0.1 + g^2 = [36.1, 64.1]
    assert opt.acc.max() < 1


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 1000, (1 << 14) * 3 + 17])
def test_dense_kernel_equals_numpy(rng, dtype, n, parallel):
    p = rng.standard_normal(n).astype(dtype)
    g = (rng.standard_normal(n) * 3).astype(dtype)
    acc = rng.uniform(0.0, 2.0, n).astype(dtype)
    p2, acc2 = p.copy(), acc.copy()
    (cpu._adagrad_dense_parallel if parallel else cpu._adagrad_dense_serial)(p, acc, g, 0.37, 0.2, 1e-10)
    reference.adagrad_update(p2, acc2, g, 0.37, 0.2, 1e-10)
    assert np.array_equal(p, p2) and np.array_equal(acc, acc2)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_kernel_equals_numpy(rng, dtype, parallel):
    V, D = 300, 33
    p = rng.standard_normal((V, D)).astype(dtype)
    g = rng.standard_normal((V, D)).astype(dtype)
    acc = rng.uniform(0.0, 2.0, (V, D)).astype(dtype)
    rows = np.unique(rng.integers(0, V, 80)).astype(np.int32)
    p2, acc2 = p.copy(), acc.copy()
    (cpu._adagrad_rows_parallel if parallel else cpu._adagrad_rows_serial)(p, acc, g, rows, 0.5, 0.1, 1e-7)
    reference.adagrad_update(p2, acc2, g, 0.5, 0.1, 1e-7, rows)
    assert np.array_equal(p, p2) and np.array_equal(acc, acc2)


def test_step_with_reference_kernels_is_identical(rng):
    """The whole step (dense and rows updates) through the NumPy fallback
    (``kernels.using('reference')``) equals the Numba path bit for bit.
    Without clipping: the norms are sums in another order, so a clip factor
    could differ in its last bit."""
    p, g, rows, segments = _rows_problem(rng, np.float32)
    p2 = p.copy()
    fast, slow = Adagrad(clip=0.0), Adagrad(clip=0.0)
    for _ in range(2):
        n1 = fast.step(p, g, 0.1, segments)
        with kernels.using("reference"):
            n2 = slow.step(p2, g, 0.1, segments)
    np.testing.assert_allclose(n1, n2, rtol=1e-6)  # float32 blocks vs float64 sums
    assert np.array_equal(p, p2) and np.array_equal(fast.acc, slow.acc)


def test_non_contiguous_views_use_numpy(rng):
    base = rng.standard_normal(20)
    p, acc, g = base[::2].copy(), np.full(10, 0.1), rng.standard_normal(10)
    pv = np.zeros(20)
    pv[::2] = p
    accv = np.full(20, 0.1)
    adagrad_update(pv[::2], accv[::2], np.repeat(g, 2)[::2], 1.0, 0.1, 1e-10)
    adagrad_update(p, acc, g, 1.0, 0.1, 1e-10)
    assert np.array_equal(pv[::2], p) and np.array_equal(accv[::2], acc)
    assert not pv[1::2].any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="divides 0 by 0"):
        Adagrad(initial_accumulator=0.0, eps=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        Adagrad(initial_accumulator=-1.0)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; available: sgd, adagrad"):
        make_optimizer("adam", 5.0)
    assert isinstance(make_optimizer("adagrad", 1.0, initial_accumulator=0.5), Adagrad)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="adam").validate()
    p = np.zeros((4, 2))
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        adagrad_update(p, p.copy(), p.copy(), 1.0, 0.1, 1e-10, rows=np.array([1, 4]))
    with pytest.raises(ValueError, match="acc is"):
        adagrad_update(p, np.zeros(8), p.copy(), 1.0, 0.1, 1e-10)
    with pytest.raises(TypeError, match="float32 or float64"):
        adagrad_update(np.zeros(3, np.int32), np.zeros(3, np.int32), np.zeros(3, np.int32), 1, 1, 0)
    # 2-d arrays without rows: every element, as a flat update would do it
    g = np.arange(8.0).reshape(4, 2)
    acc, flat_p, flat_acc = np.full((4, 2), 0.1), np.zeros(8), np.full(8, 0.1)
    adagrad_update(p, acc, g, 1.0, 0.1, 1e-10)
    adagrad_update(flat_p, flat_acc, g.ravel(), 1.0, 0.1, 1e-10)
    assert np.array_equal(p.ravel(), flat_p) and np.array_equal(acc.ravel(), flat_acc)


def test_state_dict_round_trip_through_hdf5(tmp_path, rng):
    p = rng.standard_normal(50).astype(np.float32)
    g = rng.standard_normal(50).astype(np.float32)
    opt = Adagrad(clip=2.0, initial_accumulator=0.25, eps=1e-8)
    assert "accumulator" not in opt.state_dict()  # nothing to store before a step
    opt.step(p, g, 0.1)
    ck = sio.Checkpoint(config={}, vocab=["a"], params={"w": p}, optimizer=opt.state_dict())
    sio.save(tmp_path / "m.h5", ck)
    info = sio.describe(tmp_path / "m.h5")
    acc_ds = [d for d in info["datasets"] if d["name"] == "/optimizer/accumulator"]
    assert acc_ds and acc_ds[0]["dtype"] == "float32" and acc_ds[0]["shape"] == [50]  # a dataset
    assert info["optimizer"] == {"name": "adagrad", "clip": 2.0, "initial_accumulator": 0.25,
                                 "eps": 1e-8}
    back = sio.load(tmp_path / "m.h5").optimizer
    new = Adagrad()
    new.load_state_dict(back)
    assert (new.clip, new.initial_accumulator, new.eps) == (2.0, 0.25, 1e-8)
    assert new.acc.dtype == np.float32 and np.array_equal(new.acc, opt.acc)
    assert new.acc is not back["accumulator"]  # a copy: the caller's array stays as it was
    p2 = p.copy()
    opt.step(p, g, 0.1)
    new.step(p2, g, 0.1)
    assert np.array_equal(p, p2) and np.array_equal(new.acc, opt.acc)
    with pytest.raises(ValueError, match="another model"):
        new.step(np.zeros(3, np.float32), np.zeros(3, np.float32), 0.1)
    with pytest.raises(ValueError, match="not 'adagrad'"):
        Adagrad().load_state_dict(SGD().state_dict())
    with pytest.raises(ValueError, match="not 'sgd'"):
        SGD().load_state_dict(back)


def _run(files, out, **kw):
    hp = {**TINY_HP, "optimizer": "adagrad", "lr": 0.2, **kw}
    return run_training(files, out, *configs(hp), log=lambda m: None, progress=False)


def test_interrupt_and_resume_is_bit_exact(tmp_path, monkeypatch):
    files, _ = tiny_corpus(tmp_path / "c")
    s = _run(files, tmp_path / "full.h5")
    assert s["finished"] and math.isfinite(s["test_ppl"])
    full = sio.load(tmp_path / "full.h5")
    assert full.config["train"]["optimizer"] == "adagrad"
    assert full.optimizer["accumulator"].shape == (sum(v.size for v in full.params.values()),)

    calls = {"n": 0}
    orig = Adagrad.step

    def step(self, params, grad, lr, segments=None):
        calls["n"] += 1
        if calls["n"] == 9:
            signal.raise_signal(signal.SIGINT)
        return orig(self, params, grad, lr, segments)

    monkeypatch.setattr(Adagrad, "step", step)
    s = _run(files, tmp_path / "part.h5")
    monkeypatch.setattr(Adagrad, "step", orig)
    assert not s["finished"]
    part = sio.load(tmp_path / "part.h5")
    assert part.train_state["segment"] == 9
    assert not np.array_equal(part.optimizer["accumulator"], full.optimizer["accumulator"])
    s2 = resume_training(tmp_path / "part.h5", log=lambda m: None, progress=False)
    assert s2["finished"]
    resumed = sio.load(tmp_path / "part.h5")
    for k in full.params:
        assert np.array_equal(resumed.params[k], full.params[k]), k
    assert resumed.optimizer["accumulator"].dtype == np.float32
    assert np.array_equal(resumed.optimizer["accumulator"], full.optimizer["accumulator"])
