"""Slim tail clusters of the adaptive softmax (slimnp.adaptive, tail_m): each
tail word's vector the concatenation of K sub-vectors from its cluster's K
pools, the cluster's logits by the slim embeddings' DP.  Without sharing a
slim cluster is the dense one exactly; float64 gradient checks; exact
log-probabilities; float32 against float64; the config's errors.  Whole
models, files and kernel backends: tests/test_adaptive_input.py."""
import numpy as np
import pytest

from slimnp import adaptive, layers
from slimnp.adaptive import AdaptiveSoftmax
from slimnp.buffers import ParamStore
from slimnp.mapping import output_table
from slimnp.model import LanguageModel, ModelConfig

from gradcheck import assert_output_layer_grads, layer

V, E = 23, 16
CUTOFFS = (5, 9, 15)  # head 0..4 (+3 cluster logits), clusters 5..8, 9..14, 15..22
DIV = 2.0  # tail sizes 8, 4, 2
K = 2
TAIL_M = (4, 6, 6)  # pools of 2, 3, 3 entries for 4, 6, 8 words: shared entries
SIZES = [4, 6, 8]
TARGETS = {"all": [0, 4, 5, 8, 9, 14, 15, 22, 3, 3, 15, 7],
           "no-last-cluster": [0, 4, 5, 8, 9, 14, 2, 2, 6]}


def _tables(tail_m, K=K, kind="shuffle"):
    return [output_table(v, K, m // K, kind, 0) for v, m in zip(SIZES, tail_m)]


def _layer(rng, head_bias=False, tail_m=TAIL_M, K=K, kind="shuffle"):
    return layer(rng, lambda s: AdaptiveSoftmax(s, "out", V, E, CUTOFFS, DIV, head_bias, K, tail_m,
                                                _tables(tail_m, K, kind)), scale=1.0)


def _dense_twin(store, out):
    """The dense-tail adaptive softmax with every slim cluster's vectors
    written out (word v's k-th slice from pool k), other parameters copied."""
    s2 = ParamStore(np, np.float64)
    dense = AdaptiveSoftmax(s2, "out", V, E, CUTOFFS, DIV, out.head_bias)
    s2.allocate()
    for name, p in s2.params.items():
        if name.endswith("/W") and "tail" in name:
            i = int(name.split("tail")[1].split("/")[0])
            A = store.params[f"out/tail{i}/A"]  # (K, Mk, d/K)
            idx = out._idx_kv[i]  # (K, V_i)
            p[...] = np.concatenate([A[k][idx[k]] for k in range(out.K)], axis=1)
        else:
            p[...] = store.params[name]
    return s2, dense


def _small_chunks(monkeypatch):
    monkeypatch.setattr(adaptive, "_eval_chunks", lambda N, W, chunk=None: layers._eval_chunks(N, W, 2))


@pytest.mark.parametrize("kind", ["shuffle", "hash"])
def test_equals_the_dense_tails_of_its_vectors(rng, kind):
    """Loss, ``dh``, log-probabilities of the DP equal the dense clusters'
    of the same vectors; the pools' gradient is the dense gradient's
    slices summed into the entries they came from."""
    store, out = _layer(rng, True, kind=kind)
    s2, dense = _dense_twin(store, out)
    t = np.array(TARGETS["all"], np.int32)
    h = rng.standard_normal((len(t), E))
    store.zero_grad()
    s2.zero_grad()
    nll, dh = out.loss(h, t, 0.5, True)
    nll2, dh2 = dense.loss(h, t, 0.5, True)
    np.testing.assert_allclose(nll, nll2, rtol=1e-13)
    np.testing.assert_allclose(dh, dh2, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out.log_probs(h), dense.log_probs(h), rtol=1e-13, atol=1e-14)
    for name in s2.params:
        if "tail" in name and name.endswith("/W"):
            i = int(name.split("tail")[1].split("/")[0])
            dW, idx, d = s2.grads[name], out._idx_kv[i], E // 2 ** (i + 1) // K
            want = np.zeros_like(store.grads[f"out/tail{i}/A"])
            for k in range(K):
                np.add.at(want[k], idx[k], dW[:, k * d : (k + 1) * d])
            np.testing.assert_allclose(store.grads[f"out/tail{i}/A"], want, rtol=1e-12, atol=1e-15)
        else:
            np.testing.assert_allclose(store.grads[name], s2.grads[name], rtol=1e-12, atol=1e-15)


def test_without_sharing_is_the_dense_layer(rng):
    """M_i/K = V_i: every word has its own sub-vectors (a permutation per
    pool), so the slim cluster is a dense (V_i, d_i) matrix, only stored in
    another order."""
    store, out = _layer(rng, tail_m=tuple(K * v for v in SIZES))
    s2, dense = _dense_twin(store, out)
    assert sum(p.size for n, p in store.params.items()) == sum(p.size for p in s2.params.values())
    t = np.array(TARGETS["all"], np.int32)
    h = rng.standard_normal((len(t), E))
    np.testing.assert_allclose(out.loss(h, t, compute_grad=False)[0],
                               dense.loss(h, t, compute_grad=False)[0], rtol=1e-13)


@pytest.mark.parametrize("head_bias", [False, True])
@pytest.mark.parametrize("targets", list(TARGETS))
@pytest.mark.parametrize("chunked", [False, True])
def test_layer_gradients(rng, head_bias, targets, chunked, monkeypatch):
    if chunked:
        _small_chunks(monkeypatch)
    store, out = _layer(rng, head_bias)
    t = np.array(TARGETS[targets], np.int32)
    assert_output_layer_grads(store, out, rng.standard_normal((len(t), E)), t)
    if targets == "no-last-cluster":
        assert not store.grads["out/tail2/A"].any() and not store.grads["out/tail2/proj"].any()


def test_log_probs_normalise_and_equal_the_loss(rng, monkeypatch):
    store, out = _layer(rng, True)
    hh = rng.standard_normal((V, E)) * 2
    logp = out.log_probs(hh)
    assert logp.shape == (V, V)
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, rtol=1e-13)
    t = np.arange(V, dtype=np.int32)
    nll = out.loss(hh, t, compute_grad=False)[0]
    np.testing.assert_allclose(nll, -logp[t, t], rtol=1e-12)
    _small_chunks(monkeypatch)
    np.testing.assert_allclose(out.loss(hh, t, compute_grad=False)[0], nll, rtol=1e-13)


def test_float32_matches_float64(rng):
    store, out = _layer(rng, True)
    t = np.array(TARGETS["all"], np.int32)
    h = rng.standard_normal((len(t), E))
    store.zero_grad()
    nll64, dh64 = out.loss(h, t, 0.5, True)
    dh64, g64 = dh64.copy(), store.grad.copy()
    s32 = ParamStore(np, np.float32)
    out32 = AdaptiveSoftmax(s32, "out", V, E, CUTOFFS, DIV, True, K, TAIL_M, _tables(TAIL_M))
    s32.allocate()
    s32.data[...] = store.data
    s32.zero_grad()
    nll32, dh32 = out32.loss(h.astype(np.float32), t, 0.5, True)
    np.testing.assert_allclose(nll32, nll64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh32, dh64, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s32.grad, g64, rtol=1e-4, atol=1e-6)


def test_parameters_shrink():
    from slimnp.model import param_shapes

    base = dict(vocab_size=V, hidden=E, layers=1, output="adaptive", cutoffs=CUTOFFS, div_value=DIV)
    s = param_shapes(ModelConfig(**base, output_k=K, tail_m=TAIL_M))
    assert [s[f"output/tail{i}/A"] for i in range(3)] == [(2, 2, 4), (2, 3, 2), (2, 3, 1)]
    assert not [n for n in s if n.endswith("/W") and "tail" in n]
    dense = param_shapes(ModelConfig(**base))
    assert sum(map(np.prod, s.values())) < sum(map(np.prod, dense.values()))


@pytest.mark.parametrize("kw,words", [
    (dict(output_k=2), "tail_m needs one pool size per tail cluster (3), got 0"),
    (dict(output_k=2, tail_m=(4, 6)), "got 2"),
    (dict(output_k=3, tail_m=(3, 3, 3)), "output K=3 must divide every tail cluster's vector size [8, 4, 2]"),
    (dict(output_k=2, tail_m=(4, 5, 6)), "tail cluster 1 M=5 must be a positive multiple of K=2"),
    (dict(output_k=2, tail_m=(4, 6, 18)), "tail cluster 2 M/K=9 must be <= its 8 words"),
    (dict(output_k=2, tail_m=(4, 6, 6), mapping="learned"), "slim tail clusters take mapping"),
    (dict(output_k=2, tail_m=(4, 6, 6), output_m=4), "output M=4 sizes the slim output"),
    (dict(output_k=2, tail_m="4,6,6"), "tail_m must be a list of pool sizes"),
    (dict(output="full", tail_m=(4, 6, 6)), "tail_m (slim tail clusters) needs output 'adaptive'"),
])
def test_bad_config_is_one_line_value_error(kw, words):
    cfg = ModelConfig(vocab_size=V, hidden=E, **{"output": "adaptive", "cutoffs": CUTOFFS,
                                                  "div_value": DIV, **kw})
    with pytest.raises(ValueError) as exc:
        LanguageModel(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and words in msg, msg


def test_config_round_trips_through_json():
    import json

    cfg = ModelConfig(vocab_size=V, hidden=E, output="adaptive", cutoffs=CUTOFFS, div_value=DIV,
                      output_k=K, tail_m=list(TAIL_M))
    assert cfg.tail_m == TAIL_M
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.to_dict()["tail_m"] == list(TAIL_M)


def test_stored_tables_are_checked():
    cfg = ModelConfig(vocab_size=V, hidden=E, output="adaptive", cutoffs=CUTOFFS, div_value=DIV,
                      output_k=K, tail_m=TAIL_M)
    good = LanguageModel(cfg).mapping
    bad = {**good, "output/tail1/idx": good["output/tail1/idx"][:3]}
    with pytest.raises(ValueError, match=r"output/tail1/idx: expected shape \(6, 2\), found \(3, 2\)"):
        LanguageModel(cfg, mapping=bad)
    bad = {**good, "output/tail2/idx": good["output/tail2/idx"] + 5}
    with pytest.raises(ValueError, match=r"output/tail2/idx: entries must lie in \[0, 3\)"):
        LanguageModel(cfg, mapping=bad)
