"""Experiment plans: many training runs from one TOML file, resumable, in parallel.

A plan names runs; each run is a set of ``slimnp train`` options.  ``slimnp
experiment run PLAN`` trains every run that has no line in the results file
yet, evaluates it exactly on the test text and appends one JSON line per
finished run.  A stopped run (Ctrl-C, SIGTERM, kill -9, end of a session)
continues from its checkpoint the next time; a finished run is skipped, so a
plan run over several sittings ends with the same table as one sitting.

The plan file::

    [plan]                      # optional
    description = "Figure 4 on WikiText-2"
    results = "results/fig4-wt2.jsonl"   # default: results/<plan stem>.jsonl
    runs_dir = "runs/fig4-wt2"           # checkpoints and logs; default: runs/<plan stem>

    [base]                      # options every run starts from: `slimnp train --help`
    data = "../../shared/data/ptb"       # paths are relative to the plan file
    epochs = 6

    [[run]]                     # one run
    name = "uncompressed"
    method = "uncompressed"     # free labels, copied into the results (plots use them)

    [[grid]]                    # many runs: list values are axes (a Cartesian
    name = "se-{label}"         # product, or `zip = true` to vary together);
    zip = true                  # strings are formatted with the axis values
    label = ["2", "8"]
    input_ratio = [0.5, 0.125]
    input = "slim"
    input_k = 8

Runner keys besides the options: ``name`` (unique), ``method`` and
``compression`` (labels for plots), ``label`` (a grid axis that is no
option), and ``match`` / ``match_by``: give this run the ``hidden`` size or
``embedding_size`` whose parameter count is nearest to run ``match``'s (the
SM and PM baselines of the paper's Figure 4).  The runner owns ``out``,
``resume``, ``force``, ``threads``, ``quiet``, ``json``, ``device`` and
``distributed``.

Each run trains in its own process (``slimnp experiment worker``), so
``--jobs N`` runs N at once and a crash ends one run, not the plan.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import options as options_schema

RUNNER_KEYS = ("name", "method", "compression", "label", "match", "match_by", "warmup_epochs",
               "frequent")
OWNED = ("out", "resume", "force", "threads", "quiet", "json", "device", "distributed")
MATCH_BY = ("hidden", "embedding_size")
# runner keys [base] may set for every run (mapping = "learned" sets "learned")
BASE_RUNNER_KEYS = ("learned", "warmup_epochs", "frequent")


class PlanError(ValueError):
    """A plan file is wrong; the message names the file and line."""


@dataclass
class Run:
    name: str
    options: dict  # `slimnp train` options, underscore names, plan-relative paths resolved
    meta: dict  # runner keys: method, compression, match, match_by
    line: int  # where the run was declared
    argv: list = field(default_factory=list)
    matched: dict | None = None  # set by Plan.resolve_matches


@dataclass
class Plan:
    path: Path
    description: str
    results: Path
    runs_dir: Path
    runs: list

    def run(self, name: str) -> Run:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(name)


# ---------------------------------------------------------------------------
# reading a plan
# ---------------------------------------------------------------------------
def _toml():
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise PlanError("reading plans needs Python >= 3.11 or `pip install tomli`") from None
    return tomllib


def _key_lines(text: str) -> dict:
    """``(table, index, key) -> line`` for every ``key = ...`` of a TOML text
    (``table`` is the header name, ``index`` counts ``[[array]]`` entries)."""
    where, table, index, counts = {}, "", 0, {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if m := re.match(r"^\[\[\s*([^\]]+?)\s*\]\]", line):
            table = m.group(1)
            index = counts[table] = counts.get(table, -1) + 1
            where[(table, index, None)] = no
        elif m := re.match(r"^\[\s*([^\]]+?)\s*\]", line):
            table, index = m.group(1), 0
            where[(table, 0, None)] = no
        elif m := re.match(r"^([A-Za-z0-9_\-\"']+)\s*=", line):
            where.setdefault((table, index, m.group(1).strip("\"'")), no)
    return where


def parse_sets(sets) -> dict:
    """``--set KEY=VALUE`` items as options (a VALUE is read as TOML, a bare word as a string)."""
    out = {}
    for item in sets:
        if "=" not in item:
            raise PlanError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = _toml().loads(f"x = {v}")["x"]
        except Exception:
            out[k.strip()] = v  # a bare word: a string
    return out


def _expand_grid(entry: dict, where) -> list:
    """The runs of one ``[[grid]]`` table: ``[(options+runner keys)]``."""
    entry = dict(entry)
    zipped = entry.pop("zip", False)
    if not isinstance(zipped, bool):
        raise PlanError(f"{where('zip')}: zip expects true or false")
    axes = {k: v for k, v in entry.items() if isinstance(v, list)}
    fixed = {k: v for k, v in entry.items() if not isinstance(v, list)}
    if not axes:
        raise PlanError(f"{where(None)}: a [[grid]] needs at least one list of values "
                        "(or use [[run]] for a single run)")
    for k, v in axes.items():
        if not v:
            raise PlanError(f"{where(k)}: {k} is an empty list")
    if zipped:
        lengths = {len(v) for v in axes.values()}
        if len(lengths) > 1:
            raise PlanError(f"{where(None)}: with zip = true every list must have the same "
                            f"length (got {', '.join(f'{k}: {len(v)}' for k, v in axes.items())})")
        combos = [dict(zip(axes, vals)) for vals in zip(*axes.values())]
    else:
        combos = [dict(zip(axes, vals)) for vals in itertools.product(*axes.values())]
    out = []
    for combo in combos:
        run = {**fixed, **combo}
        for k, v in list(run.items()):
            if isinstance(v, str) and "{" in v:
                try:
                    run[k] = v.format(**combo)
                except (KeyError, IndexError, ValueError) as exc:
                    raise PlanError(f"{where(k)}: cannot fill {v!r} from the grid's lists "
                                    f"({type(exc).__name__}: {exc})") from None
        out.append(run)
    return out


def load_plan(path, overrides: dict | None = None) -> Plan:
    """Read and check a plan: every option known and well typed, names unique.

    ``overrides``: options set on every run after the plan's own (``--set``).
    Errors raise :class:`PlanError` naming ``file:line``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read the plan ({exc})") from None
    tomllib = _toml()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{path}: not valid TOML: {exc}") from None
    lines = _key_lines(text)

    def at(table, index=0, key=None):
        no = lines.get((table, index, key)) or lines.get((table, index, None))
        return f"{path}:{no}" if no else str(path)

    unknown_tables = sorted(set(doc) - {"plan", "base", "run", "grid"})
    if unknown_tables:
        t = unknown_tables[0]
        raise PlanError(f"{at(t)}: unknown table [{t}]; a plan has [plan], [base], [[run]] and [[grid]]")
    head = doc.get("plan", {})
    for k in head:
        if k not in ("description", "results", "runs_dir"):
            raise PlanError(f"{at('plan', 0, k)}: unknown [plan] key {k!r} "
                            "(known: description, results, runs_dir)")
    base_dir = path.resolve().parent
    # absolute: the workers run in the runs folder, not the caller's
    results = base_dir / head.get("results", f"results/{path.stem}.jsonl")
    runs_dir = base_dir / head.get("runs_dir", f"runs/{path.stem}")
    def check(opts: dict, where) -> tuple[dict, dict]:
        """Split runner keys from options; check names and types; resolve paths."""
        options, meta = {}, {}
        for raw_key, value in opts.items():
            key = raw_key.replace("-", "_")
            if key in RUNNER_KEYS:
                meta[key] = value
                continue
            if key == "mapping" and value == "learned":
                # not a `train` option: the runner's warm-up, compress, fine-tune
                meta["learned"] = True
                continue
            if key in OWNED:
                raise PlanError(f"{where(raw_key)}: {raw_key} is set by the runner, not the plan "
                                "(slimnp experiment run --help)")
            opt = options_schema.option(key)
            if opt is not None and (opt.name in OWNED or opt.name == "as_json"):
                raise PlanError(f"{where(raw_key)}: {raw_key} is set by the runner, not the plan "
                                "(slimnp experiment run --help)")
            if opt is None:
                close = sorted(n for n in options_schema.keys() if n.startswith(key[:4]))
                hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
                raise PlanError(f"{where(raw_key)}: unknown option {raw_key!r}{hint}; "
                                "see `slimnp train --help`")
            problem = options_schema.check_value(opt, value)
            if problem:
                raise PlanError(f"{where(raw_key)}: {raw_key} {problem}")
            if opt.kind in ("dir", "file"):
                value = str((base_dir / Path(value).expanduser()).resolve())
            options[opt.name] = value
        if "match" in meta or "match_by" in meta:
            if meta.get("match_by") not in MATCH_BY or not isinstance(meta.get("match"), str):
                raise PlanError(f"{where('match')}: match = \"RUN\" needs match_by = "
                                f"{' or '.join(repr(m) for m in MATCH_BY)}")
        for k in ("name", "method", "label"):
            if k in meta and not isinstance(meta[k], str):
                raise PlanError(f"{where(k)}: {k} expects a string, got {meta[k]!r}")
        if "compression" in meta and (isinstance(meta["compression"], bool)
                                      or not isinstance(meta["compression"], (int, float))):
            raise PlanError(f"{where('compression')}: compression expects a number")
        for k in ("warmup_epochs", "frequent"):
            if k in meta:
                if isinstance(meta[k], bool) or not isinstance(meta[k], int) or meta[k] < (
                        1 if k == "warmup_epochs" else 0):
                    raise PlanError(f"{where(k)}: {k} expects an integer >= "
                                    f"{1 if k == 'warmup_epochs' else 0}")
        return options, meta

    base, base_meta = check(doc.get("base", {}), lambda k: at("base", 0, k))
    per_run = [k for k in base_meta if k not in BASE_RUNNER_KEYS]
    if per_run:
        raise PlanError(f"{at('base', 0, per_run[0])}: [base] takes options (and "
                        f"{', '.join(BASE_RUNNER_KEYS[1:])}, mapping), not {', '.join(per_run)}")
    over = {}
    if overrides:
        over, _ = check(overrides, lambda k: f"--set {k}")
    runs, seen = [], {}
    entries = [("run", i, e, [e]) for i, e in enumerate(doc.get("run", []))]
    for i, g in enumerate(doc.get("grid", [])):
        entries.append(("grid", i, g, _expand_grid(g, lambda k, i=i: at("grid", i, k))))
    for kind, i, _, expanded in entries:
        for spec in expanded:
            where = lambda k, kind=kind, i=i: at(kind, i, k)  # noqa: E731
            opts, meta = check(spec, where)
            name = meta.get("name")
            if not name:
                raise PlanError(f"{where(None)}: every [[{kind}]] needs a name")
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+\-]*", name):
                raise PlanError(f"{where('name')}: run name {name!r} must be letters, digits, "
                                "'.', '_', '+' or '-' (it names files)")
            if name in seen:
                raise PlanError(f"{where('name')}: duplicate run name {name!r} "
                                f"(first at {seen[name]})")
            seen[name] = where("name")
            line = int(where("name").rsplit(":", 1)[-1]) if ":" in where("name") else 0
            meta = {**base_meta, **meta}
            for k in ("warmup_epochs", "frequent"):
                if k in meta and not meta.get("learned"):
                    raise PlanError(f"{where(k)}: {k} belongs to mapping = \"learned\" runs")
            runs.append(Run(name=name, options={**base, **opts, **over}, meta=meta, line=line))
    if not runs:
        raise PlanError(f"{path}: the plan has no runs ([[run]] or [[grid]])")
    names = {r.name for r in runs}
    for r in runs:
        if r.meta.get("learned"):
            o = r.options
            if o.get("input_kind") != "slim" and o.get("output_kind") != "slim":
                raise PlanError(f"{path}:{r.line}: run {r.name!r}: mapping = \"learned\" needs "
                                "input = \"slim\" and/or output = \"slim\" (what to compress to)")
            if any(o.get(k) for k in ("input_m", "output_m", "tie", "embedding_size")) or \
                    o.get("mapping_seed"):
                raise PlanError(f"{path}:{r.line}: run {r.name!r}: a learned run takes "
                                "--input-ratio/--output-ratio (no -m, tie, embedding size or "
                                "mapping seed)")
        m = r.meta.get("match")
        if m is not None and m not in names:
            raise PlanError(f"{path}:{r.line}: run {r.name!r} matches {m!r}, which the plan "
                            "does not have")
        if m is not None and runs_by(runs, m).meta.get("match"):
            raise PlanError(f"{path}:{r.line}: run {r.name!r} matches {m!r}, which itself "
                            "matches another run; match a run with fixed sizes")
    plan = Plan(path=path, description=head.get("description", ""), results=results,
                runs_dir=runs_dir, runs=runs)
    return plan


def runs_by(runs, name):
    return next(r for r in runs if r.name == name)


# ---------------------------------------------------------------------------
# options -> argv, configs and parameter counts
# ---------------------------------------------------------------------------
def hp_of(options: dict) -> tuple[dict, dict]:
    """``(hp, params)``: the settings a run's ``options`` give
    (:func:`slimnp.options.settings`) and all its options, defaults filled in
    (:func:`slimnp.options.complete`), exactly as ``slimnp train`` takes them."""
    params = options_schema.complete(options)
    return options_schema.settings(params), params


_VOCAB_SIZES: dict = {}


def vocab_size(params: dict) -> int:
    """V of a run's data (the built-in corpus, --data or --train), cached."""
    from .data import Vocabulary, find_splits

    vocab_file = None
    if params.get("data"):
        files = find_splits(params["data"])
        train, vocab_file = files["train"], files.get("vocab")
    elif params.get("train_file"):
        train = Path(params["train_file"])
    else:
        from .synthetic import builtin_corpus

        d, _ = builtin_corpus(log=lambda m: None)
        train = d / "train.txt"
        vocab_file = d / "vocab.txt" if (d / "vocab.txt").exists() else None
    key = (str(train), str(vocab_file), params.get("min_count"), params.get("max_vocab"))
    if key not in _VOCAB_SIZES:
        # as run_training builds it
        vocab = Vocabulary.read(vocab_file) if vocab_file else \
            Vocabulary.build(train, min_count=params["min_count"], max_vocab=params["max_vocab"])
        _VOCAB_SIZES[key] = len(vocab)
    return _VOCAB_SIZES[key]


def configs_of(options: dict):
    """``(ModelConfig, TrainConfig)`` a run's options give."""
    from .options import model_config, train_config

    hp, p = hp_of(options)
    mc = model_config(hp, vocab_size(p))
    mc.validate()
    tc = train_config(hp, seed=p["seed"], loss_average=p["loss_average"],
                      eval_batch_size=p["eval_batch_size"])
    tc.validate()
    return mc, tc


def parameter_counts(mc) -> dict:
    """Parameters per layer (first path component) and ``total``."""
    from .model import param_shapes

    counts: dict = {}
    for name, shape in param_shapes(mc).items():
        layer = name.split("/")[0]
        counts[layer] = counts.get(layer, 0) + int(math.prod(shape))
    counts["total"] = sum(counts.values())
    return counts


def match_size(run: Run, target: Run) -> dict:
    """Set ``run``'s hidden or embedding size so its parameter count is
    nearest ``target``'s (ties: the smaller size); returns what was chosen."""
    by = run.meta["match_by"]
    mc_t, _ = configs_of(target.options)
    want = parameter_counts(mc_t)["total"]
    mc, _ = configs_of(run.options)
    hi = mc.hidden if by == "embedding_size" else max(mc.hidden, mc_t.hidden)
    best = None
    for v in range(1, hi + 1):
        try:
            cand = dataclasses.replace(mc, **{by: v})
            cand.validate()
        except ValueError:
            continue
        n = parameter_counts(cand)["total"]
        if best is None or abs(n - want) < abs(best[1] - want):
            best = (v, n)
    if best is None:
        raise PlanError(f"{run.name}: no {by} gives a valid model to match {target.name}")
    run.options[by] = best[0]
    return {"run": target.name, "by": by, "value": best[0], "parameters": best[1],
            "target_parameters": want}


def resolve(plan: Plan) -> None:
    """Fill in matched sizes and each run's argv (checks every run's config)."""
    for r in plan.runs:
        if r.meta.get("match"):
            r.matched = match_size(r, plan.run(r.meta["match"]))
        try:
            configs_of(r.options)
        except ValueError as exc:
            raise PlanError(f"{plan.path}:{r.line}: run {r.name!r}: {exc}") from None
        r.argv = options_schema.to_argv(r.options)


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
# the schema, the reader and the writer of results lines: slimnp.results;
# the machine and the commit they name: slimnp.machine
from . import results  # noqa: E402
from .errors import _default as _jsonable  # noqa: E402,F401  (work() writes its summary with it)
from .machine import describe as describe_machine  # noqa: E402
from .machine import git_commit  # noqa: E402  (also work()'s: the worker's commit)


def read_results(path) -> dict:
    """``run name -> record`` of a results file (:func:`slimnp.results.read`;
    the last line of a name wins); a damaged file is a :class:`PlanError`."""
    try:
        return results.read(path)
    except results.ResultsError as exc:
        raise PlanError(str(exc)) from None


def _stored_config(ckpt: Path) -> dict:
    from . import io as sio

    return sio.describe(ckpt)["config"]


def check_stale(run: Run, ckpt: Path) -> None:
    """A checkpoint of this run's name made with other options is an error
    (the plan changed after the run started)."""
    mc, tc = configs_of(run.options)
    stored = _stored_config(ckpt)
    want = {"model": mc.to_dict(), "train": tc.to_dict()}
    diffs = []
    for part in ("model", "train"):
        have = stored.get(part, {})
        for k, v in want[part].items():
            if have.get(k, v) != v:
                diffs.append(f"{k} {have.get(k)!r} -> {v!r}")
    if diffs:
        raise PlanError(f"run {run.name!r}: its checkpoint {ckpt} was made with other settings "
                        f"({'; '.join(diffs[:4])}); delete it to start the run again, "
                        "or give the changed run a new name")


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------
def status(plan: Plan) -> list:
    """``[(run, state, record-or-None)]``: state is done, partial (epoch/segment) or new."""
    from . import io as sio

    done = read_results(plan.results)
    out = []
    for r in plan.runs:
        ckpt = plan.runs_dir / f"{r.name}.h5"
        warm = plan.runs_dir / f"{r.name}.warmup.h5"
        if r.name in done:
            out.append((r, "done", done[r.name]))
        elif not ckpt.exists() and warm.exists():  # a learned run still in its dense warm-up
            try:
                st = sio.describe(warm)["train_state"]
                state = f"warm-up epoch {st.get('epoch')}, segment {st.get('segment')}"
                if st.get("finished"):
                    state = "warm-up done"
            except Exception as exc:
                state = f"checkpoint unreadable ({type(exc).__name__})"
            out.append((r, state, None))
        elif ckpt.exists():
            try:
                st = sio.describe(ckpt)["train_state"]
                epochs = _stored_config(ckpt).get("train", {}).get("epochs")
                state = f"epoch {st.get('epoch')}/{epochs}, segment {st.get('segment')}"
                left = time_left(st, epochs)
                if left is not None:
                    from .progress import fmt_duration

                    state += f", about {fmt_duration(left)} left"
                if st.get("finished"):
                    state = "trained, test not evaluated"
                last = last_epoch(progress_history(plan, r))
                if last is not None:
                    state += f"; valid {last['valid_ppl']:.2f} after epoch {last['epoch']}"
            except Exception as exc:  # a damaged file: say so, the run will say more
                state = f"checkpoint unreadable ({type(exc).__name__})"
            out.append((r, state, None))
        else:
            out.append((r, "new", None))
    return out


def time_left(train_state: dict, epochs) -> float | None:
    """Seconds of training a stopped or running run still needs after its
    last checkpoint, at its average speed so far (``train_state``: the
    checkpoint's, as :func:`slimnp.io.describe` gives it).  An epoch's length
    is the tokens of the finished epochs over their number (exact however
    often an epoch was stopped and resumed); None before an epoch has
    finished.  Validation is not counted, and a plateau schedule may stop
    sooner."""
    done = (train_state.get("epoch") or 1) - 1
    seen, seconds = train_state.get("tokens_seen"), train_state.get("train_seconds")
    if not (done > 0 and epochs and seen and seconds):
        return None
    per_epoch = (seen - (train_state.get("epoch_tokens") or 0)) / done
    return max(0.0, epochs * per_epoch - seen) * seconds / seen


def progress_history(plan: Plan, run: Run) -> list:
    """The epochs a run has trained so far, from its metrics log in the runs
    folder (:func:`slimnp.results.history`; an epoch logged twice, by a run
    killed after logging it and resumed from an older checkpoint, keeps its
    later line); ``[]`` before its first epoch ends."""
    from .results import history

    log = history(plan.runs_dir / f"{run.name}.metrics.jsonl")
    by_epoch = {e["epoch"]: e for e in log if isinstance(e["epoch"], int)}
    return [by_epoch[k] for k in sorted(by_epoch)]


def last_epoch(hist: list):
    """The last entry of ``hist`` with a validation perplexity, or None."""
    measured = [e for e in hist if isinstance(e.get("valid_ppl"), (int, float))]
    return measured[-1] if measured else None


def status_rows(plan: Plan) -> list:
    """One dict per run of :func:`status`: its state, size, perplexities
    and ``history`` (per epoch: epoch, lr, train_ppl, valid_ppl): a finished
    run's from its results line, a run in progress's so far from its metrics
    log (what ``slimnp experiment status`` shows; ``slimnp plot --kind
    curves`` draws its ``--json`` lines)."""
    rows = []
    for run, state, rec in status(plan):
        mc, tc = configs_of(run.options)
        rows.append({"run": run.name, "state": state, "parameters": parameter_counts(mc)["total"],
                     "hidden": mc.hidden, "embedding_size": mc.word_size, "epochs": tc.epochs,
                     "matched": run.matched, "valid_ppl": rec and rec.get("valid_ppl"),
                     "test_ppl": rec and rec.get("test_ppl"),
                     "history": (rec.get("history", []) if rec else
                                 [] if state == "new" else progress_history(plan, run))})
    return rows


def record(plan: Plan, run: Run, summary: dict, wall: float) -> dict:
    """The results line of a finished run (:data:`slimnp.results.SCHEMA`; its
    paths relative to the plan's folder)."""
    from ._version import __version__
    from . import io as sio

    info = sio.describe(summary.get("best") or plan.runs_dir / f"{run.name}.h5")
    cfg = info["config"]
    from .model import ModelConfig

    counts = parameter_counts(ModelConfig.from_dict(cfg["model"]))
    emb = counts.get("embedding", 0) + counts.get("output", 0) - cfg["model"]["vocab_size"]
    train_s = summary.get("train_seconds") or 0.0
    import numpy

    extra = {}
    comp = plan.runs_dir / f"{run.name}.compressed.h5"
    if run.meta.get("learned") and comp.exists():
        made = sio.describe(comp)["config"].get("compressed_from", {})
        extra["compress"] = {k: v for k, v in made.items() if k != "file"}
    return results.normalize({
        **extra,
        "run": run.name, "plan": str(plan.path), **{k: v for k, v in run.meta.items()
                                                   if k not in ("name", "match", "match_by")},
        "options": run.options, "config": cfg,
        "parameters": counts["total"], "parameters_by_layer": {k: v for k, v in counts.items()
                                                               if k != "total"},
        "embedding_parameters": emb, "matched": run.matched,
        "valid_ppl": summary.get("best_valid_ppl"), "test_ppl": summary.get("test_ppl"),
        "test_tokens": summary.get("test_tokens"), "epochs": summary.get("epochs_done"),
        # train_seconds: every epoch, over all sittings; wall_seconds: this sitting's
        # worker (training since the last resume, or only the final evaluation)
        "train_seconds": train_s, "wall_seconds": wall,
        "tokens_per_s": (summary.get("train_tokens_seen") or 0) / train_s if train_s else None,
        "history": results.history(plan.runs_dir / f"{run.name}.metrics.jsonl"),
        "machine": describe_machine(), "slimnp_version": __version__,
        "numpy_version": numpy.__version__,
        # the code of the worker that finished the run (its package and commit)
        "git_commit": summary.get("worker_git_commit", git_commit()),
        "package": summary.get("worker_package"),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }, plan.path.resolve().parent)


class Runner:
    """Runs a plan's unfinished runs, ``jobs`` at a time, each in a worker process.

    ``log`` gets one line per event (a run starts, finishes an epoch, ends).
    SIGINT/SIGTERM stop every worker after its current step with a
    checkpoint; the next ``run`` continues them.
    """

    def __init__(self, plan: Plan, jobs: int = 1, threads: int = 1, device: str = "cpu",
                 only=None, log=print):
        self.plan, self.jobs, self.threads, self.device = plan, jobs, threads, device
        self.only = set(only or ())
        self.log = log
        self.lock = threading.Lock()
        self.procs: dict = {}
        self.stopping = None
        self.failed: list = []
        self.finished: list = []

    def pending(self) -> list:
        done = read_results(self.plan.results)
        runs = [r for r in self.plan.runs if r.name not in done]
        if self.only:
            unknown = self.only - {r.name for r in self.plan.runs}
            if unknown:
                raise PlanError(f"{self.plan.path}: no run named {', '.join(sorted(unknown))}")
            runs = [r for r in runs if r.name in self.only]
        return runs

    def run(self) -> int:
        """Returns the exit code: 0 all done, 1 a run failed, 130 stopped."""
        plan = self.plan
        plan.runs_dir.mkdir(parents=True, exist_ok=True)
        todo = self.pending()
        done = read_results(plan.results)
        finished = sum(r.name in done for r in plan.runs)
        for r in todo:
            ckpt = plan.runs_dir / f"{r.name}.h5"
            # (a learned run's checkpoints hold the warm-up's and the compressed
            # model's configs, not the plan's: not compared)
            if ckpt.exists() and not r.meta.get("learned"):
                check_stale(r, ckpt)
        chosen = f" of the {len(self.only)} chosen by --only" if self.only else ""
        self.log(f"{plan.path}: {len(plan.runs)} runs, {finished} finished, {len(todo)}{chosen} to run "
                 f"({self.jobs} at a time, {self.threads} thread(s) each, {self.device}); "
                 f"results: {plan.results}")
        queue = list(todo)
        old = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)
               if threading.current_thread() is threading.main_thread()}
        try:
            workers = [threading.Thread(target=self._work, args=(queue,), daemon=True)
                       for _ in range(max(1, min(self.jobs, len(queue))))]
            for w in workers:
                w.start()
            while any(w.is_alive() for w in workers):
                for w in workers:
                    w.join(timeout=0.5)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        left = len(self.pending())
        if self.stopping:
            self.log(f"stopped by {self.stopping}: {len(self.finished)} run(s) finished now, "
                     f"{left} left; `slimnp experiment run {plan.path}` continues them")
            return 130
        if self.failed:
            self.log(f"{len(self.failed)} run(s) failed: {', '.join(self.failed)} "
                     f"(logs in {plan.runs_dir}); {left} left")
            return 1
        done = read_results(plan.results)
        rest = sum(r.name not in done for r in plan.runs)
        if rest:  # --only chose a part of the plan
            self.log(f"the {len(self.only)} run(s) chosen by --only are done; {rest} of the plan's "
                     f"{len(plan.runs)} left; results: {plan.results}")
        else:
            self.log(f"all {len(plan.runs)} runs done; results: {plan.results}")
        return 0

    def _stop(self, signum, frame):
        name = signal.Signals(signum).name
        if self.stopping:  # a second signal: stop hard
            for p in list(self.procs.values()):
                p.kill()
            return
        self.stopping = name
        self.log(f"{name}: stopping every run after its current step (checkpoints are written)...")
        for p in list(self.procs.values()):
            try:
                p.send_signal(signal.SIGTERM)
            except OSError:
                pass

    def _work(self, queue: list) -> None:
        while not self.stopping:
            with self.lock:
                if not queue:
                    return
                run = queue.pop(0)
            try:
                self._one(run)
            except Exception as exc:  # a bug or a damaged file: this run fails, the plan goes on
                self.log(f"[{run.name}] FAILED: {type(exc).__name__}: {exc}")
                with self.lock:
                    self.failed.append(run.name)

    def _one(self, run: Run) -> None:
        plan = self.plan
        ckpt = plan.runs_dir / f"{run.name}.h5"
        logf = plan.runs_dir / f"{run.name}.log"
        spec = plan.runs_dir / f"{run.name}.spec.json"
        summary_path = plan.runs_dir / f"{run.name}.summary.json"
        lock_path = plan.runs_dir / f"{run.name}.lock"
        lock = _try_lock(lock_path)
        if lock is None:  # another runner's worker reads this run's spec and writes its summary
            who = lock_path.read_text().split()
            self.log(f"[{run.name}] skipped: another process (pid {who[-1] if who else '?'}) "
                     "is training it now")
            self.failed.append(run.name)
            return
        try:
            if run.name in read_results(plan.results):  # another runner finished it meanwhile
                self.log(f"[{run.name}] skipped: another process finished it after this plan started")
                return
            summary_path.unlink(missing_ok=True)
            spec.write_text(json.dumps({"options": run.options, "out": str(ckpt), "summary": str(summary_path),
                                        "threads": self.threads, "device": self.device,
                                        "learned": learned_spec(run)}))
            self._launch(run, ckpt, logf, spec, summary_path, lock)
        finally:
            os.close(lock)

    def _launch(self, run, ckpt, logf, spec, summary_path, lock) -> None:
        plan = self.plan
        how = "resuming" if ckpt.exists() else "starting"
        self.log(f"[{run.name}] {how}: slimnp train {' '.join(run.argv)}")
        t0 = time.perf_counter()
        # the worker imports the slimnp this runner runs (not one that happens
        # to lie in the current folder: `python -m` would put that first)
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1",
                   PYTHONPATH=os.pathsep.join([pkg_root] + [p for p in os.environ.get(
                       "PYTHONPATH", "").split(os.pathsep) if p]))
        with open(logf, "a", encoding="utf-8") as lf:
            lf.write(f"--- {how} {datetime.datetime.now().isoformat(timespec='seconds')}\n")
            lf.flush()
            p = subprocess.Popen([sys.executable, "-m", "slimnp", "experiment", "worker", str(spec)],
                                 stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=plan.runs_dir,
                                 # signals reach it through the runner only; it holds the
                                 # run's lock too, so a killed runner leaves it locked
                                 start_new_session=True, pass_fds=(lock,))
            with self.lock:
                self.procs[run.name] = p
            os.ftruncate(lock, 0)  # who holds the run: the runner and its worker
            os.pwrite(lock, f"{os.getpid()} {p.pid}\n".encode(), 0)
            pos = logf.stat().st_size
            while p.poll() is None:
                time.sleep(1.0)
                pos = self._echo_epochs(run.name, logf, pos)
            self._echo_epochs(run.name, logf, pos)
        with self.lock:
            self.procs.pop(run.name, None)
        wall = time.perf_counter() - t0
        if p.returncode != 0 or not summary_path.exists():
            if self.stopping:
                self.log(f"[{run.name}] stopped; checkpoint {ckpt}")
                return
            last = [ln for ln in logf.read_text(encoding="utf-8", errors="replace").splitlines()
                    if ln.strip()]
            self.log(f"[{run.name}] FAILED (exit {p.returncode}): {last[-1] if last else 'no output'}")
            self.failed.append(run.name)
            return
        summary = json.loads(summary_path.read_text())
        if not summary.get("finished"):
            self.log(f"[{run.name}] stopped at epoch {summary.get('epochs_done')}; checkpoint {ckpt}")
            return
        rec = record(plan, run, summary, wall)
        with self.lock:
            results.append(plan.results, rec)
            self.finished.append(run.name)
        self.log(f"[{run.name}] done: valid {rec['valid_ppl']:.2f}  test {rec['test_ppl']:.2f}  "
                 f"{rec['parameters']:,} parameters  {fmt_s(wall)}")

    def _echo_epochs(self, name: str, logf: Path, pos: int) -> int:
        """Echo the new epoch lines of a worker's log; returns the new offset."""
        try:
            with open(logf, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except OSError:
            return pos
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            if line.startswith("epoch ") and "valid ppl" in line:
                self.log(f"[{name}] {line.strip()}")
        return pos + end


def _try_lock(path: Path):
    """An exclusive lock on ``path`` (a file descriptor), or None if another
    process holds it.  The kernel drops it when every holder exits (kill -9
    included): no stale locks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): no protection against two runners
        return fd
    except OSError:
        os.close(fd)
        return None
    return fd


def fmt_s(s: float) -> str:
    from .progress import fmt_duration

    return fmt_duration(s)


def _final_summary(ckpt: Path):
    """The ``final`` record of a finished run's metrics log, if the run's
    checkpoint says it finished (None otherwise)."""
    from . import io as sio

    metrics = ckpt.with_name(ckpt.stem + ".metrics.jsonl")
    if not (ckpt.exists() and metrics.exists()):
        return None
    if not sio.describe(ckpt)["train_state"].get("finished"):
        return None
    final = None
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "final" and rec.get("finished") and "test_ppl" in rec:
            final = {k: v for k, v in rec.items() if k != "event"}
    return final


# ---------------------------------------------------------------------------
# learned assignment as a method of a plan: warm up dense, compress, fine-tune
# ---------------------------------------------------------------------------
def learned_spec(run: Run):
    """What the worker needs for a ``mapping = "learned"`` run (None otherwise):
    the dense warm-up's arguments, the compression settings, and the
    fine-tuning arguments (training options only: the model comes from the
    compressed file)."""
    if not run.meta.get("learned"):
        return None
    o = run.options
    hp, p = hp_of(o)
    w = int(run.meta.get("warmup_epochs", 1))
    total = int(hp["epochs"])
    if w >= total:
        raise PlanError(f"run {run.name!r}: warmup_epochs {w} must be below epochs {total}")
    slim_keys = ("input_kind", "output_kind", "input_k", "input_ratio", "output_k", "output_ratio",
                 "mapping", "mapping_seed")
    dense = {k: v for k, v in o.items() if k not in slim_keys}
    dense["epochs"] = w
    if p.get("data"):  # no test evaluation of the warm-up: --train/--valid, not --data
        from .data import find_splits

        files = find_splits(p["data"])
        dense.pop("data")
        dense.update(train_file=str(files["train"]), valid_file=str(files["valid"]))
    tune = {k: v for k, v in o.items() if k not in slim_keys and k not in options_schema.MODEL_OPTIONS}
    tune["epochs"] = total - w
    if hp["schedule"] == "epoch":
        # continue the warm-up's schedule: epoch e of the fine-tuning is epoch
        # e + w of the run, so every method sees the same learning rates.  The
        # 'epoch' schedule gives epoch e (>= 2) lr0 d^max(0, e - start) and
        # epoch 1 lr0 itself, so the fine-tuning starts at lr0 d^a and, if that
        # was decayed already (a > 0), decays from its second epoch on.
        ds, d = int(hp["decay_start"]), float(hp["lr_decay"])
        a = max(0, w + 1 - ds)
        tune["lr"] = float(hp["lr"]) * d ** a
        tune["decay_start"] = 1 if a > 0 else ds - w
    compress = {"input_k": o.get("input_k") if o.get("input_kind") == "slim" else None,
                "input_ratio": o.get("input_ratio") if o.get("input_kind") == "slim" else None,
                "output_k": o.get("output_k") if o.get("output_kind") == "slim" else None,
                "output_ratio": o.get("output_ratio") if o.get("output_kind") == "slim" else None,
                "frequent": int(run.meta.get("frequent", 0)), "seed": int(p.get("mapping_seed") or 0)}
    return {"warmup": dense, "tune": tune, "compress": compress, "warmup_epochs": w}


def _work_learned(spec, log) -> dict:
    """Warm-up (``<run>.warmup.h5``), compress (``<run>.compressed.h5``),
    fine-tune (``<run>.h5``); each phase resumes or is skipped when done."""
    from . import io as sio
    from .compress import compress_file
    from .runs import train
    from .trainer import resume_training

    L = spec["learned"]
    out = Path(spec["out"])
    warm = out.with_name(out.stem + ".warmup.h5")
    comp = out.with_name(out.stem + ".compressed.h5")
    common = {"quiet": True, "threads": spec["threads"], "device": spec["device"]}
    warm_summary = None
    if not out.exists():
        if warm.exists() and sio.describe(warm)["train_state"].get("finished"):
            log(f"{warm}: warm-up done")
        elif warm.exists():
            warm_summary = resume_training(warm, device=spec["device"], log=log, progress=False)
        else:
            log(f"warm-up: {L['warmup_epochs']} epoch(s) of the dense model")
            warm_summary = train({**L["warmup"], "out": str(warm), **common}, log=log)
        if warm_summary is not None and not warm_summary.get("finished"):
            return {**warm_summary, "finished": False, "epochs_done": warm_summary.get("epochs_done")}
        if not comp.exists():  # from the warm-up's last epoch
            compress_file(warm, comp, **L["compress"], log=log, progress=False)
        log(f"fine-tuning {comp}")
        summary = train({**L["tune"], "init_from": str(comp), "out": str(out), **common}, log=log)
    else:
        summary = resume_training(out, device=spec["device"], log=log, progress=False,
                                  allow_finished=True)
    return _with_warmup(summary, warm)


def _with_warmup(summary: dict, warm: Path) -> dict:
    """The fine-tuning's summary with the warm-up's epochs and time added."""
    from . import io as sio

    st = sio.describe(warm)["train_state"]
    summary = dict(summary)
    summary["epochs_done"] = (summary.get("epochs_done") or 0) + int(st.get("epoch", 1)) - 1
    summary["train_seconds"] = (summary.get("train_seconds") or 0.0) + float(st.get("train_seconds", 0.0))
    summary["train_tokens_seen"] = (summary.get("train_tokens_seen") or 0) + int(st.get("tokens_seen", 0))
    return summary


def work(spec_path) -> dict:
    """The worker: train (or resume, or finish) one run as its spec says,
    and write the summary file.  Runs in its own process."""
    from .runs import train
    from .threads import denormals_flushed, set_threads
    from .trainer import resume_training

    spec = json.loads(Path(spec_path).read_text())
    set_threads(spec["threads"])
    out = Path(spec["out"])
    log = lambda m: print(m, flush=True)  # noqa: E731
    # resumed and learned runs train outside runs.train: flush denormals here too
    # (specs written before --denormals existed hold no value: the default, flush)
    with denormals_flushed(spec["options"].get("denormals", "flush") == "flush"):
        final = _final_summary(out)
        if final is not None:  # trained and evaluated; stopped before its result was recorded
            log(f"{out}: finished and evaluated before; taking its final summary")
            summary = final
            if spec.get("learned"):
                summary = _with_warmup(summary, out.with_name(out.stem + ".warmup.h5"))
        elif spec.get("learned"):
            summary = _work_learned(spec, log)
        elif out.exists():
            summary = resume_training(out, device=spec["device"], log=log, progress=False,
                                      allow_finished=True)
        else:
            summary = train({**spec["options"], "out": str(out), "quiet": True,
                             "threads": spec["threads"], "device": spec["device"]}, log=log)
    summary = dict(summary, worker_git_commit=git_commit(), worker_package=str(Path(__file__).parent))
    tmp = Path(spec["summary"] + ".tmp")
    tmp.write_text(json.dumps(summary, default=_jsonable))
    os.replace(tmp, spec["summary"])
    return summary
