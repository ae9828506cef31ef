"""int8 storage (slimnp.quantize, the int8 rows of slimnp.io): every weight
within half a step of its original, quantized files that load everywhere a
model file does, round trips that change nothing, version-1 files as before,
and an ONNX export that keeps the int8 arrays and scores as slimnp does."""
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from helpers import TINY_HP, tiny_corpus

from slimnp import inference
from slimnp import io as sio
from slimnp.backend import make_rng
from slimnp.cli import main
from slimnp.data import Vocabulary
from slimnp.errors import WriteError
from slimnp.evaluate import evaluate_file
from slimnp.model import LanguageModel, ModelConfig
from slimnp.modelfile import load_model, save_model
from slimnp.options import configs
from slimnp.quantize import QuantizeError, quantizable, quantize_file
from slimnp.trainer import run_training

DATA = Path(__file__).resolve().parent / "data"
V, H = 50, 16
SLIM = dict(input="slim", input_k=4, input_m=40, output="slim", output_k=4, output_m=20)
KINDS = {
    "dense": {},
    "shuffle": SLIM,
    "hash": dict(SLIM, mapping="hash", mapping_seed=3),
    "tied_slim": dict(SLIM, input_m=20, tie=True),
    "tied": dict(tie=True),
    "pm": dict(embedding_size=8),
    "float64": dict(SLIM, dtype="float64"),
}
# float32 rounding of the product float32(q) * scale: at most 127 * scale * 2^-24
SLACK = 1 + 254 * 2.0**-24


def _vocab(n=V):
    return Vocabulary(["<eos>", "<unk>"] + [f"w{i}" for i in range(n - 2)], np.arange(n, 0, -1, dtype=np.int64))


def _model_file(path, kind="dense", V=V, H=H, layers=1, seed=1):
    m = LanguageModel(ModelConfig(vocab_size=V, hidden=H, layers=layers, **KINDS[kind]))
    m.init_params(make_rng(seed))
    save_model(path, m, _vocab(V))
    return m


def _within_bound(w, w_hat, scale):
    """|w - w_hat| <= scale / 2 per row (scale: w's shape less the last axis)."""
    err = np.abs(np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))
    return bool((err <= scale[..., None].astype(np.float64) / 2 * SLACK).all())


# ---------------------------------------------------------------------------
# the arithmetic
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", [((7, 33), np.float32), ((3, 5, 4), np.float32), ((6, 2), np.float64),
                                         ((2, 1000), np.float32)])
def test_rows_are_within_half_a_step(rng, shape, dtype):
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, shape[:-1])[..., None]).astype(dtype)
    w.reshape(-1, shape[-1])[0] = 0.0  # a zero row: scale 0, q 0, exact
    q, s = sio.quantize_rows(w)
    assert q.dtype == np.int8 and q.shape == w.shape and s.dtype == np.float32 and s.shape == shape[:-1]
    assert np.abs(q.astype(int)).max() == 127 and q.min() >= -127  # -128 never used: symmetric
    w_hat = sio.dequantize_rows(q, s)
    assert w_hat.dtype == np.float32
    assert _within_bound(w, w_hat, s)
    assert s.reshape(-1)[0] == 0 and not w_hat.reshape(-1, shape[-1])[0].any()
    # dequantize is one float32 product per element, as ONNX's DequantizeLinear computes it
    np.testing.assert_array_equal(w_hat, q.astype(np.float32) * s[..., None])


def test_quantize_rows_refuses_non_finite_and_non_float():
    with pytest.raises(ValueError, match="NaN or infinity"):
        sio.quantize_rows(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="float array"):
        sio.quantize_rows(np.ones((2, 2), np.int32))


def test_what_is_quantized():
    assert quantizable("lstm0/Wx", np.zeros((8, 32), np.float32))
    assert quantizable("output/A", np.zeros((4, 5, 2), np.float32))
    assert not quantizable("lstm0/b", np.zeros(32, np.float32))  # biases stay float
    assert not quantizable("x", np.zeros((8, 1), np.float32))  # 1 + 4 bytes would outweigh 4


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_file_loads_within_the_bound(tmp_path, kind):
    m = _model_file(tmp_path / "m.h5", kind)
    report = quantize_file(tmp_path / "m.h5", tmp_path / "q.h5")
    want = m.params_numpy()
    assert sorted(report["int8"]) == sorted(k for k, v in want.items() if v.ndim >= 2)
    assert sorted(report["float"]) == sorted(k for k, v in want.items() if v.ndim == 1)
    assert all(p["max_error_over_scale"] <= 0.5 * SLACK for p in report["parameters"].values() if p["int8"])
    raw = sio.load(tmp_path / "q.h5", dequantize=False)
    assert raw.attrs["format_version"] == 2 and raw.attrs["quantization"] == sio.QUANTIZATION
    assert sorted(raw.scales) == sorted(report["int8"])
    m2, vocab, ck = load_model(tmp_path / "q.h5")  # what evaluate, score, generate, export read
    assert m2.config == m.config and vocab.words == _vocab().words
    got = m2.params_numpy()
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        if name in raw.scales:
            assert raw.params[name].dtype == np.int8
            assert _within_bound(w, got[name], raw.scales[name]), name
            # the loaded weights are exactly the float32 dequantization
            np.testing.assert_array_equal(got[name], sio.dequantize_rows(raw.params[name], raw.scales[name]))
        else:  # biases: as stored
            np.testing.assert_array_equal(got[name], w, err_msg=name)
    for k in m.mapping:
        np.testing.assert_array_equal(m2.mapping[k], m.mapping[k])
    # the trainer's reload of a best model (load_params_into) dequantizes the same way
    arrays = {k: np.empty_like(v) for k, v in want.items()}
    sio.load_params_into(tmp_path / "q.h5", arrays)
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], got[k], err_msg=k)


def test_round_trips_of_a_quantized_file_are_exact(tmp_path):
    _model_file(tmp_path / "m.h5", "shuffle")
    quantize_file(tmp_path / "m.h5", tmp_path / "q.h5")
    a = sio.load(tmp_path / "q.h5", dequantize=False)
    sio.save(tmp_path / "copy.h5", a)  # load(dequantize=False) -> save: the same arrays
    quantize_file(tmp_path / "q.h5", tmp_path / "qq.h5")  # quantizing again: nothing re-rounded
    for other in ("copy.h5", "qq.h5"):
        b = sio.load(tmp_path / other, dequantize=False)
        assert b.params.keys() == a.params.keys() and b.scales.keys() == a.scales.keys()
        for k in a.params:
            assert b.params[k].dtype == a.params[k].dtype
            np.testing.assert_array_equal(b.params[k], a.params[k])
        for k in a.scales:
            np.testing.assert_array_equal(b.scales[k], a.scales[k])
        assert b.config == a.config and b.vocab == a.vocab
    # and the dequantized model: bit for bit the same from every copy
    p = load_model(tmp_path / "q.h5")[0].params_numpy()
    for other in ("copy.h5", "qq.h5"):
        p2 = load_model(tmp_path / other)[0].params_numpy()
        assert all(np.array_equal(p[k], p2[k]) for k in p)


def test_file_shrinks_when_parameters_dominate(tmp_path):
    _model_file(tmp_path / "m.h5", "dense", V=200, H=128, layers=2)
    report = quantize_file(tmp_path / "m.h5", tmp_path / "q.h5")
    size, size32 = os.path.getsize(tmp_path / "q.h5"), os.path.getsize(tmp_path / "m.h5")
    print(f"\nfloat32 {size32:,} B, int8 {size:,} B ({size / size32:.3f}x)")
    assert report["bytes"] == size and report["source_bytes"] == size32
    assert size <= 0.35 * size32


def test_float_files_are_still_version_1(tmp_path):
    """A file without int8 parameters is written exactly as before (older
    slimnp reads it); the version-1 files in tests/data load as they did."""
    _model_file(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert int(f.attrs["format_version"]) == 1 and "quantization" not in f.attrs
        assert "param_scales" not in f
    # written by slimnp before int8 storage existed (d9fca20: format 1, checksums; a
    # 1x8 model, V = 30, slim input K = 4, M = 40, random weights)
    old, _, ck = load_model(DATA / "format1-model.hdf5")
    assert ck.attrs["format_version"] == 1 and "quantization" not in ck.attrs
    assert old.config.input == "slim" and old.config.vocab_size == 30
    with h5py.File(DATA / "format1-model.hdf5", "r") as f:
        for k, w in old.params_numpy().items():
            assert f["params/" + k].dtype == np.float32
            np.testing.assert_array_equal(w, f["params/" + k][()], err_msg=k)
    # ... and it quantizes like any other
    quantize_file(DATA / "format1-model.hdf5", tmp_path / "q.h5")
    assert load_model(tmp_path / "q.h5")[0].config == old.config


def test_an_older_reader_refuses_a_quantized_file(tmp_path, monkeypatch):
    _model_file(tmp_path / "m.h5")
    quantize_file(tmp_path / "m.h5", tmp_path / "q.h5")
    monkeypatch.setattr(sio, "FORMAT_VERSION", 1)  # slimnp before int8 storage
    with pytest.raises(sio.FormatError, match=r"format version 2 > 1\); upgrade slimnp") as e:
        load_model(tmp_path / "q.h5")
    assert "\n" not in str(e.value)


def test_damaged_scales_are_reported(tmp_path):
    _model_file(tmp_path / "m.h5")
    quantize_file(tmp_path / "m.h5", tmp_path / "q.h5")
    with h5py.File(tmp_path / "q.h5", "r+") as f:
        del f["param_scales/output/W"]
    with pytest.raises(sio.FormatError, match="missing /param_scales/output/W"):
        load_model(tmp_path / "q.h5")
    with h5py.File(tmp_path / "q.h5", "r+") as f:
        f["params/lstm0/Wx"].attrs["quantization"] = "int4-blocked"
    with pytest.raises(sio.FormatError, match="int4-blocked"):
        load_model(tmp_path / "q.h5")


def test_optimizer_and_training_state_are_dropped(tmp_path):
    files, _ = tiny_corpus(tmp_path, tokens=1500)
    run_training(files, tmp_path / "m.h5", *configs({**TINY_HP, "hidden": 8, "layers": 1, "epochs": 1,
                                                      "optimizer": "adagrad", "lr": 0.1}),
                 log=lambda m: None, progress=False)
    report = quantize_file(tmp_path / "m.h5", tmp_path / "q.h5")
    assert report["dropped"] == ["optimizer", "train_state"]
    ck = sio.load(tmp_path / "q.h5")
    assert not ck.optimizer and not ck.train_state
    assert "train" not in ck.config and "data" not in ck.config  # not a resumable run
    src = ck.config["quantized_from"]
    assert src["file"] == "m.h5" and src["scheme"] == sio.QUANTIZATION and "train" in src and "data" in src


# ---------------------------------------------------------------------------
# a trained model: perplexity, fine-tuning
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantize")
    files, _ = tiny_corpus(d, tokens=4000)
    run_training(files, d / "m.h5", *configs({**TINY_HP, "hidden": 32, "epochs": 2, "input": "slim",
                                              "input_k": 4, "input_ratio": 0.25}),
                 log=lambda m: None, progress=False)
    quantize_file(d / "m.best.h5", d / "q.h5")
    return d, files


def test_perplexity_stays_within_a_few_percent(trained):
    d, files = trained
    f32 = evaluate_file(d / "m.best.h5", files["test"], progress=False)["perplexity"]
    i8 = evaluate_file(d / "q.h5", files["test"], progress=False)["perplexity"]
    print(f"\ntest perplexity float32 {f32:.3f}, int8 {i8:.3f} ({i8 / f32 - 1:+.3%})")
    assert abs(i8 / f32 - 1) < 0.03


def test_fine_tuning_starts_from_the_quantized_weights(trained, tmp_path):
    d, files = trained
    q_params = load_model(d / "q.h5")[0].params_numpy()
    # lr 1e-30: the weights move by less than float32 resolves (but from 0)
    _, train = configs({**TINY_HP, "hidden": 32, "epochs": 1, "lr": 1e-30})
    run_training(files, tmp_path / "ft.h5", None, train, init_from=d / "q.h5", log=lambda m: None,
                 progress=False)
    tuned, _, ck = load_model(tmp_path / "ft.h5")
    assert ck.attrs["format_version"] == 1  # training writes float32 files
    for k, w in tuned.params_numpy().items():
        np.testing.assert_allclose(w, q_params[k], rtol=0, atol=1e-20, err_msg=k)


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------
def _run(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def test_quantize_and_inspect_commands(tmp_path):
    _model_file(tmp_path / "m.h5", "shuffle")
    out = tmp_path / "q.h5"
    r = _run("quantize", tmp_path / "m.h5", "--out", out)
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"wrote {out}: ") and "int8 with a float32 scale per row" in r.output
    assert r.output.count("\n") == 1
    r = _run("quantize", tmp_path / "m.h5", "--out", out, "--force", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["scheme"] == sio.QUANTIZATION
    r = _run("inspect", out)
    assert r.exit_code == 0 and "format:      slimnp v2" in r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("quantized:")][0]
    assert sio.QUANTIZATION in line and "4 arrays int8" in line and "as float32" in line
    info = json.loads(_run("inspect", out, "--json").output)
    q = info["quantization"]
    assert q["scheme"] == sio.QUANTIZATION and len(q["int8"]) == 4
    assert q["int8_bytes"] + q["scale_bytes"] + q["float_bytes"] == info["parameter_bytes"]
    assert "quantization" in json.loads(_run("inspect", tmp_path / "m.h5", "--json").output)
    assert "quantized:" not in _run("inspect", tmp_path / "m.h5").output
    r = _run("quantize", "--help")
    assert r.exit_code == 0 and "--force" in r.output and "int8" in r.output


def test_bad_input_gives_one_line(tmp_path):
    _model_file(tmp_path / "m.h5")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    (tmp_path / "exists.h5").write_bytes(b"keep me")
    cases = [((notes, "--out", tmp_path / "q.h5"), "not an HDF5 file"),
             ((foreign, "--out", tmp_path / "q.h5"), "not a slimnp model file"),
             ((tmp_path / "none.h5", "--out", tmp_path / "q.h5"), "no such file"),
             ((tmp_path / "m.h5", "--out", tmp_path / "exists.h5"), "exists; pass --force"),
             ((tmp_path / "m.h5", "--out", tmp_path / "no" / "q.h5"), "does not exist"),
             ((tmp_path / "m.h5", "--out", tmp_path / "exists.h5" / "q.h5"), "is not a folder")]
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        cases.append(((tmp_path / "m.h5", "--out", ro / "q.h5"), "permission denied"))
    for args, msg in cases:
        r = _run("quantize", *args)
        assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
        assert msg in r.output, r.output
    assert (tmp_path / "exists.h5").read_bytes() == b"keep me" and not (tmp_path / "q.h5").exists()
    with pytest.raises(QuantizeError):
        quantize_file(tmp_path / "m.h5", tmp_path / "exists.h5")
    with pytest.raises(WriteError, match="does not exist"):
        quantize_file(tmp_path / "m.h5", tmp_path / "no" / "q.h5")
    with pytest.raises(WriteError, match="it is a folder"):
        quantize_file(tmp_path / "m.h5", tmp_path)


# ---------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------
def _onnx_logprobs(sess, sentences, dtype):
    """Each sentence's token log-probabilities from the step graph, one
    stream, as ``slimnp score`` scores it (tests/test_export.py's loop)."""
    meta = sess.get_modelmeta().custom_metadata_map
    index = {w: i for i, w in enumerate(json.loads(meta["slimnp.vocab"]))}
    eos, unk = int(meta["slimnp.eos_id"]), int(meta["slimnp.unk_id"])
    cfg = json.loads(meta["slimnp.config"])
    out = []
    for s in sentences:
        state = np.zeros((cfg["layers"], 2, 1, cfg["hidden"]), dtype)
        cur, lps = eos, []
        for w in [index.get(w, unk) for w in s.split()] + [eos]:
            lp, state = sess.run(["log_probs", "new_state"], {"ids": np.array([cur], np.int64), "state": state})
            lps.append(lp[0, w])
            cur = w
        out.append(np.array(lps, np.float64))
    return out


@pytest.mark.parametrize("kind", ["dense", "shuffle", "tied_slim", "pm", "float64"])
def test_onnx_export_keeps_int8_and_scores_as_slimnp(tmp_path, kind):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from slimnp.export import export_onnx

    m = _model_file(tmp_path / "m.h5", kind, V=V, H=32)
    if kind == "dense":  # zero rows: scale 0 (DequantizeLinear gives 0)
        m.store.params["output/W"][5] = 0
        m.store.params["embedding/W"][:3] = 0
        save_model(tmp_path / "m.h5", m, _vocab())
    quantize_file(tmp_path / "m.h5", tmp_path / "q.h5")
    info32 = export_onnx(tmp_path / "m.h5", tmp_path / "m.onnx")
    info = export_onnx(tmp_path / "q.h5", tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"))
    proto = onnx.load(str(tmp_path / "q.onnx"))
    raw = sio.load(tmp_path / "q.h5", dequantize=False)
    inits = {t.name: t for t in proto.graph.initializer}
    int8 = sorted(n[:-len("/int8")] for n, t in inits.items() if t.data_type == onnx.TensorProto.INT8)
    want = sorted({"lstm0/W" if k.startswith("lstm0/") else k for k in raw.scales})
    assert int8 == want and info["quantized"]["int8"] == sorted(raw.scales)
    assert not any(t.data_type == onnx.TensorProto.FLOAT and n in want for n, t in inits.items())
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(want) and all(a.name == "axis" and a.i == 0 for n in dq for a in n.attribute)
    assert info["quantized"]["int8_bytes"] == sum(q.size for q in raw.params.values() if q.dtype == np.int8)
    print(f"\n{kind}: ONNX float32 {info32['bytes']:,} B, int8 {info['bytes']:,} B "
          f"({info['bytes'] / info32['bytes']:.2f}x)")
    assert info["bytes"] < info32["bytes"]

    words = _vocab().words
    r = np.random.default_rng(0)
    sentences = [" ".join(words[i] for i in r.integers(2, V, n)) for n in (1, 5, 9)] + ["w3 oov-word w7"]
    want_lp = [s.logprobs for s in inference.load(tmp_path / "q.h5").score(sentences)]
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    got = _onnx_logprobs(sess, sentences, np.float64 if kind == "float64" else np.float32)
    err = max(np.abs(g - w).max() for g, w in zip(got, want_lp))
    print(f"{kind}: max |onnxruntime(int8 export) - slimnp(int8 file)| = {err:.2e}")
    assert err <= 1e-4
