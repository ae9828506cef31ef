"""The training options, once: names, types, defaults, help, recipes, and
how they become a :class:`~slimnp.model.ModelConfig` and a
:class:`~slimnp.trainer.TrainConfig`.

Everything that describes a training run as options reads this module:
``slimnp train`` generates its click options from :data:`TRAIN_OPTIONS`
(:mod:`slimnp.cli`), the experiment runner checks a plan's values with
:func:`check_value` and fills the defaults with :func:`complete`, and
:func:`slimnp.runs.train` turns the result into configs with
:func:`settings` and :func:`configs`.  An option is known by its name (the
key of an options dict: ``schedule``, ``input_kind``) or by its long flag
with dashes or underscores (``lr-schedule``, ``input``).

Options left unset take the recipe's value (:data:`PRESETS`): the built-in
synthetic corpus when no data is given, Zaremba et al.'s "small" PTB recipe
otherwise.  Errors name the options (``--input-k``), since the options are
what the user gave.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Option", "TRAIN_OPTIONS", "PRESETS", "MODEL_OPTIONS", "SLIM_SIZE_OPTIONS", "OptionError",
           "option", "keys", "check_value", "complete", "settings", "to_argv", "slim_settings",
           "model_config", "train_config", "configs"]


class OptionError(ValueError):
    """Options that do not go together (the CLI shows it as a usage error)."""


@dataclass(frozen=True)
class Option:
    """One ``slimnp train`` option.

    ``kind``: ``int``, ``float``, ``str``, ``choice`` (one of ``choices``),
    ``flag`` (a boolean switch), ``ints`` (comma-separated integers, or a
    list in a plan), ``dir`` / ``file`` (a path; ``exists``: it
    must exist).  ``default``: the value when not given; None means "the
    recipe's value" for the model and training options (``recipe``).
    ``low`` / ``high``: inclusive bounds of a number (``low_open``: the
    lower bound is excluded).  ``feeds``: what the option describes --
    ``model`` (fixed by ``--init-from`` and ``--resume``), ``train``, ``data``,
    or ``run`` (how this process runs: files, threads, output).
    """

    name: str
    flag: str
    kind: str
    help: str
    feeds: str
    default: Any = None
    recipe: bool = False
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    exists: bool = False
    short: str | None = None
    metavar: str | None = None
    show_default: bool = False

    @property
    def type_name(self) -> str:
        """The value's type in words (as click names it: errors quote it)."""
        return {"int": "integer", "float": "float", "choice": "choice", "flag": "boolean",
                "dir": "directory", "file": "file", "str": "text",
                "ints": "list of integers"}[self.kind]


def _o(name, flag, kind, feeds, help, **kw) -> Option:
    return Option(name=name, flag=flag, kind=kind, feeds=feeds, help=help, **kw)


#: Every option of ``slimnp train``, in the order of its ``--help``.
TRAIN_OPTIONS: tuple[Option, ...] = (
    _o("data", "--data", "dir", "data", "Directory with train/valid/test splits (PTB, plain or WikiText naming)."),
    _o("train_file", "--train", "file", "data", "Training text file."),
    _o("valid_file", "--valid", "file", "data", "Validation text file."),
    _o("test_file", "--test", "file", "data", "Test text file (evaluated at the end)."),
    _o("out", "--out", "file", "run", "Checkpoint file [default: model.h5]; the best model goes to <stem>.best.h5, metrics to <stem>.metrics.jsonl."),
    _o("resume", "--resume", "file", "run", "Continue the run stored in this checkpoint.", exists=True),
    _o("init_from", "--init-from", "file", "run", "Start from this model file's parameters, tables and vocabulary (e.g. made by `slimnp compress`) with a fresh optimizer and schedule; model options cannot be given.", exists=True),
    _o("force", "--force", "flag", "run", "Overwrite an existing --out file.", default=False),
    _o("threads", "--threads", "int", "run", "CPU threads for the GEMMs and kernels [default: all cores]; 1 is faster when other jobs already load the cores.", low=1),
    _o("denormals", "--denormals", "choice", "run", "Denormal floats on the CPU (magnitudes below ~1.2e-38 in float32): flush turns them into zeros in every CPU thread (the x86 FTZ/DAZ bits, as TensorFlow does by default), keep computes them exactly (IEEE).  x86 cores take ~100 cycles per denormal operand, and a trained LSTM can hold enough of them (gate derivatives, saturated gates) to make training several times slower and evaluation up to 2x slower (BENCHMARKS.rst: Denormals); results differ only where such values occur.  No effect on --device gpu or on other CPUs.", default="flush", choices=("flush", "keep"), show_default=True),
    _o("loss", "--loss", "choice", "train", "Training objective [default: softmax]: the exact softmax, importance sampling (sampled softmax) or NCE, with --samples noise words per minibatch from the smoothed unigram law.  Evaluation is always exact.", choices=("softmax", "is", "nce")),
    _o("samples", "--samples", "int", "train", "Noise words per minibatch for --loss is/nce [default: 4000].", low=1),
    _o("optimizer", "--optimizer", "choice", "train", "Optimizer [default: sgd]; Adagrad wants a smaller --lr (about 0.1-0.2).", choices=("sgd", "adagrad")),
    _o("layers", "--layers", "int", "model", "LSTM layers.", recipe=True),
    _o("hidden", "--hidden", "int", "model", "Hidden size (and word-vector size unless --embedding-size).", recipe=True),
    _o("dropout", "--dropout", "float", "model", "Dropout on non-recurrent connections.", recipe=True),
    _o("input_dropout", "--input-dropout", "float", "model", "Dropout on the embedding -> LSTM connection alone [default: --dropout] (the paper's Tables 2-3 vary it with --dropout 0.5)."),
    _o("embedding_size", "--embedding-size", "int", "model", "Word-vector size E [default: --hidden]; E != H adds learned E x H and H x E projections around the LSTM stack (the paper's PM baseline).", low=1),
    _o("init_scale", "--init-scale", "float", "model", "Uniform init range +-.", recipe=True),
    _o("epochs", "--epochs", "int", "train", "Epochs to train (with --resume: the new total).", recipe=True),
    _o("bptt", "--bptt", "int", "train", "Truncated-BPTT segment length.", recipe=True),
    _o("batch_size", "--batch-size", "int", "train", "Parallel streams B.", recipe=True),
    _o("lr", "--lr", "float", "train", "Initial learning rate.", recipe=True),
    _o("schedule", "--lr-schedule", "choice", "train", "epoch: Zaremba decay after --decay-start; plateau: Kim et al., decay when valid PPL improves < --decay-threshold.", recipe=True, choices=("epoch", "plateau", "constant")),
    _o("lr_decay", "--lr-decay", "float", "train", "Learning-rate multiplier of the schedule.", recipe=True),
    _o("decay_start", "--decay-start", "int", "train", "epoch schedule: first epoch with decayed lr is decay-start+1.", recipe=True),
    _o("decay_threshold", "--decay-threshold", "float", "train", "plateau schedule: minimum valid PPL improvement.", recipe=True),
    _o("clip", "--clip", "float", "train", "Max global gradient norm (0: off).", recipe=True),
    _o("input_kind", "--input", "choice", "model", "Input embedding: a dense V x H table; slim: K sub-vectors per word from one shared pool of M; adaptive: the adaptive input (Baevski & Auli 2019) on the bands of --cutoffs/--div-value (band i's vectors have size H/div^i, projected to H).", default="dense", choices=("dense", "slim", "adaptive"), show_default=True),
    _o("input_k", "--input-k", "int", "model", "Slim input: sub-vectors per word (must divide --hidden)."),
    _o("input_m", "--input-m", "int", "model", "Slim input: pool size M (<= K*V)."),
    _o("input_ratio", "--input-ratio", "float", "model", "Slim input: size as a fraction of the dense table (sets M = ratio*K*V)."),
    _o("output_kind", "--output", "choice", "model", "Output layer: full softmax; slim: K disjoint pools of M/K sub-vectors, logits by dynamic programming; adaptive: the adaptive softmax (Grave et al. 2017; --cutoffs, --div-value; slim tail clusters with --output-k and --output-ratio).", default="full", choices=("full", "slim", "adaptive"), show_default=True),
    _o("output_k", "--output-k", "int", "model", "Slim output: sub-vectors per word (must divide --hidden); with --output adaptive and --output-ratio: slim tail clusters, K sub-vectors per tail word from the cluster's K pools (must divide each cluster's vector size)."),
    _o("output_m", "--output-m", "int", "model", "Slim output: total pool size M (a multiple of K, M/K <= V)."),
    _o("output_ratio", "--output-ratio", "float", "model", "Slim output: size as a fraction of the dense softmax (sets M/K = ratio*V); with --output adaptive: each tail cluster's pools as a fraction of its dense matrix (M_i/K = ratio*V_i)."),
    _o("cutoffs", "--cutoffs", "ints", "model", "Adaptive output and input: word ids below the first cutoff form the head (input band 0), each further range a tail cluster (the next input band; the vocabulary is ordered by frequency) [default: 2000,10000; each must be below V].", metavar="N,N,..."),
    _o("div_value", "--div-value", "float", "model", "Adaptive output and input: tail cluster i's vectors (input band i+1's) have size H/div^(i+1) [default: 4].", low=1, low_open=True),
    _o("head_bias", "--head-bias", "flag", "model", "Adaptive output: a bias on the head's logits (off, as in PyTorch).", default=False),
    _o("mapping", "--mapping", "choice", "model", "Sub-vector assignment: shuffle (the paper; tables stored in the file) or hash (computed from the seed; K=H is HashNet).", default="shuffle", choices=("shuffle", "hash"), show_default=True),
    _o("mapping_seed", "--mapping-seed", "int", "model", "Seed of the assignment tables.", default=0, show_default=True),
    _o("tie", "--tie", "flag", "model", "Share the output layer's parameters with the input (dense+full, slim+slim, or adaptive+adaptive: each input band uses the output's head or tail cluster vectors and projection).", default=False),
    _o("loss_average", "--loss-average", "choice", "train", "batch: loss summed over time, averaged over the batch (Zaremba); token: mean per token.", default="batch", choices=("batch", "token"), show_default=True),
    _o("seed", "--seed", "int", "train", "Random seed (init, dropout).", default=0, show_default=True),
    _o("min_count", "--min-count", "int", "data", "Drop words rarer than this (they become <unk>).", default=1, show_default=True),
    _o("max_vocab", "--max-vocab", "int", "data", "Keep at most this many words."),
    _o("eval_batch_size", "--eval-batch-size", "int", "train", "Streams for per-epoch validation.", default=10, show_default=True),
    _o("quiet", "--quiet", "flag", "run", "No progress bars.", default=False, short="-q"),
    _o("as_json", "--json", "flag", "run", "Print the final summary as one JSON object.", default=False),
    _o("checkpoint_every", "--checkpoint-every", "float", "run", "Also write the checkpoint every MINUTES of wall-clock time inside an epoch (after the step it falls due in; fractions allowed; 0: only at epoch ends).  A killed run resumed with --resume loses at most this much work and continues bit-exactly.", default=10.0, low=0, metavar="MINUTES", show_default=True),
    _o("force_memory", "--force-memory", "flag", "run", "Train even if the memory estimate printed at the start exceeds the memory available.", default=False),
    _o("distributed", "--distributed", "flag", "run", "Data-parallel training across the ranks of an MPI job (mpiexec -n N / srun): each rank trains on --batch-size/N of the streams, gradients are summed every step, rank 0 writes the files [needs pip install 'slimnp[mpi]'].", default=False),
    _o("device", "--device", "choice", "run", "cpu (NumPy + Numba) or gpu (CuPy on an NVIDIA GPU: pip install 'slimnp[gpu]'; README: GPU).", default="cpu", choices=("cpu", "gpu"), show_default=True),
)

_BY_NAME = {o.name: o for o in TRAIN_OPTIONS}
_BY_KEY = {**{o.flag[2:].replace("-", "_"): o for o in TRAIN_OPTIONS}, **_BY_NAME}

#: Options that describe the model (not its training): fixed by ``--init-from``.
MODEL_OPTIONS = ("layers", "hidden", "dropout", "input_dropout", "embedding_size", "init_scale",
                 "input_k", "input_m", "input_ratio", "output_k", "output_m", "output_ratio",
                 "cutoffs", "div_value")
SLIM_SIZE_OPTIONS = ("input_k", "input_m", "input_ratio", "output_k", "output_m", "output_ratio")
# the model's kind: with MODEL_OPTIONS, what --init-from and --resume take from the file
MODEL_KIND_OPTIONS = ("input_kind", "output_kind", "mapping", "mapping_seed", "tie", "head_bias")
ADAPTIVE_OPTIONS = ("cutoffs", "div_value", "head_bias")

#: Settings of the two built-in recipes (the options with ``recipe=True``).
PRESETS = {
    # measured: test PPL 1.05x the oracle after 2 epochs (1M tokens each)
    "builtin": dict(layers=1, hidden=128, dropout=0.0, init_scale=0.1, epochs=2, bptt=20,
                    batch_size=32, lr=1.0, schedule="epoch", lr_decay=0.5, decay_start=1,
                    decay_threshold=1.0, clip=5.0),
    "zaremba-small": dict(layers=2, hidden=200, dropout=0.0, init_scale=0.1, epochs=13, bptt=20,
                          batch_size=20, lr=1.0, schedule="epoch", lr_decay=0.5, decay_start=4,
                          decay_threshold=1.0, clip=5.0),
}


def option(key: str) -> Option | None:
    """The option named ``key`` (its name, or its long flag with ``-`` or ``_``)."""
    return _BY_KEY.get(key.replace("-", "_"))


def keys() -> list:
    """Every name an option is known by (names and long flags, underscored)."""
    return list(_BY_KEY)


def check_value(opt: Option, value) -> str | None:
    """What is wrong with ``value`` (a TOML or JSON value) for ``opt``, or None.

    Strict: an integer option takes an integer, a flag a boolean, a string
    option a string; numbers are checked against the bounds, choices
    against the list.
    """
    if opt.kind == "flag":
        return None if isinstance(value, bool) else "expects true or false"
    if opt.kind == "ints":
        try:
            parse_ints(value)
        except ValueError as exc:
            return str(exc)
        return None
    if isinstance(value, bool):
        return f"expects {opt.type_name}, got a boolean"
    if opt.kind == "int" and not isinstance(value, int):
        return f"expects an integer, got {value!r}"
    if opt.kind == "float" and not isinstance(value, (int, float)):
        return f"expects a number, got {value!r}"
    if opt.kind in ("choice", "str", "dir", "file") and not isinstance(value, str):
        return f"expects a string, got {value!r}"
    if opt.kind == "choice" and value not in opt.choices:
        return f"{value!r} is not one of {', '.join(map(repr, opt.choices))}."
    if opt.kind in ("int", "float"):
        if opt.kind == "float" and not math.isfinite(value):
            return f"expects a finite number, got {value!r}"
        low_bad = opt.low is not None and (value <= opt.low if opt.low_open else value < opt.low)
        if low_bad or (opt.high is not None and value > opt.high):
            return f"{value} is not in the range {_range(opt)}."
    return None


def _range(opt: Option) -> str:
    lo = "" if opt.low is None else f"{opt.low:g}{'<' if opt.low_open else '<='}"
    hi = "" if opt.high is None else f"<={opt.high:g}"
    return f"{lo}x{hi}"


def parse_ints(value) -> tuple:
    """``"2000,10000"`` (or a list of integers) as a tuple of integers."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        if isinstance(items, (str, bytes)) or any(isinstance(v, (bool, float)) for v in items):
            raise TypeError
        return tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"expects integers separated by commas (e.g. 2000,10000), got {value!r}") from None


def _typed(opt: Option, value):
    """``value`` as the option's Python type (a float option given 1 holds 1.0)."""
    if value is None:
        return None
    if opt.kind == "float":
        return float(value)
    if opt.kind == "int":
        return int(value)
    if opt.kind == "flag":
        return bool(value)
    if opt.kind == "ints":
        return parse_ints(value)
    return str(value) if opt.kind in ("dir", "file") else value


def complete(given: dict) -> dict:
    """Every option of ``slimnp train`` for an options dict (option names as
    keys, values already checked): the given ones in their types, the rest
    at their defaults (None: the recipe's)."""
    unknown = sorted(k for k in given if k not in _BY_NAME)
    if unknown:
        raise OptionError(f"unknown option(s): {', '.join(unknown)}")
    out = {}
    for o in TRAIN_OPTIONS:
        try:
            out[o.name] = _typed(o, given[o.name]) if o.name in given else o.default
        except ValueError as exc:
            raise OptionError(f"{o.flag}: {exc}") from None
    return out


def recipe_of(params: dict) -> str:
    """The recipe (:data:`PRESETS` key) that fills a run's unset options."""
    return "zaremba-small" if params.get("data") or params.get("train_file") else "builtin"


def settings(params: dict) -> dict:
    """The settings :func:`configs` takes (``hp``), from complete options:
    the model and training options, unset ones from the recipe."""
    preset = PRESETS[recipe_of(params)]
    hp = {o.name: (params[o.name] if params[o.name] is not None else preset.get(o.name))
          for o in TRAIN_OPTIONS
          if o.feeds in ("model", "train") and o.name not in SLIM_SIZE_OPTIONS
          and o.name not in MODEL_KIND_OPTIONS and o.name not in ("loss_average", "seed",
                                                                   "eval_batch_size")}
    hp.update({k: params.get(k) for k in SLIM_SIZE_OPTIONS}, input=params["input_kind"],
              output=params["output_kind"], mapping=params["mapping"],
              mapping_seed=params["mapping_seed"], tie=params["tie"], head_bias=params["head_bias"])
    return hp


def to_argv(options: dict) -> list:
    """``slimnp train`` arguments for an options dict (what a user would type)."""
    argv = []
    for name, value in options.items():
        opt = _BY_NAME[name]
        if opt.kind == "flag":
            if value:
                argv.append(opt.flag)
        elif opt.kind == "ints":
            argv += [opt.flag, ",".join(map(str, parse_ints(value)))]
        else:
            argv += [opt.flag, str(value)]
    return argv


def slim_settings(hp: dict, V: int) -> dict:
    """Slim-embedding fields of :class:`ModelConfig` from CLI-style settings.

    ``input_ratio`` / ``output_ratio`` give the layer's size as a fraction of
    the dense ``V x H`` table (parameters ``M*H/K``, so ``M = ratio*K*V``;
    on the output side ``M/K = round(ratio*V)`` keeps M a multiple of K).
    """
    out = {}
    for side, kind_slim in (("input", "slim"), ("output", "slim")):
        kind = hp.get(side) or ("dense" if side == "input" else "full")
        out[side] = kind
        k, m, ratio = hp.get(f"{side}_k"), hp.get(f"{side}_m"), hp.get(f"{side}_ratio")
        if kind != kind_slim:
            if k or m or ratio:
                raise ValueError(f"--{side}-k/--{side}-m/--{side}-ratio need --{side} slim")
            continue
        if hp.get("tie") and side == "input":
            if k or m or ratio:
                raise ValueError("with --tie the input uses the output's pools: "
                                 "give --output-k/--output-m only")
            continue
        if not k:
            raise ValueError(f"--{side} slim needs --{side}-k (sub-vectors per word)")
        if (m is None) == (ratio is None):
            raise ValueError(f"--{side} slim needs exactly one of --{side}-m and --{side}-ratio")
        if ratio is not None:
            if not 0 < ratio <= 1:
                raise ValueError(f"--{side}-ratio must lie in (0, 1], got {ratio}")
            m = max(1, round(ratio * k * V)) if side == "input" else k * max(1, round(ratio * V))
        out[f"{side}_k"], out[f"{side}_m"] = int(k), int(m)
    if hp.get("tie") and out["input"] == "slim" and out["output"] == "slim":
        out["input_k"], out["input_m"] = out["output_k"], out["output_m"]
    out["mapping"] = hp.get("mapping") or "shuffle"
    out["mapping_seed"] = int(hp.get("mapping_seed") or 0)
    out["tie"] = bool(hp.get("tie"))
    return out


def model_config(hp: dict, V: int):
    """The :class:`ModelConfig` of CLI-style settings ``hp`` for a vocabulary of ``V`` words."""
    from .model import ModelConfig

    # with --output adaptive, --output-k/--output-ratio size the slim tails (adaptive_settings)
    slim_hp = {**hp, "output_k": None, "output_m": None, "output_ratio": None} \
        if hp.get("output") == "adaptive" else hp
    return ModelConfig(vocab_size=V, hidden=hp["hidden"], layers=hp["layers"],
                       dropout=hp["dropout"], init_scale=hp["init_scale"],
                       input_dropout=hp.get("input_dropout"),
                       embedding_size=hp.get("embedding_size") or 0,
                       dtype=hp.get("dtype") or "float32", **slim_settings(slim_hp, V),
                       **adaptive_settings(hp, V))


def adaptive_settings(hp: dict, V: int | None = None) -> dict:
    """The adaptive layers' fields of :class:`ModelConfig`: the bands
    (``--cutoffs``, ``--div-value``) of ``--input adaptive`` and/or
    ``--output adaptive``, ``--head-bias``, and the output's slim tail
    clusters (``--output-k`` K and ``--output-ratio`` r: cluster i's K pools
    get ``M_i/K = round(r*V_i)`` entries each, V_i its words; ``V`` the
    vocabulary size)."""
    given = [k for k in ADAPTIVE_OPTIONS if hp.get(k)]
    if hp.get("output") != "adaptive":
        wrong = [k for k in given if k == "head_bias" or hp.get("input") != "adaptive"]
        if wrong:
            names = ", ".join("--" + k.replace("_", "-") for k in wrong)
            where = "--output adaptive" if "head_bias" in wrong else "--input adaptive or --output adaptive"
            raise ValueError(f"{names} {'needs' if len(wrong) == 1 else 'need'} {where}")
        return {k: hp[k] for k in given}
    if hp.get("loss") not in (None, "softmax"):
        raise ValueError(f"--loss {hp['loss']}: the adaptive softmax trains its exact loss "
                         "(--loss softmax)")
    out = {k: hp[k] for k in given}
    k, ratio = hp.get("output_k"), hp.get("output_ratio")
    if hp.get("output_m"):
        raise ValueError("--output-m sizes one slim output layer; slim tail clusters (--output "
                         "adaptive) take --output-k and --output-ratio (M_i/K = ratio*V_i per cluster)")
    if k or ratio is not None:
        if not k or ratio is None:
            raise ValueError("slim tail clusters (--output adaptive) need both --output-k and "
                             "--output-ratio")
        if not 0 < ratio <= 1:
            raise ValueError(f"--output-ratio must lie in (0, 1], got {ratio}")
        from .adaptive import DEFAULT_CUTOFFS, clusters

        out["output_k"] = int(k)
        out["tail_m"] = tuple(int(k) * max(1, round(ratio * (hi - lo)))
                              for lo, hi in clusters(V, hp.get("cutoffs") or DEFAULT_CUTOFFS))
    return out


def train_config(hp: dict, *, seed=0, loss_average="batch", eval_batch_size=10):
    """The :class:`TrainConfig` of CLI-style settings ``hp``."""
    from .trainer import TrainConfig

    return TrainConfig(epochs=hp["epochs"], bptt=hp["bptt"], batch_size=hp["batch_size"], lr=hp["lr"],
                       optimizer=hp.get("optimizer") or "sgd", loss=hp.get("loss") or "softmax",
                       samples=hp.get("samples") or 4000, clip=hp["clip"], schedule=hp["schedule"],
                       lr_decay=hp["lr_decay"], decay_start=hp["decay_start"],
                       decay_threshold=hp["decay_threshold"], loss_average=loss_average, seed=seed,
                       eval_batch_size=eval_batch_size)


def configs(hp: dict, *, seed=0, loss_average="batch", eval_batch_size=10):
    """``(model, train)`` for :func:`slimnp.trainer.run_training` from
    CLI-style settings: ``model`` is a function of the vocabulary size (the
    vocabulary is built by the run, and ``input_ratio``/``output_ratio``
    need its size), ``train`` a :class:`TrainConfig`."""
    return ((lambda V: model_config(hp, V)),
            train_config(hp, seed=seed, loss_average=loss_average, eval_batch_size=eval_batch_size))
