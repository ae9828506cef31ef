"""`slimnp rerank`: an LM feature added to n-best lists raises BLEU.

The fixture is the project's own (slimnp.mt.fakemt): sentences of an HMM
corpus, each turned into an n-best list by random edits, with a "translation
model" feature that only partly knows how damaged a hypothesis is.  A model
trained on the same HMM's text knows its word order, so adding it as a
feature must raise BLEU on held-out sentences.
"""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from slimnp.mt import fakemt, nbest
from slimnp.cli import main
from slimnp.synthetic import HMMSpec, write_corpus
from slimnp.trainer import run_training
from slimnp.options import configs

HP = dict(layers=1, hidden=32, dropout=0.0, init_scale=0.1, epochs=3, bptt=10, batch_size=16, lr=1.0,
          schedule="epoch", lr_decay=0.5, decay_start=1, decay_threshold=1.0, clip=5.0)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("rerank")
    write_corpus(d, HMMSpec(vocab=100, states=8, seed=0, support=20), 40000, 2000, 2000)
    files = {s: d / f"{s}.txt" for s in ("train", "valid", "test")}
    run_training(files, d / "m.h5", *configs(HP), log=lambda m: None, progress=False)
    dev = fakemt.write_task(files["valid"].read_text().splitlines(), d, "dev", n=20, seed=1)
    test = fakemt.write_task(files["test"].read_text().splitlines(), d, "test", n=20, seed=2)
    return d / "m.h5", dev, test


def _run(*args):
    r = CliRunner().invoke(main, ["rerank", *map(str, args), "-q"])
    assert r.exit_code == 0, r.output
    return r


def test_lm_feature_raises_bleu(task, tmp_path):
    model, dev, test = task
    r = _run(model, test["nbest"], "--tune", dev["nbest"], "--refs", dev["ref"], "--test-refs", test["ref"],
             "--json", "--out", tmp_path / "out.nbest", "--best", tmp_path / "out.txt")
    s = json.loads(r.stdout)
    dev_b, test_b = s["dev_bleu"], s["test_bleu"]
    # the fixture is hard for the TM feature alone ...
    assert test_b["decoder"] < 95
    # ... tuning without the LM gains little; with it, clearly more, on held-out sentences too
    assert dev_b["tuned_lm"] >= dev_b["tuned_no_lm"] >= dev_b["decoder"]
    assert test_b["tuned_lm"] > test_b["decoder"] + 0.5
    assert test_b["tuned_lm"] > test_b["tuned_no_lm"] + 0.5
    w = nbest.parse_weights(s["weights"])
    assert w["SlimLM0"][0] > 0  # a likelier sentence is a better translation
    # the written 1-best is what the reported BLEU scored (sacrebleu agrees)
    best = (tmp_path / "out.txt").read_text().splitlines()
    from slimnp.mt.bleu import corpus_bleu

    refs = test["ref"].read_text().splitlines()
    assert corpus_bleu(best, refs) == pytest.approx(test_b["tuned_lm"], abs=1e-9)
    if "sacrebleu_reranked" in test_b:
        assert test_b["sacrebleu_reranked"] == pytest.approx(test_b["tuned_lm"], abs=1e-6)
    # the reranked list: every hypothesis carries the LM feature, best first
    groups = nbest.read_nbest(tmp_path / "out.nbest")
    for g in groups:
        assert all(len(h.feature("SlimLM0")) == 1 for h in g)
        scores = [h.score for h in g]
        assert scores == sorted(scores, reverse=True)
    assert [g[0].text for g in groups] == best


def test_library_entry_point_is_the_command(task, tmp_path):
    """slimnp.mt.rerank_nbest gives what `slimnp rerank` prints and writes."""
    import slimnp
    from slimnp.mt import rerank_nbest

    model, dev, test = task
    r = _run(model, test["nbest"], "--tune", dev["nbest"], "--refs", dev["ref"], "--test-refs", test["ref"],
             "--json", "--out", tmp_path / "cli.nbest", "--best", tmp_path / "cli.txt")
    res = rerank_nbest(slimnp.load(model), test["nbest"], dev_nbest=dev["nbest"], dev_refs=dev["ref"],
                       test_refs=test["ref"], out=tmp_path / "lib.nbest", best=tmp_path / "lib.txt")
    assert res.reranked and res.summary == json.loads(r.stdout)
    assert res.best == (tmp_path / "cli.txt").read_text().splitlines()
    assert (tmp_path / "lib.txt").read_bytes() == (tmp_path / "cli.txt").read_bytes()
    assert (tmp_path / "lib.nbest").read_bytes() == (tmp_path / "cli.nbest").read_bytes()
    assert res.report()[0] == f"weights: {res.summary['weights']}"
    with pytest.raises(ValueError, match="dev_refs"):
        rerank_nbest(slimnp.load(model), test["nbest"], dev_nbest=dev["nbest"])


def test_lm_feature_equals_score_command(task):
    """The added feature is the sentence's log-probability from `slimnp score`."""
    model, _, test = task
    r = _run(model, test["nbest"], "--best", "/dev/null", "--out", test["nbest"].with_suffix(".lm"))
    groups = nbest.read_nbest(test["nbest"].with_suffix(".lm"))
    import slimnp

    lm = slimnp.load(model)
    texts = [h.text for h in groups[0][:5]]
    want = [s.logprob for s in lm.score(texts)]
    got = [h.feature("SlimLM0")[0] for h in groups[0][:5]]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert "order is the decoder's" in r.stderr
    # without weights nothing moves: same hypotheses, same order, same scores
    orig = nbest.read_nbest(test["nbest"])
    assert [[(h.text, h.score) for h in g] for g in groups] == [[(h.text, h.score) for h in g] for g in orig]


def test_given_weights_rerank(task, tmp_path):
    model, _, test = task
    r = _run(model, test["nbest"], "--weights", "TM0=1 WordPenalty0=0 SlimLM0=0", "--test-refs", test["ref"],
             "--json", "--best", tmp_path / "b.txt")
    s = json.loads(r.stdout)
    # the decoder's own weights (its score is TM0) reproduce its 1-best
    assert s["test_bleu"]["reranked"] == pytest.approx(s["test_bleu"]["decoder"])


def test_rerank_errors(task, tmp_path):
    model, dev, test = task
    runner = CliRunner()
    r = runner.invoke(main, ["rerank", str(model), str(test["nbest"]), "--weights", "TM0=1"])
    assert r.exit_code == 1 and "SlimLM0" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["rerank", str(model), str(test["nbest"]), "--tune", str(dev["nbest"])])
    assert r.exit_code == 2 and "--refs" in r.output
    bad = tmp_path / "bad.nbest"
    bad.write_text("0 ||| a b ||| TM0= -1 ||| -1\n0 ||| a c ||| TM0= x ||| -1\n")
    r = runner.invoke(main, ["rerank", str(model), str(bad)])
    assert r.exit_code == 1 and "bad.nbest:2" in r.output
    short = tmp_path / "short.ref"
    short.write_text("only one line\n")
    r = runner.invoke(main, ["rerank", str(model), str(test["nbest"]), "--test-refs", str(short)])
    assert r.exit_code == 1 and "no reference" in r.output


def test_fakemt_lists_are_seeded_and_partly_informative(task):
    refs = ["a b c d e f g h", "b c d e f g h i j"]
    a = fakemt.make_nbest(refs, n=10, seed=5)
    assert a == fakemt.make_nbest(refs, n=10, seed=5) and a != fakemt.make_nbest(refs, n=10, seed=6)
    groups = nbest.parse_nbest([line + "\n" for line in a])
    assert [g[0].sent_id for g in groups] == [0, 1]
    for g in groups:
        assert len({h.text for h in g}) == len(g)  # no duplicates
        assert [h.score for h in g] == sorted((h.score for h in g), reverse=True)
        assert all(h.feature("WordPenalty0")[0] == -len(h.text.split()) for h in g)
    with pytest.raises(ValueError):
        fakemt.make_nbest(refs, n=0)


def test_cli_data_nbest(tmp_path):
    refs = tmp_path / "refs.txt"
    refs.write_text("a b c d e\n\nf g h i\n")
    r = CliRunner().invoke(main, ["data", "nbest", str(refs), str(tmp_path / "o"), "--name", "dev", "--n", "4"])
    assert r.exit_code == 0, r.output
    groups = nbest.read_nbest(tmp_path / "o" / "dev.nbest")
    assert len(groups) == 2 and all(1 <= len(g) <= 4 for g in groups)  # blank line skipped
    assert (tmp_path / "o" / "dev.ref").read_text() == "a b c d e\nf g h i\n"
    r = CliRunner().invoke(main, ["data", "nbest", str(refs), str(tmp_path / "o"), "--min-edits", "3",
                                  "--max-edits", "1"])
    assert r.exit_code == 1 and "min_edits" in r.output
