"""slimnp.errors: strict JSON from every ``--json`` (NaN and infinities as
``null`` with a reason) and one-line read errors.

(One-line *write* errors, which keep the old files, are in test_atomic.py.)
"""
import errno
import json
import shutil
import signal

import numpy as np
import pytest
from click.testing import CliRunner

from slimnp.cli import main

from helpers import TINY_TRAIN, run_cli, trained_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_tiny(tmp_path_factory.mktemp("errors"))


def _reject(token):
    raise ValueError(f"not strict JSON: {token}")


def strict_lines(text: str) -> list:
    """Every line of ``text`` parsed as JSON, rejecting NaN/Infinity."""
    return [json.loads(line, parse_constant=_reject) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# strict JSON
# ---------------------------------------------------------------------------
def test_strict_json_helper():
    from slimnp.errors import json_dumps

    text = json_dumps({"a": float("nan"), "b": [1.0, float("inf")], "c": {"perplexity": float("-inf")},
                       "d": np.float32("nan"), "e": 2.5}, {"perplexity": "no tokens"})
    got = json.loads(text, parse_constant=_reject)
    assert got == {"a": None, "a_reason": "not a number", "b": [1.0, None],
                   "c": {"perplexity": None, "perplexity_reason": "no tokens"},
                   "d": None, "d_reason": "not a number", "e": 2.5}


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
                                  *TINY_TRAIN])
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
        r = run_cli("inspect", model, "--json")
        assert r.exit_code == 0
        info = strict_lines(r.output.replace("\n", " "))[0]
    assert info["train_state"]["best_valid_ppl"] is None
    assert info["train_state"]["best_valid_ppl_reason"] == "no epoch has finished yet"
    # evaluate: a text, and an empty one (an error, not a NaN)
    r = run_cli("evaluate", d / "m.h5", files["test"], "--json", "-q")
    assert r.exit_code == 0 and np.isfinite(strict_lines(r.stdout)[0]["perplexity"])
    r = run_cli("evaluate", d / "m.h5", empty, "--json", "-q")
    assert r.exit_code == 1 and "NaN" not in r.output and len(r.output.strip().splitlines()) == 1
    # score: sentences, and no sentence at all
    r = run_cli("score", d / "m.h5", files["test"], "--json", "-q")
    rows = strict_lines(r.stdout)
    assert r.exit_code == 0 and len(rows) > 10 and np.isfinite(rows[-1]["total"]["perplexity"])
    r = run_cli("score", d / "m.h5", empty, "--json", "-q")
    total = strict_lines(r.stdout)[-1]["total"]
    assert r.exit_code == 0 and total["perplexity"] is None
    assert total["perplexity_reason"] == "no tokens" and total["tokens"] == 0
    # generate: text, and nothing drawn
    for length in ("5", "0"):
        r = run_cli("generate", d / "m.h5", "--json", "--count", "2", "--length", length)
        assert r.exit_code == 0 and len(strict_lines(r.stdout)) == 2
    # rerank: an n-best list, and an empty one
    run_cli("data", "nbest", files["test"], tmp_path / "mt", "--limit", "5", "--n", "3")
    (tmp_path / "mt" / "empty.nbest").write_text("")
    for nb in ("test.nbest", "empty.nbest"):
        r = run_cli("rerank", d / "m.h5", tmp_path / "mt" / nb, "--json", "-q", "--best", tmp_path / "b.txt")
        assert r.exit_code in (0, 1), r.output
        if r.exit_code == 0:
            strict_lines(r.stdout)
        else:
            assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    # experiment status: runs without results (null perplexities)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[plan]\ndescription = "x"\n[base]\ndata = "{d / "corpus"}"\nhidden = 8\n'
                    'layers = 1\nepochs = 1\n[[run]]\nname = "a"\n')
    r = run_cli("experiment", "status", plan, "--json")
    assert r.exit_code == 0, r.output
    row = strict_lines(r.stdout)[0]
    assert row["run"] == "a" and row["valid_ppl"] is None


# ---------------------------------------------------------------------------
# the one-line messages
# ---------------------------------------------------------------------------
def test_write_error_names_the_file_the_cause_and_what_was_kept(tmp_path):
    """The errno is found where Python puts it, inside HDF5's text, or in the
    words alone; the message never shows the temporary file or HDF5's internals."""
    from slimnp.errors import WriteError, human_bytes, write_error

    out = tmp_path / "m.h5"
    tmp = tmp_path / ".m.h5.tmp-123"
    h5 = OSError(f"Can't close file (file write failed: filename = '{tmp}', errno = 28, "
                 "error message = 'No space left on device', buf = 0x55)")
    for exc in (OSError(errno.ENOSPC, "No space left on device", str(tmp)), h5,
                OSError("write failed: No space left on device")):
        err = write_error(exc, out, existed=True, needed=64_600_000)
        assert isinstance(err, WriteError) and err.errno == errno.ENOSPC and err.filename == str(out)
        assert str(err).startswith(f"cannot write {out}: no space left on device (about 64.6 MB needed, ")
        assert str(err).endswith(f" free in {tmp_path}); the previous {out} is unchanged")
        assert ".tmp-" not in str(err) and "errno" not in str(err)
    cases = [(OSError(errno.EACCES, "Permission denied"), f"permission denied (folder {tmp_path})"),
             (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded ("),
             (OSError(errno.ENOENT, "No such file"), f"folder {tmp_path} does not exist"),
             (OSError(errno.EISDIR, "Is a directory"), "it is a folder"),
             (OSError(errno.ENXIO, "No such device or address"), "no such device or address"),
             (OSError("Can't write data (wrong B-tree signature)"), "Can't write data")]
    for exc, cause in cases:
        msg = str(write_error(exc, out, existed=False))
        assert msg.startswith(f"cannot write {out}: {cause}") and msg.endswith(f"; no {out} was written"), msg
        assert "B-tree" not in msg
    assert [human_bytes(n) for n in (512, 1_500, 64_600_000, 41_850_000_000)] == [
        "512 bytes", "1.5 kB", "64.6 MB", "41.85 GB"]


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
        r = run_cli(*cmd)
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
    r = run_cli("inspect", d / "m.h5")
    assert r.exit_code == 1 and r.output.strip() == f"Error: {d / 'm.h5'}: cannot read it: permission denied"
    monkeypatch.undo()
    exc = PermissionError(errno.EACCES, "Permission denied", str(files["test"]))
    assert os_error_line(exc) == f"{files['test']}: permission denied"
    exc = FileNotFoundError(errno.ENOENT, "No such file or directory", "nope.txt")
    assert os_error_line(exc) == "nope.txt: no such file"
