"""Results files: one JSON line per finished run, one schema, one reader.

``slimnp experiment run`` appends a line when a run finishes,
``experiments/compress-ptb.sh`` one per command it runs; ``slimnp plot``,
``slimnp experiment status`` and ``experiments/report.py`` read them.  All of
them go through this module:

* :func:`append` checks a record against :data:`SCHEMA` and adds it as one
  line of strict JSON (a NaN or infinity becomes ``null`` with a
  ``<key>_reason`` beside it: :func:`slimnp.errors.json_dumps`), written by
  :func:`slimnp._atomic.append_line` under a lock, so a full disk or a second
  runner appending to the same file never leaves a torn line;
* :func:`read` gives ``run name -> record``; a later line of a name replaces
  an earlier one (a run redone after a fix);
* :func:`normalize` brings a record of an older form to the current one, and
  :func:`rewrite` does that for a whole file; both are idempotent.

Paths
-----
Every path in a record is relative to the folder of the plan that made it,
written with ``/``; ``plan`` itself is then the plan's file name.  A results
file thus means the same on every checkout and names no machine's folders
(the checkpoints' absolute paths stay in the checkpoints).

Older forms, read as the current one and rewritten by :func:`rewrite`
---------------------------------------------------------------------
* the runner's lines before ``format_version``: the absolute paths of the
  machine that ran them (``plan``, ``options.data``, ``config.data.*``,
  ``config.data.init_from``, ``package``), or a ``plan`` relative to the
  folder the runner was started from;
* the lines of ``experiments/compress-ptb.sh`` before it wrote this schema:
  ``{"step", "command", "output"}``, run from the plan folder's parent.

Examples
--------
>>> from slimnp import results                                  # doctest: +SKIP
>>> res = results.read("experiments/results/sweeps-ptb.jsonl")  # doctest: +SKIP
>>> res["se-32"]["test_ppl"]                                    # doctest: +SKIP
166.61...
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

from ._atomic import append_line, atomic_path
from .errors import json_dumps

#: The form of a results line this module writes (``format_version``).
FORMAT_VERSION = 1

_NUM = (int, float)
_NONE = type(None)


class Field(NamedTuple):
    types: tuple  # accepted JSON types (int/float exclude bool); () accepts any value
    required: bool  # every line written has it
    meaning: str


#: Every key a results line may have: its JSON types, whether every line has
#: it, and what it means.  Other keys are allowed (a plan's free labels), and
#: ``<key>_reason`` (a string) says why ``<key>`` is null.
SCHEMA = {
    "format_version": Field((int,), True, f"the form of the line: {FORMAT_VERSION}"),
    "run": Field((str,), True, "the run's name, unique in its plan"),
    "plan": Field((str,), True, "the file that made the line (a plan, or a script), relative "
                                "to its own folder: its name"),
    "valid_ppl": Field(_NUM + (_NONE,), True, "best validation perplexity (null: none measured)"),
    "test_ppl": Field(_NUM + (_NONE,), True, "test perplexity of the best model over every test "
                                             "token (null: not measured)"),
    # the plan's labels for plots and tables
    "method": Field((str,), False, "the plan's method label (SE, SM, PM, ...)"),
    "compression": Field(_NUM, False, "the plan's compression label (8 for 1/8)"),
    "label": Field((), False, "a grid axis that is no option"),
    "learned": Field((bool,), False, "a mapping = \"learned\" run: warm-up, compress, fine-tune"),
    "warmup_epochs": Field((int,), False, "dense epochs of a learned run before compressing"),
    "frequent": Field((int,), False, "words a learned run kept exact"),
    # the model
    "options": Field((dict,), False, "the run's `slimnp train` options (underscore names)"),
    "config": Field((dict,), False, "model, train and data config stored in the checkpoint"),
    "parameters": Field((int,), False, "parameters of the model"),
    "parameters_by_layer": Field((dict,), False, "parameters per layer"),
    "embedding_parameters": Field((int,), False, "parameters of the input and output "
                                                 "embeddings (output bias left out)"),
    "matched": Field((dict, _NONE), False, "the size chosen to match another run's parameters"),
    "compress": Field((dict,), False, "a learned run's compression report"),
    # the training
    "test_tokens": Field((int, _NONE), False, "tokens of the test text"),
    "epochs": Field((int, _NONE), False, "epochs trained, over every sitting"),
    "train_seconds": Field(_NUM + (_NONE,), False, "training time of every epoch, every sitting"),
    "wall_seconds": Field(_NUM + (_NONE,), False, "the last sitting's worker, start to end"),
    "tokens_per_s": Field(_NUM + (_NONE,), False, "training tokens per second"),
    "history": Field((list,), False, "per epoch: {epoch, lr, train_ppl, valid_ppl}"),
    # what made it
    "machine": Field((dict,), False, "slimnp.machine.describe() of the machine that recorded it"),
    "slimnp_version": Field((str,), False, "slimnp's version"),
    "numpy_version": Field((str,), False, "NumPy's version"),
    "git_commit": Field((str, _NONE), False, "the worker's checkout (-dirty: with changes)"),
    "package": Field((str, _NONE), False, "the worker's slimnp package folder"),
    "finished_at": Field((str,), False, "UTC time the line was made (ISO 8601)"),
    # a script's command (experiments/compress-ptb.sh)
    "cwd": Field((str,), False, "the folder the command ran in"),
    "command": Field((str,), False, "the command line, as run in cwd (its program by name)"),
    "output": Field((dict,), False, "the command's --json output (its paths relative to the "
                                    "plan's folder)"),
}

#: The keys of one ``history`` entry (from the run's metrics file).
HISTORY_KEYS = ("epoch", "lr", "train_ppl", "valid_ppl")

# the --json outputs of `slimnp evaluate`, `compress` and `train` that a script
# records: where the schema's fields are in them (a path of keys)
_LIFTED = (("test_ppl", ("perplexity",)), ("test_ppl", ("test_ppl",)),
           ("valid_ppl", ("best_valid_ppl",)), ("valid_ppl", ("valid_ppl_after",)),
           ("test_tokens", ("tokens",)), ("test_tokens", ("test_tokens",)),
           ("parameters", ("parameters",)), ("parameters", ("parameters", "after")),
           ("epochs", ("epochs_done",)), ("train_seconds", ("train_seconds",)),
           ("wall_seconds", ("wall_seconds",)))
# keys of those outputs that hold a path relative to the command's folder
_OUTPUT_PATHS = ("model", "file", "out", "best")


class ResultsError(ValueError):
    """A results file or record is not what :data:`SCHEMA` says; the message
    is one line naming the file (and the line or run)."""


# ---------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------
def _is(value, types) -> bool:
    if not types:
        return True
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _type_names(types) -> str:
    names = {int: "integer", float: "number", str: "string", dict: "object", list: "list",
             bool: "true/false", _NONE: "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types if not (t is int and float in types)))


def is_absolute(text: str) -> bool:
    """Whether ``text`` is an absolute path on POSIX or Windows."""
    return PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute()


def _absolute_paths(obj, where=""):
    """``[(key path, value)]`` of the string leaves of ``obj`` that are absolute paths."""
    if isinstance(obj, dict):
        return [hit for k, v in obj.items() for hit in _absolute_paths(v, f"{where}.{k}" if where else k)]
    if isinstance(obj, list):
        return [hit for i, v in enumerate(obj) for hit in _absolute_paths(v, f"{where}[{i}]")]
    return [(where, obj)] if isinstance(obj, str) and is_absolute(obj) else []


def check(record, complete: bool = True) -> list:
    """The problems of ``record`` (an empty list: none).

    Every key of :data:`SCHEMA` that ``record`` has must have its type;
    ``complete`` also asks for every required key, this ``format_version``
    and no absolute path anywhere (what :func:`append` and :func:`rewrite`
    write).  ``complete=False`` is what :func:`read` asks of a line: a
    ``run`` name, and well-typed keys (a hand-written row of a few keys
    plots).
    """
    if not isinstance(record, dict):
        return ["not a JSON object"]
    problems = []
    for key, f in SCHEMA.items():
        if key in record:
            if not _is(record[key], f.types):
                problems.append(f"{key} must be {_type_names(f.types)}, got {record[key]!r}")
        elif f.required and (complete or key == "run"):
            problems.append(f"no {key}")
    problems += [f"{k} must be a string" for k, v in record.items()
                 if k.endswith("_reason") and not isinstance(v, str)]
    if complete:
        if "format_version" in record and record["format_version"] != FORMAT_VERSION:
            problems.append(f"format_version {record['format_version']!r}, expected "
                            f"{FORMAT_VERSION} (normalize() it)")
        problems += [f"{k} is an absolute path ({v!r}): store it relative to the plan's folder"
                     for k, v in _absolute_paths(record)]
    return problems


# ---------------------------------------------------------------------------
# the current form
# ---------------------------------------------------------------------------
def relative_path(path: str, plan_dir, base=None) -> str:
    """``path`` relative to ``plan_dir``, with ``/``.

    A relative ``path`` is taken relative to ``base`` (the folder it was
    written from) when given, else returned as it is.  A path that cannot be
    relative (another Windows drive) stays absolute.
    """
    if not is_absolute(path):
        if base is None:
            return path
        path = os.path.join(base, path)
    try:
        rel = os.path.relpath(os.path.normpath(path), os.path.abspath(plan_dir))
    except ValueError:
        return path
    return rel.replace(os.sep, "/")


def _relative(obj, plan_dir, base=None, keys=()):
    """``obj`` with every absolute path leaf relative to ``plan_dir`` (and the
    relative leaves under ``keys``, taken relative to ``base``)."""
    if isinstance(obj, dict):
        return {k: (relative_path(v, plan_dir, base) if isinstance(v, str) and k in keys
                    else _relative(v, plan_dir, base, keys)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative(v, plan_dir, base, keys) for v in obj]
    if isinstance(obj, str) and is_absolute(obj):
        return relative_path(obj, plan_dir)
    return obj


def _current(record: dict) -> dict:
    """``record`` with ``format_version`` first."""
    return {"format_version": FORMAT_VERSION,
            **{k: v for k, v in record.items() if k != "format_version"}}


def normalize(record: dict, plan_dir, plan_name: str | None = None) -> dict:
    """``record`` in the current form: its paths relative to ``plan_dir``.

    Parameters
    ----------
    record : dict
        A results line of any form (module docstring); it is not changed.
    plan_dir : str or Path
        The folder of the plan that made it.
    plan_name : str, optional
        The plan's file name, for lines that do not say it (the old lines
        of ``experiments/compress-ptb.sh``).

    Returns
    -------
    dict
        A new record; ``normalize(normalize(r, d), d) == normalize(r, d)``,
        and a record in the current form comes back equal to itself.
    """
    version = record.get("format_version")
    if version not in (None, FORMAT_VERSION):
        raise ResultsError(f"format_version {version!r} is newer than this slimnp reads "
                           f"({FORMAT_VERSION}): update slimnp")
    plan_dir = os.path.abspath(plan_dir)
    if "step" in record and "run" not in record:  # an old line of compress-ptb.sh
        if plan_name is None:
            raise ResultsError("a {step, command, output} line needs the name of its script")
        # the script ran its commands from the repository root, the plan folder's parent
        return from_command(record["step"], record.get("command", ""), record.get("output") or {},
                            plan=plan_name, plan_dir=plan_dir, cwd=os.path.dirname(plan_dir))
    out = _relative(record, plan_dir)
    if version is None and isinstance(record.get("plan"), str):
        # absolute, or relative to the folder the runner was started from:
        # plan_dir is its folder either way
        out["plan"] = posixpath.basename(record["plan"].replace("\\", "/"))
    return _current(out)


def _dig(obj, keys):
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


def from_command(run: str, command: str, output: dict, *, plan: str, plan_dir, cwd) -> dict:
    """The results line of one command of a script (``--json`` output).

    ``output`` is kept whole, its paths made relative to ``plan_dir`` (a
    relative one was relative to ``cwd``); the schema's fields are copied out
    of it where the command prints them: ``slimnp evaluate`` of the test text
    (``test_ppl``, ``test_tokens``), ``slimnp compress --valid``
    (``valid_ppl``: after compressing; ``parameters``) and ``slimnp train``
    (``valid_ppl``, ``test_ppl``, ``parameters``, ``epochs``, times).  The
    command's program is kept by name (which installation ran it is this
    machine's business).
    """
    output = _relative(output, plan_dir, base=cwd, keys=_OUTPUT_PATHS)
    words = command.split(" ", 1)
    words[0] = os.path.basename(words[0])
    rec = {"run": run, "plan": plan, "cwd": relative_path(os.path.abspath(cwd), plan_dir),
           "command": " ".join(words), "valid_ppl": None, "test_ppl": None}
    for key, where in _LIFTED:
        value = _dig(output, where)
        if rec.get(key) is None and _is(value, SCHEMA[key].types) and value is not None:
            rec[key] = value
    rec["output"] = output
    return _current(rec)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------
def read_lines(path) -> list:
    """The JSON objects of a JSON-lines file (results or metrics), one per
    non-blank line, as they are written.

    Raises
    ------
    ResultsError
        The file is missing or unreadable, or a line is not a JSON object
        (the message gives ``file:line``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{path}: not a text file (expected JSON lines)") from None
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    records = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ResultsError(f"{path}:{no}: not a JSON line (cut short by a crash? remove "
                               "the line; its run is then run again)") from None
        if not isinstance(rec, dict):
            raise ResultsError(f"{path}:{no}: not a JSON object")
        records.append(rec)
    return records


def plan_dir_of(record: dict, path):
    """``(folder, file name)`` of the plan that made a line of results file ``path``.

    An absolute ``plan`` names it; a relative one is looked for from the
    results file's folder upwards (an old line's ``plan`` is relative to the
    folder its runner started in); else the default layout,
    ``<plan folder>/results/<plan>.jsonl``, with the script of an old
    ``compress-ptb.sh`` line named after the results file.
    """
    plan = record.get("plan")
    if isinstance(plan, str) and is_absolute(plan):
        return os.path.dirname(plan), os.path.basename(plan)
    results_dir = Path(os.path.abspath(path)).parent
    if not isinstance(plan, str) or not plan:
        plan = Path(path).stem + (".sh" if "step" in record else ".toml")
    for folder in (results_dir, *results_dir.parents):
        if (folder / plan).is_file():
            return str((folder / plan).parent), posixpath.basename(plan)
    return str(results_dir.parent), posixpath.basename(plan)


def current(record: dict, path) -> dict:
    """A line of results file ``path`` in the current form."""
    if record.get("format_version") == FORMAT_VERSION:
        return record
    folder, name = plan_dir_of(record, path)
    return normalize(record, folder, plan_name=name)


def by_run(records, path) -> dict:
    """``run name -> record`` of the lines of results file ``path`` (in the
    current form; the last line of a name wins; lines without a run name,
    such as a metrics file's, are left out).

    Raises
    ------
    ResultsError
        A line has a key of the wrong type.
    """
    out = {}
    for rec in records:
        if not isinstance(rec.get("run"), str) and "step" not in rec:
            continue
        rec = current(rec, path)
        problems = check(rec, complete=False)
        if problems:
            raise ResultsError(f"{path}: run {rec.get('run')!r}: {'; '.join(problems)}")
        out[rec["run"]] = rec
    return out


def read(path) -> dict:
    """``run name -> record`` of a results file; ``{}`` if there is none yet.

    Lines of older forms come back in the current one (:func:`normalize`);
    the last line of a run's name wins.

    Raises
    ------
    ResultsError
        The file is damaged (``file:line``) or a line's keys have the wrong
        types.
    """
    path = Path(path)
    if not path.exists():
        return {}
    return by_run(read_lines(path), path)


def history(metrics) -> list:
    """The ``history`` of a record: each epoch of a ``*.metrics.jsonl`` file
    (a line cut short by a killed run is skipped)."""
    try:
        text = Path(metrics).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == "epoch":
            out.append({k: rec.get(k) for k in HISTORY_KEYS})
    return out


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path):
    """Hold an exclusive lock on ``path``'s folder: two runners appending to
    one results file take turns (each rewrites it whole, append_line)."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer at a time is the user's business
        yield
        return
    fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _complete(record: dict, path) -> dict:
    """``record`` as plain strict JSON, checked; raises :class:`ResultsError`."""
    rec = json.loads(json_dumps(record))  # NumPy scalars to numbers, NaN to null + reason
    problems = check(rec)
    if problems:
        raise ResultsError(f"{path}: run {rec.get('run')!r} is no results line: "
                           f"{'; '.join(problems)}")
    return rec


def append(path, record: dict) -> None:
    """Add ``record`` (current form: :func:`normalize` first) to results file
    ``path`` as one line of strict JSON.

    Raises
    ------
    ResultsError
        The record does not satisfy :data:`SCHEMA` (nothing is written).
    slimnp.errors.WriteError
        The file cannot be written (the previous lines are kept).
    """
    path = Path(path)
    line = json_dumps(_complete(record, path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        append_line(path, line)


def rewrite(path) -> int:
    """Rewrite results file ``path`` in the current form; returns the number
    of lines changed (0: the file was current and is left untouched).

    Every line is kept (a run's earlier lines too), every number as it was;
    only the form changes (:func:`normalize`).  Rewriting twice changes
    nothing the second time.
    """
    path = Path(path)
    with _locked(path):
        old = read_lines(path)
        new = [_complete(current(rec, path), path) for rec in old]
        text = "".join(json_dumps(rec) + "\n" for rec in new)
        if text == path.read_text(encoding="utf-8"):
            return 0
        with atomic_path(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    return sum(a != b for a, b in zip(old, new))


def file_problems(path) -> list:
    """``[(run, [problem, ...])]`` of the lines of ``path`` that are not in
    the current form (``slimnp experiment check``)."""
    bad = [(r.get("run"), check(r)) for r in read_lines(path)]
    return [(run, pr) for run, pr in bad if pr]


def record_command(out, plan, run: str, command: str, output: str, cwd=None) -> dict:
    """Append the results line of one command of a script (``slimnp
    experiment record``, for ``experiments/compress-ptb.sh``): ``output`` is
    the command's printed text, whose last line is its ``--json`` object;
    ``plan`` the script's path, relative paths from ``cwd`` (default: the
    current folder).  Returns the record."""
    plan = Path(plan)
    lines = output.strip().splitlines()
    try:
        obj = json.loads(lines[-1]) if lines else None
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise ResultsError(f"{run}: the command's last line is no JSON object: "
                           f"{lines[-1][:80] if lines else '(no output)'!r}")
    rec = from_command(run, command, obj, plan=plan.name, plan_dir=plan.resolve().parent,
                       cwd=str(cwd or os.getcwd()))
    append(out, rec)
    return rec
