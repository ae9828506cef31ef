"""Float64 central-difference gradient checks of every layer (the layer
objects training runs) and the sequential-vs-batch test; the slim embedding
layers: the DP output layer and its dense strategy against the full softmax,
the word-major loss against the softmax of its vectors, ``slim_matrix``,
gradients, the no-sharing limits.  (Tables: test_mapping.py; the kernels:
test_kernels.py and test_slim_kernels.py; slim layers in the model:
test_model.py.)"""
import numpy as np
import pytest

from slimnp import layers
from slimnp.layers import (LSTM, SlimSoftmax, Softmax, embedding_backward, embedding_forward,
                           slim_embedding_backward, slim_embedding_forward, slim_logits,
                           slim_output_strategy, slim_softmax_loss_t)
from slimnp.mapping import hash_assignment, inverse_table, shuffle_assignment, shuffle_assignment_pools
from slimnp.model import LanguageModel, ModelConfig

from gradcheck import assert_grad, assert_model_grads, layer, softmax_expected


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
    assert_model_grads(m, x, y, state, masks, 1.0 / B, rng)


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


# -- slim layers ----------------------------------------------------------------
def _dense_from_pools(A, idx_vk):
    """Materialise the (V, H) output matrix (tests only)."""
    K = A.shape[0]
    return np.concatenate([A[k][idx_vk[:, k]] for k in range(K)], axis=1)


def test_dp_logits_equal_materialised_matrix(rng):
    N, V, K, Mk, d = 6, 40, 4, 7, 3
    h = rng.standard_normal((N, K * d))
    A = rng.standard_normal((K, Mk, d))
    b = rng.standard_normal(V)
    idx = shuffle_assignment_pools(V, K, Mk, 0)
    z, _ = slim_logits(h, A, np.ascontiguousarray(idx.T), b)
    np.testing.assert_allclose(z, h @ _dense_from_pools(A, idx).T + b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("table", ["shuffle", "hash"])
def test_slim_matrix_equals_the_word_by_word_loop(rng, table):
    """slim_matrix rebuilds W[w] = [A[idx[w, 0]] | ...] for one pool and
    [A[0, idx[w, 0]] | ... | A[K-1, idx[w, K-1]]] for K pools, exactly (a
    gather: every number is a pool's own), ids 0 and V-1 and shared rows
    included; ``out`` receives it."""
    V, K, M, Mk, d = 37, 4, 29, 6, 3
    if table == "shuffle":
        idx_in, idx_out = shuffle_assignment(V, K, M, 1), shuffle_assignment_pools(V, K, Mk, 2)
    else:
        idx_in, idx_out = hash_assignment(V, K, M, seed=3, salt=0), hash_assignment(V, K, Mk, seed=3, salt=1)
    pool, pools = rng.standard_normal((M, d)).astype(np.float32), rng.standard_normal((K, Mk, d))
    want_in, want_out = np.zeros((V, K * d), np.float32), np.zeros((V, K * d))
    for w in range(V):
        for k in range(K):
            want_in[w, k * d : (k + 1) * d] = pool[idx_in[w, k]]
            want_out[w, k * d : (k + 1) * d] = pools[k, idx_out[w, k]]
    for A, idx, want in ((pool, idx_in, want_in), (pools, idx_out, want_out)):
        got = layers.slim_matrix(A, idx)
        assert got.dtype == A.dtype
        np.testing.assert_array_equal(got, want)
        out = np.full((V, K * d), np.nan, A.dtype)
        assert layers.slim_matrix(A, idx, out=out) is out
        np.testing.assert_array_equal(out, want)
    # the K pools seen as one (M, d) pool with global rows: the same matrix
    rows = idx_out + np.arange(K) * Mk
    np.testing.assert_array_equal(layers.slim_matrix(pools.reshape(K * Mk, d), rows), want_out)
    with pytest.raises(ValueError, match="C-contiguous"):
        layers.slim_matrix(pool, idx_in, out=np.empty((K * d, V), np.float32).T)
    with pytest.raises(ValueError, match="3 pools but the table has K = 4"):
        layers.slim_matrix(pools[:3], idx_out)


def _slim_and_full(rng, V, H, K, Mk, idx, strategy="dp"):
    """A slim output layer with tables ``idx (V, K)`` and the full softmax
    holding the same word vectors (``W[w] = concat_k A[k, idx[w, k]]``)."""
    slim_store, slim = layer(rng, lambda st: SlimSoftmax(st, "out", V, H, K, K * Mk, idx, strategy), 1.0)
    assert slim.strategy == strategy
    full_store, full = layer(rng, lambda st: Softmax(st, "out", V, H), 1.0)
    A = slim_store.params["out/A"]
    full_store.params["out/W"][...] = _dense_from_pools(A, idx)
    full_store.params["out/b"][...] = slim_store.params["out/b"]
    return (slim_store, slim), (full_store, full)


def _assert_same_softmax(rng, V, H, K, Mk, idx, N=5, scale=0.5, strategy="dp"):
    """The slim layer's loss and gradients equal the full softmax's on the same vectors."""
    (ss, slim), (fs, full) = _slim_and_full(rng, V, H, K, Mk, idx, strategy)
    h = rng.standard_normal((N, H))
    t = rng.integers(0, V, N).astype(np.int32)
    t[:2] = [0, V - 1]
    ss.zero_grad()
    fs.zero_grad()
    nll_s, dh_s = slim.loss(h, t, scale)
    nll_f, dh_f = full.loss(h, t, scale)
    np.testing.assert_allclose(nll_s, nll_f, rtol=1e-13)
    np.testing.assert_allclose(dh_s, dh_f, rtol=1e-12, atol=1e-14)
    # each pool row's gradient is the sum of its words' slices of dW
    dW, dA = fs.grads["out/W"], ss.grads["out/A"]
    d = H // K
    for k in range(K):
        want = np.zeros((Mk, d))
        np.add.at(want, idx[:, k], dW[:, k * d : (k + 1) * d])
        np.testing.assert_allclose(dA[k], want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ss.grads["out/b"], fs.grads["out/b"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(slim.loss(h, t, compute_grad=False)[0], nll_f, rtol=1e-13)


@pytest.mark.parametrize("strategy", ["dp", "dense"])
def test_slim_softmax_without_sharing_is_the_full_softmax(rng, strategy):
    """K=1, one pool entry per word: exactly a full softmax (loss and gradients)."""
    V, H = 30, 8
    perm = rng.permutation(V).astype(np.int32)[:, None]  # (V, 1)
    _assert_same_softmax(rng, V, H, 1, V, perm, strategy=strategy)


@pytest.mark.parametrize("strategy", ["dp", "dense"])
@pytest.mark.parametrize("K,Mk,H", [(4, 7, 12), (12, 5, 12)])
def test_slim_softmax_with_sharing_is_the_full_softmax_of_its_vectors(rng, strategy, K, Mk, H):
    """Shared pool entries (V = 40 words on 7 or 5 entries per pool; K = H is
    HashNet's shape): the loss of the materialised vectors, and the pool
    gradients summed over the words -- by the DP and by the rebuilt matrix."""
    V = 40
    _assert_same_softmax(rng, V, H, K, Mk, shuffle_assignment_pools(V, K, Mk, 3), strategy=strategy)


def test_slim_softmax_strategies_agree_on_hash_tables(rng):
    """Uneven fan-out (hash tables, a pool row shared by 0 to many words): the
    dense strategy's loss, dh and pool gradients equal the DP's."""
    N, V, K, Mk, H = 9, 60, 6, 11, 6
    idx = hash_assignment(V, K, Mk, seed=2, salt=0)
    (s1, dp), _ = _slim_and_full(np.random.default_rng(5), V, H, K, Mk, idx, "dp")
    (s2, dense), _ = _slim_and_full(np.random.default_rng(5), V, H, K, Mk, idx, "dense")
    np.testing.assert_array_equal(s1.data, s2.data)
    h = rng.standard_normal((N, H))
    t = rng.integers(0, V, N).astype(np.int32)
    s1.zero_grad()
    s2.zero_grad()
    nll1, dh1 = dp.loss(h, t, 0.25)
    nll2, dh2 = dense.loss(h, t, 0.25)
    np.testing.assert_allclose(nll2, nll1, rtol=1e-13)
    np.testing.assert_allclose(dh2, dh1, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s2.grad, s1.grad, rtol=1e-12, atol=1e-14)
    # evaluation in row chunks (2 rows each) gives the same losses
    np.testing.assert_allclose(dense.loss(h, t, compute_grad=False, chunk=2)[0], nll1, rtol=1e-13)
    # and the row-major logits generation samples from
    np.testing.assert_allclose(dense.logits(h), dp.logits(h), rtol=1e-12, atol=1e-13)


def test_slim_output_strategy_rule():
    """The rebuilt matrix where sub-vectors are a few numbers long (HashNet,
    K = 40 at H = 200), the DP elsewhere: the paper's shapes, tiny layers and
    vocabularies whose V x H matrix would cost the memory the layer saves."""
    assert slim_output_strategy(10_000, 200, 200) == "dense"  # HashNet on PTB
    assert slim_output_strategy(10_000, 200, 40) == "dense"  # d = 5
    assert slim_output_strategy(10_000, 200, 8) == "dp"  # the sweeps' K = 8, d = 25
    assert slim_output_strategy(10_000, 200, 20) == "dense"  # d = 10
    assert slim_output_strategy(10_000, 200, 10) == "dp"  # d = 20
    assert slim_output_strategy(793_471, 2048, 8) == "dp"  # Table 7
    assert slim_output_strategy(793_471, 512, 512) == "dp"  # 406M numbers: the memory bound
    assert slim_output_strategy(25, 8, 8) == "dp"  # tiny: nothing to gain
    with pytest.raises(ValueError, match="strategy"):
        SlimSoftmax(layers.ParamStore(), "out", 10, 4, 2, 4, np.zeros((10, 2), np.int32), "fast")


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
    W = _dense_from_pools(A, idx_kv.T)  # (V, H)
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


@pytest.mark.parametrize("strategy", ["dp", "dense"])
def test_slim_softmax_gradient(rng, strategy):
    N, V, K, Mk, d = 4, 17, 3, 5, 2
    store, out = layer(rng, lambda st: SlimSoftmax(st, "out", V, K * d, K, K * Mk,
                                                   shuffle_assignment_pools(V, K, Mk, 1), strategy), 1.0)
    assert out.strategy == strategy
    h = rng.standard_normal((N, K * d))
    t = np.array([0, V - 1, 3, 3], np.int32)

    def loss():
        return 0.5 * float(out.loss(h, t, compute_grad=False)[0].sum())

    store.zero_grad()
    _, dh = out.loss(h, t, 0.5)
    for analytic, arr in ((dh.copy(), h), (store.grads["out/A"], store.params["out/A"]),
                          (store.grads["out/b"], store.params["out/b"])):
        assert_grad(analytic, loss, arr)


def test_slim_embedding_gradient(rng):
    V, K, M, d = 9, 3, 5, 2
    A = rng.standard_normal((M, d))
    idx = shuffle_assignment(V, K, M, 0)
    ids = np.array([[0, 8], [4, 4], [8, 1]], np.int32)
    w = rng.standard_normal((3, 2, K * d))

    def loss():
        return float((slim_embedding_forward(A, idx, ids)[0] * w).sum())

    X, sub = slim_embedding_forward(A, idx, ids)
    np.testing.assert_array_equal(X[0, 1], np.concatenate([A[i] for i in idx[8]]))
    dA = np.zeros_like(A)
    slim_embedding_backward(dA, sub, w)
    assert_grad(dA, loss, A)


# -- no-sharing limits ---------------------------------------------------------
def test_slim_input_without_sharing_is_a_dense_embedding(rng):
    """K=1, M=V, identity table: exactly the dense embedding (forward and backward)."""
    V, H = 12, 5
    A = rng.standard_normal((V, H))
    ids = rng.integers(0, V, (4, 3)).astype(np.int32)
    ident = np.arange(V, dtype=np.int32)[:, None]
    X, sub = slim_embedding_forward(A, ident, ids)
    np.testing.assert_array_equal(X, embedding_forward(A, ids))
    dX = rng.standard_normal((4, 3, H))
    dA, dW = np.zeros_like(A), np.zeros_like(A)
    slim_embedding_backward(dA, sub, dX)
    embedding_backward(dW, ids, dX)
    np.testing.assert_array_equal(dA, dW)


def test_slim_output_with_identity_pools_is_the_full_softmax(rng):
    """K pools of size V, idx[w, k] = w: the full softmax with W[w] = concat_k A[k, w]."""
    V, K, d = 11, 3, 2
    _assert_same_softmax(rng, V, K * d, K, V, np.tile(np.arange(V, dtype=np.int32)[:, None], (1, K)),
                         scale=1.0)
