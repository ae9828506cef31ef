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
}
SLIM_KINDS = ["shuffle", "hash", "learned", "tied_slim", "pm_slim", "wide"]
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
