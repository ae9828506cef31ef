"""Scoring and generation with a trained model (slimnp.inference, `slimnp score`,
`slimnp generate`)."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY_HP, tiny_corpus

from slimnp import inference
from slimnp.cli import main
from slimnp.evaluate import evaluate_ids
from slimnp.trainer import run_training
from slimnp.options import configs

SLIM = dict(input="slim", input_k=4, input_ratio=0.25, output="slim", output_k=4, output_ratio=0.25)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small slim model trained on an HMM corpus, and its test split."""
    d = tmp_path_factory.mktemp("apply")
    files, _ = tiny_corpus(d)
    out = d / "m.h5"
    run_training(files, out, *configs({**TINY_HP, **SLIM, "dropout": 0.0}), log=lambda m: None, progress=False)
    return out, files["test"]


@pytest.fixture(scope="module")
def lm(trained):
    return inference.load(trained[0])


def _lines(path):
    return path.read_text().splitlines()


def test_sentence_score_is_sum_of_word_scores(lm, trained):
    scores = lm.score(_lines(trained[1])[:10])
    for s in scores:
        assert s.words[-1] == "<eos>" and len(s.words) == s.tokens
        assert s.logprob == pytest.approx(float(np.sum(s.logprobs)), abs=1e-12)
        assert s.log10prob == pytest.approx(s.logprob / np.log(10))
        d = s.to_dict(words=True)
        assert sum(w["logprob"] for w in d["words"]) == pytest.approx(s.logprob, abs=1e-9)
        assert np.all(s.logprobs < 0)


def test_continuous_scores_equal_evaluate(lm, trained):
    """Scoring the file as one stream is exactly `evaluate --batch-size 1`."""
    enc = lm.vocab.encode_file(trained[1])
    ref = evaluate_ids(lm.model, enc.ids, lm.vocab.eos_id, batch_size=1)
    scores = lm.score(_lines(trained[1]), continuous=True)
    assert sum(s.tokens for s in scores) == ref.tokens
    assert -sum(s.logprob for s in scores) == pytest.approx(ref.nll, rel=1e-12)
    assert lm.perplexity(_lines(trained[1])) == pytest.approx(ref.perplexity, rel=1e-12)


def test_single_sentence_equals_evaluate_of_that_line(lm, trained, tmp_path):
    line = _lines(trained[1])[5]
    f = tmp_path / "one.txt"
    f.write_text(line + "\n")
    ref = evaluate_ids(lm.model, lm.vocab.encode_file(f).ids, lm.vocab.eos_id)
    (s,) = lm.score([line])
    assert -s.logprob == pytest.approx(ref.nll, rel=1e-12)


def test_batched_scores_equal_one_at_a_time(lm, trained):
    """Padding and length-sorting do not change any sentence's score."""
    lines = _lines(trained[1])
    batched = lm.score(lines, batch_size=64)
    single = lm.score(lines, batch_size=1)
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)


def test_oov_counted_and_scored_as_unk(lm):
    (s,) = lm.score(["w0001 never-seen-word w0002"])
    (u,) = lm.score(["w0001 <unk> w0002"])
    assert s.oov == 1 and u.oov == 0
    np.testing.assert_allclose(s.logprobs, u.logprobs)


def test_compressed_scores_equal_dense_expansion(lm, trained):
    """The slim model scored in compressed form = the same model with its
    pools written out as dense V x H tables."""
    dense = lm.dense()
    assert dense.model.config.input == "dense" and dense.model.config.output == "full"
    assert "output/W" in dense.model.store.params
    lines = _lines(trained[1])
    for a, b in zip(lm.score(lines), dense.score(lines)):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


def test_score_rejects_bad_input(lm):
    with pytest.raises(ValueError, match="single str"):
        lm.score("a sentence")
    with pytest.raises(ValueError, match="newline"):
        lm.score(["one\ntwo"])


def test_generation_is_reproducible(lm):
    a = lm.generate("w0001", length=15, seed=3, count=4)
    b = lm.generate("w0001", length=15, seed=3, count=4)
    c = lm.generate("w0001", length=15, seed=4, count=4)
    assert a == b and a != c
    assert all(t.split()[0] == "w0001" for t in a)
    assert all(1 <= len(t.split()) <= 16 and "<eos>" not in t for t in a)


def test_top_k_one_is_greedy(lm):
    """With top-k 1 each drawn word is the model's most likely next word."""
    (text,) = lm.generate("", length=8, top_k=1, seed=0, stop_at_eos=False)
    words = [w if w else "<eos>" for w in text.replace("\n", " <eos> ").split(" ")]
    ids = [lm.vocab.eos_id] + [lm.vocab.index[w] for w in words]
    z, _ = lm.model.logits(np.array(ids[:-1], np.int32)[:, None], lm.model.zero_state(1))
    np.testing.assert_array_equal(np.argmax(z[:, 0], axis=1), ids[1:])


def test_generation_samples_the_word_major_logits(lm, monkeypatch):
    """The slim layer has one layout: each drawn word runs the word-major
    gather-sum over the C streams, and the (N, V) logits generation reads
    are the transposed view of slim_logits_t's (V, N) array, the same bits."""
    from slimnp import kernels
    from slimnp.layers import slim_logits_t

    out, V = lm.model.output, lm.model.config.vocab_size
    assert out.strategy == "dp"
    calls = []
    gather = kernels.slim_gather_sum_t
    monkeypatch.setattr(kernels, "slim_gather_sum_t", lambda *a: (calls.append(a[3].shape), gather(*a))[1])
    lm.generate("", length=6, seed=2, count=3, stop_at_eos=False)
    assert calls == [(V, 3)] * 6
    h = np.random.default_rng(0).standard_normal((5, out.H)).astype(lm.model.dtype)
    z = out.logits(h)
    zT, _ = slim_logits_t(h, lm.model.store.params["output/A"], out.idx_kv, lm.model.store.params["output/b"])
    assert z.shape == (5, V) and z.base is not None  # a view, not a second array
    np.testing.assert_array_equal(z, zT.T)


def test_generate_validates(lm):
    for kw in ({"temperature": 0.0}, {"top_k": -1}, {"count": 0}, {"length": -1}):
        with pytest.raises(ValueError):
            lm.generate("", **kw)


def test_cli_score_text_json_and_words(trained):
    model, test = trained
    r = CliRunner().invoke(main, ["score", str(model), str(test), "-q"])
    assert r.exit_code == 0, r.output
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    lines = _lines(test)
    assert len(rows) == len(lines) and rows[0][5] == lines[0]
    lm = inference.load(model)
    want = lm.score(lines)
    assert float(rows[0][0]) == pytest.approx(want[0].logprob, abs=1e-4)
    assert "perplexity" in r.stderr
    r = CliRunner().invoke(main, ["score", str(model), str(test), "-q", "--json", "--words"])
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(objs) == len(lines) + 1 and "total" in objs[-1]
    assert objs[1]["logprob"] == pytest.approx(want[1].logprob)
    assert [w["word"] for w in objs[1]["words"]] == want[1].words
    total = objs[-1]["total"]
    assert total["tokens"] == sum(s.tokens for s in want)
    assert total["perplexity"] == pytest.approx(np.exp(-sum(s.logprob for s in want) / total["tokens"]))


def test_cli_score_stdin_and_errors(trained, tmp_path):
    model, test = trained
    r = CliRunner().invoke(main, ["score", str(model), "-", "-q"], input="w0001 w0002\n")
    assert r.exit_code == 0 and r.stdout.count("\n") == 1
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"w0001\nw0002 \xff\n")
    r = CliRunner().invoke(main, ["score", str(model), str(bad)])
    assert r.exit_code == 1 and "bad.txt:2: not valid UTF-8" in r.output
    r = CliRunner().invoke(main, ["score", str(tmp_path / "none.h5"), str(test)])
    assert r.exit_code == 1 and "Traceback" not in r.output


def test_cli_generate_seeded(trained):
    model, _ = trained
    args = ["generate", str(model), "--count", "3", "--length", "12", "--seed", "7", "--top-k", "20"]
    a, b = CliRunner().invoke(main, args), CliRunner().invoke(main, args)
    assert a.exit_code == 0 and a.stdout == b.stdout and len(a.stdout.splitlines()) == 3
    r = CliRunner().invoke(main, ["generate", str(model), "--temperature", "0"])
    assert r.exit_code == 2 and "temperature" in r.output
