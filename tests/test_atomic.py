"""slimnp._atomic: output paths checked before any work, and every write site
failing in one line that names the user's file while the old file stays
byte-identical (a simulated ENOSPC/EACCES/EROFS at each site, and a real
full disk).

(Checkpoints inside an epoch and a SIGKILL-then-resume are in
test_trainer.py, io's own failed saves and checksums in test_io.py.)
"""
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slimnp import _atomic
from slimnp.errors import WriteError
from slimnp.model import ModelConfig

from helpers import TINY_TRAIN, run_cli, trained_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_tiny(tmp_path_factory.mktemp("atomic"))


# ---------------------------------------------------------------------------
# the temporary file and the rename
# ---------------------------------------------------------------------------
def test_atomic_path_replaces_on_success_and_keeps_the_old_file_otherwise(tmp_path):
    """The body writes a hidden temporary file beside the target; a clean
    exit renames it over the target, an exception (Ctrl-C included) deletes it
    and leaves the target as it was.  A writer killed earlier left a temporary
    file: a dead process's is removed, a live one's (ours aside) is left."""
    target = tmp_path / "m.h5"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with _atomic.atomic_path(target) as tmp:
            assert tmp == _atomic.temp_name(target) and tmp.parent == tmp_path and tmp.name.startswith(".m.h5.tmp-")
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.h5"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".m.h5.tmp-{dead.pid}").write_bytes(b"left by a kill -9")
    (tmp_path / f".m.h5.tmp-{os.getppid()}").write_bytes(b"still being written")
    with _atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == [f".m.h5.tmp-{os.getppid()}", "m.h5"]


def test_append_line_keeps_every_previous_line_when_a_write_fails(tmp_path, monkeypatch):
    log = tmp_path / "m.metrics.jsonl"
    _atomic.append_line(log, '{"epoch": 1}')  # a new file
    _atomic.append_line(log, '{"epoch": 2}')
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    _fail_writing(monkeypatch, log.name, errno.ENOSPC, hdf5=False)
    with pytest.raises(WriteError, match=f"cannot write {log}: no space left on device") as err:
        _atomic.append_line(log, '{"epoch": 3}')
    assert f"the previous {log} is unchanged" in str(err.value) and "\n" not in str(err.value)
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_file_sha256_reads_in_blocks(tmp_path):
    import hashlib

    data = os.urandom((1 << 22) + 3)  # one whole 4 MB block and a partial one
    (tmp_path / "f").write_bytes(data)
    assert _atomic.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    (tmp_path / "e").write_bytes(b"")
    assert _atomic.file_sha256(tmp_path / "e") == hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------------------
# output paths checked before any work
# ---------------------------------------------------------------------------
def test_check_output_fails_fast(tmp_path):
    _atomic.check_output(tmp_path / "m.h5")  # fine, and leaves nothing behind
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WriteError, match=r"cannot write .*x\.h5 \(--out\): folder .*missing/dir does "
                                         r"not exist; create it first \(nothing was done\)"):
        _atomic.check_output(tmp_path / "missing" / "dir" / "x.h5")
    (tmp_path / "d.h5").mkdir()
    with pytest.raises(WriteError, match="it is a folder"):
        _atomic.check_output(tmp_path / "d.h5")
    (tmp_path / "f").write_text("")
    with pytest.raises(WriteError, match="is not a folder"):
        _atomic.check_output(tmp_path / "f" / "x.h5")


def test_a_missing_output_folder_fails_before_training(trained, tmp_path, monkeypatch):
    d, files = trained
    from slimnp import trainer

    def no_training(*a, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(trainer, "run_training", no_training)
    monkeypatch.setattr(trainer.Vocabulary, "build", no_training)
    out = tmp_path / "missing" / "dir" / "x.h5"
    r = run_cli("train", "--data", d / "corpus", "--out", out, *TINY_TRAIN)
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: cannot write {out} (--out): folder {out.parent} does not "
                                "exist; create it first (nothing was done)")
    # the library checks too (a script calling run_training)
    monkeypatch.undo()
    with pytest.raises(WriteError, match="does not exist"):
        trainer.run_training(files, out, ModelConfig(vocab_size=0), trainer.TrainConfig(), log=lambda m: None)
    # rerank: before the model is loaded and the lists scored
    from slimnp import cli

    monkeypatch.setattr(cli, "_load_lm", no_training)
    for opt in ("--out", "--best"):
        r = run_cli("rerank", d / "m.h5", files["test"], opt, out)
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
    r = run_cli(*args)
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
    run_cli("data", "nbest", files["test"], tmp_path / "mt", "--limit", "4", "--n", "3")
    out, best = tmp_path / "out.nbest", tmp_path / "best.txt"
    out.write_text("old list\n")
    best.write_text("old best\n")
    target = out if opt == "--out" else best
    _fail_writing(monkeypatch, target.name, code, hdf5=False)
    r = run_cli("rerank", d / "m.h5", tmp_path / "mt" / "test.nbest", "--out", out, "--best", best, "-q")
    _one_line_error(r, str(target), code, kept=True)
    assert target.read_text() == ("old list\n" if opt == "--out" else "old best\n")


@pytest.mark.parametrize("code", list(CAUSES), ids=["ENOSPC", "EACCES", "EROFS"])
def test_corpus_cache_write_failures_are_one_line(tmp_path, monkeypatch, code):
    """The built-in corpus, generated into the cache on first use."""
    from slimnp import synthetic

    monkeypatch.setattr(synthetic, "DEFAULT_TOKENS", (3000, 600, 600))
    monkeypatch.setenv("SLIMNP_CACHE", str(tmp_path / "cache"))
    _fail_writing(monkeypatch, "train.txt", code, hdf5=False)
    r = run_cli("train", "--out", tmp_path / "m.h5", *TINY_TRAIN)
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
