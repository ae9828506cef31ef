"""The experiment runner: plans, results, skipping, resuming, parallel jobs, errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from slimnp.cli import main
from slimnp.experiment import PlanError, load_plan, read_results, resolve, time_left

from helpers import tiny_corpus

PLAN = """\
[plan]
description = "toy"

[base]
data = "{data}"
hidden = 12
layers = 1
epochs = {epochs}
bptt = 10
batch-size = 8

[[run]]
name = "dense"
method = "uncompressed"
compression = 1

[[grid]]
name = "se-{{label}}"
method = "SE"
zip = true
label = ["4"]
compression = [4]
input = "slim"
output = "slim"
input-k = 4
output-k = 4
input-ratio = [0.25]
output-ratio = [0.25]

[[run]]
name = "sm-4"
method = "SM"
compression = 4
match = "se-4"
match_by = "hidden"
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    tiny_corpus(d, tokens=12000)
    return d


def _plan(tmp_path, corpus, epochs=2, text=PLAN) -> Path:
    p = tmp_path / "plan.toml"
    p.write_text(text.format(data=corpus, epochs=epochs))
    return p


def test_workers_run_this_slimnp_not_one_in_the_current_folder(tmp_path, corpus):
    """`python -m slimnp` would import a slimnp/ that lies in the caller's
    folder first; the runner's workers import the runner's own package."""
    fake = tmp_path / "cwd" / "slimnp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the wrong slimnp was imported')\n")
    (fake / "__main__.py").write_text("raise SystemExit('the wrong slimnp was run')\n")
    text = PLAN.split("[[grid]]")[0].replace("epochs = {epochs}", "epochs = 1")
    plan = _plan(tmp_path, corpus, text=text)
    import slimnp

    env = dict(os.environ, PYTHONPATH=str(Path(slimnp.__file__).parent.parent))
    res = subprocess.run([sys.executable, "-P", "-m", "slimnp", "experiment", "run", str(plan)],
                         cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    rec = read_results(tmp_path / "results" / "plan.jsonl")["dense"]
    # relative to the plan's folder, as every path of a results line
    assert not Path(rec["package"]).is_absolute()
    assert (plan.parent / rec["package"]).resolve() == Path(slimnp.__file__).parent.resolve()


def _run(args, cwd=None, **kw):
    return subprocess.run([sys.executable, "-m", "slimnp", "experiment", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, **kw)


def _essence(results: Path) -> dict:
    """What must not depend on how the plan was run: per run, the perplexities,
    sizes and configs (not the times)."""
    return {name: (r["valid_ppl"], r["test_ppl"], r["parameters"], r["epochs"], r["config"]["model"],
                   r["config"]["train"], r["matched"])
            for name, r in read_results(results).items()}


@pytest.mark.slow
def test_plan_runs_skips_finished_and_jobs_agree(tmp_path, corpus):
    (tmp_path / "a").mkdir()
    one = _plan(tmp_path / "a", corpus)
    res = _run(["run", str(one)])
    assert res.returncode == 0, res.stderr
    results = one.parent / "results" / "plan.jsonl"
    recs = read_results(results)
    assert sorted(recs) == ["dense", "se-4", "sm-4"]
    r = recs["se-4"]
    for key in ("config", "parameters", "parameters_by_layer", "valid_ppl", "test_ppl", "epochs",
                "wall_seconds", "tokens_per_s", "machine", "slimnp_version", "git_commit", "history"):
        assert key in r, key
    assert r["epochs"] == 2 and r["method"] == "SE" and r["compression"] == 4
    assert r["config"]["model"]["output"] == "slim" and r["config"]["model"]["output_k"] == 4
    assert r["parameters"] == sum(r["parameters_by_layer"].values())
    assert len(r["history"]) == 2 and 1 < r["test_ppl"] < 200
    # SM: the hidden size whose parameter count is nearest the SE run's
    sm = recs["sm-4"]
    assert sm["matched"]["run"] == "se-4" and sm["matched"]["target_parameters"] == r["parameters"]
    assert sm["config"]["model"]["hidden"] == sm["matched"]["value"] < 12
    assert sm["parameters"] == sm["matched"]["parameters"]
    # every line is strict JSON, a complete line of the schema with no absolute path
    from slimnp.results import check

    for line in results.read_text().splitlines():
        assert check(json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))) == []
    # a second sitting: nothing to do, the file unchanged
    before = results.read_bytes()
    again = _run(["run", str(one)])
    assert again.returncode == 0 and "3 finished, 0 to run" in again.stderr
    only = _run(["run", str(one), "--only", "sm-4"])  # finished runs counted over the whole plan
    assert only.returncode == 0 and "3 finished, 0 of the 1 chosen by --only to run" in only.stderr
    assert results.read_bytes() == before
    # --jobs 2 elsewhere: the same table
    (tmp_path / "b").mkdir()
    two = _plan(tmp_path / "b", corpus)
    res2 = _run(["run", str(two), "--jobs", "2"])
    assert res2.returncode == 0, res2.stderr
    assert _essence(two.parent / "results" / "plan.jsonl") == _essence(results)
    # status shows them done
    st = CliRunner().invoke(main, ["experiment", "status", str(one)])
    assert st.exit_code == 0 and st.output.count(" done") == 3


def _wait_for(path: Path, proc, timeout=300):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_stopped_or_killed_plan_resumes_to_the_same_results(tmp_path, corpus, how):
    """Stop the runner after the first run's first epoch checkpoint (SIGTERM: it
    stops its workers with checkpoints; kill -9: runner and worker die at once);
    the next `experiment run` ends with exactly the table of an uninterrupted one."""
    text = PLAN.replace('[[run]]\nname = "sm-4"', '[[run]]\nname = "sm-4"\nepochs = 1', 1)
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir()
    cut_dir.mkdir()
    ref = _plan(ref_dir, corpus, epochs=4, text=text)
    assert _run(["run", str(ref)]).returncode == 0
    cut = _plan(cut_dir, corpus, epochs=4, text=text)
    proc = subprocess.Popen([sys.executable, "-m", "slimnp", "experiment", "run", str(cut)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = cut_dir / "runs" / "plan" / "dense.h5"
    _wait_for(ckpt, proc)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert "stopped by SIGTERM" in err and "continues them" in err
    else:
        runner_pid, worker_pid = map(int, (ckpt.with_suffix(".lock")).read_text().split())
        assert runner_pid == proc.pid
        os.kill(worker_pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()
    assert "dense" not in read_results(cut_dir / "results" / "plan.jsonl")
    # status tells where the stopped run is and, its first epoch done, how long it still needs
    # (the signal lands in epoch 2 or later on a loaded machine, rarely after the last)
    # and the last validation perplexity its metrics log has
    st = CliRunner().invoke(main, ["experiment", "status", str(cut)])
    m = re.search(r"^dense .* (epoch [234]/4, segment \d+, about \d+:\d\d left|trained, test not evaluated)"
                  r"; valid (\d+\.\d\d) after epoch ([1234])$", st.output, re.M)
    assert m, st.output
    js = CliRunner().invoke(main, ["experiment", "status", str(cut), "--json"])
    rows = {r["run"]: r for r in map(json.loads, js.output.splitlines())}
    hist = rows["dense"]["history"]
    assert [e["epoch"] for e in hist] == list(range(1, int(m.group(3)) + 1))
    assert f"{hist[-1]['valid_ppl']:.2f}" == m.group(2) and rows["dense"]["valid_ppl"] is None
    assert rows["sm-4"]["history"] == []  # not started
    res = _run(["run", str(cut)])
    assert res.returncode == 0, res.stderr
    assert "[dense] resuming" in res.stderr
    assert _essence(cut_dir / "results" / "plan.jsonl") == _essence(ref_dir / "results" / "plan.jsonl")


def test_progress_history_reads_the_metrics_log(tmp_path):
    """A run in progress's epochs: one per epoch (a resumed run's repeated
    epoch keeps its later line), lines cut short and other events left out."""
    from types import SimpleNamespace

    from slimnp.experiment import last_epoch, progress_history

    lines = [{"event": "epoch", "epoch": 1, "lr": 1.0, "train_ppl": 300.0, "valid_ppl": 200.0},
             {"event": "checkpoint", "epoch": 2, "segment": 5},
             {"event": "epoch", "epoch": 2, "lr": 1.0, "train_ppl": 150.0, "valid_ppl": 140.0},
             {"event": "epoch", "epoch": 2, "lr": 1.0, "train_ppl": 151.0, "valid_ppl": 141.0},
             {"event": "epoch", "epoch": 3, "lr": 0.5, "train_ppl": 120.0, "valid_ppl": None}]
    (tmp_path / "a.metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"event": "ep')
    plan, run = SimpleNamespace(runs_dir=tmp_path), SimpleNamespace(name="a")
    hist = progress_history(plan, run)
    assert [(e["epoch"], e["valid_ppl"]) for e in hist] == [(1, 200.0), (2, 141.0), (3, None)]
    assert set(hist[0]) == {"epoch", "lr", "train_ppl", "valid_ppl"}
    assert last_epoch(hist)["epoch"] == 2 and last_epoch([]) is None
    assert progress_history(plan, SimpleNamespace(name="b")) == []  # no log yet


BAD = [
    ('[[run]]\nname = "a"\nhiden = 3\n', ":5: unknown option 'hiden'"),
    ('[[run]]\nname = "a"\nhidden = "big"\n', ":5: hidden expects an integer"),
    ('[[run]]\nname = "a"\ndropout = true\n', ":5: dropout expects float, got a boolean"),
    ('[[run]]\nname = "a"\ninput = "sparse"\n', ":5: input "),
    ('[[run]]\nname = "a"\n\n[[run]]\nname = "a"\n', ":7: duplicate run name 'a' (first at"),
    ('[[run]]\nname = "a"\nout = "x.h5"\n', ":5: out is set by the runner"),
    ('[[run]]\nname = "a"\nmatch = "b"\nmatch_by = "hidden"\n', "matches 'b', which the plan does not have"),
    ('[[run]]\nname = "a"\nmatch = "b"\n', "match_by"),
    ('[[run]]\nhidden = 4\n', "every [[run]] needs a name"),
    ('[[run]]\nname = "a/b"\n', "must be letters"),
    ('[runs]\nname = "a"\n', ":3: unknown table [runs]"),
    ('[[grid]]\nname = "g{x}"\nzip = true\nx = [1, 2]\nhidden = [3]\n', "same length"),
    ('[[run]\nname = "a"\n', "not valid TOML"),
    ('', "the plan has no runs"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_plans_give_one_line_naming_the_line(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text("[base]\nepochs = 1\n" + text)
    res = CliRunner().invoke(main, ["experiment", "run", str(p)])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert message in lines[0], (message, lines[0])
    assert str(p) in lines[0] or "--set" in lines[0]


def test_grid_expands_cartesian_and_formats_names(tmp_path, corpus):
    p = tmp_path / "g.toml"
    p.write_text(f'[base]\ndata = "{corpus}"\n\n[[grid]]\nname = "h{{hidden}}-l{{layers}}"\n'
                 'hidden = [8, 16]\nlayers = [1, 2]\nepochs = 1\n')
    plan = load_plan(p, overrides={"lr": 0.5})
    assert [r.name for r in plan.runs] == ["h8-l1", "h8-l2", "h16-l1", "h16-l2"]
    assert all(r.options["lr"] == 0.5 and r.options["epochs"] == 1 for r in plan.runs)
    assert plan.runs[0].options["data"] == str(corpus)
    resolve(plan)
    argv = plan.runs[3].argv
    assert argv[argv.index("--hidden") + 1] == "16" and argv[argv.index("--layers") + 1] == "2"
    assert argv[argv.index("--data") + 1] == str(corpus) and argv[argv.index("--lr") + 1] == "0.5"


def test_changed_plan_makes_the_checkpoint_stale(tmp_path, corpus):
    """A checkpoint made with other settings is not resumed silently."""
    from slimnp.experiment import check_stale

    p = _plan(tmp_path, corpus, epochs=1)
    runs = tmp_path / "runs" / "plan"
    runs.mkdir(parents=True)
    res = CliRunner().invoke(main, ["train", "--data", str(corpus), "--hidden", "12", "--layers", "1",
                                    "--epochs", "1", "--bptt", "10", "--batch-size", "8", "-q",
                                    "--out", str(runs / "dense.h5")])
    assert res.exit_code == 0, res.output
    plan = load_plan(p)
    resolve(plan)
    check_stale(plan.run("dense"), runs / "dense.h5")  # the same settings: fine
    plan = load_plan(p, overrides={"lr": 0.5})
    resolve(plan)
    with pytest.raises(PlanError, match="lr 1.0 -> 0.5"):
        check_stale(plan.run("dense"), runs / "dense.h5")


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.data
@pytest.mark.parametrize("plan", sorted((ROOT / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_repository_plans_load_and_match_sizes(plan):
    """The committed plans parse, every run's config is valid, and the SM/PM
    sizes found give parameter counts within 2% of the SE run they match --
    or, where one unit of the size is a bigger step than that (one unit of E
    is 2V parameters: 8.5% of WikiText-2's 1/128 SE model), the nearest
    count any size gives (both neighbours are further)."""
    import dataclasses

    from slimnp.experiment import configs_of, parameter_counts

    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib

    data = (plan.parent / tomllib.loads(plan.read_text())["base"]["data"]).resolve()
    if not data.exists():
        pytest.skip(f"needs {data}")
    p = load_plan(plan)
    resolve(p)
    assert len({r.name for r in p.runs}) == len(p.runs) >= 4
    for r in p.runs:
        if not r.matched:
            continue
        m = r.matched
        if abs(m["parameters"] / m["target_parameters"] - 1) < 0.02:
            continue
        mc, _ = configs_of(r.options)
        for v in (m["value"] - 1, m["value"] + 1):
            if v >= 1:
                n = parameter_counts(dataclasses.replace(mc, **{m["by"]: v}))["total"]
                assert abs(n - m["target_parameters"]) >= abs(m["parameters"] - m["target_parameters"]), \
                    (r.name, v, n, m)


LEARNED = """\
[base]
data = "{data}"
hidden = 12
layers = 1
epochs = 3
bptt = 10
batch-size = 8
decay-start = 1

[[run]]
name = "learned-4"
method = "SE learned"
compression = 4
mapping = "learned"
warmup_epochs = 1
frequent = 2
input = "slim"
output = "slim"
input-k = 4
output-k = 4
input-ratio = 0.25
output-ratio = 0.25
"""


@pytest.mark.slow
def test_learned_run_warms_up_compresses_and_fine_tunes(tmp_path, corpus):
    p = tmp_path / "learned.toml"
    p.write_text(LEARNED.format(data=corpus))
    res = _run(["run", str(p)])
    assert res.returncode == 0, res.stderr
    rec = read_results(tmp_path / "results" / "learned.jsonl")["learned-4"]
    m = rec["config"]["model"]
    assert rec["learned"] is True and m["mapping"] == "learned" and m["output_k"] == 4
    assert m["output_m"] == 4 * (round(0.25 * m["vocab_size"]) + 2)  # 2 frequent words' entries
    assert rec["epochs"] == 3 and 1 < rec["test_ppl"] < 200
    assert rec["compress"]["frequent"] == 2 and rec["compress"]["output"]["K"] == 4
    # the fine-tuning continued the warm-up's schedule: epoch 1 of it is epoch 2 of the run
    assert rec["config"]["train"]["epochs"] == 2
    assert [h["lr"] for h in rec["history"]] == [0.5, 0.25]  # epochs 2 and 3 of lr 1, 0.5, 0.25
    runs = tmp_path / "runs" / "learned"
    assert (runs / "learned-4.warmup.h5").exists() and (runs / "learned-4.compressed.h5").exists()
    again = _run(["run", str(p)])
    assert again.returncode == 0 and "1 finished, 0 to run" in again.stderr


def test_learned_plan_errors(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[[run]]\nname = "a"\nmapping = "learned"\n')
    with pytest.raises(PlanError, match='needs input = "slim"'):
        load_plan(p)
    p.write_text('[[run]]\nname = "a"\nfrequent = 3\n')
    with pytest.raises(PlanError, match=":3: frequent belongs to mapping"):
        load_plan(p)


@pytest.mark.parametrize("w,ds", [(1, 4), (1, 1), (2, 1), (3, 4), (2, 2), (1, 0)])
def test_learned_fine_tuning_continues_the_epoch_schedule(tmp_path, corpus, w, ds):
    """The fine-tuning's learning rates are the run's epochs w+1.. of the
    uninterrupted 'epoch' schedule, whatever the warm-up length."""
    from slimnp.experiment import learned_spec
    from slimnp.optim import Schedule

    p = tmp_path / "p.toml"
    p.write_text(LEARNED.format(data=corpus).replace("epochs = 3", "epochs = 7")
                 .replace("decay-start = 1", f"decay-start = {ds}")
                 .replace("warmup_epochs = 1", f"warmup_epochs = {w}"))
    plan = load_plan(p)
    spec = learned_spec(plan.runs[0])
    lr, start = spec["tune"]["lr"], spec["tune"]["decay_start"]

    def lrs(lr0, start, n):
        s, out, cur = Schedule("epoch", lr0, 0.5, 1.0, start), [], lr0
        for e in range(1, n + 1):
            out.append(cur)
            cur = s.next_lr(cur, e, None, None)
        return out

    assert lrs(lr, start, 7 - w) == lrs(1.0, ds, 7)[w:]


def test_run_held_by_another_runner_is_skipped_untouched(tmp_path, corpus):
    """A run whose lock another runner holds is skipped, and its files --
    the spec that runner's worker reads, the summary it writes -- are left
    as they are."""
    from slimnp.experiment import _try_lock

    text = PLAN.split("[[grid]]")[0].replace("epochs = {epochs}", "epochs = 1")
    plan = load_plan(_plan(tmp_path, corpus, text=text))
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    spec, summary = plan.runs_dir / "dense.spec.json", plan.runs_dir / "dense.summary.json"
    spec.write_text("the other runner's spec")
    summary.write_text("the other runner's summary")
    held = _try_lock(plan.runs_dir / "dense.lock")
    assert held is not None
    try:
        res = _run(["run", str(plan.path)])
    finally:
        os.close(held)
    assert "[dense] skipped: another process" in res.stderr
    assert spec.read_text() == "the other runner's spec"
    assert summary.read_text() == "the other runner's summary"
    assert not (tmp_path / "results" / "plan.jsonl").exists()


def test_run_finished_by_another_runner_meanwhile_is_not_run_again(tmp_path, corpus):
    """A runner's queue is made when it starts; a run another runner finished
    since then is skipped when its turn comes, not trained and recorded twice."""
    from slimnp.experiment import Runner

    text = PLAN.split("[[grid]]")[0].replace("epochs = {epochs}", "epochs = 1")
    plan = load_plan(_plan(tmp_path, corpus, text=text))
    lines = []
    runner = Runner(plan, log=lines.append)
    (run,) = runner.pending()
    plan.results.parent.mkdir(parents=True, exist_ok=True)
    plan.results.write_text(json.dumps({"run": "dense", "test_ppl": 1.0}) + "\n")  # the other runner's line
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    runner._one(run)
    assert any("[dense] skipped: another process finished it" in ln for ln in lines), lines
    assert not (plan.runs_dir / "dense.h5").exists()
    assert len(plan.results.read_text().splitlines()) == 1


def test_only_says_what_is_left_of_the_plan(tmp_path, corpus):
    """``--only`` finishing its runs does not report the whole plan done."""
    text = PLAN.split("[[grid]]")[0].replace("epochs = {epochs}", "epochs = 1")
    text += '\n[[run]]\nname = "small"\nmethod = "SM"\nhidden = 6\n'
    plan = _plan(tmp_path, corpus, text=text)
    res = _run(["run", str(plan), "--only", "small"])
    assert res.returncode == 0, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("the 1 run(s) chosen by --only are done; 1 of the plan's 2 left"), last
    res = _run(["run", str(plan)])
    assert res.returncode == 0 and res.stderr.strip().splitlines()[-1].startswith("all 2 runs done"), res.stderr


def test_time_left_from_a_checkpoints_train_state():
    """In epoch 3 of 4 with 500 tokens of it seen: 2 finished epochs of 2,000
    tokens (however often they were stopped and resumed), 4,500 seen in 90 s:
    3,500 tokens left at 50 tok/s."""
    st = {"epoch": 3, "epoch_tokens": 500, "tokens_seen": 4500, "train_seconds": 90.0}
    assert time_left(st, 4) == pytest.approx(70.0)
    # just after an epoch ended (the counters reset): 2 epochs of 2,000 left
    assert time_left({**st, "epoch_tokens": 0, "tokens_seen": 4000, "train_seconds": 80.0}, 4) == pytest.approx(80.0)
    assert time_left({**st, "epoch": 5, "epoch_tokens": 0, "tokens_seen": 8000}, 4) == 0.0
    assert time_left({**st, "epoch": 1}, 4) is None  # no epoch finished: its length is unknown
    assert time_left(st, None) is None and time_left({**st, "train_seconds": 0.0}, 4) is None
