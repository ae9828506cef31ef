"""slimnp.results: the one schema, reader and writer of results files.

The committed results files are checked line by line: every line reads as a
complete record of the schema with no absolute path, normalising it again
changes nothing, and no number differs from the line as it is stored.
"""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from slimnp import machine, results as R

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "experiments" / "results").glob("*.jsonl"))


def numbers(obj, where=()):
    """``key path -> value`` of every number (and true/false) leaf of ``obj``."""
    if isinstance(obj, dict):
        return {p: v for k, x in obj.items() for p, v in numbers(x, where + (k,)).items()}
    if isinstance(obj, list):
        return {p: v for i, x in enumerate(obj) for p, v in numbers(x, where + (i,)).items()}
    return {where: obj} if isinstance(obj, (int, float)) else {}


def same_numbers(old: dict, new: dict) -> None:
    """Every number of ``old`` is in ``new`` at the same place, the same type
    and the same value (the same JSON text); a script's old line keeps its
    numbers under ``output``."""
    if "step" in old and "run" not in old:
        old, new = old["output"], new["output"]
    a, b = numbers(old), numbers(new)
    for path, v in a.items():
        assert path in b, path
        assert type(b[path]) is type(v) and json.dumps(b[path]) == json.dumps(v), (path, v, b[path])
    extra = set(b) - set(a) - {("format_version",)}
    assert not extra, extra


# ---------------------------------------------------------------------------
# the committed files
# ---------------------------------------------------------------------------
def test_there_are_committed_results():
    assert {p.name for p in COMMITTED} >= {"sweeps-ptb.jsonl", "table2-ptb.jsonl",
                                           "learned-ptb.jsonl", "compress-ptb.jsonl"}


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_file_reads_as_complete_records_with_their_numbers(path):
    raw = R.read_lines(path)
    assert raw
    for line in raw:
        rec = R.current(line, path)
        assert R.check(rec) == [], (line.get("run"), R.check(rec))  # complete, no absolute path
        assert not R._absolute_paths(rec)
        folder, name = R.plan_dir_of(line, path)
        assert rec["plan"] == name
        again = R.normalize(rec, folder, plan_name=name)
        assert again == rec  # idempotent
        assert json.dumps(again) == json.dumps(rec)  # key order too
        same_numbers(line, rec)
    res = R.read(path)
    assert set(res) == {R.current(x, path)["run"] for x in raw}


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_rewriting_a_committed_file_keeps_every_number(path, tmp_path):
    # the copy sits where the plan's folder is found as for the original
    copy = tmp_path / "experiments" / "results" / path.name
    copy.parent.mkdir(parents=True)
    copy.write_bytes(path.read_bytes())
    for plan in (ROOT / "experiments").iterdir():
        if plan.suffix in (".toml", ".sh"):
            (tmp_path / "experiments" / plan.name).write_bytes(plan.read_bytes())
    R.rewrite(copy)
    text = copy.read_text()
    assert R.rewrite(copy) == 0 and copy.read_text() == text  # a second time: nothing to do
    new = R.read_lines(copy)
    old = R.read_lines(path)
    assert len(new) == len(old)
    for o, n in zip(old, new):
        assert R.check(n) == []
        same_numbers(o, n)
        if o.get("format_version") == R.FORMAT_VERSION:
            assert n == o  # a current line is left as it is


# ---------------------------------------------------------------------------
# older forms
# ---------------------------------------------------------------------------
def _old_runner_line(plan: Path, data: Path) -> dict:
    return {"run": "se-8", "plan": str(plan), "method": "SE", "compression": 8,
            "options": {"data": str(data), "epochs": 2},
            "config": {"model": {"hidden": 20}, "data": {"train": str(data / "train.txt"),
                                                          "init_from": str(plan.parent / "runs" / "x.h5"),
                                                          "max_vocab": None}},
            "parameters": 1234, "valid_ppl": 150.5, "test_ppl": 140.25, "epochs": 2,
            "history": [{"epoch": 1, "lr": 1.0, "train_ppl": 300.0, "valid_ppl": 200.0}],
            "package": str(plan.parent.parent / "venv" / "slimnp"), "git_commit": None}


def test_an_old_runner_line_gets_paths_relative_to_its_plan(tmp_path):
    plan = tmp_path / "exp" / "p.toml"
    plan.parent.mkdir()
    plan.write_text("")
    data = tmp_path / "data" / "ptb"
    old = _old_runner_line(plan, data)
    rec = R.normalize(old, plan.parent)
    assert list(rec)[0] == "format_version" and rec["format_version"] == R.FORMAT_VERSION
    assert rec["plan"] == "p.toml"
    assert rec["options"]["data"] == "../data/ptb"
    assert rec["config"]["data"] == {"train": "../data/ptb/train.txt", "init_from": "runs/x.h5",
                                     "max_vocab": None}
    assert rec["package"] == "../venv/slimnp"
    assert R.check(rec) == [] and R.check(old, complete=True) != []
    assert (plan.parent / rec["options"]["data"]).resolve() == data.resolve()
    assert R.normalize(rec, plan.parent) == rec
    same_numbers(old, rec)


def test_an_old_line_with_a_plan_relative_to_the_runners_folder(tmp_path):
    """`slimnp experiment run experiments/p.toml` from the checkout wrote
    "plan": "experiments/p.toml": the plan is found above the results file."""
    plan = tmp_path / "experiments" / "p.toml"
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    plan.write_text("")
    old = _old_runner_line(plan, tmp_path / "data")
    old["plan"] = "experiments/p.toml"
    f = tmp_path / "experiments" / "results" / "p.jsonl"
    f.write_text(json.dumps(old) + "\n")
    rec = R.read(f)["se-8"]
    assert rec["plan"] == "p.toml" and rec["options"]["data"] == "../data"


def test_an_old_script_line_becomes_a_record(tmp_path):
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "experiments" / "s.sh").write_text("")
    old = {"step": "fine-tune", "command": "/opt/venv/bin/slimnp train --out experiments/runs/t.h5",
           "output": {"out": "experiments/runs/t.h5", "best": "experiments/runs/t.best.h5",
                      "best_valid_ppl": 119.5, "test_ppl": 115.25, "test_tokens": 82430,
                      "parameters": 1151600, "epochs_done": 2, "train_seconds": 10.5,
                      "wall_seconds": 11.0, "finished": True}}
    f = tmp_path / "experiments" / "results" / "s.jsonl"
    f.write_text(json.dumps(old) + "\n")
    rec = R.read(f)["fine-tune"]
    assert R.check(rec) == []
    assert rec["plan"] == "s.sh" and rec["cwd"] == ".."
    assert rec["command"] == "slimnp train --out experiments/runs/t.h5"  # run in cwd
    assert rec["output"]["out"] == "runs/t.h5" and rec["output"]["best"] == "runs/t.best.h5"
    assert (rec["valid_ppl"], rec["test_ppl"], rec["parameters"], rec["epochs"]) == \
        (119.5, 115.25, 1151600, 2)
    same_numbers(old, rec)
    assert R.rewrite(f) == 1 and R.rewrite(f) == 0
    assert R.read_lines(f) == [rec]


def test_a_newer_format_is_refused(tmp_path):
    with pytest.raises(R.ResultsError, match="newer"):
        R.normalize({"format_version": R.FORMAT_VERSION + 1, "run": "a"}, tmp_path)


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
def _record(**kw):
    return {"format_version": R.FORMAT_VERSION, "run": "a", "plan": "p.toml", "valid_ppl": 120.0,
            "test_ppl": 110.0, **kw}


def test_append_writes_strict_json_lines(tmp_path):
    f = tmp_path / "results" / "p.jsonl"  # the folder is made
    R.append(f, _record(parameters=np.int64(7), tokens_per_s=np.float32(2.5)))
    R.append(f, _record(run="b", valid_ppl=float("nan"), test_ppl=float("inf")))
    lines = f.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    res = R.read(f)
    assert res["a"]["parameters"] == 7 and type(res["a"]["parameters"]) is int
    assert res["b"]["valid_ppl"] is None and res["b"]["valid_ppl_reason"] == "not a number"
    assert res["b"]["test_ppl"] is None and res["b"]["test_ppl_reason"] == "infinite"
    R.append(f, _record(test_ppl=99.0))  # a run redone: its last line wins
    assert R.read(f)["a"]["test_ppl"] == 99.0 and list(R.read(f)) == ["a", "b"]


@pytest.mark.parametrize("bad, words", [
    ({"run": None}, "run must be string"),
    ({"plan": "/home/me/p.toml"}, "plan is an absolute path"),
    ({"options": {"data": "/data/ptb"}}, "options.data is an absolute path"),
    ({"parameters": 1.5}, "parameters must be integer"),
    ({"compression": True}, "compression must be"),
    ({"format_version": 0}, "format_version 0"),
    ({"test_ppl_reason": 3}, "test_ppl_reason must be a string"),
], ids=lambda x: str(x)[:24])
def test_append_refuses_a_record_off_the_schema(tmp_path, bad, words):
    f = tmp_path / "p.jsonl"
    with pytest.raises(R.ResultsError, match="p.jsonl") as e:
        R.append(f, _record(**bad))
    assert words in str(e.value)
    assert not f.exists()


@pytest.mark.parametrize("key", [k for k, f in R.SCHEMA.items() if f.required])
def test_append_needs_every_required_key(tmp_path, key):
    rec = _record()
    del rec[key]
    with pytest.raises(R.ResultsError, match=f"no {key}"):
        R.append(tmp_path / "p.jsonl", rec)


def test_the_script_command_appends_a_record(tmp_path, monkeypatch):
    """experiments/compress-ptb.sh: `slimnp experiment record ...`."""
    from click.testing import CliRunner

    from slimnp.cli import main

    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "s.sh").write_text("")
    monkeypatch.chdir(tmp_path)
    out = json.dumps({"model": "experiments/runs/m.h5", "file": str(tmp_path / "test.txt"),
                      "perplexity": 112.5, "tokens": 100})
    r = CliRunner().invoke(main, ["experiment", "record", "experiments/results/s.jsonl", "experiments/s.sh",
                                  "dense-test", "/x/bin/slimnp evaluate experiments/runs/m.h5 test.txt --json",
                                  "log line\n" + out])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["experiment", "check", "experiments/results/s.jsonl"])
    assert r.exit_code == 0 and "every line current" in r.output
    r = CliRunner().invoke(main, ["experiment", "rewrite", "experiments/results/s.jsonl"])
    assert r.exit_code == 0 and r.output.strip().endswith(": current")
    r = CliRunner().invoke(main, ["experiment", "record", "experiments/results/s.jsonl", "experiments/s.sh",
                                  "x", "cmd", "no json here"])
    assert r.exit_code == 1 and "no JSON object" in r.output
    rec = R.read("experiments/results/s.jsonl")["dense-test"]
    assert R.check(rec) == []
    assert (rec["test_ppl"], rec["test_tokens"], rec["valid_ppl"]) == (112.5, 100, None)
    assert rec["output"]["model"] == "runs/m.h5" and rec["output"]["file"] == "../test.txt"
    assert rec["cwd"] == ".." and rec["command"].startswith("slimnp evaluate ")


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
def test_read_of_no_file_is_empty_and_damage_names_the_line(tmp_path):
    assert R.read(tmp_path / "none.jsonl") == {}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(_record()) + "\n\n{cut")
    with pytest.raises(R.ResultsError, match=r"p.jsonl:3: not a JSON line"):
        R.read(f)
    f.write_text("[1, 2]\n")
    with pytest.raises(R.ResultsError, match=r"p.jsonl:1: not a JSON object"):
        R.read(f)
    with pytest.raises(R.ResultsError, match="no such file"):
        R.read_lines(tmp_path / "none.jsonl")


def test_read_takes_partial_rows_but_checks_their_types(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"run": "a", "test_ppl": 100.0}) + "\n" + json.dumps({"note": 1}) + "\n")
    assert list(R.read(f)) == ["a"]  # a hand-written row; a line of no run is left out
    f.write_text(json.dumps({"run": "a", "test_ppl": "100"}) + "\n")
    with pytest.raises(R.ResultsError, match="run 'a': test_ppl must be number or null"):
        R.read(f)


def test_history_keeps_the_epochs_of_a_metrics_file(tmp_path):
    m = tmp_path / "r.metrics.jsonl"
    lines = [{"event": "epoch", "epoch": 1, "lr": 1.0, "train_ppl": 300.0, "valid_ppl": 200.0, "x": 1},
             {"event": "interrupted", "epoch": 2}, {"event": "final", "test_ppl": 99.0}]
    m.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"event": "epo')
    assert R.history(m) == [{"epoch": 1, "lr": 1.0, "train_ppl": 300.0, "valid_ppl": 200.0}]
    assert R.history(tmp_path / "none.jsonl") == []


# ---------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------
def test_machine_description():
    m = machine.describe()
    assert set(m) == {"platform", "python", "cores", "cpu", "l3"}
    assert isinstance(m["cores"], int) and m["cpu"] and m["l3"]
    assert 1 <= machine.usable_cores() <= os.cpu_count()
    commit = machine.git_commit(ROOT)
    assert commit is None or len(commit.split("-")[0]) == 40


def test_numbers_helper_could_fail():
    a = {"x": 1.0, "y": [1, {"z": 2.5}]}
    same_numbers(a, json.loads(json.dumps(a)))
    with pytest.raises(AssertionError):
        same_numbers(a, {"x": 1, "y": [1, {"z": 2.5}]})  # 1.0 became 1
    with pytest.raises(AssertionError):
        same_numbers(a, {"x": 1.0, "y": [1, {"z": math.nextafter(2.5, 3)}]})
