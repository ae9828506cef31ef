"""ONNX export (slimnp.export): onnxruntime's log-probabilities equal slimnp's
own scoring for every model kind, and slim layers stay compressed in the file."""
import json
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from helpers import TINY_HP, tiny_corpus  # noqa: E402

from slimnp import io as sio  # noqa: E402
from slimnp import inference  # noqa: E402
from slimnp.compress import compress_model  # noqa: E402
from slimnp.errors import WriteError  # noqa: E402
from slimnp.export import ExportError, OnnxUnavailable, export_onnx  # noqa: E402
from slimnp.modelfile import load_model, save_model  # noqa: E402
from slimnp.options import configs  # noqa: E402
from slimnp._atomic import file_sha256  # noqa: E402
from slimnp.trainer import run_training  # noqa: E402

SLIM = dict(input="slim", input_k=4, input_ratio=0.125, output="slim", output_k=4, output_ratio=0.25)
ADAPTIVE = dict(cutoffs=(10, 40), div_value=2.0)
# trained with dropout 0.1 (TINY_HP): the export must leave it out
KINDS = {
    "dense": {},
    "shuffle": SLIM,
    "hash": {**SLIM, "mapping": "hash"},
    "learned": None,  # the dense model compressed by k-means (slimnp compress)
    "tied": {"tie": True},
    "tied_slim": dict(input="slim", output="slim", output_k=4, output_ratio=0.25, tie=True),
    "pm": {"embedding_size": 16},  # E = 16 < H = 32: the PM projections
    "pm_slim": {**SLIM, "embedding_size": 16},
    # pools of over 256 rows: the tables are stored as uint16
    "wide": dict(input="slim", input_k=4, input_m=300, output="slim", output_k=4, output_ratio=0.8),
    # the adaptive layers (slimnp.adaptive): a head of 10 words, tail clusters
    # [10, 40) and [40, V) with vectors of 32/2 = 16 and 32/4 = 8 numbers
    "adaptive": {**ADAPTIVE, "output": "adaptive", "head_bias": True},
    "adaptive_input": {**ADAPTIVE, "input": "adaptive"},  # output full
    "adaptive_tied": {**ADAPTIVE, "input": "adaptive", "output": "adaptive", "tie": True},
    # slim tails (K = 4 pools per cluster, M_i/K = V_i/2) behind a slim input
    "adaptive_slim": {**ADAPTIVE, "input": "slim", "input_k": 4, "input_ratio": 0.125,
                      "output": "adaptive", "output_k": 4, "output_ratio": 0.5},
    # the input bands read the slim tails' pools; hash tables (the file keeps a seed)
    "adaptive_tied_slim": {**ADAPTIVE, "input": "adaptive", "output": "adaptive", "tie": True,
                           "output_k": 4, "output_ratio": 0.5, "mapping": "hash", "head_bias": True},
    # E = 16 < H = 32: bands of 16, 8 and 4 numbers between the PM projections
    "adaptive_pm": {**ADAPTIVE, "input": "adaptive", "output": "adaptive", "embedding_size": 16,
                    "output_k": 2, "output_ratio": 0.5},
}
SLIM_KINDS = ["shuffle", "hash", "learned", "tied_slim", "pm_slim", "wide"]
ADAPTIVE_KINDS = [k for k in KINDS if k.startswith("adaptive")]
TOL = 1e-4  # float32, natural log


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One small trained model file per kind, and some sentences (an OOV word included)."""
    d = tmp_path_factory.mktemp("export")
    files, _ = tiny_corpus(d, tokens=3000)
    paths = {}
    for kind, kw in KINDS.items():
        if kw is None:
            continue
        paths[kind] = d / f"{kind}.h5"
        run_training(files, paths[kind], *configs({**TINY_HP, "hidden": 32, "epochs": 1, **kw}),
                     log=lambda m: None, progress=False)
    dense, vocab, _ = load_model(paths["dense"])
    slim, _ = compress_model(dense, vocab.counts, input_k=4, input_ratio=0.125, output_k=4,
                             output_ratio=0.25)
    paths["learned"] = d / "learned.h5"
    save_model(paths["learned"], slim, vocab)
    sentences = files["test"].read_text().splitlines()[:7] + ["zzz-oov " + "x" * 3]
    return paths, sentences


def onnx_logprobs(sess, sentences, B):
    """Each sentence's token log-probabilities from the exported step graph,
    ``B`` sentences at a time, as ``slimnp score`` scores them: a zero state,
    the ``<eos>`` prime, then each word; the vocabulary comes from the file."""
    meta = sess.get_modelmeta().custom_metadata_map
    words = json.loads(meta["slimnp.vocab"])
    index, eos, unk = {w: i for i, w in enumerate(words)}, int(meta["slimnp.eos_id"]), \
        int(meta["slimnp.unk_id"])
    cfg = json.loads(meta["slimnp.config"])
    L, H = cfg["layers"], cfg["hidden"]
    out = []
    for i in range(0, len(sentences), B):
        seqs = [[index.get(w, unk) for w in s.split()] + [eos] for s in sentences[i:i + B]]
        b = len(seqs)
        state = np.zeros((L, 2, b, H), np.float32)
        cur = np.full(b, eos, np.int64)
        lps = [[] for _ in seqs]
        for t in range(max(len(s) for s in seqs)):
            lp, state = sess.run(["log_probs", "new_state"], {"ids": cur, "state": state})
            assert lp.shape == (b, len(words)) and state.shape == (L, 2, b, H)
            for j, s in enumerate(seqs):
                if t < len(s):
                    lps[j].append(lp[j, s[t]])
            cur = np.array([s[t] if t < len(s) else eos for s in seqs], np.int64)
        out += [np.array(x, np.float64) for x in lps]
    return out


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnxruntime_scores_equal_slimnp_score(models, kind, tmp_path):
    paths, sentences = models
    out = tmp_path / f"{kind}.onnx"
    info = export_onnx(paths[kind], out)
    onnx.checker.check_model(str(out))
    assert info["bytes"] == out.stat().st_size
    assert info["inputs"] == {"ids": ["B"], "state": [2, 2, "B", 32]}
    assert list(info["outputs"]) == ["log_probs", "new_state"]
    # what `slimnp score --words` prints: each token's log-probability
    want = [s.logprobs for s in inference.load(paths[kind]).score(sentences)]
    sess = session(out)
    errs = []
    for B in (1, 3):  # B is dynamic: one stream, then three side by side
        got = onnx_logprobs(sess, sentences, B)
        errs += [np.abs(g - w).max() for g, w in zip(got, want)]
        for g, w in zip(got, want):
            assert g.shape == w.shape
    print(f"\n{kind}: max |onnxruntime - slimnp| = {max(errs):.2e} (natural log), "
          f"{info['bytes']:,} bytes, compressed: {info['compressed']}")
    assert max(errs) <= TOL


@pytest.mark.parametrize("kind", SLIM_KINDS)
def test_slim_export_stays_compressed(models, kind, tmp_path):
    """No V x E matrix in the file: the only float initializer with a V axis
    is the output bias; the file is the parameters, the tables (uint8, or
    uint16 for pools of over 256 rows; cast to int32 in the graph) and the
    metadata, and less than 10% more."""
    paths, _ = models
    model, vocab, _ = load_model(paths[kind])
    c = model.config
    V, E = c.vocab_size, c.word_size
    out = tmp_path / "m.onnx"
    info = export_onnx(paths[kind], out)
    assert info["compressed"] == ["input", "output"]
    m = onnx.load(str(out))
    floats = {t.name: tuple(t.dims) for t in m.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT}
    assert [n for n, s in floats.items() if V in s] == ["output/b"], floats
    assert not any(s in ((V, E), (E, V)) for s in floats.values())
    # what the file must hold: every parameter once (float32), the integer
    # tables in the smallest unsigned type of their largest row (V*K each; a
    # tied input layer shares the output's), and the metadata's keys and values
    def width(hi):
        return 1 if hi <= 0xFF else 2 if hi <= 0xFFFF else 4

    tables = V * c.output_k * width(c.output_m - 1)
    tables += 0 if c.tie else V * c.input_k * width(c.input_m - 1)
    stored = {t.name: t.data_type for t in m.graph.initializer}
    small = "uint8" if c.output_m <= 256 else "uint16"
    assert stored[f"output/rows/{small}"] == getattr(onnx.TensorProto, small.upper())
    assert "output/rows" not in stored
    casts = {n.output[0] for n in m.graph.node if n.op_type == "Cast"}
    assert "output/rows" in casts and (c.tie or "embedding/idx" in casts)
    meta = sum(len(p.key.encode()) + len(p.value.encode()) for p in m.metadata_props)
    expected = 4 * model.num_parameters + tables + meta
    size = out.stat().st_size
    print(f"\n{kind}: file {size:,} bytes; parameters {4 * model.num_parameters:,} + tables "
          f"{tables:,} + metadata {meta:,} = {expected:,} ({size / expected - 1:+.1%}); "
          f".h5 {paths[kind].stat().st_size:,}")
    assert info["parameter_bytes"] == 4 * model.num_parameters
    assert info["table_bytes"] == tables
    assert expected <= size <= 1.10 * expected


def test_metadata_carries_vocab_config_and_source(models, tmp_path):
    paths, _ = models
    out = tmp_path / "m.onnx"
    info = export_onnx(paths["hash"], out)
    _, vocab, ck = load_model(paths["hash"])
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["slimnp.vocab"]) == list(vocab.words)
    assert int(meta["slimnp.eos_id"]) == vocab.eos_id and int(meta["slimnp.unk_id"]) == vocab.unk_id
    assert json.loads(meta["slimnp.config"]) == json.loads(json.dumps(ck.config["model"]))
    assert meta["slimnp.source_sha256"] == file_sha256(paths["hash"]) == info["source_sha256"]
    assert meta["slimnp.source"] == "hash.h5"  # the name only: no machine's folders
    assert info["mapping"] == "hash"


@pytest.mark.parametrize("kind", ["pm", "pm_slim"])
def test_logits_output_and_in_memory_model(models, kind, tmp_path):
    """``logits=True`` adds the raw scores (their log-softmax is log_probs),
    equal to the model's (a slim model's through its dense expansion); an
    ``slimnp.LM`` exports as its file does; the oldest opset works too."""
    paths, _ = models
    lm = inference.load(paths[kind])
    out = tmp_path / "m.onnx"
    info = export_onnx(lm, out, logits=True, opset=13)
    assert list(info["outputs"]) == ["log_probs", "logits", "new_state"]
    model = inference.expand_dense(lm.model)  # the same function, V x E matrices written out
    x = np.array([[3, 5, 7], [1, 2, 9]], np.int32)  # (T, B)
    z, _ = model.logits(x, model.zero_state(3))
    sess = session(out)
    state = np.zeros((2, 2, 3, 32), np.float32)
    for t in range(2):
        lp, zz, state = sess.run(None, {"ids": x[t].astype(np.int64), "state": state})
        np.testing.assert_allclose(zz, z[t], atol=TOL)
        np.testing.assert_allclose(lp, zz - np.log(np.exp(zz).sum(1, keepdims=True)), atol=TOL)


def test_bad_input_gives_one_line_errors(models, tmp_path, monkeypatch):
    paths, _ = models
    not_model = tmp_path / "notes.txt"
    not_model.write_text("not a model\n")
    with pytest.raises(sio.FormatError, match="notes.txt") as e:
        export_onnx(not_model, tmp_path / "m.onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(WriteError, match="does not exist") as e:
        export_onnx(paths["dense"], tmp_path / "no" / "m.onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(WriteError, match="folder"):
        export_onnx(paths["dense"], tmp_path)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(paths["dense"], tmp_path / "m.onnx", opset=9)
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnx", None)  # the [onnx] extra not installed
    with pytest.raises(OnnxUnavailable, match=r"pip install 'slimnp\[onnx\]'") as e:
        export_onnx(paths["dense"], tmp_path / "m.onnx")
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_export_command(models, tmp_path):
    """``slimnp export``: a summary line or JSON, ``--force`` to overwrite,
    one-line errors and status 1."""
    from click.testing import CliRunner

    from slimnp.cli import main

    def run(*args):
        return CliRunner().invoke(main, ["export", *map(str, args)])

    paths, _ = models
    out = tmp_path / "m.onnx"
    r = run(paths["shuffle"], "--out", out)
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out}:") and "output slim (K-pool DP, K=4" in r.output
    r = run(paths["shuffle"], "--out", out)
    assert r.exit_code == 1 and "exists; pass --force" in r.output
    r = run(paths["shuffle"], "--out", out, "--force", "--json", "--logits")
    info = json.loads(r.output)
    assert info["compressed"] == ["input", "output"] and "logits" in info["outputs"]
    r = run(tmp_path / "none.h5", "--out", tmp_path / "x.onnx")
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1
    assert "none.h5" in r.output


def test_readme_example_runs(models, tmp_path, monkeypatch):
    """README, "Deploying with ONNX Runtime": the example prints each word's
    log-probability, the ones slimnp score gives."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.rst").read_text()
    assert "``slimnp export MODEL --out model.onnx``" in readme
    block = readme.split("in\nplain ONNX Runtime::\n\n")[1]
    code = "\n".join(ln[4:] for ln in re.split(r"\n(?=\S)", block)[0].splitlines())
    paths, sentences = models
    words = sentences[0].split()[:3]
    assert '"the cat sat"' in code
    code = code.replace('"the cat sat"', repr(" ".join(words)))
    export_onnx(paths["tied_slim"], tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.rst", "exec"), {"print": lambda *a: printed.append(a)})
    want = inference.load(paths["tied_slim"]).score([" ".join(words)])[0].logprobs[:3]
    assert [w for w, _ in printed] == words
    np.testing.assert_allclose([lp for _, lp in printed], want, atol=TOL)


# ----------------------------------------------------------------------------
# the adaptive layers
# ----------------------------------------------------------------------------
def band_edge_ids(c):
    """Ids at both ends of every band: 0, c_0 - 1, c_0, ..., V - 1."""
    cut = [0, *c.cutoffs, c.vocab_size]
    return np.array(sorted({w for lo, hi in zip(cut, cut[1:]) for w in (lo, hi - 1)}), np.int64)


@pytest.mark.parametrize("kind", ADAPTIVE_KINDS)
def test_adaptive_log_probs_of_every_word(models, kind, tmp_path):
    """Every word's log-probability, not only the next word's: the (B, V)
    rows equal slimnp's own (AdaptiveSoftmax.log_probs; the log-softmax of
    the logits for a full output) and their exponentials sum to 1, for ids
    at both ends of every band; ``logits`` of an adaptive output are the
    log-probabilities again, as slimnp's ``logits`` gives them."""
    paths, _ = models
    model, vocab, _ = load_model(paths[kind])
    c = model.config
    # weights of order one, not the tiny trained ones (a band vector passes
    # up to three projections of +-0.1 before the LSTM): a wrong band or
    # cluster then moves the log-probabilities far beyond TOL
    model.store.data[:] = np.random.default_rng(1).uniform(-0.5, 0.5, model.store.data.shape)
    out = tmp_path / "m.onnx"
    info = export_onnx(model, out, logits=True, opset=13, vocab=vocab)
    assert list(info["outputs"]) == ["log_probs", "logits", "new_state"]
    ids = band_edge_ids(c)
    x = np.stack([ids, ids[::-1], np.roll(ids, 1)]).astype(np.int32)  # (T, B): every band, every step
    z, _ = model.logits(x, model.zero_state(x.shape[1]))  # (T, B, V)
    if c.output == "adaptive":
        want = z
    else:
        want = z - np.log(np.exp(z.astype(np.float64)).sum(-1, keepdims=True))
    sess = session(out)
    state = np.zeros((c.layers, 2, x.shape[1], c.hidden), np.float32)
    err = 0.0
    for t in range(x.shape[0]):
        lp, zz, state = sess.run(None, {"ids": x[t].astype(np.int64), "state": state})
        err = max(err, float(np.abs(lp - want[t]).max()))
        np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(1), 1.0, atol=1e-5)
        if c.output == "adaptive":
            np.testing.assert_array_equal(zz, lp)
    print(f"\n{kind}: max |onnxruntime - slimnp| over all {c.vocab_size} words = {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("kind", ADAPTIVE_KINDS)
def test_adaptive_export_stores_each_parameter_once(models, kind, tmp_path):
    """No V x E matrix on an adaptive side: the file holds each parameter once (a tied model's
    shared bands once), the slim tails' tables (one (K, V_i) per cluster,
    uint8 here) and the metadata; the summary names the layers."""
    from slimnp.export import summary_line

    paths, _ = models
    model, _, _ = load_model(paths[kind])
    c = model.config
    V, E = c.vocab_size, c.word_size
    out = tmp_path / "m.onnx"
    info = export_onnx(paths[kind], out)
    m = onnx.load(str(out))
    floats = {t.name: tuple(t.dims) for t in m.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT}
    adaptive = [side for side, kind in (("embedding/", c.input), ("output/", c.output))
                if kind == "adaptive"]
    assert not [n for n, s in floats.items() if V in s and n.startswith(tuple(adaptive))], floats
    assert info["parameter_bytes"] == 4 * model.num_parameters
    cut = [*c.cutoffs, V]
    tails = sum((hi - lo) * c.output_k for lo, hi in zip(cut, cut[1:])) if c.tail_m else 0
    inputs = V * c.input_k if c.input == "slim" else 0
    assert info["table_bytes"] == tails + inputs  # every pool under 256 rows: uint8
    stored = {t.name for t in m.graph.initializer}
    assert all(f"output/tail{i}/rows/uint8" in stored for i in range(len(c.tail_m)))
    slim = {"input": c.input == "slim" or (c.tie and bool(c.tail_m)), "output": bool(c.tail_m)}
    assert info["compressed"] == [side for side in ("input", "output") if slim[side]]
    line = summary_line(info)
    print(f"\n{kind}: {line}")
    if c.output == "adaptive":
        assert info["layers"]["output"]["kind"] == "adaptive"
        assert "output adaptive (head 12, 2 tail clusters of sizes " \
               f"{E // 2},{E // 4}" in line
        assert ("slim tails K=" in line) == bool(c.tail_m)
    if c.input == "adaptive":
        assert info["layers"]["input"]["bands"] == [[10, E], [30, E // 2], [V - 40, E // 4]]
        assert "input adaptive (3 bands of sizes" in line and ("tied" in line) == c.tie
    meta = sum(len(p.key.encode()) + len(p.value.encode()) for p in m.metadata_props)
    expected = 4 * model.num_parameters + info["table_bytes"] + meta
    size = out.stat().st_size
    print(f"{kind}: file {size:,} bytes = arrays and metadata {expected:,} + graph {size - expected:,}")
    # the rest is the graph: nodes, names, small constants (more per cluster
    # than the slim layers' few nodes, but not growing with V or H)
    assert expected <= size <= expected + 12_000


@pytest.mark.parametrize("kind", ["adaptive", "adaptive_tied_slim", "adaptive_pm"])
def test_quantized_adaptive_file_keeps_int8(models, kind, tmp_path):
    """``slimnp quantize`` of an adaptive model: the head, the tails' vectors,
    pools and projections, the bands stay int8 in the ONNX file
    (``DequantizeLinear``), the file shrinks, and onnxruntime scores as
    slimnp scores the quantized file."""
    from slimnp.quantize import quantize_file

    paths, sentences = models
    q = tmp_path / "q.h5"
    quantize_file(paths[kind], q)
    raw = sio.load(q, dequantize=False)
    assert any(k.startswith("output/tail") for k in raw.scales)
    info32 = export_onnx(paths[kind], tmp_path / "m.onnx")
    info = export_onnx(q, tmp_path / "q.onnx")
    proto = onnx.load(str(tmp_path / "q.onnx"))
    int8 = sorted(t.name[:-len("/int8")] for t in proto.graph.initializer
                  if t.data_type == onnx.TensorProto.INT8)
    lstm = {f"lstm{l}/W" for l in range(2)}
    assert int8 == sorted({k for k in raw.scales if not k.startswith("lstm")} | lstm)
    assert info["quantized"]["int8"] == sorted(raw.scales)
    assert info["bytes"] < 0.6 * info32["bytes"]
    want = [s.logprobs for s in inference.load(q).score(sentences)]
    got = onnx_logprobs(session(tmp_path / "q.onnx"), sentences, 3)
    err = max(np.abs(g - w).max() for g, w in zip(got, want))
    print(f"\n{kind} int8: max |onnxruntime - slimnp| = {err:.2e}; "
          f"{info32['bytes']:,} -> {info['bytes']:,} bytes")
    assert err <= TOL
