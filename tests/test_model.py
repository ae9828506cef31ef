"""Model-level properties: determinism, save/load round trip, learning,
gradients of the whole model (dense, slim, tied), the fast step (lazily
zeroed, row-tracked gradients, the fused update) equal to the plain one."""
import h5py
import numpy as np
import pytest

from slimnp import io as sio
from slimnp import layers
from slimnp.backend import make_rng
from slimnp.model import LanguageModel, ModelConfig, param_shapes
from slimnp.modelfile import expected_shapes, load_model, mapping_fields
from slimnp.optim import SGD

from gradcheck import assert_grad
from helpers import cycle_losses


def _model(seed=0, **kw):
    cfg = ModelConfig(**{**dict(vocab_size=30, hidden=8, layers=2), **kw})
    m = LanguageModel(cfg)
    m.init_params(make_rng(seed))
    return m


def _steps(m, n, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    state = m.zero_state(3)
    losses = []
    for _ in range(n):
        x = rng.integers(0, 30, (5, 3)).astype(np.int32)
        m.store.zero_grad()
        nll, state, _ = m.forward_backward(x, np.roll(x, -1, axis=0), state, rng=rng)
        m.store.data -= 0.5 * m.store.grad
        losses.append(nll)
    return losses


def test_params_live_in_one_flat_buffer():
    m = _model()
    assert m.store.data.ndim == 1 and m.store.data.size == m.num_parameters
    for name, p in m.store.params.items():
        assert np.shares_memory(p, m.store.data), name
        assert np.shares_memory(m.store.grads[name], m.store.grad), name
    assert param_shapes(m.config) == m.param_shapes()
    V, H = 30, 8
    assert m.num_parameters == V * H + 2 * (2 * H * 4 * H + 4 * H) + V * H + V


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


def test_same_seed_same_model():
    a, b, c = _model(seed=3, dropout=0.3), _model(seed=3, dropout=0.3), _model(seed=4, dropout=0.3)
    np.testing.assert_array_equal(a.store.data, b.store.data)
    assert not np.array_equal(a.store.data, c.store.data)
    _steps(a, 4)
    _steps(b, 4)
    np.testing.assert_array_equal(a.store.data, b.store.data)


def test_loss_falls_on_repeated_pattern():
    first, last = cycle_losses(_model(init_scale=0.1))
    assert last < 0.5 * first


def test_save_load_round_trip_identical_logits(tmp_path):
    m = _model()
    _steps(m, 2)
    ck = sio.Checkpoint(config={"model": m.config.to_dict()},
                        vocab=["<eos>", "<unk>"] + [f"w{i}" for i in range(28)],
                        params=m.params_numpy())
    sio.save(tmp_path / "m.h5", ck)
    m2, vocab, _ = load_model(tmp_path / "m.h5")
    x = np.arange(12, dtype=np.int32).reshape(4, 3)
    l1, s1 = m.logits(x, m.zero_state(3))
    l2, s2 = m2.logits(x, m2.zero_state(3))
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(s1, s2)
    assert len(vocab) == 30 and vocab.eos_id == 0


def test_load_reports_shape_mismatch(tmp_path):
    m = _model()
    params = m.params_numpy()
    params["lstm0/Wx"] = params["lstm0/Wx"][:, :4]
    del params["output/b"]
    ck = sio.Checkpoint(config={"model": m.config.to_dict()}, vocab=["<eos>", "<unk>"], params=params)
    sio.save(tmp_path / "bad.h5", ck)
    try:
        sio.load(tmp_path / "bad.h5", expected_shapes=expected_shapes)
    except sio.FormatError as exc:
        msg = str(exc)
    else:
        raise AssertionError("mismatch not reported")
    assert "lstm0/Wx" in msg and "output/b" in msg


def test_input_dropout_default_draws_the_masks_it_always_drew():
    """input_dropout=None (the default, and every older file) is --dropout on
    the input too: the same draws from the generator as an explicit equal value."""
    a = _model(dropout=0.3)
    b = _model(dropout=0.3, input_dropout=0.3)
    ma, mb = a._masks(np.random.default_rng(2), 4, 3), b._masks(np.random.default_rng(2), 4, 3)
    assert len(ma) == len(mb) == 3
    for x, y in zip(ma, mb):
        np.testing.assert_array_equal(x, y)
    _steps(a, 3)
    _steps(b, 3)
    np.testing.assert_array_equal(a.store.data, b.store.data)


def test_input_dropout_rate_is_its_own():
    m = _model(hidden=64, dropout=0.5, input_dropout=0.1)
    masks = m._masks(np.random.default_rng(0), 50, 8)
    assert abs((masks[0] == 0).mean() - 0.1) < 0.02  # 20,000 draws
    assert all(abs((mk == 0).mean() - 0.5) < 0.02 for mk in masks[1:])
    assert _model(dropout=0.5, input_dropout=0.0)._masks(np.random.default_rng(0), 2, 2)[0] is None
    only = _model(dropout=0.0, input_dropout=0.2)._masks(np.random.default_rng(0), 2, 2)
    assert only[0] is not None and only[1:] == [None, None]


def test_pm_parameter_count_and_round_trip(tmp_path):
    """PM (E < H): V x E tables and the E x H, H x E projections."""
    V, H, E = 30, 8, 3
    m = _model(embedding_size=E)
    assert m.num_parameters == V * E + E * H + 2 * (2 * H * 4 * H + 4 * H) + H * E + V * E + V
    assert param_shapes(m.config) == m.param_shapes()
    _steps(m, 2)
    ck = sio.Checkpoint(config={"model": m.config.to_dict()},
                        vocab=["<eos>", "<unk>"] + [f"w{i}" for i in range(V - 2)],
                        params=m.params_numpy())
    sio.save(tmp_path / "pm.h5", ck)
    m2, _, _ = load_model(tmp_path / "pm.h5")
    assert m2.config == m.config
    x = np.arange(12, dtype=np.int32).reshape(4, 3)
    np.testing.assert_array_equal(m.logits(x, m.zero_state(3))[0], m2.logits(x, m2.zero_state(3))[0])


def test_bad_new_options_are_rejected():
    with pytest.raises(ValueError, match="input_dropout"):
        ModelConfig(vocab_size=10, input_dropout=1.0).validate()
    with pytest.raises(ValueError, match="must divide the word-vector size embedding_size=6"):
        ModelConfig(vocab_size=10, hidden=8, embedding_size=6, output="slim", output_k=4,
                    output_m=8).validate()


# -- slim layers in the model -------------------------------------------------
SLIM = dict(input="slim", input_k=2, input_m=12, output="slim", output_k=3, output_m=15)


@pytest.mark.parametrize("extra", [SLIM, dict(SLIM, mapping="hash"),
                                   dict(output="slim", output_k=2, output_m=10, input="slim", tie=True),
                                   dict(tie=True), "hashnet-dense", "tied-dense"])
def test_model_gradients_slim(extra, rng, monkeypatch):
    V, H, L, T, B = 13, 6, 2, 3, 2
    if isinstance(extra, str):  # the output layer on the dense strategy (forced: the model is tiny)
        monkeypatch.setattr(layers, "DENSE_MIN_ELEMENTS", 0)
        extra = {"hashnet-dense": dict(SLIM, mapping="hash", output_k=6, output_m=18),
                 "tied-dense": dict(output="slim", output_k=3, output_m=15, input="slim", tie=True)}[extra]
        dense = True
    else:
        dense = False
    m = LanguageModel(ModelConfig(vocab_size=V, hidden=H, layers=L, init_scale=0.4,
                                  dtype="float64", **extra))
    if extra.get("output") == "slim":
        assert m.output.strategy == ("dense" if dense else "dp")
    m.init_params(np.random.default_rng(0))
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    y = rng.integers(0, V, (T, B)).astype(np.int32)
    state = rng.standard_normal((L, 2, B, H)) * 0.5

    def loss():
        return float(m.nll(x, y, state)[0].sum()) / B

    m.store.zero_grad()
    m.forward_backward(x, y, state)
    for name, p in m.store.params.items():
        idx = rng.choice(p.size, size=min(p.size, 20), replace=False)
        assert_grad(m.store.grads[name], loss, p, idx)


def test_slim_parameter_counts():
    V, H = 1000, 20
    dense = LanguageModel(ModelConfig(vocab_size=V, hidden=H, layers=1))
    slim = LanguageModel(ModelConfig(vocab_size=V, hidden=H, layers=1, input="slim", input_k=4,
                                     input_m=400, output="slim", output_k=5, output_m=500))
    shapes = slim.param_shapes()
    assert np.prod(shapes["embedding/A"]) == 400 * H // 4  # M*H/K
    assert np.prod(shapes["output/A"]) == 500 * H // 5
    assert dense.num_parameters - slim.num_parameters == 2 * V * H - 400 * 5 - 500 * 4


def test_tiny_slim_model_loss_falls():
    m = LanguageModel(ModelConfig(vocab_size=20, hidden=12, layers=1, **dict(SLIM, input_m=20, output_m=30)))
    m.init_params(make_rng(0))
    first, last = cycle_losses(m)
    assert last < 0.5 * first


@pytest.mark.parametrize("mapping", ["shuffle", "hash"])
def test_slim_save_load_round_trip(tmp_path, mapping):
    cfg = ModelConfig(vocab_size=30, hidden=6, layers=1, mapping=mapping, mapping_seed=7, **SLIM)
    m = LanguageModel(cfg)
    m.init_params(make_rng(1))
    ck = sio.Checkpoint(config={"model": cfg.to_dict()},
                        vocab=["<eos>", "<unk>"] + [f"w{i}" for i in range(28)],
                        params=m.params_numpy(), **mapping_fields(m))
    sio.save(tmp_path / "m.h5", ck)
    with h5py.File(tmp_path / "m.h5") as f:
        names = list(f["mapping"].keys()) if "mapping" in f else []
        if mapping == "shuffle":
            assert f["mapping/output/idx"].dtype == np.uint8  # smallest dtype that fits
        else:
            assert names == []  # hash: nothing stored but the seed
    m2, _, _ = load_model(tmp_path / "m.h5")
    x = np.arange(8, dtype=np.int32).reshape(4, 2)
    np.testing.assert_array_equal(m.logits(x, m.zero_state(2))[0], m2.logits(x, m2.zero_state(2))[0])
    for k in m.mapping:
        np.testing.assert_array_equal(m.mapping[k], m2.mapping[k])
