"""The performance work's kernels and bookkeeping: the fast exp, the inverted
tables, lazy gradients, the pipeline over layers, and the same training
result as the plain paths.  (The kernels' parity with the reference is in
``test_kernels.py``.)"""
import numpy as np
import pytest

from slimnp import kernels
from slimnp.backend import make_rng
from slimnp.kernels import cpu
from slimnp.buffers import ParamStore, Workspace
from slimnp.layers import slim_softmax_loss_t
from slimnp.mapping import hash_assignment, inverse_table, shuffle_assignment_pools
from slimnp.model import LanguageModel, ModelConfig
from slimnp.optim import SGD, global_norm

from gradcheck import softmax_expected


# ----------------------------------------------------------------------------
# exp
# ----------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------
# slim output layer: inverted tables, the loss
# ----------------------------------------------------------------------------
def test_inverse_table(rng):
    V, K, Mk = 60, 3, 12
    idx_kv = np.ascontiguousarray(shuffle_assignment_pools(V, K, Mk, 4).T)
    inv = inverse_table(idx_kv, Mk)
    assert inv.shape == (K, V // Mk, Mk)
    for k in range(K):
        for j in range(Mk):
            words = inv[k, :, j]
            assert np.all(np.diff(words) > 0)  # ascending
            assert np.array_equal(np.flatnonzero(idx_kv[k] == j), words)
    # uneven fan-out (hash mapping, or Mk not dividing V): no inverse
    assert inverse_table(np.ascontiguousarray(hash_assignment(V, K, Mk, 0, 1).T), Mk) is None
    assert inverse_table(idx_kv[:, :-1], Mk) is None


def test_inverse_table_shape_checked(rng):
    V, K, Mk = 40, 2, 10
    idx_kv = np.ascontiguousarray(shuffle_assignment_pools(V, K, Mk, 0).T)
    with pytest.raises(ValueError, match="inv"):
        kernels.slim_segment_sum_t(np.zeros((V, 3), np.float32), idx_kv, np.empty((K, Mk, 3), np.float32),
                                   inv=np.zeros((K, 3, Mk), np.int32))


@pytest.mark.parametrize("seed", [0, 1])
def test_word_major_slim_loss_matches_the_softmax_of_its_vectors(seed):
    """The word-major slim loss (with and without the inverted table) against
    the plain NumPy softmax of the materialised (V, H) matrix; the pool
    gradient is the words' slices of dW summed per pool entry."""
    rng = np.random.default_rng(seed)
    N, H, K, Mk, V = 13, 24, 4, 15, 60
    d = H // K
    h = rng.standard_normal((N, H))
    A = rng.standard_normal((K, Mk, d)) * 0.3
    b = rng.standard_normal(V)
    idx_kv = np.ascontiguousarray(shuffle_assignment_pools(V, K, Mk, seed).T)
    t = rng.integers(0, V, N).astype(np.int32)
    W = np.concatenate([A[k][idx_kv[k]] for k in range(K)], axis=1)  # (V, H)
    nll_r, (dh_r, dW_r, db_r) = softmax_expected(h, W, b, t, 0.5)
    dA_r = np.zeros_like(A)
    for k in range(K):
        np.add.at(dA_r[k], idx_kv[k], dW_r[:, k * d : (k + 1) * d])
    for inv in (inverse_table(idx_kv, Mk), None):
        nll_t, (dh_t, dPT, hk, db_t) = slim_softmax_loss_t(h, A, b, idx_kv, t, 0.5, True, inv)
        np.testing.assert_allclose(nll_t, nll_r, rtol=1e-12)
        np.testing.assert_allclose(dh_t, dh_r, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dPT @ hk, dA_r, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(db_t, db_r, rtol=1e-10, atol=1e-12)
        nll_e, _ = slim_softmax_loss_t(h, A, b, idx_kv, t, 1.0, False)
        np.testing.assert_allclose(nll_e, nll_r, rtol=1e-12)


# ----------------------------------------------------------------------------
# lazy gradients, row-tracked embedding gradients, the fused step
# ----------------------------------------------------------------------------
def test_lazy_zero_and_row_tracking():
    store = ParamStore()
    store.add("emb", (10, 3))
    store.add("w", (3, 2))
    store.allocate()
    store.grad[:] = 7  # stale values from an earlier step
    store.zero_grad(lazy=True)
    g = store.grad_rows("emb", np.array([2, 5]))
    g[[2, 5]] += 1
    a, b = np.ones((3, 4), np.float32), np.ones((4, 2), np.float32)
    store.accumulate("w", a, b)  # written, not added to the stale 7s
    store.settle_grad()
    assert np.all(store.grads["w"] == 4)
    np.testing.assert_array_equal(store.grads["emb"].sum(axis=1), [0, 0, 3, 0, 0, 3, 0, 0, 0, 0])
    assert [s[0] for s in store.segments()] == ["rows", "dense"]
    # next step: only rows 2 and 5 needed clearing; a second scatter unions rows
    store.zero_grad(lazy=True)
    store.grad_rows("emb", np.array([1]))[1] += 1
    store.grad_rows("emb", np.array([9]))[9] += 1
    store.settle_grad()
    np.testing.assert_array_equal(store.grads["emb"].sum(axis=1), [0, 3, 0, 0, 0, 0, 0, 0, 0, 3])
    np.testing.assert_array_equal(store.segments()[0][3], [1, 9])
    assert np.all(store.grads["w"] == 0)  # settled: nobody wrote it this step
    assert global_norm(store.grad, store.segments()) == pytest.approx(np.sqrt(6))


@pytest.mark.parametrize("extra", [{}, {"input": "slim", "input_k": 4, "input_m": 40,
                                        "output": "slim", "output_k": 4, "output_m": 40}])
def test_fast_step_equals_plain_step(extra):
    """Lazy zeroing + row-tracked embeddings + fused SGD give the same model as
    eager zeroing + a dense update."""
    cfg = ModelConfig(vocab_size=80, hidden=16, layers=2, **extra)
    rng = np.random.default_rng(3)
    segs = [(rng.integers(0, 80, (5, 4)).astype(np.int32), rng.integers(0, 80, (5, 4)).astype(np.int32))
            for _ in range(4)]
    results = []
    for fast in (True, False):
        m = LanguageModel(cfg)
        m.init_params(make_rng(0))
        opt, state = SGD(clip=0.5), m.zero_state(4)
        for x, y in segs:
            m.store.zero_grad(lazy=fast)
            _, state, _ = m.forward_backward(x, y, state, 0.25)
            opt.step(m.store.data, m.store.grad, 1.0, m.store.segments() if fast else None)
        results.append(m.store.data.copy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_workspace_reuses_buffers():
    ws = Workspace()
    a = ws.get("x", (4, 5), np.float32)
    assert ws.get("x", (4, 5), np.float32) is a
    assert ws.get("x", (4, 6), np.float32).shape == (4, 6)


# ----------------------------------------------------------------------------
# the LSTM stack as a pipeline over layers
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dropout,T", [(0.0, 23), (0.3, 10), (0.3, 31)])
def test_pipelined_stack_equals_sequential(monkeypatch, dropout, T):
    from slimnp import threaded_lstm

    cfg = ModelConfig(vocab_size=50, hidden=8, layers=3, dropout=dropout, dtype="float64")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, (T, 4)).astype(np.int32)
    y = rng.integers(0, 50, (T, 4)).astype(np.int32)
    state = rng.standard_normal((3, 2, 4, 8)) * 0.1
    out = []
    for piped in (True, False):
        monkeypatch.setattr(threaded_lstm, "enabled", lambda *a, piped=piped: piped)
        m = LanguageModel(cfg)
        m.init_params(make_rng(1))
        masks = m._masks(make_rng(5), T, 4)
        m.store.zero_grad()
        nll, new_state, dstate = m.forward_backward(x, y, state, 0.25, masks=masks)
        out.append((nll, new_state, dstate, m.store.grad.copy(), m.nll(x, y, state)[0]))
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_pipeline_error_propagates_without_hanging(monkeypatch):
    """A failure in a pool thread's layer surfaces in the caller, the other
    layers stop waiting, and the BLAS thread count is restored."""
    import threading

    from slimnp import threaded_lstm

    real = threaded_lstm.kernels.lstm_segment_kernels

    def kernels_failing_off_main_thread(G, cs):
        fwd, bwd = real(G, cs)

        def step(*args):
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("kernel failed")
            return fwd(*args)

        return step, bwd

    monkeypatch.setattr(threaded_lstm, "enabled", lambda *a: True)
    monkeypatch.setattr(threaded_lstm.kernels, "lstm_segment_kernels", kernels_failing_off_main_thread)
    m = LanguageModel(ModelConfig(vocab_size=20, hidden=4, layers=3))
    m.init_params(make_rng(0))
    before = threaded_lstm.blas_threads()
    x = np.zeros((12, 2), np.int32)
    with pytest.raises(RuntimeError, match="kernel failed"):
        m.nll(x, x, m.zero_state(2))
    assert threaded_lstm.blas_threads() == before


def test_pipeline_heuristic(monkeypatch):
    from slimnp import threaded_lstm

    # a 2-core machine whose OpenBLAS runs 2 threads, whatever runs the test
    monkeypatch.setattr(threaded_lstm.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threaded_lstm, "blas_threads", lambda: 2)
    monkeypatch.delenv("SLIMNP_PIPELINE", raising=False)
    assert threaded_lstm.enabled(np, 2, 35, 20, 300)  # config B: pipelined
    assert threaded_lstm.enabled(np, 3, 10, 20, 200)  # two chunks, B*H = MIN_BH
    assert not threaded_lstm.enabled(np, 1, 35, 20, 300)  # one layer: nothing to overlap
    assert not threaded_lstm.enabled(np, 2, 5, 20, 300)  # a single chunk
    assert not threaded_lstm.enabled(np, 2, 35, 1, 200)  # steps too small (exact B=1 evaluation)
    assert not threaded_lstm.enabled(object(), 2, 35, 20, 300)  # not NumPy (CuPy)
    monkeypatch.setattr(threaded_lstm, "blas_threads", lambda: 1)
    assert not threaded_lstm.enabled(np, 2, 35, 20, 300)  # a single-threaded BLAS: no cores to share
    monkeypatch.setattr(threaded_lstm, "blas_threads", lambda: 2)
    monkeypatch.setenv("SLIMNP_PIPELINE", "1")
    assert threaded_lstm.enabled(np, 2, 35, 1, 200)  # on whenever possible ...
    assert not threaded_lstm.enabled(np, 1, 35, 1, 200)  # ... and only then
    monkeypatch.setenv("SLIMNP_PIPELINE", "0")
    assert not threaded_lstm.enabled(np, 2, 35, 20, 300)
