"""Float64 central-difference gradient checks of every layer (the layer
objects training runs) and the sequential-vs-batch test."""
import numpy as np
import pytest

from slimnp.layers import LSTM, Softmax, embedding_backward, embedding_forward
from slimnp.model import LanguageModel, ModelConfig

from gradcheck import assert_grad, layer, softmax_expected


def _lstm(rng, D, H):
    return layer(rng, lambda store: LSTM(store, "lstm", D, H))


def test_lstm_gradients_including_state(rng):
    T, B, D, H = 5, 3, 4, 6
    store, lstm = _lstm(rng, D, H)
    x = rng.standard_normal((T, B, D))
    h0, c0 = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    # loss = sum(h_seq * w) + sum(hT * u) + sum(cT * v): gradients arrive from
    # every output and from the next segment's state
    w, u, v = rng.standard_normal((T, B, H)), rng.standard_normal((B, H)), rng.standard_normal((B, H))

    def loss():
        hs, (hT, cT), _ = lstm.forward(x, h0, c0)
        return float((hs * w).sum() + (hT * u).sum() + (cT * v).sum())

    _, _, cache = lstm.forward(x, h0, c0)
    store.zero_grad()
    dx, dh0, dc0 = lstm.backward(w, cache, u, v)
    Wx, Wh, b = lstm.weights()
    g = store.grads
    for analytic, arr in ((dx, x), (dh0, h0), (dc0, c0), (g["lstm/Wx"], Wx), (g["lstm/Wh"], Wh),
                          (g["lstm/b"], b)):
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
    store, out = layer(rng, lambda store: Softmax(store, "out", V, H), scale=1.0)
    h = rng.standard_normal((N, H))
    t = np.array([0, 8, 3, 3], np.int32)
    scale = 0.5

    def loss():
        return scale * float(out.loss(h, t, compute_grad=False)[0].sum())

    store.zero_grad()
    nll, dh = out.loss(h, t, scale, True)
    W, b = store.params["out/W"], store.params["out/b"]
    for analytic, arr in ((dh.copy(), h), (store.grads["out/W"], W), (store.grads["out/b"], b)):
        assert_grad(analytic, loss, arr)
    # and the plain NumPy formulas
    nll_e, (dh_e, dW_e, db_e) = softmax_expected(h, W, b, t, scale)
    np.testing.assert_allclose(nll, nll_e, rtol=1e-13)
    for got, want in ((dh, dh_e), (store.grads["out/W"], dW_e), (store.grads["out/b"], db_e)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


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
    store, lstm = _lstm(rng, D, H)
    x = rng.standard_normal((T, B, D))
    h0, c0 = rng.standard_normal((B, H)), rng.standard_normal((B, H))
    dh_seq = rng.standard_normal((T, B, H))
    hs, (hT, cT), cache = lstm.forward(x, h0, c0)
    store.zero_grad()
    dx_full, dh0_full, dc0_full = lstm.backward(dh_seq, cache)
    grads_full = store.grad.copy()

    # forward one step at a time, carrying the state
    h, c, caches, outs = h0, c0, [], []
    for t in range(T):
        o, (h, c), ca = lstm.forward(x[t : t + 1], h, c)
        outs.append(o[0].copy())
        caches.append(ca)
    np.testing.assert_allclose(np.stack(outs), hs, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(h, hT, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(c, cT, rtol=1e-13, atol=1e-13)
    # backward one step at a time, feeding each step's state gradient to the
    # previous; the layer accumulates the weight gradients of every step
    dh_next = np.zeros((B, H))
    dc_next = np.zeros((B, H))
    dxs = [None] * T
    store.zero_grad()
    for t in range(T - 1, -1, -1):
        dx, dh_next, dc_next = lstm.backward(dh_seq[t : t + 1], caches[t], dh_next, dc_next)
        dxs[t] = dx[0]
    for got, want in ((np.stack(dxs), dx_full), (dh_next, dh0_full), (dc_next, dc0_full),
                      (store.grad, grads_full)):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
