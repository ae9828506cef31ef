"""Training runs: loss falls, exact resume after an interrupt, NaN handling."""
import json
import signal

import numpy as np
import pytest

from slimnp import io as sio
from slimnp.optim import SGD
from slimnp.model import ModelConfig
from slimnp.options import configs
from slimnp.trainer import TrainConfig, TrainingError, resume_training, run_training

from helpers import TINY_HP, tiny_corpus


def _run(files, out, **kw):
    return run_training(files, out, *configs({**TINY_HP, **kw}), log=lambda m: None, progress=False)


def test_library_configs_and_cli_options_train_the_same_model(tmp_path):
    """run_training takes a ModelConfig and a TrainConfig; the CLI's options
    reach it through slimnp.options and give the same model bit for bit."""
    files, _ = tiny_corpus(tmp_path / "c", tokens=6000)
    hp = {**TINY_HP, "epochs": 1, "input": "slim", "input_k": 2, "input_ratio": 0.5}
    a = run_training(files, tmp_path / "a.h5", *configs(hp, seed=3), log=lambda m: None, progress=False)
    V = sio.load(tmp_path / "a.h5").config["model"]["vocab_size"]
    mc = ModelConfig(vocab_size=0, hidden=16, layers=2, dropout=0.1, init_scale=0.1, input="slim",
                     input_k=2, input_m=round(0.5 * 2 * V))
    tc = TrainConfig(epochs=1, bptt=7, batch_size=4, lr=1.0, schedule="epoch", lr_decay=0.5,
                     decay_start=1, decay_threshold=1.0, clip=5.0, seed=3)
    b = run_training(files, tmp_path / "b.h5", mc, tc, log=lambda m: None, progress=False)
    assert a["test_ppl"] == b["test_ppl"]
    pa, pb = sio.load(tmp_path / "a.h5").params, sio.load(tmp_path / "b.h5").params
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    # a vocab_size other than the vocabulary's, a missing or doubled model, a dict
    with pytest.raises(ValueError, match=f"vocab_size is 7 but the vocabulary has {V} words"):
        run_training(files, tmp_path / "c.h5", ModelConfig(vocab_size=7), tc, log=lambda m: None)
    with pytest.raises(TypeError, match="exactly one of model"):
        run_training(files, tmp_path / "c.h5", None, tc, log=lambda m: None)
    with pytest.raises(TypeError, match="exactly one of model"):
        run_training(files, tmp_path / "c.h5", mc, tc, init_from=tmp_path / "a.h5", log=lambda m: None)
    with pytest.raises(TypeError, match="train must be a TrainConfig"):
        run_training(files, tmp_path / "c.h5", mc, dict(TINY_HP), log=lambda m: None)
    assert not (tmp_path / "c.h5").exists()


def test_configs_from_dict_are_strict():
    tc = TrainConfig(epochs=3, lr=0.5)
    assert TrainConfig.from_dict(tc.to_dict()) == tc
    with pytest.raises(ValueError, match="unknown training config keys: epoch, lr_decy"):
        TrainConfig.from_dict({**tc.to_dict(), "lr_decy": 0.5, "epoch": 3})
    mc = ModelConfig(vocab_size=50, hidden=8, input="slim", input_k=2, input_m=10)
    assert ModelConfig.from_dict(mc.to_dict()) == mc
    with pytest.raises(ValueError, match="unknown model config keys: hiden"):
        ModelConfig.from_dict({**mc.to_dict(), "hiden": 9})


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
    from slimnp.modelfile import load_model
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


# ---------------------------------------------------------------------------
# one training step
# ---------------------------------------------------------------------------
def _trainer(tmp_path, files, name="m.h5", **kw):
    """A fresh Trainer on the tiny corpus (TINY_HP, dropout on, and ``kw``)."""
    from slimnp.data import Vocabulary
    from slimnp.model import LanguageModel
    from slimnp.trainer import Trainer

    vocab = Vocabulary.build(files["train"])
    model_of, tc = configs({**TINY_HP, "epochs": 1, **kw}, seed=5)
    t = Trainer(LanguageModel(model_of(len(vocab))), vocab, vocab.encode_file(files["train"]).ids,
                vocab.encode_file(files["valid"]).ids, tc, tmp_path / name, log=lambda m: None,
                progress=False)
    t.init_params()
    return t


def _segments(t, n):
    from slimnp.data import segment

    return [tuple(np.ascontiguousarray(a.T) for a in segment(t.streams, i, t.config.bptt))
            for i in range(n)]


@pytest.mark.parametrize("extra", [{}, dict(optimizer="adagrad", lr=0.2, loss="is", samples=15)])
def test_step_is_zero_grad_forward_backward_clip_update(tmp_path, extra):
    """Trainer.step is the step the benchmarks wrote by hand: zero the
    gradients, forward + BPTT from the carried state (dropout and noise words
    from the trainer's generator), clip, update at state.lr; bit for bit."""
    files, _ = tiny_corpus(tmp_path / "c")
    a, b = _trainer(tmp_path, files, "a.h5", **extra), _trainer(tmp_path, files, "b.h5", **extra)
    m, opt = b.model, b.optimizer
    state, B = m.zero_state(4), 4
    for x, y in _segments(a, 12):
        done = a.step(x, y)
        m.store.zero_grad(lazy=True)
        nll, state, _ = m.forward_backward(x, y, state, 1.0 / B, b.rng, sampled=b.sampled)
        opt.step(m.store.data, m.store.grad, b.state.lr, m.store.segments())
        assert done.nll == nll and done.stop is None and done.checkpoint is False
    np.testing.assert_array_equal(a.model.store.data, m.store.data)
    np.testing.assert_array_equal(a.hidden, state)
    assert (a.state.segment, a.state.epoch_tokens, a.state.tokens_seen) == (12, 12 * 7 * 4, 12 * 7 * 4)
    # the answers it was asked for come back; a bad shape is refused
    done = a.step(x, y, stop=lambda: "SIGTERM", checkpoint_due=lambda: True)
    assert (done.stop, done.checkpoint) == ("SIGTERM", True)
    with pytest.raises(ValueError, match=r"must both be \(t, 4\) arrays"):
        a.step(x[:, :3], y[:, :3])


def test_train_is_one_step_per_segment(tmp_path):
    """An epoch of Trainer.train gives exactly the parameters of Trainer.step
    over the epoch's segments in order."""
    files, _ = tiny_corpus(tmp_path / "c")
    a, b = _trainer(tmp_path, files, "a.h5"), _trainer(tmp_path, files, "b.h5")
    a.train()
    nll = sum(b.step(x, y).nll for x, y in _segments(b, b.segments_per_epoch))
    np.testing.assert_array_equal(a.model.store.data, b.model.store.data)
    assert a.state.history[0]["train_loss"] == nll / b.state.epoch_tokens


def test_step_stops_on_a_nan_loss_before_the_update(tmp_path, monkeypatch):
    from slimnp.model import LanguageModel

    files, _ = tiny_corpus(tmp_path / "c")
    t = _trainer(tmp_path, files)
    (x, y), = _segments(t, 1)
    before, hidden = t.model.store.data.copy(), t.hidden.copy()
    orig = LanguageModel.forward_backward
    monkeypatch.setattr(LanguageModel, "forward_backward",
                        lambda self, *a, **k: (float("inf"), *orig(self, *a, **k)[1:]))
    with pytest.raises(TrainingError, match=f"loss became inf at epoch 1, segment 1/{t.segments_per_epoch} "):
        t.step(x, y)
    np.testing.assert_array_equal(t.model.store.data, before)
    np.testing.assert_array_equal(t.hidden, hidden)
    assert t.state.segment == 0


# ---------------------------------------------------------------------------
# checkpoints inside an epoch
# ---------------------------------------------------------------------------
def _step_clock(monkeypatch):
    """The checkpoint clock in training steps: one "minute" per step."""
    from slimnp import trainer
    from slimnp.model import LanguageModel

    steps = [0]
    orig = LanguageModel.forward_backward

    def counted(self, *a, **kw):
        steps[0] += 1
        return orig(self, *a, **kw)

    monkeypatch.setattr(LanguageModel, "forward_backward", counted)
    monkeypatch.setattr(trainer, "_clock", lambda: 60.0 * steps[0])


def test_timed_checkpoints_inside_epochs_resume_bit_exactly(tmp_path, monkeypatch):
    """A checkpoint every 10 steps (the clock counts steps), none after an
    epoch's last step; each is resumable to exactly the uninterrupted end."""
    import shutil

    from slimnp.trainer import Trainer

    files, _ = tiny_corpus(tmp_path / "c")
    extra = dict(optimizer="adagrad", lr=0.2, loss="is", samples=15)  # state and RNG carried
    _run(files, tmp_path / "full.h5", **extra)
    full = sio.load(tmp_path / "full.h5")

    _step_clock(monkeypatch)
    copies = []
    orig = Trainer._save_inside_epoch

    def save_and_copy(self, t0):
        took = orig(self, t0)
        copies.append(tmp_path / f"at{len(copies)}.h5")
        shutil.copy(self.out, copies[-1])
        return took

    monkeypatch.setattr(Trainer, "_save_inside_epoch", save_and_copy)
    run_training(files, tmp_path / "timed.h5", *configs({**TINY_HP, **extra}), log=lambda m: None,
                 progress=False, checkpoint_every=10)
    recs = [json.loads(l) for l in (tmp_path / "timed.metrics.jsonl").read_text().splitlines()]
    nseg = 214  # 6000 tokens / 4 streams, bptt 7
    points = [(r["epoch"], r["segment"]) for r in recs if r["event"] == "checkpoint"]
    # every 10 steps, restarting at each epoch end (which writes one itself)
    assert points == [(e, s) for e in (1, 2) for s in range(10, nseg, 10)], points
    assert [r["event"] for r in recs].count("epoch") == 2
    timed = sio.load(tmp_path / "timed.h5")
    for k in full.params:  # writing them changed nothing
        np.testing.assert_array_equal(timed.params[k], full.params[k], err_msg=k)
    monkeypatch.undo()
    for i in (0, 25):  # (1, 10) and (2, 50)
        st = sio.load(copies[i]).train_state
        assert (st["epoch"], st["segment"], st["finished"]) == points[i] + (False,)
        resume_training(copies[i], log=lambda m: None, progress=False, checkpoint_every=0)
        got = sio.load(copies[i])
        for k in full.params:
            np.testing.assert_array_equal(got.params[k], full.params[k], err_msg=f"{i} {k}")
        np.testing.assert_array_equal(got.optimizer["accumulator"], full.optimizer["accumulator"])


def _cli(args, timeout=120):
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "slimnp", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_after_a_mid_epoch_checkpoint_resumes_bit_exactly(tmp_path):
    """kill -9 (no handler runs) once the file holds a checkpoint from inside
    epoch 2; `train --resume` then ends with the uninterrupted run's bits."""
    import os
    import signal
    import time

    files, _ = tiny_corpus(tmp_path / "c", tokens=12000)
    opts = ["--train", files["train"], "--valid", files["valid"], "--test", files["test"], "-q",
            "--epochs", "3", "--layers", "2", "--hidden", "16", "--batch-size", "4", "--bptt", "7",
            "--dropout", "0.1", "--optimizer", "adagrad", "--lr", "0.2", "--threads", "1"]
    ref = _cli(["train", *opts, "--out", tmp_path / "ref.h5", "--checkpoint-every", "0"])
    p = _cli(["train", *opts, "--out", tmp_path / "m.h5", "--checkpoint-every", "0.0005"])  # 30 ms
    deadline, st = time.monotonic() + 120, None
    while time.monotonic() < deadline and p.poll() is None:
        try:
            st = sio.load(tmp_path / "m.h5", params=False, optimizer=False).train_state
        except sio.FormatError:  # not written yet
            st = None
        if st and st["epoch"] == 2 and st["segment"] > 0:
            break
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    st = sio.load(tmp_path / "m.h5").train_state
    assert st["epoch"] >= 2 and 0 < st["segment"] and not st["finished"], st
    r = _cli(["train", "--resume", tmp_path / "m.h5", "-q", "--threads", "1"])
    out, err = r.communicate(timeout=120)
    assert r.returncode == 0, out + err
    # a temporary file the kill left behind is gone with the next write
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    assert f"resuming {tmp_path / 'm.h5'}: epoch {st['epoch']}, segment {st['segment']}/" in out
    assert ref.wait(timeout=120) == 0
    want, got = sio.load(tmp_path / "ref.h5"), sio.load(tmp_path / "m.h5")
    assert got.train_state["finished"]
    for k in want.params:
        np.testing.assert_array_equal(got.params[k], want.params[k], err_msg=k)
    np.testing.assert_array_equal(got.optimizer["accumulator"], want.optimizer["accumulator"])


def test_progress_line_says_when_the_checkpoint_was_written(tmp_path, monkeypatch):
    import io

    from slimnp import progress, trainer

    files, _ = tiny_corpus(tmp_path / "c")
    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    monkeypatch.setattr(progress.Progress, "__init__", _always_draw(progress.Progress.__init__))
    now = [1000.0]
    monkeypatch.setattr(trainer, "_clock", lambda: now[0])
    run_training(files, tmp_path / "m.h5", *configs({**TINY_HP, "epochs": 2}), log=lambda m: None,
                 progress=True, checkpoint_every=10)
    lines = stream.getvalue().splitlines()
    assert "no checkpoint yet" in lines[0]
    assert any("epoch 2/2" in l and "saved 0:00 ago" in l for l in lines), lines[-3:]


def _always_draw(init):
    def wrapped(self, *a, **kw):
        init(self, *a, **kw)
        self.interval = 0.0
    return wrapped


def test_best_epoch_before_the_last_is_the_one_tested(tmp_path, monkeypatch):
    """The final test reads the best model's parameters into the model (no
    second copy in memory) and the final ones back afterwards."""
    from slimnp.evaluate import evaluate_ids
    from slimnp.modelfile import load_model
    from slimnp.trainer import Trainer

    files, _ = tiny_corpus(tmp_path / "c")
    ppl = iter([50.0, 60.0])  # epoch 1 is the best
    monkeypatch.setattr(Trainer, "validate", lambda self, ids: next(ppl))
    seen = []
    orig = Trainer.train

    def keep(self):
        seen.append(self)
        return orig(self)

    monkeypatch.setattr(Trainer, "train", keep)
    s = _run(files, tmp_path / "m.h5")
    best, vocab, _ = load_model(tmp_path / "m.best.h5")
    assert sio.load(tmp_path / "m.best.h5").train_state["epoch"] == 2  # written after epoch 1
    want = evaluate_ids(best, vocab.encode_file(files["test"]).ids, vocab.eos_id).perplexity
    assert s["test_ppl"] == want and s["best_valid_ppl"] == 50.0
    final = sio.load(tmp_path / "m.h5").params
    for k, v in seen[0].model.params_numpy().items():  # the final parameters again
        np.testing.assert_array_equal(v, final[k], err_msg=k)
