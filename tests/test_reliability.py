"""Long runs that lose nothing (issue 17): strict JSON from every ``--json``,
output paths checked before any work, one-line I/O errors that keep the old
files, a real full disk, and the memory estimate against measured peaks.

(Checkpoints inside an epoch and a SIGKILL-then-resume are in
test_trainer.py, the timer under MPI in test_distributed.py, checksums in
test_io.py.)
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from slimnp import _atomic, memory
from slimnp.cli import main
from slimnp.model import ModelConfig, param_shapes

from helpers import tiny_corpus

TINY = ["--layers", "1", "--hidden", "16", "--epochs", "1", "--bptt", "10", "--batch-size", "8",
        "-q", "--threads", "1"]


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def _reject(token):
    raise ValueError(f"not strict JSON: {token}")


def strict_lines(text: str) -> list:
    """Every line of ``text`` parsed as JSON, rejecting NaN/Infinity."""
    return [json.loads(line, parse_constant=_reject) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    files, _ = tiny_corpus(d / "corpus", tokens=4000)
    r = CliRunner().invoke(main, ["train", "--data", str(d / "corpus"), "--out", str(d / "m.h5"),
                                  "--json", *TINY])
    assert r.exit_code == 0, r.output
    return d, files


# ---------------------------------------------------------------------------
# strict JSON
# ---------------------------------------------------------------------------
def _interrupted_run(d, files, monkeypatch, out):
    """`train --json` stopped by SIGINT in its 3rd step: no epoch finished."""
    from slimnp.optim import SGD

    calls, orig = [0], SGD.step

    def step(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGINT)
        return orig(self, *a, **kw)

    monkeypatch.setattr(SGD, "step", step)
    r = CliRunner().invoke(main, ["train", "--data", str(d / "corpus"), "--out", str(out), "--json",
                                  *TINY])
    monkeypatch.setattr(SGD, "step", orig)
    return r


def test_every_json_output_is_strict_on_normal_and_empty_inputs(trained, tmp_path, monkeypatch):
    d, files = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    # train: a finished run, and one stopped before its first epoch ended
    r = _interrupted_run(d, files, monkeypatch, tmp_path / "stopped.h5")
    assert r.exit_code == 0, r.output
    s = strict_lines(r.stdout)[-1]
    assert not s["finished"] and s["best_valid_ppl"] is None
    assert s["best_valid_ppl_reason"] == "no epoch has finished yet"
    # inspect: the stopped checkpoint holds infinite best/previous perplexities
    for model in (d / "m.h5", tmp_path / "stopped.h5"):
        r = run("inspect", model, "--json")
        assert r.exit_code == 0
        info = strict_lines(r.output.replace("\n", " "))[0]
    assert info["train_state"]["best_valid_ppl"] is None
    assert info["train_state"]["best_valid_ppl_reason"] == "no epoch has finished yet"
    # evaluate: a text, and an empty one (an error, not a NaN)
    r = run("evaluate", d / "m.h5", files["test"], "--json", "-q")
    assert r.exit_code == 0 and np.isfinite(strict_lines(r.stdout)[0]["perplexity"])
    r = run("evaluate", d / "m.h5", empty, "--json", "-q")
    assert r.exit_code == 1 and "NaN" not in r.output and len(r.output.strip().splitlines()) == 1
    # score: sentences, and no sentence at all
    r = run("score", d / "m.h5", files["test"], "--json", "-q")
    rows = strict_lines(r.stdout)
    assert r.exit_code == 0 and len(rows) > 10 and np.isfinite(rows[-1]["total"]["perplexity"])
    r = run("score", d / "m.h5", empty, "--json", "-q")
    total = strict_lines(r.stdout)[-1]["total"]
    assert r.exit_code == 0 and total["perplexity"] is None
    assert total["perplexity_reason"] == "no tokens" and total["tokens"] == 0
    # generate: text, and nothing drawn
    for length in ("5", "0"):
        r = run("generate", d / "m.h5", "--json", "--count", "2", "--length", length)
        assert r.exit_code == 0 and len(strict_lines(r.stdout)) == 2
    # rerank: an n-best list, and an empty one
    run("data", "nbest", files["test"], tmp_path / "mt", "--limit", "5", "--n", "3")
    (tmp_path / "mt" / "empty.nbest").write_text("")
    for nb in ("test.nbest", "empty.nbest"):
        r = run("rerank", d / "m.h5", tmp_path / "mt" / nb, "--json", "-q", "--best", tmp_path / "b.txt")
        assert r.exit_code in (0, 1), r.output
        if r.exit_code == 0:
            strict_lines(r.stdout)
        else:
            assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    # experiment status: runs without results (null perplexities)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[plan]\ndescription = "x"\n[base]\ndata = "{d / "corpus"}"\nhidden = 8\n'
                    'layers = 1\nepochs = 1\n[[run]]\nname = "a"\n')
    r = run("experiment", "status", plan, "--json")
    assert r.exit_code == 0, r.output
    row = strict_lines(r.stdout)[0]
    assert row["run"] == "a" and row["valid_ppl"] is None


def test_strict_json_helper():
    from slimnp.errors import json_dumps

    text = json_dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": {"perplexity": float("-inf")},
                       "d": np.float32("nan"), "e": 2.5}, {"perplexity": "no tokens"})
    got = json.loads(text, parse_constant=_reject)
    assert got == {"a": None, "a_reason": "not a number", "b": [1.0, None],
                   "c": {"perplexity": None, "perplexity_reason": "no tokens"},
                   "d": None, "d_reason": "not a number", "e": 2.5}


# ---------------------------------------------------------------------------
# output paths checked before any work
# ---------------------------------------------------------------------------
def test_a_missing_output_folder_fails_before_training(trained, tmp_path, monkeypatch):
    d, files = trained
    from slimnp import trainer

    def no_training(*a, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer, "run_training", no_training)
    monkeypatch.setattr(trainer.Vocabulary, "build", no_training)
    out = tmp_path / "missing" / "dir" / "x.h5"
    r = run("train", "--data", d / "corpus", "--out", out, *TINY)
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: cannot write {out} (--out): folder {out.parent} does not "
                                "exist; create it first (nothing was done)")
    # the library checks too (a script calling run_training)
    monkeypatch.undo()
    from slimnp.errors import WriteError

    with pytest.raises(WriteError, match="does not exist"):
        trainer.run_training(files, out, ModelConfig(vocab_size=0), trainer.TrainConfig(), log=lambda m: None)
    # rerank: before the model is loaded and the lists scored
    from slimnp import cli

    monkeypatch.setattr(cli, "_load_lm", no_training)
    for opt in ("--out", "--best"):
        r = run("rerank", d / "m.h5", files["test"], opt, out)
        assert r.exit_code == 1 and f"cannot write {out} ({opt}): folder" in r.output


# ---------------------------------------------------------------------------
# one-line errors at every write site, old files kept
# ---------------------------------------------------------------------------
CAUSES = {errno.ENOSPC: "no space left on device", errno.EACCES: "permission denied",
          errno.EROFS: "read-only file system"}


def _fail_writing(monkeypatch, target: str, code: int, hdf5: bool):
    """Make the write of the file named ``target`` fail with ``code`` while
    its temporary file is being completed: as h5py reports it (errno only
    inside HDF5's text, the temporary name in it) or as Python does."""
    orig = _atomic.fsync_path

    def fsync_path(path, directory=False):
        name = Path(path).name
        if not directory and name.startswith(f".{target}.tmp-"):
            if hdf5:
                raise OSError(f"Can't close file (file write failed: time = now, filename = '{path}', "
                              f"file descriptor = 3, errno = {code}, error message = "
                              f"'{os.strerror(code)}', buf = 0x55, total write size = 64592)")
            raise OSError(code, os.strerror(code), str(path))
        return orig(path, directory)

    monkeypatch.setattr(_atomic, "fsync_path", fsync_path)


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line_error(r, target_shown: str, code: int, kept: bool):
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    err = lines[-1]
    assert err.startswith(f"Error: cannot write {target_shown}: {CAUSES[code]}"), err
    if kept:
        assert f"the previous {target_shown} is unchanged" in err, err
    assert ".tmp-" not in r.output and "Traceback" not in r.output and "errno" not in err
    if code == errno.ENOSPC:
        assert "free in" in err
    return err


@pytest.mark.parametrize("code", list(CAUSES), ids=["ENOSPC", "EACCES", "EROFS"])
@pytest.mark.parametrize("site", ["checkpoint", "best", "metrics", "timed checkpoint"])
def test_training_write_failures_are_one_line_and_keep_the_old_files(trained, tmp_path, monkeypatch,
                                                                     site, code):
    d, _ = trained
    for name in ("m.h5", "m.best.h5", "m.metrics.jsonl"):
        shutil.copy(d / name, tmp_path / name)
    before = _snapshot(tmp_path)
    target = {"checkpoint": "m.h5", "best": "m.best.h5", "metrics": "m.metrics.jsonl",
              "timed checkpoint": "m.h5"}[site]
    _fail_writing(monkeypatch, target, code, hdf5=target.endswith(".h5"))
    args = ["train", "--resume", tmp_path / "m.h5", "--epochs", "2", "-q", "--threads", "1"]
    if site == "timed checkpoint":
        from slimnp import trainer

        ticks = iter(range(10**6))
        monkeypatch.setattr(trainer, "_clock", lambda: 60.0 * next(ticks))
        args += ["--checkpoint-every", "5"]
    r = run(*args)
    err = _one_line_error(r, str(tmp_path / target), code, kept=True)
    assert "training stopped" in err or site == "metrics"
    after = _snapshot(tmp_path)
    assert after[target] == before[target]  # the file that failed: byte-identical
    if site in ("best", "timed checkpoint"):  # written first: nothing else changed either
        assert after == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.parametrize("code", list(CAUSES), ids=["ENOSPC", "EACCES", "EROFS"])
@pytest.mark.parametrize("opt", ["--out", "--best"])
def test_nbest_write_failures_are_one_line_and_keep_the_old_files(trained, tmp_path, monkeypatch, opt,
                                                                  code):
    d, files = trained
    run("data", "nbest", files["test"], tmp_path / "mt", "--limit", "4", "--n", "3")
    out, best = tmp_path / "out.nbest", tmp_path / "best.txt"
    out.write_text("old list\n")
    best.write_text("old best\n")
    target = out if opt == "--out" else best
    _fail_writing(monkeypatch, target.name, code, hdf5=False)
    r = run("rerank", d / "m.h5", tmp_path / "mt" / "test.nbest", "--out", out, "--best", best, "-q")
    _one_line_error(r, str(target), code, kept=True)
    assert target.read_text() == ("old list\n" if opt == "--out" else "old best\n")


@pytest.mark.parametrize("code", list(CAUSES), ids=["ENOSPC", "EACCES", "EROFS"])
def test_corpus_cache_write_failures_are_one_line(tmp_path, monkeypatch, code):
    """The built-in corpus, generated into the cache on first use."""
    from slimnp import synthetic

    monkeypatch.setattr(synthetic, "DEFAULT_TOKENS", (3000, 600, 600))
    monkeypatch.setenv("SLIMNP_CACHE", str(tmp_path / "cache"))
    _fail_writing(monkeypatch, "train.txt", code, hdf5=False)
    r = run("train", "--out", tmp_path / "m.h5", *TINY)
    from slimnp.synthetic import builtin_corpus_dir

    _one_line_error(r, str(builtin_corpus_dir() / "train.txt"), code, kept=False)
    assert not (tmp_path / "m.h5").exists()


# ---------------------------------------------------------------------------
# a real full disk
# ---------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs (root only; skips elsewhere)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_real_full_disk(trained, tmp_path, small_tmpfs):
    """The checkpoint does not fit: one line, exit 1, no crash inside HDF5, the
    previous files byte-identical, no temporary file left."""
    d, files = trained
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "slimnp", "train", "--data", str(d / "corpus"), "-q", "--threads", "1",
           "--layers", "1", "--hidden", "16", "--bptt", "10", "--batch-size", "8"]
    ok = subprocess.run(cmd + ["--out", str(small_tmpfs / "m.h5"), "--epochs", "1"], env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    before = _snapshot(small_tmpfs)
    st = os.statvfs(small_tmpfs)
    (small_tmpfs / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 4096))  # 4 kB stay free
    before["filler"] = (small_tmpfs / "filler").read_bytes()
    r = subprocess.run([sys.executable, "-m", "slimnp", "train", "--resume", str(small_tmpfs / "m.h5"),
                        "--epochs", "2", "-q", "--threads", "1"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # not -11: HDF5 did not crash
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: cannot write {small_tmpfs}/m.")
    assert "no space left on device (about " in err[0] and "is unchanged" in err[0]
    assert ".tmp-" not in err[0] and "HDF5" not in err[0] and "errno" not in err[0]
    assert _snapshot(small_tmpfs) == before


# ---------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------
def test_estimate_counts_projections_and_slim_pools():
    V, H = 5000, 64
    dense = ModelConfig(vocab_size=V, hidden=H, layers=2)
    pm = ModelConfig(vocab_size=V, hidden=H, layers=2, embedding_size=16)
    slim = ModelConfig(vocab_size=V, hidden=H, layers=2, input="slim", input_k=8, input_m=1000,
                       output="slim", output_k=8, output_m=8 * 250)
    for mc in (dense, pm, slim):
        P = sum(int(np.prod(s)) for s in param_shapes(mc).values())
        for opt, copies in (("sgd", 2), ("adagrad", 3)):
            p = memory.parts(mc, optimizer=opt)
            assert p["parameters"] == 4 * P and p["parameters"] + p["gradients"] + p["optimizer"] == copies * 4 * P
    assert "proj_in/W" in param_shapes(pm)
    assert memory.parts(pm)["parameters"] < memory.parts(dense)["parameters"]
    assert memory.parts(slim)["parameters"] < memory.parts(pm)["parameters"]
    assert memory.parts(slim)["tables"] > 0 == memory.parts(dense)["tables"]
    # float64 doubles everything, two ranks halve the per-rank activations
    f64 = ModelConfig(vocab_size=V, hidden=H, layers=2, dtype="float64")
    assert memory.parts(f64)["parameters"] == 2 * memory.parts(dense)["parameters"]
    assert memory.parts(dense, ranks=2)["activations"] * 2 == memory.parts(dense)["activations"]
    # HashNet's shape (K = H): its output layer rebuilds the V x H matrix
    # (the dense strategy) instead of K x M/K x rows partial products
    hashnet = ModelConfig(vocab_size=V, hidden=H, layers=2, output="slim", output_k=H, output_m=H * 625)
    assert memory._output_buffers(hashnet, 100, 4) == 4 * (V * H + 100 * V + 100 * H) + 4 * V * H
    dp = ModelConfig(vocab_size=V, hidden=H, layers=2, output="slim", output_k=4, output_m=4 * 250)
    assert memory._output_buffers(dp, 100, 4) == 4 * (V * 100 + 4 * 250 * 100 + V + 100 * H)


MEASURE = r"""
import json, resource, sys
from slimnp import memory
from slimnp.trainer import run_training
from slimnp.options import configs
seen = []
check = memory.check
memory.check = lambda *a, **kw: seen.append(check(*a, **kw)) or seen[-1]
files, out, hp, warm = json.loads(sys.argv[1])
# compile every kernel first (a tiny run of the same kind), then reset the
# peak-RSS counter: Numba's compile-time memory is not the run's
run_training(warm[0], warm[1], *configs(hp), log=lambda m: None, progress=False, checkpoint_every=0)
seen.clear()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (Linux >= 4.0)
    reset = True
except OSError:
    reset = False
run_training(files, out, *configs(hp), log=lambda m: None, progress=False, checkpoint_every=0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if reset:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
print(json.dumps({"estimate": seen[0].host_total, "peak": peak}))
"""


def _big_vocab_corpus(d: Path, V: int, tokens: int) -> dict:
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(V)])
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    for split, n in (("train", tokens), ("valid", tokens // 4), ("test", tokens // 4)):
        toks = words[rng.integers(0, V, n)]
        (d / f"{split}.txt").write_text("\n".join(" ".join(toks[i:i + 20]) for i in range(0, n, 20)) + "\n")
    return {s: str(d / f"{s}.txt") for s in ("train", "valid", "test", "vocab")}


@pytest.mark.slow
@pytest.mark.parametrize("V, H, optimizer", [(40_000, 256, "adagrad"), (80_000, 256, "sgd")])
def test_memory_estimate_matches_the_measured_peak(tmp_path, V, H, optimizer):
    """Peak RSS of a whole run (training, validation, checkpoints, the final
    test) in a fresh process, against the estimate printed at its start."""
    files = _big_vocab_corpus(tmp_path / "c", V, 200)
    hp = dict(layers=1, hidden=H, dropout=0.0, init_scale=0.1, epochs=1, bptt=5, batch_size=4, lr=0.1,
              schedule="epoch", lr_decay=0.5, decay_start=1, decay_threshold=1.0, clip=5.0,
              optimizer=optimizer)
    # a clean environment: what earlier tests of the session left in os.environ
    # (kernel modes, thread layers) must not change what this process measures
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "LANG", "PYTHONPATH") if k in os.environ}
    env.update(NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    small = _big_vocab_corpus(tmp_path / "small", 300, 200)
    r = subprocess.run([sys.executable, "-c", MEASURE,
                        json.dumps([files, str(tmp_path / "m.h5"), hp, [small, str(tmp_path / "w.h5")]])],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = got["estimate"] / got["peak"]
    assert 0.75 <= ratio <= 1.25, got
    assert got["peak"] > 400e6  # the model, not the interpreter, dominates what is compared


def _fake_host(monkeypatch, free):
    monkeypatch.setattr(memory, "host_available",
                        lambda: memory.Available(int(free), "MemAvailable in /proc/meminfo", 0))


def test_too_big_a_run_stops_with_both_numbers_and_what_would_fit(monkeypatch):
    mc = ModelConfig(vocab_size=793_471, hidden=650, layers=2)
    settings = dict(optimizer="adagrad", bptt=35, batch_size=20)
    need = memory.estimate(mc, in_use=0, **settings).host_total
    _fake_host(monkeypatch, 0.6 * need)
    monkeypatch.setattr(memory, "current_rss", lambda: 0)
    with pytest.raises(memory.NotEnoughMemory) as err:
        memory.check(mc, **settings)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("not enough memory: the run needs about ")
    assert "are available (MemAvailable in /proc/meminfo); would fit: " in msg
    assert msg.endswith("; pass --force-memory to try anyway")
    assert "--input slim --input-k 10" in msg  # K must divide 650
    # what it suggests does fit
    for tip in msg.split("would fit: ")[1].split("; pass")[0].split(", or "):
        assert "about" in tip
    memory.check(mc, force=True, **settings)  # --force-memory


def test_gpu_runs_are_checked_against_the_devices_free_memory(monkeypatch):
    mc = ModelConfig(vocab_size=200_000, hidden=512, layers=2)
    _fake_host(monkeypatch, 1e12)
    monkeypatch.setattr(memory, "device_available",
                        lambda: memory.Available(int(1e9), "free on the GPU of 80.00 GB"))
    lines = []
    with pytest.raises(memory.NotEnoughMemory, match=r"the GPU needs about .* 1\.00 GB are free on "
                                                     r"the GPU of 80\.00 GB"):
        memory.check(mc, device="gpu", log=lines.append, optimizer="adagrad")
    assert "GPU about" in lines[0] and "free on the GPU" in lines[0]
    monkeypatch.setattr(memory, "device_available",
                        lambda: memory.Available(int(100e9), "free on the GPU of 140.00 GB"))
    memory.check(mc, device="gpu", optimizer="adagrad")


def test_cli_refuses_a_run_that_does_not_fit_unless_forced(trained, tmp_path, monkeypatch):
    d, _ = trained
    _fake_host(monkeypatch, 1e6)  # 1 MB left
    r = run("train", "--data", d / "corpus", "--out", tmp_path / "m.h5", *TINY)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("memory: about ") and lines[-1].startswith("Error: not enough memory: ")
    assert "1.0 MB are available" in lines[-1] and not (tmp_path / "m.h5").exists()
    r = run("train", "--data", d / "corpus", "--out", tmp_path / "m.h5", "--force-memory", *TINY)
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
def test_read_errors_are_one_line(trained, tmp_path, monkeypatch):
    import h5py

    from slimnp.errors import os_error_line

    d, files = trained
    # a damaged parameter: named, one line, exit 1
    bad = tmp_path / "bad.h5"
    shutil.copy(d / "m.best.h5", bad)
    with h5py.File(bad, "r") as f:
        offset = f["params/lstm0/Wh"].id.get_chunk_info(0).byte_offset
    with open(bad, "r+b") as fh:
        fh.seek(offset + 3)
        fh.write(b"\x7f")
    for cmd in (["evaluate", bad, files["test"], "-q"], ["score", bad, files["test"], "-q"],
                ["generate", bad]):
        r = run(*cmd)
        assert r.exit_code == 1 and r.output.strip().splitlines() == [
            f"Error: {bad}: dataset /params/lstm0/Wh is damaged (its checksum does not match): the "
            "file was corrupted or not copied completely; use another copy or a checkpoint"], r.output
    # permission denied on a model (as HDF5 says it) and on a text (as Python does)
    orig = h5py.File

    def denied(name, *a, **kw):
        if str(name) == str(d / "m.h5"):
            raise OSError(f"Unable to synchronously open file (unable to open file: name = '{name}', "
                          "errno = 13, error message = 'Permission denied', flags = 0, o_flags = 0)")
        return orig(name, *a, **kw)

    monkeypatch.setattr(h5py, "File", denied)
    r = run("inspect", d / "m.h5")
    assert r.exit_code == 1 and r.output.strip() == f"Error: {d / 'm.h5'}: cannot read it: permission denied"
    monkeypatch.undo()
    exc = PermissionError(errno.EACCES, "Permission denied", str(files["test"]))
    assert os_error_line(exc) == f"{files['test']}: permission denied"
    exc = FileNotFoundError(errno.ENOENT, "No such file or directory", "nope.txt")
    assert os_error_line(exc) == "nope.txt: no such file"
