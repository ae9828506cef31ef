"""slimnp.runs: a training run as a library call (what `slimnp train` does)."""
import numpy as np
import pytest
from click.testing import CliRunner

from slimnp.cli import main
from slimnp.io import load
from slimnp.options import OptionError
from slimnp.runs import data_files, train
from slimnp.trainer import TrainingError

from helpers import tiny_corpus

TINY = dict(layers=1, hidden=16, epochs=1, bptt=10, batch_size=8, quiet=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "corpus"
    tiny_corpus(d, tokens=4000)
    return d


def test_the_library_call_is_the_command(corpus, tmp_path):
    """runs.train(options) and `slimnp train` with the same options write the
    same model, bit for bit."""
    opts = dict(TINY, data=str(corpus), input_kind="slim", input_k=4, input_ratio=0.25, seed=2)
    summary = train({**opts, "out": str(tmp_path / "lib.h5")}, log=lambda m: None)
    assert summary["finished"] and np.isfinite(summary["test_ppl"])
    argv = ["train", "--data", corpus, "--layers", 1, "--hidden", 16, "--epochs", 1, "--bptt", 10,
            "--batch-size", 8, "-q", "--input", "slim", "--input-k", 4, "--input-ratio", 0.25,
            "--seed", 2, "--out", tmp_path / "cli.h5"]
    r = CliRunner().invoke(main, [str(a) for a in argv])
    assert r.exit_code == 0, r.output
    a, b = load(tmp_path / "lib.h5"), load(tmp_path / "cli.h5")
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k


def test_an_existing_output_is_kept(corpus, tmp_path):
    out = tmp_path / "m.h5"
    out.write_bytes(b"precious")
    with pytest.raises(TrainingError, match="exists; continue it with"):
        train(dict(TINY, data=str(corpus), out=str(out)), log=lambda m: None)
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("extra, words", [
    ({"hidden": 32}, "--hidden cannot change"),
    ({"input_kind": "slim"}, "input/output/mapping/tie cannot change"),
    ({"out": "x.h5"}, "data/--out options cannot change"),
])
def test_resume_takes_the_run_from_the_file(corpus, tmp_path, extra, words):
    out = tmp_path / "m.h5"
    train(dict(TINY, data=str(corpus), out=str(out)), log=lambda m: None)
    with pytest.raises(OptionError, match=words):
        train({"resume": str(out), **extra}, log=lambda m: None)


def test_init_from_takes_the_model_from_the_file(corpus, tmp_path):
    out = tmp_path / "m.h5"
    train(dict(TINY, data=str(corpus), out=str(out)), log=lambda m: None)
    with pytest.raises(OptionError, match="--hidden cannot be given"):
        train({"init_from": str(out), "data": str(corpus), "hidden": 8}, log=lambda m: None)
    with pytest.raises(OptionError, match="needs the training data"):
        train({"init_from": str(out)}, log=lambda m: None)


def test_data_files(corpus, tmp_path):
    assert set(data_files({"data": str(corpus)})) >= {"train", "valid", "test"}
    assert data_files({}) is None
    with pytest.raises(OptionError, match="not both"):
        data_files({"data": str(corpus), "train_file": "t.txt"})
    with pytest.raises(OptionError, match="--train needs --valid"):
        data_files({"train_file": str(corpus / "train.txt")})
    with pytest.raises(OptionError, match="need --train"):
        data_files({"test_file": "t.txt"})


def test_training_keep_and_flush_agree_where_no_denormals_arise(corpus, tmp_path):
    """A tiny run (no value near 1e-38 arises in a few steps from a fresh
    model) gives the same bits either way, and the setting does not outlive
    the run."""
    from slimnp import threads

    base = dict(TINY, data=str(corpus), seed=3)
    threads.flush_denormals(False)
    out = {}
    for mode in ("keep", "flush"):
        summary = train(dict(base, denormals=mode, out=str(tmp_path / f"{mode}.h5")),
                        log=lambda m: None)
        assert summary["finished"] and not threads.denormals_are_flushed()
        out[mode] = (summary, load(tmp_path / f"{mode}.h5"))
    (sk, mk), (sf, mf) = out["keep"], out["flush"]
    assert sk["test_ppl"] == sf["test_ppl"]
    assert mk.params.keys() == mf.params.keys()
    for k in mk.params:
        assert np.array_equal(mk.params[k], mf.params[k]), k
