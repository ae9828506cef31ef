"""Training runs: loss falls, exact resume after an interrupt, NaN handling."""
import json
import signal

import numpy as np
import pytest

from slimnp import io as sio
from slimnp.optim import SGD, Schedule, clip_global_norm
from slimnp.trainer import TrainingError, resume_training, run_training

from helpers import TINY_HP, tiny_corpus


def _run(files, out, **kw):
    return run_training(files, out, {**TINY_HP, **kw}, log=lambda m: None, progress=False)


def test_tiny_run_learns_and_writes_files(tmp_path):
    files, info = tiny_corpus(tmp_path / "c", tokens=20000)
    s = _run(files, tmp_path / "m.h5", epochs=3, dropout=0.0, layers=1, hidden=32, batch_size=8,
             bptt=10, lr=2.0, init_scale=0.3, decay_start=1)
    assert s["finished"] and s["epochs_done"] == 3
    hist = [json.loads(l) for l in (tmp_path / "m.metrics.jsonl").read_text().splitlines()]
    epochs = [h for h in hist if h["event"] == "epoch"]
    assert len(epochs) == 3
    assert epochs[-1]["valid_ppl"] < epochs[0]["valid_ppl"]
    # it learned context: clearly better than counting words (unigram)
    assert s["test_ppl"] < 0.9 * info["unigram_perplexity"]["test"]
    assert (tmp_path / "m.best.h5").exists()
    ck = sio.load(tmp_path / "m.h5")
    assert ck.train_state["finished"] and ck.train_state["epoch"] == 4
    # Zaremba schedule with decay_start=1: lr 1, 0.5, 0.25
    assert [h["lr"] for h in epochs] == [2.0, 1.0, 0.5]  # Zaremba decay after epoch 1


@pytest.mark.parametrize("extra", [{}, {"loss": "is", "samples": 15}, {"loss": "nce", "samples": 15}],
                         ids=["softmax", "is", "nce"])
def test_interrupt_and_resume_is_bit_exact(tmp_path, monkeypatch, extra):
    files, _ = tiny_corpus(tmp_path / "c")
    _run(files, tmp_path / "full.h5", **extra)
    full = sio.load(tmp_path / "full.h5").params

    # Same run, with SIGINT delivered in the middle of epoch 1 (dropout is on,
    # so the RNG state must be restored too).
    calls = {"n": 0}
    orig = SGD.step

    def step(self, params, grad, lr, segments=None):
        calls["n"] += 1
        if calls["n"] == 9:
            signal.raise_signal(signal.SIGINT)
        return orig(self, params, grad, lr, segments)

    monkeypatch.setattr(SGD, "step", step)
    s = _run(files, tmp_path / "part.h5", **extra)
    monkeypatch.setattr(SGD, "step", orig)
    assert not s["finished"]
    st = sio.load(tmp_path / "part.h5").train_state
    assert st["epoch"] == 1 and st["segment"] == 9
    s2 = resume_training(tmp_path / "part.h5", log=lambda m: None, progress=False)
    assert s2["finished"]
    resumed = sio.load(tmp_path / "part.h5").params
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)


def test_sampled_training_is_checkpointed_and_evaluated_exactly(tmp_path):
    """--loss is: the objective is in the file's config, validation is exact."""
    files, _ = tiny_corpus(tmp_path / "c")
    s = _run(files, tmp_path / "m.h5", loss="is", samples=10, epochs=1)
    cfg = sio.read_config(tmp_path / "m.h5")
    assert cfg["train"]["loss"] == "is" and cfg["train"]["samples"] == 10
    from slimnp.trainer import load_model
    from slimnp.evaluate import evaluate_ids

    model, vocab, _ = load_model(tmp_path / "m.best.h5")
    test_ids = vocab.encode_file(files["test"]).ids
    assert evaluate_ids(model, test_ids, vocab.eos_id).perplexity == pytest.approx(s["test_ppl"], rel=1e-9)
    with pytest.raises(ValueError, match="loss"):
        _run(files, tmp_path / "bad.h5", loss="hinge")


def test_resume_extends_epochs_and_refuses_finished(tmp_path):
    files, _ = tiny_corpus(tmp_path / "c")
    _run(files, tmp_path / "m.h5", epochs=1)
    with pytest.raises(TrainingError, match="already finished"):
        resume_training(tmp_path / "m.h5", log=lambda m: None, progress=False)
    s = resume_training(tmp_path / "m.h5", epochs=2, log=lambda m: None, progress=False)
    assert s["epochs_done"] == 2


def test_resume_detects_changed_data(tmp_path):
    files, _ = tiny_corpus(tmp_path / "c")
    _run(files, tmp_path / "m.h5", epochs=1)
    with open(files["train"], "a") as f:
        f.write("w1 w2\n")
    with pytest.raises(TrainingError, match="changed"):
        resume_training(tmp_path / "m.h5", epochs=2, log=lambda m: None, progress=False)


def test_nan_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    files, _ = tiny_corpus(tmp_path / "c")
    _run(files, tmp_path / "m.h5", epochs=1)
    before = sio.load(tmp_path / "m.h5").params
    from slimnp.model import LanguageModel

    orig = LanguageModel.forward_backward

    def poisoned(self, *a, **k):
        nll, s, d = orig(self, *a, **k)
        return float("nan"), s, d

    monkeypatch.setattr(LanguageModel, "forward_backward", poisoned)
    with pytest.raises(TrainingError, match="loss became nan"):
        resume_training(tmp_path / "m.h5", epochs=2, log=lambda m: None, progress=False)
    after = sio.load(tmp_path / "m.h5").params
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_clip_and_schedules():
    g = np.array([3.0, 4.0])
    assert clip_global_norm(g, 1.0) == 5.0
    np.testing.assert_allclose(g, [0.6, 0.8])
    z = Schedule("epoch", 1.0, 0.5, start=4)
    assert [z.next_lr(None, e, None, None) for e in range(1, 8)] == [1, 1, 1, 0.5, 0.25, 0.125, 0.0625]
    k = Schedule("plateau", 1.0, 0.5, threshold=1.0)
    assert k.next_lr(1.0, 1, float("inf"), 100.0) == 1.0
    assert k.next_lr(1.0, 2, 100.0, 99.5) == 0.5
    assert k.next_lr(1.0, 2, 100.0, 90.0) == 1.0
