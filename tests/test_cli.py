"""The command line through click's CliRunner: help, a whole run, error paths,
the slim layers' options."""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from slimnp.cli import main

from helpers import tiny_corpus

TINY = ["--layers", "1", "--hidden", "16", "--epochs", "1", "--bptt", "10", "--batch-size", "8", "-q"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _commands(group=main, path=()):
    """Every command path of the CLI, groups and hidden commands included."""
    import click

    yield list(path)
    if isinstance(group, click.Group):
        for name, cmd in sorted(group.commands.items()):
            yield from _commands(cmd, path + (name,))


COMMANDS = list(_commands())


def test_the_command_walk_sees_every_command():
    names = {" ".join(c) for c in COMMANDS}
    assert {"train", "export", "plot", "experiment run", "experiment status", "data fetch"} <= names
    assert len(COMMANDS) >= 18


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "slimnp")
def test_help(cmd):
    """Every command's --help: its usage, its summary line, and a help text
    for every option."""
    import click

    r = run(*cmd, "--help")
    assert r.exit_code == 0 and r.output.startswith("Usage: ")
    obj = main
    for name in cmd:
        obj = obj.commands[name]
    assert obj.help and obj.help.split("\n")[0].strip() in " ".join(r.output.split())
    for p in obj.params:
        if isinstance(p, click.Option) and p.name != "help":
            assert p.help, f"{' '.join(cmd)} {p.opts[0]} has no help"
            assert p.opts[0] in r.output or p.hidden


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    files, _ = tiny_corpus(d / "corpus", tokens=5000)
    r = run("train", "--data", d / "corpus", "--out", d / "m.h5", "--json", *TINY)
    assert r.exit_code == 0, r.output
    return d, files, json.loads(r.output.strip().splitlines()[-1])


def test_train_evaluate_inspect(trained):
    d, files, summary = trained
    assert summary["finished"] and np.isfinite(summary["test_ppl"])
    r = run("evaluate", d / "m.best.h5", files["test"], "--json", "-q")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output)
    assert ev["tokens"] == summary["test_tokens"] and ev["oov_rate"] == summary["test_oov_rate"]
    assert ev["perplexity"] == pytest.approx(summary["test_ppl"], rel=1e-9)
    r = run("inspect", d / "m.h5", "--json")
    info = json.loads(r.output)
    assert r.exit_code == 0 and info["parameters"] > 0 and "lstm0" in info["layers"]
    assert run("inspect", d / "m.h5").exit_code == 0


def test_threads_option(trained):
    """--threads sets both pools; the result does not depend on the count."""
    import numba

    from slimnp.threads import blas_threads, set_blas_threads

    d, files, summary = trained
    before = numba.get_num_threads(), blas_threads()
    try:
        r = run("evaluate", d / "m.best.h5", files["test"], "--json", "-q", "--threads", "1")
        assert r.exit_code == 0, r.output
        assert numba.get_num_threads() == 1 and blas_threads() in (1, None)
        assert json.loads(r.output)["perplexity"] == pytest.approx(summary["test_ppl"], rel=1e-6)
        assert run("evaluate", d / "m.h5", files["test"], "--threads", "0").exit_code != 0
    finally:
        numba.set_num_threads(before[0])
        if before[1]:
            set_blas_threads(before[1])


def test_evaluate_counts_oov(trained, tmp_path):
    d, files, _ = trained
    w1, w2 = files["train"].read_text().split()[:2]
    f = tmp_path / "oov.txt"
    f.write_text(f"{w1} zzz-unknown {w2}\n")
    ev = json.loads(run("evaluate", d / "m.h5", f, "--json", "-q").output)
    assert ev["tokens"] == 4 and ev["oov"] == 1 and ev["oov_rate"] == pytest.approx(0.25)


def test_refuses_to_overwrite(trained):
    d, _, _ = trained
    before = (d / "m.h5").read_bytes()
    r = run("train", "--data", d / "corpus", "--out", d / "m.h5", *TINY)
    assert r.exit_code != 0 and "--resume" in r.output
    assert (d / "m.h5").read_bytes() == before


def test_resume_rejects_changed_options(trained):
    d, _, _ = trained
    r = run("train", "--resume", d / "m.h5", "--hidden", "32")
    assert r.exit_code != 0 and "--hidden" in r.output


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"\xff\xfe bad\n", "UTF-8")])
def test_bad_corpus_is_one_line(tmp_path, content, needle):
    for s in ("train", "valid", "test"):
        (tmp_path / f"{s}.txt").write_bytes(content)
    r = run("train", "--data", tmp_path, "--out", tmp_path / "m.h5", *TINY)
    assert r.exit_code == 1
    assert needle in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_missing_data_dir(tmp_path):
    r = run("train", "--data", tmp_path / "nope", "--out", tmp_path / "m.h5")
    assert r.exit_code != 0 and "Traceback" not in r.output


def test_bad_model_files(tmp_path, trained):
    d, files, _ = trained
    text = tmp_path / "x.h5"
    text.write_text("not hdf5")
    foreign = tmp_path / "f.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    trunc = tmp_path / "t.h5"
    raw = (d / "m.h5").read_bytes()
    trunc.write_bytes(raw[: len(raw) // 2])
    for path, needle in ((text, "HDF5"), (foreign, "not a slimnp"), (trunc, ""),
                         (tmp_path / "missing.h5", "no such file")):
        for cmd in (["evaluate", path, files["test"]], ["inspect", path]):
            r = run(*cmd)
            assert r.exit_code == 1, (cmd, r.output)
            assert needle in r.output and "Traceback" not in r.output
            assert len(r.output.strip().splitlines()) == 1


def test_bad_options(tmp_path):
    files, _ = tiny_corpus(tmp_path / "c", tokens=2000)
    r = run("train", "--data", tmp_path / "c", "--out", tmp_path / "m.h5", "--hidden", "0", "-q")
    assert r.exit_code == 1 and "hidden" in r.output
    r = run("train", "--data", tmp_path / "c", "--train", files["train"])
    assert r.exit_code == 2 and "not both" in r.output
    r = run("train", "--data", tmp_path / "c", "--out", tmp_path / "m.h5", "--batch-size", "100000", "-q")
    assert r.exit_code == 1 and "batch" in r.output


def test_data_synthetic(tmp_path):
    r = run("data", "synthetic", tmp_path / "s", "--vocab", "50", "--tokens", "3000")
    assert r.exit_code == 0, r.output
    assert "oracle test PPL" in r.output
    info = json.loads((tmp_path / "s" / "corpus.json").read_text())
    assert info["tokens"]["train"] >= 3000


def test_python_dash_m():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "slimnp", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout


@pytest.mark.data
def test_data_fetch_ptb_from_local_mirror(tmp_path):
    """`slimnp data fetch ptb` against a 127.0.0.1 server holding the real files."""
    import functools
    import http.server
    import threading

    from helpers import shared_data

    src = shared_data("ptb")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(src))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/"
        r = run("data", "fetch", "ptb", tmp_path / "ptb", "--base-url", url, "-q")
        assert r.exit_code == 0, r.output
        for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
            assert (tmp_path / "ptb" / name).read_bytes() == (src / name).read_bytes()
        # a mirror serving different bytes is refused, and nothing is left behind
        (tmp_path / "bad").mkdir()
        for name in ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"):
            (tmp_path / "bad" / name).write_text("tampered\n")
        srv.RequestHandlerClass.directory = str(tmp_path / "bad")
        handler.keywords["directory"] = str(tmp_path / "bad")
        r = run("data", "fetch", "ptb", tmp_path / "ptb2", "--base-url", url, "-q")
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert not list((tmp_path / "ptb2").glob("ptb.*.txt"))
    finally:
        srv.shutdown()


# -- the slim layers' options ---------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--input", "slim", "--input-k", "3", "--input-m", "10"], "must divide hidden"),
    (["--output", "slim", "--output-k", "4", "--output-m", "10"], "multiple of K"),
    (["--input", "slim", "--input-k", "4", "--input-m", "100000"], "K*V"),
    (["--input", "slim", "--input-m", "10"], "--input-k"),
    (["--input-k", "4"], "need --input slim"),
    (["--tie", "--output", "slim", "--output-k", "4", "--output-ratio", "0.5"], "same kind"),
])
def test_cli_rejects_bad_combinations(tmp_path, args, needle):
    tiny_corpus(tmp_path / "c", tokens=2000)
    r = run("train", "--data", tmp_path / "c", "--out", tmp_path / "m.h5", "--hidden", "16", "-q", *args)
    assert r.exit_code == 1, r.output
    assert needle in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.h5").exists()


def test_cli_trains_slim_model(tmp_path):
    tiny_corpus(tmp_path / "c", tokens=4000)
    r = run("train", "--data", tmp_path / "c", "--out", tmp_path / "m.h5", *TINY,
            "--input", "slim", "--input-k", "4", "--input-ratio", "0.25",
            "--output", "slim", "--output-k", "4", "--output-ratio", "0.25", "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.output.strip().splitlines()[-1])
    assert np.isfinite(s["test_ppl"])
    info = json.loads(run("inspect", tmp_path / "m.h5", "--json").output)
    assert info["config"]["model"]["input"] == "slim"
    assert info["config"]["model"]["output_m"] % 4 == 0
