"""The adaptive input (slimnp.adaptive.AdaptiveEmbedding), alone and tied to
the adaptive softmax band by band (fairseq's tie_adaptive_weights with
tie_adaptive_proj), and slim tail clusters tied to it: the vectors against
their definition, float64 gradient checks of the layer and of whole models,
the config's one-line errors, model files, scoring, and a training step on
every compiled kernel backend."""
import numpy as np
import pytest

from slimnp.adaptive import AdaptiveEmbedding, AdaptiveSoftmax
from slimnp.buffers import ParamStore
from slimnp.mapping import output_table
from slimnp.model import LanguageModel, ModelConfig, param_shapes

from gradcheck import assert_grad, assert_model_grads, layer

V, E = 23, 8
CUTOFFS = (5, 9, 15)  # bands 0..4, 5..8, 9..14, 15..22
DIV = 2.0  # band sizes 8, 4, 2, 1
BANDS = [(0, 5), (5, 9), (9, 15), (15, 23)]
# every band, its first and last words, repeats; with the last band left out
IDS = {"all": [[0, 4, 5, 8], [9, 14, 15, 22], [3, 3, 15, 7]],
       "no-last-band": [[0, 4, 5, 8], [9, 14, 2, 2], [6, 6, 10, 1]]}


def _tables(K, tail_m, seed=0):
    return [output_table(hi - lo, K, m // K, "shuffle", seed) for (lo, hi), m in zip(BANDS[1:], tail_m)]


def _tied(store, E=E, K=1, tail_m=()):
    out = AdaptiveSoftmax(store, "out", V, E, CUTOFFS, DIV, tail_k=K, tail_m=tail_m,
                          tables=_tables(K, tail_m) if tail_m else None)
    return out, AdaptiveEmbedding(store, "emb", V, E, CUTOFFS, DIV, tied=out)


def _vectors(store, emb, ids):
    """What the bands say word by word: ``(len(ids), E)``."""
    p = store.params
    rows = []
    for w in ids:
        j = next(j for j, (lo, hi) in enumerate(BANDS) if lo <= w < hi)
        band = emb.bands[j]
        W = p[band.W]
        if band.rows is None:
            e = W[w - band.lo]
        else:  # the K sub-vectors, each from its own pool
            e = np.concatenate([W.reshape(-1, W.shape[-1])[r] for r in band.rows[w - band.lo]])
        rows.append(e if band.proj is None else e @ p[band.proj])
    return np.array(rows)


# ---------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------
def test_vectors_are_the_bands_projected(rng):
    store, emb = layer(rng, lambda s: AdaptiveEmbedding(s, "emb", V, E, CUTOFFS, DIV))
    assert {k: v for k, v in store.shapes.items()} == {
        "emb/band0/W": (5, 8), "emb/band1/W": (4, 4), "emb/band1/proj": (4, 8),
        "emb/band2/W": (6, 2), "emb/band2/proj": (2, 8), "emb/band3/W": (8, 1), "emb/band3/proj": (1, 8)}
    ids = np.array(IDS["all"], np.int32)
    X = emb.forward(ids)
    assert X.shape == (3, 4, E) and X.dtype == np.float64
    np.testing.assert_allclose(X.reshape(-1, E), _vectors(store, emb, ids.ravel()), rtol=1e-14)
    # band 0 has no projection: the head words' vectors as they are
    np.testing.assert_array_equal(X[0, 0], store.params["emb/band0/W"][0])


@pytest.mark.parametrize("ids", list(IDS))
@pytest.mark.parametrize("tied", ["no", "dense", "slim"])
def test_layer_gradients(rng, ids, tied):
    """``loss = sum(X * w)``: every parameter the bands read (their own, or
    the tied output's), repeated words accumulating; a band with no word in
    the batch keeps zero gradients."""
    if tied == "no":
        store, emb = layer(rng, lambda s: AdaptiveEmbedding(s, "emb", V, E, CUTOFFS, DIV))
    else:
        # slim: E = 16 (tail sizes 8, 4, 2), K = 2 pools per cluster with sharing
        e, K, tail_m = (E, 1, ()) if tied == "dense" else (16, 2, (4, 6, 6))
        store, (out, emb) = layer(rng, lambda s: _tied(s, e, K, tail_m))
    x = np.array(IDS[ids], np.int32)
    w = rng.standard_normal((*x.shape, emb.E))

    def loss():
        return float((emb.forward(x) * w).sum())

    store.zero_grad()
    emb.forward(x)
    emb.backward(x, w)
    for name, p in store.params.items():
        assert_grad(store.grads[name], loss, p)
    if ids == "no-last-band":
        last = [n for n in store.params if "band3" in n or "tail2" in n]
        assert last and not any(store.grads[n].any() for n in last)


def test_gradients_accumulate_and_lazy_zero(rng):
    """A second backward adds; after a lazy zero_grad the scatter's rows are
    zeroed first (the rows a step touched are tracked for the optimizer)."""
    store, emb = layer(rng, lambda s: AdaptiveEmbedding(s, "emb", V, E, CUTOFFS, DIV))
    x = np.array(IDS["all"], np.int32)
    w = rng.standard_normal((*x.shape, E))
    store.zero_grad()
    emb.forward(x)
    emb.backward(x, w)
    once = store.grad.copy()
    emb.backward(x, w)
    np.testing.assert_allclose(store.grad, 2 * once, rtol=1e-13)
    store.zero_grad(lazy=True)
    emb.forward(x)
    emb.backward(x, w)
    store.settle_grad()
    np.testing.assert_allclose(store.grad, once, rtol=1e-13)
    kinds = {s[0] for s in store.segments()}
    assert "rows" in kinds  # the band vectors: only the rows of the batch's words


@pytest.mark.parametrize("K,tail_m", [(1, ()), (2, (4, 6, 6))])
def test_tied_bands_are_the_outputs_vectors(rng, K, tail_m):
    """Tied, the layer has no parameters of its own: band 0 reads the head
    words' rows of head/W, band j tail cluster j-1's vectors (or pools) and
    its projection, transposed with respect to the output's use."""
    e = E if K == 1 else 16
    store, (out, emb) = layer(rng, lambda s: _tied(s, e, K, tail_m))
    assert not [n for n in store.shapes if n.startswith("emb")]
    p = store.params
    ids = np.arange(V, dtype=np.int32)[None, :]
    X = emb.forward(ids)[0]  # (V, E): every word
    np.testing.assert_array_equal(X[:5], p["out/head/W"][:5])
    np.testing.assert_allclose(X, _vectors(store, emb, range(V)), rtol=1e-14)
    if K == 1:
        np.testing.assert_allclose(X[9:15], p["out/tail1/W"] @ p["out/tail1/proj"], rtol=1e-14)


def test_tied_layer_must_match_the_output():
    store = ParamStore(np, np.float64)
    out = AdaptiveSoftmax(store, "out", V, E, CUTOFFS, DIV)
    with pytest.raises(ValueError, match="needs the output's V, E, cutoffs and div_value"):
        AdaptiveEmbedding(store, "emb", V, E, (5, 9), DIV, tied=out)
    with pytest.raises(ValueError, match="^invalid adaptive input: cutoffs"):
        AdaptiveEmbedding(store, "emb", V, E, (9, 5), DIV)


# ---------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------
def test_param_shapes_and_counts():
    base = dict(vocab_size=V, hidden=16, layers=1, cutoffs=CUTOFFS, div_value=DIV)
    s = param_shapes(ModelConfig(**base, input="adaptive"))
    assert [s[f"embedding/band{j}/W"] for j in range(4)] == [(5, 16), (4, 8), (6, 4), (8, 2)]
    assert [s[f"embedding/band{j}/proj"] for j in (1, 2, 3)] == [(8, 16), (4, 16), (2, 16)]
    assert "embedding/band0/proj" not in s and "output/W" in s
    untied = param_shapes(ModelConfig(**base, input="adaptive", output="adaptive"))
    tied = param_shapes(ModelConfig(**base, input="adaptive", output="adaptive", tie=True))
    assert set(untied) - set(tied) == {n for n in untied if n.startswith("embedding/")}
    assert set(tied) == set(param_shapes(ModelConfig(**base, output="adaptive"))) - {"embedding/W"}


@pytest.mark.parametrize("kw,words", [
    (dict(input="adaptive", tie=True), "tie with input 'adaptive' needs output 'adaptive'"),
    (dict(input="adaptive", output="slim", output_k=2, output_m=10, tie=True),
     "tie with input 'adaptive' needs output 'adaptive'"),
    (dict(output="adaptive", tie=True), "tie needs a V x E output matrix"),
    (dict(input="slim", input_k=2, input_m=8, output="adaptive", tie=True), "or input 'adaptive'"),
    (dict(input="adaptive", cutoffs=(9, 5)), "strictly increasing"),
    (dict(input="adaptive", cutoffs=(5, 23)), "[1, V-1]"),
    (dict(input="adaptive", cutoffs=(2, 4, 6, 8, 10)), "tail cluster 5 would have size 16 // 2^5 = 0"),
    (dict(input="adaptiv"), "input must be 'dense', 'slim' or 'adaptive'"),
])
def test_bad_config_is_one_line_value_error(kw, words):
    cfg = ModelConfig(vocab_size=V, hidden=16, **{"cutoffs": CUTOFFS, "div_value": DIV, **kw})
    with pytest.raises(ValueError) as exc:
        LanguageModel(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and words in msg, msg


def test_existing_kinds_ignore_the_new_fields():
    """The other kinds build as before (their parameters, names and order)."""
    cfg = ModelConfig(vocab_size=V, hidden=8, layers=1)
    assert cfg.tail_m == () and "tail_m" in cfg.to_dict()
    assert list(param_shapes(cfg)) == ["output/W", "output/b", "embedding/W", "lstm0/Wx", "lstm0/Wh",
                                       "lstm0/b"]


# ---------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------
MODELS = {
    "input-full": dict(input="adaptive"),
    "input-adaptive": dict(input="adaptive", output="adaptive", dropout=0.3),
    "tied": dict(input="adaptive", output="adaptive", tie=True, head_bias=True, dropout=0.3),
    "tied-pm": dict(input="adaptive", output="adaptive", tie=True, embedding_size=8, input_dropout=0.2),
    "tied-slim-tails": dict(input="adaptive", output="adaptive", tie=True, output_k=2, tail_m=(4, 6, 6)),
    "slim-tails": dict(output="adaptive", output_k=2, tail_m=(2, 4, 8), mapping="hash", dropout=0.2),
}


@pytest.mark.parametrize("variant", list(MODELS))
def test_model_gradients(variant, rng):
    """Whole model (2 layers, fixed dropout masks): every parameter, the
    incoming state; without dropout the NLL equals minus the scored
    log-probability and the log-probabilities sum to 1 over V."""
    L, T, B, H = 2, 4, 3, 16
    cfg = ModelConfig(vocab_size=V, hidden=H, layers=L, init_scale=0.3, dtype="float64",
                      **{"cutoffs": CUTOFFS, "div_value": DIV, **MODELS[variant]})
    m = LanguageModel(cfg)
    m.init_params(np.random.default_rng(0))
    x = rng.integers(0, V, (T, B)).astype(np.int32)
    y = rng.integers(0, V, (T, B)).astype(np.int32)
    x[0], y[0] = [0, 9, V - 1], [4, 15, V - 1]
    state = rng.standard_normal((L, 2, B, H)) * 0.5
    masks = m._masks(np.random.default_rng(5), T, B)
    assert_model_grads(m, x, y, state, masks, 1.0 / B, rng)
    nll, s1 = m.nll(x, y, state)
    logp, s2 = m.logits(x, state)
    if cfg.output == "full":
        logp = logp - np.log(np.exp(logp).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(np.exp(logp).sum(axis=-1), 1.0, rtol=1e-13)
    np.testing.assert_allclose(nll, -np.take_along_axis(logp, y[..., None], -1)[..., 0], rtol=1e-12)
    np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("variant", ["tied", "tied-slim-tails"])
def test_loss_falls(variant):
    from helpers import cycle_losses

    kw = {k: v for k, v in MODELS[variant].items() if k != "dropout"}
    cfg = ModelConfig(vocab_size=V, hidden=16, layers=1, cutoffs=CUTOFFS, div_value=DIV, **kw)
    m = LanguageModel(cfg)
    m.init_params(np.random.default_rng(0))
    first, last = cycle_losses(m)
    assert last < 0.5 * first


# ---------------------------------------------------------------------------
# training, model files, scoring, the options
# ---------------------------------------------------------------------------
FILES = {
    "input": dict(input="adaptive"),
    "tied": dict(input="adaptive", output="adaptive", tie=True),
    "tied-slim-tails-hash": dict(input="adaptive", output="adaptive", tie=True, output_k=2,
                                 tail_m=(10, 30), mapping="hash"),
    "slim-tails": dict(output="adaptive", output_k=4, tail_m=(12, 28)),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from helpers import tiny_corpus

    return tiny_corpus(tmp_path_factory.mktemp("adaptive-input"))[0]


@pytest.mark.parametrize("kind", list(FILES))
def test_trained_file_round_trip_and_scores(kind, corpus, tmp_path):
    """One epoch on an HMM corpus (V = 100); the file's parameters and tables
    are the model's bit for bit, the loaded model's logits equal the
    trained one's, and continuous scoring equals exact evaluation."""
    from slimnp import inference
    from slimnp.evaluate import evaluate_ids
    from slimnp.modelfile import load_model
    from slimnp.trainer import TrainConfig, run_training

    out = tmp_path / "m.h5"
    mc = ModelConfig(vocab_size=0, hidden=16, layers=1, dropout=0.1, cutoffs=(10, 40), div_value=2.0,
                     **FILES[kind])
    summary = run_training(corpus, out, mc, TrainConfig(epochs=1, bptt=7, batch_size=4, lr=1.0),
                           log=lambda m: None, progress=False)
    assert np.isfinite(summary["test_ppl"]) and summary["test_ppl"] < 100
    model, vocab, ck = load_model(out)
    assert model.config == ModelConfig.from_dict(ck.config["model"]) and model.config.input == mc.input
    for k, v in ck.params.items():
        np.testing.assert_array_equal(model.store.params[k], v)
    assert set(ck.mapping) == ({"output/tail0/idx", "output/tail1/idx"}
                               if model.config.tail_m and model.config.mapping == "shuffle" else set())
    again = LanguageModel(model.config, mapping=ck.mapping or None)
    again.load_params(ck.params)
    x = np.arange(0, model.config.vocab_size, 3, dtype=np.int32).reshape(-1, 1)  # every band
    np.testing.assert_array_equal(again.logits(x, again.zero_state(1))[0],
                                  model.logits(x, model.zero_state(1))[0])
    lm = inference.LM(model, vocab)
    text = corpus["test"].read_text().splitlines()[:15]
    cont = lm.score(text, continuous=True)
    toks = np.concatenate([[vocab.index.get(w, vocab.unk_id) for w in ln.split()] + [vocab.eos_id]
                           for ln in text]).astype(np.int32)
    res = evaluate_ids(model, toks, vocab.eos_id, batch_size=1)
    assert sum(s.logprob for s in cont) == pytest.approx(-res.nll, rel=1e-6)
    assert len(lm.generate("", length=5, seed=1, count=2)) == 2


def test_command_line_trains_tied_slim_tails(corpus, tmp_path):
    """slimnp train --input adaptive --output adaptive --tie --output-k K
    --output-ratio r: the tail clusters' pools are sized from the ratio."""
    import json

    from click.testing import CliRunner

    from slimnp.cli import main

    out = tmp_path / "m.h5"
    args = ["train", "--train", str(corpus["train"]), "--valid", str(corpus["valid"]), "--out", str(out),
            "--hidden", "16", "--layers", "1", "--epochs", "1", "--bptt", "7", "--batch-size", "4",
            "--input", "adaptive", "--output", "adaptive", "--tie", "--cutoffs", "10,40",
            "--div-value", "2", "--output-k", "2", "--output-ratio", "0.25", "--quiet", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    model = json.loads(r.output)["config"]["model"]
    V = model["vocab_size"]
    assert (model["input"], model["output"], model["tie"], model["output_k"]) == ("adaptive", "adaptive",
                                                                                    True, 2)
    assert model["tail_m"] == [2 * round(0.25 * 30), 2 * round(0.25 * (V - 40))]


@pytest.mark.parametrize("given,words", [
    ({"output_kind": "adaptive", "output_k": 2}, "need both --output-k and --output-ratio"),
    ({"output_kind": "adaptive", "output_ratio": 0.5}, "need both --output-k and --output-ratio"),
    ({"output_kind": "adaptive", "output_k": 2, "output_m": 8}, "--output-m sizes one slim output"),
    ({"output_kind": "adaptive", "output_k": 2, "output_ratio": 1.5}, "--output-ratio must lie in (0, 1]"),
    ({"output_kind": "adaptive", "output_k": 3, "output_ratio": 0.5}, "output K=3 must divide every"),
    ({"input_kind": "adaptive", "head_bias": True}, "--head-bias needs --output adaptive"),
    ({}, "--cutoffs, --div-value need --input adaptive or --output adaptive"),
    ({"input_kind": "adaptive", "tie": True}, "tie with input 'adaptive' needs output 'adaptive'"),
])
def test_bad_options_are_one_line_errors(given, words):
    from slimnp import options as O

    hp = O.settings(O.complete({"data": "d", "hidden": 16, "cutoffs": "20,60", "div_value": 2, **given}))
    with pytest.raises(ValueError) as exc:
        O.model_config(hp, 100).validate()
    assert "\n" not in str(exc.value) and words in str(exc.value), str(exc.value)


def test_options_make_the_configs():
    from slimnp import options as O

    def mc(**given):
        return O.model_config(O.settings(O.complete({"data": "d", "hidden": 16, **given})), 100)

    c = mc(input_kind="adaptive", cutoffs="20,60", div_value=2)
    assert (c.input, c.output, c.cutoffs, c.div_value, c.tail_m) == ("adaptive", "full", (20, 60), 2.0, ())
    c = mc(output_kind="adaptive", cutoffs="20,60", div_value=2, output_k=4, output_ratio=0.25)
    assert (c.output_k, c.output_m, c.tail_m) == (4, 0, (4 * 10, 4 * 10))
    c = mc(input_kind="adaptive", output_kind="adaptive", tie=True, cutoffs="20,60", div_value=2)
    assert c.tie and c.input == c.output == "adaptive"
    LanguageModel(c)


def test_memory_estimate_counts_the_new_layers():
    from slimnp import adaptive, memory

    base = dict(vocab_size=1000, hidden=32, layers=1, cutoffs=(100, 400), div_value=2.0)
    dense = memory.parts(ModelConfig(**base, output="adaptive"))
    slim = memory.parts(ModelConfig(**base, output="adaptive", output_k=4, tail_m=(4 * 75, 4 * 150)))
    tied = memory.parts(ModelConfig(**base, input="adaptive", output="adaptive", tie=True))
    assert slim["parameters"] < dense["parameters"] and tied["parameters"] < dense["parameters"]
    assert slim["tables"] == 12 * 900 * 4 and tied["tables"] == dense["tables"] == 0  # the tails' (V_i, K)
    # the slim tails' DP adds a chunk's partial products and the cluster's bias gradient
    args = (400, 1000, 32, (100, 400), 2.0)
    assert adaptive.buffer_elements(*args, 4, (300, 600)) == adaptive.buffer_elements(*args) + 400 * 600 + 600


# ---------------------------------------------------------------------------
# every compiled kernel backend (Numba, the CUDA C on the emulator, CUDA)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["tied", "tied-slim-tails", "slim-tails"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_step_parity(dev, dtype, variant, monkeypatch):
    """Two SGD steps (dropout, clipping, carried state) agree with the reference kernels."""
    from test_gpu import assert_step_parity

    monkeypatch.setenv("SLIMNP_PIPELINE", "0")  # the emulator is single-threaded
    kw = {"dropout": 0.2, **MODELS[variant]}
    cfg = ModelConfig(vocab_size=V, hidden=16, layers=2, dtype=dtype, cutoffs=CUTOFFS, div_value=DIV, **kw)
    assert_step_parity(dev, cfg)
