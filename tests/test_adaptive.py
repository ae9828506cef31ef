"""The adaptive softmax output layer (slimnp.adaptive): float64 gradient
checks of the layer and of whole models with it, exact log-probabilities,
PyTorch's AdaptiveLogSoftmaxWithLoss as the expected values, the config's
errors, training, model files, scoring and generation, and a training step
on every compiled kernel backend."""
import numpy as np
import pytest

from slimnp import adaptive, layers
from slimnp.adaptive import AdaptiveSoftmax
from slimnp.model import LanguageModel, ModelConfig

from gradcheck import assert_model_grads, assert_output_layer_grads, layer

V, E = 23, 8
CUTOFFS = (5, 9, 15)  # head 0..4 (+3 cluster logits), clusters 5..8, 9..14, 15..22
DIV = 2.0  # tail sizes 4, 2, 1
# every part of the vocabulary, its first and last words, repeats; with the
# last cluster left out (its gradients must stay zero)
TARGETS = {"all": [0, 4, 5, 8, 9, 14, 15, 22, 3, 3, 15, 7],
           "no-last-cluster": [0, 4, 5, 8, 9, 14, 2, 2, 6]}


def _layer(rng, head_bias=False, cutoffs=CUTOFFS, div_value=DIV):
    return layer(rng, lambda store: AdaptiveSoftmax(store, "out", V, E, cutoffs, div_value, head_bias),
                 scale=1.0)


def _small_chunks(monkeypatch):
    """Tail logits in chunks of 2 rows (as a cluster wider than 2**26 / N_i
    words is computed), so the chunk loop runs several times."""
    monkeypatch.setattr(adaptive, "_eval_chunks", lambda N, W, chunk=None: layers._eval_chunks(N, W, 2))


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
        assert not store.grads["out/tail2/W"].any() and not store.grads["out/tail2/proj"].any()


def test_gradients_accumulate_and_lazy_zero(rng):
    """A second call adds into the gradients; a lazy zero_grad is overwritten."""
    store, out = _layer(rng, True)
    t = np.array(TARGETS["all"], np.int32)
    h = rng.standard_normal((len(t), E))
    store.zero_grad()
    out.loss(h, t, 0.5, True)
    once = store.grad.copy()
    out.loss(h, t, 0.5, True)
    np.testing.assert_allclose(store.grad, 2 * once, rtol=1e-13)
    store.zero_grad(lazy=True)
    out.loss(h, t, 0.5, True)
    store.settle_grad()
    np.testing.assert_allclose(store.grad, once, rtol=1e-13)


@pytest.mark.parametrize("head_bias", [False, True])
def test_log_probs_normalise_and_equal_the_loss(rng, head_bias, monkeypatch):
    store, out = _layer(rng, head_bias)
    h = rng.standard_normal((7, E)) * 2
    logp = out.log_probs(h)  # (N, V)
    assert logp.shape == (7, V)
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, rtol=1e-13)
    np.testing.assert_array_equal(out.logits(h), logp)
    hh = np.repeat(h, 4, axis=0)[:V]  # one row per word of the vocabulary
    t = np.arange(V, dtype=np.int32)
    want = -out.log_probs(hh)[np.arange(V), t]
    nll, dh = out.loss(hh, t, compute_grad=False)
    assert dh is None and nll.dtype == np.float64
    np.testing.assert_allclose(nll, want, rtol=1e-12)
    # evaluation in row chunks (and tail chunks) gives the same numbers
    np.testing.assert_allclose(out.loss(hh, t, compute_grad=False, chunk=3)[0], nll, rtol=1e-13)
    _small_chunks(monkeypatch)
    np.testing.assert_allclose(out.loss(hh, t, compute_grad=False)[0], nll, rtol=1e-13)


def test_float32_matches_float64(rng):
    store, out = _layer(rng, True)
    t = np.array(TARGETS["all"], np.int32)
    h = rng.standard_normal((len(t), E))
    store.zero_grad()
    nll64, dh64 = out.loss(h, t, 0.5, True)
    dh64, g64 = dh64.copy(), store.grad.copy()
    from slimnp.buffers import ParamStore

    s32 = ParamStore(np, np.float32)
    out32 = AdaptiveSoftmax(s32, "out", V, E, CUTOFFS, DIV, True)
    s32.allocate()
    s32.data[...] = store.data
    s32.zero_grad()
    nll32, dh32 = out32.loss(h.astype(np.float32), t, 0.5, True)
    np.testing.assert_allclose(nll32, nll64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dh32, dh64, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(s32.grad, g64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("head_bias", [False, True])
@pytest.mark.parametrize("cutoffs,div_value", [(CUTOFFS, DIV), ((11,), 4.0), ((3, 20), 1.5)])
def test_equals_torch_adaptive_log_softmax(rng, head_bias, cutoffs, div_value):
    """Loss, log-probabilities and every gradient equal PyTorch's, given the
    same weights (float64)."""
    torch = pytest.importorskip("torch")
    store, out = _layer(rng, head_bias, cutoffs, div_value)
    ref = torch.nn.AdaptiveLogSoftmaxWithLoss(E, V, list(cutoffs), div_value=div_value,
                                              head_bias=head_bias).double()
    p = store.params
    named = {"head.weight": "out/head/W", "head.bias": "out/head/b"}
    for i in range(len(cutoffs)):
        named.update({f"tail.{i}.0.weight": f"out/tail{i}/proj", f"tail.{i}.1.weight": f"out/tail{i}/W"})
    theirs = dict(ref.named_parameters())
    assert sorted(theirs) == sorted(k for k, v in named.items() if v in p)
    with torch.no_grad():
        for k, v in theirs.items():
            assert tuple(v.shape) == p[named[k]].shape
            v.copy_(torch.from_numpy(p[named[k]]))
    N = 16
    t = rng.integers(0, V, N).astype(np.int32)
    t[:3] = [0, cutoffs[-1], V - 1]
    h = rng.standard_normal((N, E))
    ht = torch.tensor(h, requires_grad=True)
    res = ref(ht, torch.from_numpy(t).long())
    res.loss.backward()  # the mean NLL: scale 1/N
    store.zero_grad()
    nll, dh = out.loss(h, t, 1.0 / N, True)
    np.testing.assert_allclose(nll, -res.output.detach().numpy(), rtol=1e-12)
    assert nll.mean() == pytest.approx(res.loss.item(), rel=1e-13)
    np.testing.assert_allclose(dh, ht.grad.numpy(), rtol=1e-10, atol=1e-15)
    for k, v in theirs.items():
        np.testing.assert_allclose(store.grads[named[k]], v.grad.numpy(), rtol=1e-10, atol=1e-15,
                                   err_msg=k)
    with torch.no_grad():
        np.testing.assert_allclose(out.log_probs(h), ref.log_prob(torch.from_numpy(h)).numpy(),
                                   rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw,words", [
    (dict(cutoffs=(9, 5)), "strictly increasing"),
    (dict(cutoffs=(5, 5)), "strictly increasing"),
    (dict(cutoffs=(5, 23)), "[1, V-1] = [1, 22]"),
    (dict(cutoffs=(5, 40)), "[1, V-1]"),
    (dict(cutoffs=(0, 5)), "[1, V-1]"),
    (dict(cutoffs=(-1,)), "[1, V-1]"),
    (dict(cutoffs=()), "at least one"),
    (dict(cutoffs=(5.5, 9)), "integers"),
    (dict(cutoffs="5,9"), "list of word ids"),
    (dict(cutoffs=(2, 4, 6, 8)), "tail cluster 4 would have size 8 // 2^4 = 0"),
    (dict(div_value=0.0), "div_value must be a number > 0"),
    (dict(div_value=float("nan")), "div_value"),
    (dict(tie=True), "tie needs a V x E output matrix"),
])
def test_bad_config_is_one_line_value_error(kw, words):
    cfg = ModelConfig(vocab_size=V, hidden=E, output="adaptive", **{"cutoffs": CUTOFFS, "div_value": DIV,
                                                                   **kw})
    with pytest.raises(ValueError) as exc:
        LanguageModel(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and words in msg, msg


def test_config_fields_round_trip_through_json():
    import json

    cfg = ModelConfig(vocab_size=V, hidden=E, output="adaptive", cutoffs=[5, 9], div_value=2.0,
                      head_bias=True)
    assert cfg.cutoffs == (5, 9)
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert cfg.to_dict()["cutoffs"] == [5, 9]
    # the fields are ignored by the other output layers (their defaults need V > 10000)
    ModelConfig(vocab_size=V, hidden=E).validate()


def test_param_shapes_and_pm():
    """With PM (embedding_size E < H) the adaptive softmax acts on the
    projected E-sized vectors, like the full softmax."""
    from slimnp.model import param_shapes

    s = param_shapes(ModelConfig(vocab_size=V, hidden=12, layers=1, embedding_size=E, output="adaptive",
                                 cutoffs=CUTOFFS, div_value=DIV, head_bias=True))
    assert s["output/head/W"] == (8, E) and s["output/head/b"] == (8,)
    assert [s[f"output/tail{i}/proj"] for i in range(3)] == [(4, E), (2, E), (1, E)]
    assert [s[f"output/tail{i}/W"] for i in range(3)] == [(4, 4), (6, 2), (8, 1)]
    assert s["proj_out/W"] == (12, E) and "output/W" not in s


# ---------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------
MODELS = {
    "plain": dict(),
    "dropout-head-bias": dict(dropout=0.4, head_bias=True),
    "pm": dict(embedding_size=4, cutoffs=(5, 9), input_dropout=0.2),
    "slim-input": dict(input="slim", input_k=2, input_m=9, dropout=0.3),
}


@pytest.mark.parametrize("variant", list(MODELS))
def test_model_gradients(variant, rng):
    """Whole model (2 layers, fixed dropout masks): every parameter, the
    incoming state; evaluation's NLL equals the log-probabilities' scoring."""
    L, T, B, H = 2, 4, 3, 8
    cfg = ModelConfig(vocab_size=V, hidden=H, layers=L, init_scale=0.3, dtype="float64", output="adaptive",
                      **{"cutoffs": (4, 9, 15), "div_value": 2.0, **MODELS[variant]})
    m = LanguageModel(cfg)
    m.init_params(np.random.default_rng(0))
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    y = rng.integers(0, V, (T, B)).astype(np.int32)
    y[0] = [0, 9, V - 1]
    state = rng.standard_normal((L, 2, B, H)) * 0.5
    masks = m._masks(np.random.default_rng(5), T, B)
    assert_model_grads(m, x, y, state, masks, 1.0 / B, rng)
    # without dropout: the per-token NLL is minus the scored log-probability
    nll, s1 = m.nll(x, y, state)
    logp, s2 = m.logits(x, state)  # (T, B, V) log-probabilities
    np.testing.assert_allclose(np.exp(logp).sum(axis=-1), 1.0, rtol=1e-13)
    np.testing.assert_allclose(nll, -np.take_along_axis(logp, y[..., None], -1)[..., 0], rtol=1e-12)
    np.testing.assert_array_equal(s1, s2)


def test_loss_falls():
    from helpers import cycle_losses

    cfg = ModelConfig(vocab_size=30, hidden=16, layers=1, output="adaptive", cutoffs=(4, 8), div_value=2.0)
    m = LanguageModel(cfg)
    m.init_params(np.random.default_rng(0))
    first, last = cycle_losses(m)
    assert last < 0.5 * first


def test_sampled_losses_refused():
    cfg = ModelConfig(vocab_size=V, hidden=E, output="adaptive", cutoffs=CUTOFFS, div_value=DIV)
    m = LanguageModel(cfg)
    with pytest.raises(ValueError, match="adaptive softmax trains its exact loss"):
        m.output.candidates(np.arange(3))


# ---------------------------------------------------------------------------
# training, model files, inspect, scoring, generation
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny adaptive-softmax model trained on an HMM corpus (V = 100)."""
    from helpers import tiny_corpus

    from slimnp.trainer import TrainConfig, run_training

    d = tmp_path_factory.mktemp("adaptive")
    files, _ = tiny_corpus(d)
    out = d / "m.h5"
    mc = ModelConfig(vocab_size=0, hidden=16, layers=1, dropout=0.1, output="adaptive", cutoffs=(10, 40),
                     div_value=2.0)
    tc = TrainConfig(epochs=1, bptt=7, batch_size=4, lr=1.0)
    summary = run_training(files, out, mc, tc, log=lambda m: None, progress=False)
    return out, files, summary


def test_trained_file_loads_scores_and_generates(trained):
    from slimnp import inference
    from slimnp.evaluate import evaluate_ids
    from slimnp.modelfile import load_model

    out, files, summary = trained
    model, vocab, ck = load_model(out)
    assert model.config.output == "adaptive" and model.config.cutoffs == (10, 40)
    assert isinstance(model.output, AdaptiveSoftmax)
    assert {"output/head/W", "output/tail1/W"} <= set(ck.params)
    # the file's parameters are the model's, bit for bit
    for k, v in ck.params.items():
        np.testing.assert_array_equal(model.store.params[k], v)
    lm = inference.LM(model, vocab)
    text = files["test"].read_text().splitlines()[:20]
    scores = lm.score(text)
    assert all(np.isfinite(s.logprob) and s.logprob < 0 for s in scores)
    # continuous scoring (batch 1) equals exact evaluation of the same text
    cont = lm.score(text, continuous=True)
    toks = np.concatenate([[vocab.index.get(w, vocab.unk_id) for w in ln.split()] + [vocab.eos_id]
                           for ln in text]).astype(np.int32)
    res = evaluate_ids(model, toks, vocab.eos_id, batch_size=1)
    assert sum(s.logprob for s in cont) == pytest.approx(-res.nll, rel=1e-6)
    a = lm.generate("", length=8, seed=3, count=2)
    assert a == lm.generate("", length=8, seed=3, count=2) and len(a) == 2
    assert np.isfinite(summary["test_ppl"]) and summary["test_ppl"] < 100
    with pytest.raises(ValueError, match="no dense equivalent"):
        lm.dense()  # a clear error, not a missing-parameter KeyError


def test_trained_file_resumes_and_inspects(trained, tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from slimnp.cli import main
    from slimnp.trainer import resume_training

    out = trained[0]
    r = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["config"]["model"]["output"] == "adaptive"
    assert info["config"]["model"]["cutoffs"] == [10, 40]
    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0 and "adaptive" in r.output and "output/tail1/W" in r.output, r.output
    # one more epoch from the checkpoint
    copy = tmp_path / "r.h5"
    shutil.copy(out, copy)
    resume_training(copy, epochs=2, log=lambda m: None, progress=False)


def test_sampled_loss_training_is_refused(trained, tmp_path):
    from slimnp.trainer import TrainConfig, run_training

    files = trained[1]
    mc = ModelConfig(vocab_size=0, hidden=8, layers=1, output="adaptive", cutoffs=(10, 40), div_value=2.0)
    with pytest.raises(ValueError, match="use loss 'softmax'"):
        run_training(files, tmp_path / "s.h5", mc, TrainConfig(epochs=1, bptt=7, batch_size=4, loss="is"),
                     log=lambda m: None, progress=False)


# ---------------------------------------------------------------------------
# every compiled kernel backend (Numba, the CUDA C on the emulator, CUDA)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_step_parity(dev, dtype, monkeypatch):
    """Two SGD steps (dropout, clipping, carried state) agree with the reference kernels."""
    from test_gpu import assert_step_parity

    monkeypatch.setenv("SLIMNP_PIPELINE", "0")  # the emulator is single-threaded
    cfg = ModelConfig(vocab_size=25, hidden=8, layers=2, dropout=0.2, dtype=dtype, output="adaptive",
                      cutoffs=(6, 12), div_value=2.0, head_bias=True)
    assert_step_parity(dev, cfg)
