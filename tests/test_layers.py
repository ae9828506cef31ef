"""Float64 central-difference gradient checks and the sequential-vs-batch test."""
import numpy as np
import pytest

from slimnp.layers import (embedding_backward, embedding_forward, lstm_backward, lstm_forward,
                           softmax_forward_backward)
from slimnp.model import LanguageModel, ModelConfig

EPS = 1e-6


def numgrad(f, x, idx=None):
    """Central differences of scalar f() w.r.t. entries ``idx`` of array x (in place)."""
    flat = x.reshape(-1)
    idx = range(flat.size) if idx is None else idx
    g = {}
    for i in idx:
        old = flat[i]
        flat[i] = old + EPS
        fp = f()
        flat[i] = old - EPS
        fm = f()
        flat[i] = old
        g[i] = (fp - fm) / (2 * EPS)
    return g


def assert_grad(analytic, f, x, idx=None, rtol=1e-6, atol=1e-8):
    num = numgrad(f, x, idx)
    a = analytic.reshape(-1)
    for i, v in num.items():
        assert abs(a[i] - v) <= atol + rtol * abs(v), f"entry {i}: analytic {a[i]}, numeric {v}"


def test_lstm_gradients_including_state(rng):
    T, B, D, H = 5, 3, 4, 6
    x = rng.standard_normal((T, B, D))
    h0, c0 = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    Wx, Wh = rng.standard_normal((D, 4 * H)) * 0.5, rng.standard_normal((H, 4 * H)) * 0.5
    b = rng.standard_normal(4 * H) * 0.1
    # loss = sum(h_seq * w) + sum(hT * u) + sum(cT * v): gradients arrive from
    # every output and from the next segment's state
    w, u, v = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))

    def loss():
        hs, (hT, cT), _ = lstm_forward(x, h0, c0, Wx, Wh, b)
        return float((hs * w).sum() + (hT * u).sum() + (cT * v).sum())

    _, _, cache = lstm_forward(x, h0, c0, Wx, Wh, b)
    dx, dh0, dc0, dWx, dWh, db = lstm_backward(w, cache, Wx, Wh, u, v)
    for analytic, arr in ((dx, x), (dh0, h0), (dc0, c0), (dWx, Wx), (dWh, Wh), (db, b)):
        assert_grad(analytic, loss, arr)


def test_embedding_gradient(rng):
    V, D = 7, 3
    W = rng.standard_normal((V, D))
    ids = np.array([[0, 6], [3, 3], [6, 1]], np.int32)  # repeats, first and last word
    w = rng.standard_normal((3, 2, D))

    def loss():
        return float((embedding_forward(W, ids) * w).sum())

    dW = np.zeros_like(W)
    embedding_backward(dW, ids, w)
    assert_grad(dW, loss, W)


def test_softmax_gradient(rng):
    N, H, V = 4, 5, 9
    h = rng.standard_normal((N, H))
    W, b = rng.standard_normal((V, H)), rng.standard_normal(V)
    t = np.array([0, 8, 3, 3], np.int32)
    scale = 0.5

    def loss():
        return scale * float(softmax_forward_backward(h, W, b, t, 1.0, False)[0].sum())

    nll, (dh, dW, db) = softmax_forward_backward(h, W, b, t, scale, True)
    for analytic, arr in ((dh, h), (dW, W), (db, b)):
        assert_grad(analytic, loss, arr)


VARIANTS = {
    "plain": dict(),
    "dropout": dict(dropout=0.4),
    # Tables 2-3 of the paper: the embedding -> LSTM connection alone varies
    "input-dropout-only": dict(dropout=0.0, input_dropout=0.3),
    "no-input-dropout": dict(dropout=0.4, input_dropout=0.0),
    "both-dropouts": dict(dropout=0.4, input_dropout=0.1),
    # PM (Figure 4): E=4 word vectors, 4x6 and 6x4 projections
    "pm": dict(embedding_size=4, dropout=0.4),
    "pm-tied": dict(embedding_size=4, tie=True, input_dropout=0.2),
    "pm-slim": dict(embedding_size=4, input="slim", input_k=2, input_m=9, output="slim",
                    output_k=2, output_m=8, dropout=0.3),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_gradients_two_layers(variant, rng):
    """Whole model (2 layers, fixed dropout masks): every parameter and the incoming state."""
    V, H, L, T, B = 11, 6, 2, 4, 3
    cfg = ModelConfig(vocab_size=V, hidden=H, layers=L, init_scale=0.3, dtype="float64",
                      **VARIANTS[variant])
    m = LanguageModel(cfg)
    m.init_params(np.random.default_rng(0))
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    y = rng.integers(0, V, (T, B)).astype(np.int32)
    state = rng.standard_normal((L, 2, B, H)) * 0.5
    masks = m._masks(np.random.default_rng(5), T, B)
    if cfg.dropout or cfg.p_input:
        assert masks is not None and any((mk == 0).any() for mk in masks if mk is not None)
        assert (masks[0] is None) == (cfg.p_input == 0)
        assert all((mk is None) == (cfg.dropout == 0) for mk in masks[1:])
    else:
        assert masks is None
    scale = 1.0 / B

    def loss():
        nll, _ = m.nll(x, y, state, masks)
        return scale * float(nll.sum())

    m.store.zero_grad()
    nll_sum, _, dstate = m.forward_backward(x, y, state, scale=scale, masks=masks)
    assert abs(scale * nll_sum - loss()) < 1e-10
    assert_grad(dstate, loss, state)
    for name, p in m.store.params.items():
        idx = rng.choice(p.size, size=min(p.size, 25), replace=False)
        assert_grad(m.store.grads[name], loss, p, idx)


def test_sequential_equals_batch(rng):
    """Step-by-step with carried state equals the whole-segment call (outputs and grads)."""
    T, B, D, H = 6, 2, 3, 4
    x = rng.standard_normal((T, B, D))
    h0, c0 = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    Wx, Wh, b = rng.standard_normal((D, 4 * H)), rng.standard_normal((H, 4 * H)), rng.standard_normal(4 * H)
    dh_seq = rng.standard_normal((T, B, H))
    hs, (hT, cT), cache = lstm_forward(x, h0, c0, Wx, Wh, b)
    full = lstm_backward(dh_seq, cache, Wx, Wh)

    # forward one step at a time, carrying the state
    h, c, caches, outs = h0, c0, [], []
    for t in range(T):
        o, (h, c), ca = lstm_forward(x[t : t + 1], h, c, Wx, Wh, b)
        outs.append(o[0].copy())
        caches.append(ca)
    np.testing.assert_allclose(np.stack(outs), hs, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(h, hT, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(c, cT, rtol=1e-13, atol=1e-13)
    # backward one step at a time, feeding each step's state gradient to the previous
    dh_next = np.zeros((B, H))
    dc_next = np.zeros((B, H))
    dWx, dWh, db = np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)
    dxs = [None] * T
    for t in range(T - 1, -1, -1):
        dx, dh_next, dc_next, a, bb, cc = lstm_backward(dh_seq[t : t + 1], caches[t], Wx, Wh, dh_next, dc_next)
        dxs[t] = dx[0]
        dWx += a
        dWh += bb
        db += cc
    for got, want in ((np.stack(dxs), full[0]), (dh_next, full[1]), (dc_next, full[2]),
                      (dWx, full[3]), (dWh, full[4]), (db, full[5])):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
