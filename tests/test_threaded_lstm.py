"""slimnp.threaded_lstm: the LSTM stack as a pipeline over layers equals the
plain stack, layer after layer, of slimnp.layers' forward/backward pair, and
through the model (``forward_backward`` with the pipeline on and off); a
failing stage; the on/off heuristic.
"""
import threading

import numpy as np
import pytest

from slimnp import threaded_lstm
from slimnp.backend import make_rng
from slimnp.layers import lstm_backward_gates, lstm_forward
from slimnp.model import LanguageModel, ModelConfig


def _stack(rng, L, D, H, dtype=np.float64):
    """Weights ``[(Wx (D or H, 4H), Wh (H, 4H), b (4H,))]`` of an L-layer stack."""
    return [tuple((rng.standard_normal(shape) * 0.4).astype(dtype)
                  for shape in ((D if l == 0 else H, 4 * H), (H, 4 * H), (4 * H,))) for l in range(L)]


def _masks(rng, L, T, B, H, dtype=np.float64):
    """``masks[l + 1]`` scales layer l's output (masks[0], the input's, is applied by the caller)."""
    return [None] + [((rng.random((T, B, H)) > 0.3) / 0.7).astype(dtype) for _ in range(L)]


def _plain(a0, state, weights, masks, da_top):
    """The sequential stack: lstm_forward layer by layer, then lstm_backward_gates
    from the top, ``dx = dgates Wx^T`` and the masks undone on the way down."""
    L = len(weights)
    a, new_state, caches = a0, np.empty_like(state), []
    for l, (Wx, Wh, b) in enumerate(weights):
        h_seq, (hT, cT), cache = lstm_forward(a, state[l, 0], state[l, 1], Wx, Wh, b)
        new_state[l, 0], new_state[l, 1] = hT, cT
        caches.append(cache)
        a = h_seq * masks[l + 1] if masks is not None else h_seq.copy()
    top = a
    da, dgates, dstate = da_top, [None] * L, np.empty_like(state)
    for l in range(L - 1, -1, -1):
        if masks is not None:
            da = da * masks[l + 1]
        dgates[l], dstate[l, 0], dstate[l, 1] = lstm_backward_gates(da, caches[l], weights[l][1])
        T, B, H4 = dgates[l].shape
        da = (dgates[l].reshape(T * B, H4) @ weights[l][0].T).reshape(T, B, -1)
    return top, new_state, caches, da, dgates, dstate


def _piped(a0, state, weights, masks, da_top):
    top, new_state, caches = threaded_lstm.forward(a0, state, weights, masks)
    dx0, dgates, dstate = threaded_lstm.backward(da_top, caches, weights, masks)
    return top.copy(), new_state, caches, dx0, dgates, dstate


@pytest.mark.parametrize("L,T,masked", [(2, 10, False), (3, 13, True), (3, 4, True), (4, 23, False)])
def test_pipeline_equals_the_plain_stack(rng, L, T, masked):
    """Outputs, final state, every layer's cache, the input gradient, the gate
    gradients (what the weight GEMMs use) and the state gradient: T a multiple
    of the chunk, not one, and shorter than one; layer 0's input wider than H."""
    B, D, H = 3, 7, 5
    weights = _stack(rng, L, D, H)
    a0 = rng.standard_normal((T, B, D))
    state = rng.standard_normal((L, 2, B, H)) * 0.5
    masks = _masks(rng, L, T, B, H) if masked else None
    da_top = rng.standard_normal((T, B, H))
    want, got = _plain(a0, state, weights, masks, da_top), _piped(a0, state, weights, masks, da_top)
    tol = dict(rtol=1e-12, atol=1e-13)
    for name, w, g in zip(("output", "state", "caches", "dx0", "dgates", "dstate"), want, got):
        if name == "caches":
            for cw, cg in zip(w, g):
                for field in ("gates", "hs", "cs", "tcs"):
                    np.testing.assert_allclose(getattr(cg, field), getattr(cw, field), err_msg=field, **tol)
        elif name == "dgates":
            for dw, dg in zip(w, g):
                np.testing.assert_allclose(dg, dw, err_msg=name, **tol)
        else:
            np.testing.assert_allclose(g, w, err_msg=name, **tol)


def test_pipeline_does_not_depend_on_thread_timing(rng):
    """Each layer runs on its own buffers: two runs (float32) are bit-identical,
    whichever thread finished a chunk first."""
    L, T, B, D, H = 3, 17, 4, 6, 8
    weights = _stack(rng, L, D, H, np.float32)
    a0 = rng.standard_normal((T, B, D)).astype(np.float32)
    state = (rng.standard_normal((L, 2, B, H)) * 0.5).astype(np.float32)
    masks = _masks(rng, L, T, B, H, np.float32)
    da_top = rng.standard_normal((T, B, H)).astype(np.float32)
    first, second = (_piped(a0, state, weights, masks, da_top) for _ in range(2))
    for a, b in ((first[0], second[0]), (first[1], second[1]), (first[3], second[3]), (first[5], second[5]),
                 *zip(first[4], second[4])):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# through the model
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("dropout,T", [(0.0, 23), (0.3, 10), (0.3, 31)])
def test_pipelined_stack_equals_sequential(monkeypatch, dropout, T):
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


# ----------------------------------------------------------------------------
# when the pipeline is on
# ----------------------------------------------------------------------------
def test_pipeline_heuristic(monkeypatch):
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
