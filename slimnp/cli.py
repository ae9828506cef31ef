"""The ``slimnp`` command line: a thin click layer over the library.

Each command calls library functions; library errors that mean "the user
asked for something wrong" become one clear line on stderr and exit code 1.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

from ._version import __version__

# Settings of the two built-in recipes.  Options left unset on the command
# line take the recipe's value: the built-in synthetic corpus when no data is
# given, Zaremba et al.'s "small" PTB recipe otherwise.
PRESETS = {
    # measured: test PPL 1.05x the oracle after 2 epochs (1M tokens each)
    "builtin": dict(layers=1, hidden=128, dropout=0.0, init_scale=0.1, epochs=2, bptt=20,
                    batch_size=32, lr=1.0, schedule="epoch", lr_decay=0.5, decay_start=1,
                    decay_threshold=1.0, clip=5.0),
    "zaremba-small": dict(layers=2, hidden=200, dropout=0.0, init_scale=0.1, epochs=13, bptt=20,
                          batch_size=20, lr=1.0, schedule="epoch", lr_decay=0.5, decay_start=4,
                          decay_threshold=1.0, clip=5.0),
}


def _user_errors():
    from .backend import DeviceUnavailable
    from .data import CorpusError
    from .fetch import FetchError
    from .io import FormatError
    from .memory import NotEnoughMemory
    from .trainer import TrainingError

    return (CorpusError, DeviceUnavailable, FetchError, FormatError, NotEnoughMemory, TrainingError,
            ValueError, OSError)


def _json(obj, **kw) -> str:
    """Strict JSON of a ``--json`` output: NaN/infinity become null with a
    ``<key>_reason`` beside them (slimnp.errors.json_dumps)."""
    from .errors import json_dumps
    from .trainer import JSON_REASONS

    return json_dumps(obj, JSON_REASONS, **kw)


def _device_option(fn):
    """``--device cpu|gpu``, checked before any work (a missing CuPy or CUDA
    is one line, not a traceback after the data were read)."""

    def check(ctx, param, value):
        if value == "gpu":
            from .backend import DeviceUnavailable, get_xp

            try:
                get_xp(value)
            except DeviceUnavailable as exc:
                raise click.ClickException(str(exc)) from None
        return value

    return click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
                        callback=check,
                        help="cpu (NumPy + Numba) or gpu (CuPy on an NVIDIA GPU: pip install "
                             "'slimnp[gpu]'; README: GPU).")(fn)


def friendly_errors(fn):
    """Turn library errors into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            # the reader went away (`slimnp score ... | head`): not an error;
            # point stdout at devnull so the interpreter's final flush is quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except _user_errors() as exc:
            from .errors import os_error_line

            msg = str(exc) or type(exc).__name__
            if isinstance(exc, OSError):  # the file, the cause in words: one line
                msg = os_error_line(exc)
            raise click.ClickException(" ".join(msg.split())) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slimnp")
def main():
    """slimnp: compact recurrent neural language models with slim embeddings.

    \b
    Quick start:
      slimnp train                         # built-in synthetic corpus, prints test PPL
      slimnp data fetch ptb data/ptb       # Penn Treebank, sha256-checked
      slimnp train --data data/ptb --out ptb.h5
      slimnp evaluate ptb.h5 data/ptb/ptb.test.txt
      slimnp inspect ptb.h5
    """


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------
def _builtin_corpus_dir() -> Path:
    from .synthetic import DEFAULT_SPEC, DEFAULT_TOKENS

    import dataclasses
    import hashlib

    root = Path(os.environ.get("SLIMNP_CACHE", Path.home() / ".cache" / "slimnp"))
    # the whole spec and the sizes name the directory: a retuned spec never
    # reuses a stale corpus
    blob = json.dumps([dataclasses.asdict(DEFAULT_SPEC), list(DEFAULT_TOKENS)], sort_keys=True)
    return root / f"builtin-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def ensure_builtin_corpus(echo=click.echo) -> tuple[Path, dict]:
    """The built-in synthetic corpus, generated once into the cache directory."""
    from .synthetic import DEFAULT_SPEC, DEFAULT_TOKENS, write_corpus

    d = _builtin_corpus_dir()
    meta = d / "corpus.json"
    if meta.exists():
        try:
            return d, json.loads(meta.read_text())
        except ValueError:
            pass  # damaged: regenerate
    echo(f"generating the built-in synthetic corpus in {d} ...")
    info = write_corpus(d, DEFAULT_SPEC, *DEFAULT_TOKENS)
    return d, info


def _resolve_data(data, train, valid, test):
    from .data import CorpusError, find_splits

    if data and (train or valid or test):
        raise click.UsageError("give either --data DIR or --train/--valid/--test, not both")
    if data:
        return find_splits(data)
    if train:
        if not valid:
            raise click.UsageError("--train needs --valid too (validation drives the lr schedule)")
        files = {"train": Path(train), "valid": Path(valid)}
        if test:
            files["test"] = Path(test)
        for k, p in files.items():
            if not p.is_file():
                raise CorpusError(f"{p}: no such file (--{k})")
        return files
    if valid or test:
        raise click.UsageError("--valid/--test need --train")
    return None


def _train_options(fn):
    opts = [
        click.option("--data", type=click.Path(file_okay=False), help="Directory with train/valid/test splits (PTB, plain or WikiText naming)."),
        click.option("--train", "train_file", type=click.Path(dir_okay=False), help="Training text file."),
        click.option("--valid", "valid_file", type=click.Path(dir_okay=False), help="Validation text file."),
        click.option("--test", "test_file", type=click.Path(dir_okay=False), help="Test text file (evaluated at the end)."),
        click.option("--out", type=click.Path(dir_okay=False), default=None, help="Checkpoint file [default: model.h5]; the best model goes to <stem>.best.h5, metrics to <stem>.metrics.jsonl."),
        click.option("--resume", type=click.Path(dir_okay=False, exists=True), help="Continue the run stored in this checkpoint."),
        click.option("--init-from", type=click.Path(dir_okay=False, exists=True), help="Start from this model file's parameters, tables and vocabulary (e.g. made by `slimnp compress`) with a fresh optimizer and schedule; model options cannot be given."),
        click.option("--force", is_flag=True, help="Overwrite an existing --out file."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for the GEMMs and kernels [default: all cores]; 1 is faster when other jobs already load the cores."),
        click.option("--loss", type=click.Choice(["softmax", "is", "nce"]), default=None, help="Training objective [default: softmax]: the exact softmax, importance sampling (sampled softmax) or NCE, with --samples noise words per minibatch from the smoothed unigram law.  Evaluation is always exact."),
        click.option("--samples", type=click.IntRange(min=1), default=None, help="Noise words per minibatch for --loss is/nce [default: 4000]."),
        click.option("--optimizer", type=click.Choice(["sgd", "adagrad"]), default=None, help="Optimizer [default: sgd]; Adagrad wants a smaller --lr (about 0.1-0.2)."),
        click.option("--layers", type=int, help="LSTM layers."),
        click.option("--hidden", type=int, help="Hidden size (and word-vector size unless --embedding-size)."),
        click.option("--dropout", type=float, help="Dropout on non-recurrent connections."),
        click.option("--input-dropout", type=float, help="Dropout on the embedding -> LSTM connection alone [default: --dropout] (the paper's Tables 2-3 vary it with --dropout 0.5)."),
        click.option("--embedding-size", type=click.IntRange(min=1), help="Word-vector size E [default: --hidden]; E != H adds learned E x H and H x E projections around the LSTM stack (the paper's PM baseline)."),
        click.option("--init-scale", type=float, help="Uniform init range +-."),
        click.option("--epochs", type=int, help="Epochs to train (with --resume: the new total)."),
        click.option("--bptt", type=int, help="Truncated-BPTT segment length."),
        click.option("--batch-size", type=int, help="Parallel streams B."),
        click.option("--lr", type=float, help="Initial learning rate."),
        click.option("--lr-schedule", "schedule", type=click.Choice(["epoch", "plateau", "constant"]), help="epoch: Zaremba decay after --decay-start; plateau: Kim et al., decay when valid PPL improves < --decay-threshold."),
        click.option("--lr-decay", type=float, help="Learning-rate multiplier of the schedule."),
        click.option("--decay-start", type=int, help="epoch schedule: first epoch with decayed lr is decay-start+1."),
        click.option("--decay-threshold", type=float, help="plateau schedule: minimum valid PPL improvement."),
        click.option("--clip", type=float, help="Max global gradient norm (0: off)."),
        click.option("--input", "input_kind", type=click.Choice(["dense", "slim"]), default="dense", show_default=True, help="Input embedding: a dense V x H table, or slim: K sub-vectors per word from one shared pool of M."),
        click.option("--input-k", type=int, help="Slim input: sub-vectors per word (must divide --hidden)."),
        click.option("--input-m", type=int, help="Slim input: pool size M (<= K*V)."),
        click.option("--input-ratio", type=float, help="Slim input: size as a fraction of the dense table (sets M = ratio*K*V)."),
        click.option("--output", "output_kind", type=click.Choice(["full", "slim"]), default="full", show_default=True, help="Output layer: full softmax, or slim: K disjoint pools of M/K sub-vectors, logits by dynamic programming."),
        click.option("--output-k", type=int, help="Slim output: sub-vectors per word (must divide --hidden)."),
        click.option("--output-m", type=int, help="Slim output: total pool size M (a multiple of K, M/K <= V)."),
        click.option("--output-ratio", type=float, help="Slim output: size as a fraction of the dense softmax (sets M/K = ratio*V)."),
        click.option("--mapping", type=click.Choice(["shuffle", "hash"]), default="shuffle", show_default=True, help="Sub-vector assignment: shuffle (the paper; tables stored in the file) or hash (computed from the seed; K=H is HashNet)."),
        click.option("--mapping-seed", type=int, default=0, show_default=True, help="Seed of the assignment tables."),
        click.option("--tie", is_flag=True, help="Share the output layer's parameters with the input (dense+full or slim+slim)."),
        click.option("--loss-average", type=click.Choice(["batch", "token"]), default="batch", show_default=True, help="batch: loss summed over time, averaged over the batch (Zaremba); token: mean per token."),
        click.option("--seed", type=int, default=0, show_default=True, help="Random seed (init, dropout)."),
        click.option("--min-count", type=int, default=1, show_default=True, help="Drop words rarer than this (they become <unk>)."),
        click.option("--max-vocab", type=int, default=None, help="Keep at most this many words."),
        click.option("--eval-batch-size", type=int, default=10, show_default=True, help="Streams for per-epoch validation."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
        click.option("--json", "as_json", is_flag=True, help="Print the final summary as one JSON object."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@main.command()
@_train_options
@click.option("--checkpoint-every", type=click.FloatRange(min=0), default=10.0, show_default=True, metavar="MINUTES", help="Also write the checkpoint every MINUTES of wall-clock time inside an epoch (after the step it falls due in; fractions allowed; 0: only at epoch ends).  A killed run resumed with --resume loses at most this much work and continues bit-exactly.")
@click.option("--force-memory", is_flag=True, help="Train even if the memory estimate printed at the start exceeds the memory available.")
@click.option("--distributed", is_flag=True, help="Data-parallel training across the ranks of an MPI job (mpiexec -n N / srun): each rank trains on --batch-size/N of the streams, gradients are summed every step, rank 0 writes the files [needs pip install 'slimnp[mpi]'].")
@_device_option
@friendly_errors
def train(data, train_file, valid_file, test_file, out, resume, force, threads, quiet, as_json,
          seed, min_count, max_vocab, eval_batch_size, loss_average, input_kind, output_kind,
          mapping, mapping_seed, tie, distributed, device, init_from=None, checkpoint_every=10.0,
          force_memory=False, **hyper):
    """Train an LSTM language model.

    With no data options, trains on the built-in synthetic corpus (a hidden
    Markov model whose exact perplexity is known) and prints the model's test
    perplexity beside the oracle and unigram perplexities.  With --data (or
    --train/--valid/--test) the defaults are Zaremba et al.'s "small" recipe
    (2x200, bptt 20, batch 20, lr 1, halve lr every epoch after the 4th, 13
    epochs, clip 5).

    Ctrl-C stops after the current step and writes a checkpoint;
    `slimnp train --resume FILE` continues exactly where it stopped.

    With --distributed, run under MPI (`mpiexec -n 4 slimnp train
    --distributed ...`): the README's "Distributed training" says more.
    """
    import contextlib

    from .distributed import DistributedError, launched_by_mpi

    comm = None
    if distributed:
        from .distributed import init as init_distributed

        try:
            comm = init_distributed()
        except DistributedError as exc:
            raise click.ClickException(str(exc)) from None
        threads = threads or comm.default_threads()  # the node's cores, shared by its ranks
    elif (launch := launched_by_mpi()) and launch[0] == 0:
        click.echo(f"warning: this is rank 0 of {launch[1]} MPI processes but --distributed is not "
                   "set: every process trains a model of its own and writes the same files; "
                   "add --distributed", err=True)
    # distributed: one rank's error must not leave the others waiting in a collective
    with (comm.abort_on_error() if comm is not None else contextlib.nullcontext()):
        return _train(comm, data, train_file, valid_file, test_file, out, resume, force, threads, quiet,
               as_json, seed, min_count, max_vocab, eval_batch_size, loss_average, input_kind,
               output_kind, mapping, mapping_seed, tie, hyper, device=device, init_from=init_from,
               checkpoint_every=checkpoint_every, force_memory=force_memory)


def _train(comm, data, train_file, valid_file, test_file, out, resume, force, threads, quiet,
           as_json, seed, min_count, max_vocab, eval_batch_size, loss_average, input_kind,
           output_kind, mapping, mapping_seed, tie, hyper, device="cpu", init_from=None,
           checkpoint_every=10.0, force_memory=False):
    """The body of ``train``; ``comm``: the distributed run's ranks, or None;
    ``device``: 'cpu' or 'gpu'."""
    from .options import configs
    from .trainer import resume_training, run_training

    root = comm is None or comm.is_root
    if threads:
        from .threads import set_threads

        set_threads(threads)
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    if resume:
        given = {k: v for k, v in hyper.items() if v is not None and k != "epochs"}
        if input_kind != "dense" or output_kind != "full" or tie or mapping != "shuffle" or mapping_seed:
            given["input/output/mapping/tie"] = True
        if given or data or train_file or out or init_from:
            names = ", ".join("--" + k.replace("_", "-") for k in given) or "data/--out options"
            raise click.UsageError(f"--resume continues the stored run; {names} cannot change "
                                   "(only --epochs may be raised)")
        summary = resume_training(resume, epochs=hyper.get("epochs"), device=device, log=log,
                                  progress=not quiet, comm=comm, checkpoint_every=checkpoint_every,
                                  force_memory=force_memory)
    else:
        if init_from:
            model_opts = [k for k in MODEL_OPTIONS if hyper.get(k) is not None]
            if input_kind != "dense" or output_kind != "full" or tie or mapping != "shuffle" or mapping_seed:
                model_opts.append("input/output/mapping/tie")
            if model_opts:
                raise click.UsageError(
                    "--init-from takes the model from the file; "
                    f"{', '.join('--' + k.replace('_', '-') for k in model_opts)} cannot be given")
            if not (data or train_file):
                raise click.UsageError("--init-from needs the training data: --data DIR or --train/--valid")
        out = Path(out or "model.h5")
        if root:  # before any work: a typo in --out costs seconds, not an epoch
            from .trainer import check_output

            check_output(out)
            if out.exists() and not force:
                raise click.ClickException(
                    f"{out} exists; continue it with `slimnp train --resume {out}`, "
                    "or pass --force to overwrite it (or choose another --out)")
        files = _resolve_data(data, train_file, valid_file, test_file)
        corpus_info = None
        if files is None:
            if comm is not None and not root:
                comm.barrier()  # rank 0 generates the corpus first (see below)
            d, corpus_info = ensure_builtin_corpus(log if root else (lambda m: None))
            if comm is not None and root:
                comm.barrier()
            files = {s: d / f"{s}.txt" for s in ("train", "valid", "test")}
            preset = PRESETS["builtin"]
        else:
            preset = PRESETS["zaremba-small"]
        hp = train_hp(hyper, preset, input_kind, output_kind, mapping, mapping_seed, tie)
        model, train_cfg = configs(hp, seed=seed, loss_average=loss_average,
                                   eval_batch_size=eval_batch_size)
        summary = run_training(files, out, None if init_from else model, train_cfg,
                               min_count=min_count, max_vocab=max_vocab, corpus_info=corpus_info,
                               device=device, log=log, progress=not quiet, comm=comm,
                               init_from=init_from, checkpoint_every=checkpoint_every,
                               force_memory=force_memory)
    if as_json and root:
        click.echo(_json(summary))
    return summary


# options that describe the model (not its training): fixed by --init-from
MODEL_OPTIONS = ("layers", "hidden", "dropout", "input_dropout", "embedding_size", "init_scale",
                 "input_k", "input_m", "input_ratio", "output_k", "output_m", "output_ratio")
SLIM_SIZE_OPTIONS = ("input_k", "input_m", "input_ratio", "output_k", "output_m", "output_ratio")


def train_hp(hyper: dict, preset: dict, input_kind="dense", output_kind="full", mapping="shuffle",
             mapping_seed=0, tie=False) -> dict:
    """The settings :func:`slimnp.trainer.run_training` takes, from the
    ``train`` command's hyper-parameter options (None: the preset's value)."""
    hp = {k: (v if v is not None else preset.get(k)) for k, v in hyper.items()
          if k not in SLIM_SIZE_OPTIONS}
    hp.update({k: hyper.get(k) for k in SLIM_SIZE_OPTIONS}, input=input_kind, output=output_kind,
              mapping=mapping, mapping_seed=mapping_seed, tie=tie)
    return hp


# ---------------------------------------------------------------------------
# evaluate / inspect
# ---------------------------------------------------------------------------
@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--batch-size", type=int, default=1, show_default=True, help="1 is exact; B>1 runs B pieces of the file in parallel from fresh states (faster, approximate).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_device_option
@friendly_errors
def evaluate(model, file, batch_size, threads, as_json, quiet, device):
    """Exact perplexity of MODEL on the text FILE.

    Every token is predicted (the first from an <eos> prime); words outside
    the model's vocabulary count as <unk> and are reported as the OOV rate.
    """
    from .evaluate import evaluate_ids
    from .progress import Progress
    from .modelfile import load_model

    if threads:
        from .threads import set_threads

        set_threads(threads)
    m, vocab, _ = load_model(model, device=device)
    t0 = time.perf_counter()
    enc = vocab.encode_file(file)
    prog = Progress(enc.n_tokens, "evaluate", enabled=not quiet)
    res = evaluate_ids(m, enc.ids, vocab.eos_id, batch_size=batch_size,
                       progress=lambda done: prog.update(done, f"{done:,} tokens"))
    prog.close()
    secs = time.perf_counter() - t0
    out = {"model": str(model), "file": str(file), "perplexity": res.perplexity,
           "loss": res.loss, "tokens": res.tokens, "oov": enc.n_oov, "oov_rate": enc.oov_rate,
           "batch_size": batch_size, "seconds": secs, "tokens_per_s": res.tokens / max(secs, 1e-9)}
    if as_json:
        click.echo(_json(out))
    else:
        click.echo(f"perplexity {res.perplexity:.3f}  (loss {res.loss:.4f} nats/token, "
                   f"{res.tokens:,} tokens, OOV {enc.oov_rate * 100:.2f}%, {secs:.1f} s)")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly_errors
def inspect(model, as_json):
    """Show a model file: config, every dataset, parameter counts, training state."""
    from . import io as sio
    from .mapping import slim_report
    from .model import ModelConfig, make_mapping

    info = sio.describe(model)
    mcfg = info.get("config", {}).get("model")
    if mcfg and (mcfg.get("input") == "slim" or mcfg.get("output") == "slim"):
        mc = ModelConfig.from_dict(mcfg)
        if mc.mapping == "hash":
            tables = make_mapping(mc)  # nothing stored: recompute from the seed
        else:
            tables = sio.load(model, params=False, optimizer=False, train_state=False, mapping=True).mapping
        nbytes = {d["name"][len("/mapping/"):]: d["nbytes"] for d in info["datasets"]
                  if d["name"].startswith("/mapping/")}
        info["slim"] = slim_report(mcfg, tables, nbytes)
    if as_json:
        click.echo(_json(info, indent=2))
        return
    click.echo(sio.format_describe_text(info))
    for side, r in info.get("slim", {}).items():
        line = (f"slim {side}: K={r['K']} M={r['M']} (sub-vectors of {r['sub_vector_size']}), "
                f"{r['pool_parameters']:,} parameters vs {r['dense_parameters']:,} dense "
                f"({r['compression']:.4f}), mapping {r['mapping']} seed {r['mapping_seed']}, "
                f"tables {r['table_bytes']:,} B")
        if "uses_min" in r:
            line += f", uses per sub-vector {r['uses_min']}..{r['uses_max']}"
        if r["tied_to_output"]:
            line += ", tied to the output pools"
        click.echo(line)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The slim model file to write.")
@click.option("--input-k", type=click.IntRange(min=1), help="Slim input: sub-vectors per word (must divide the hidden size).")
@click.option("--input-ratio", type=click.FloatRange(0, 1, min_open=True), help="Slim input: pool size as a share of the dense table (M = ratio*K*V), before --frequent.")
@click.option("--output-k", type=click.IntRange(min=1), help="Slim output: sub-vectors per word.")
@click.option("--output-ratio", type=click.FloatRange(0, 1, min_open=True), help="Slim output: entries per pool as a share of V (M/K = ratio*V), before --frequent.")
@click.option("--frequent", type=click.IntRange(min=0), default=0, show_default=True, help="The N most frequent words keep their exact sub-vectors as private pool entries (each pool grows by N).")
@click.option("--valid", "valid_file", type=click.Path(dir_okay=False, exists=True), help="Text to report the perplexity on, before and after.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the k-means samples and seeding.")
@click.option("--iters", type=click.IntRange(min=1), default=None, help="Lloyd iterations at most [default: 25; 10 where a k-means is too big for the exact search (over 2e11 flops a pass, e.g. a 793K-word layer) and runs an inverted-file search].")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@friendly_errors
def compress(model, out, input_k, input_ratio, output_k, output_ratio, frequent, valid_file, seed,
             iters, force, threads, as_json):
    """Turn a trained dense MODEL into a slim one with learned (k-means) tables.

    Output layer: each row of the V x H matrix is cut into K slices and the
    k-th slices are clustered into the k-th pool (product quantization).
    Input layer: all V*K slices are clustered into one pool of M.  The LSTM
    weights and the output bias are copied.  Fine-tune the result with
    `slimnp train --init-from OUT --data ...`.
    """
    from . import io as sio
    from .compress import compress_model
    from .evaluate import evaluate_ids
    from .modelfile import load_model, mapping_fields
    from .trainer import check_output, file_sha256

    if threads:
        from .threads import set_threads

        set_threads(threads)
    if not input_k and not output_k:
        raise click.UsageError("give --input-k/--input-ratio and/or --output-k/--output-ratio")
    for side, k, r in (("input", input_k, input_ratio), ("output", output_k, output_ratio)):
        if bool(k) != (r is not None):
            raise click.UsageError(f"--{side}-k and --{side}-ratio go together")
    out = Path(out)
    check_output(out)  # before the k-means: a folder that cannot be written costs seconds
    if out.exists() and not force:
        raise click.ClickException(f"{out} exists; pass --force to overwrite it")
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    dense, vocab, ck = load_model(model)
    counts = vocab.counts if vocab.counts is not None else np.ones(len(vocab), np.int64)
    valid = vocab.encode_file(valid_file).ids if valid_file else None
    report = {}
    if valid is not None:
        report["valid_ppl_before"] = evaluate_ids(dense, valid, vocab.eos_id, batch_size=10).perplexity
    slim, rep = compress_model(dense, counts, input_k=input_k, input_ratio=input_ratio,
                               output_k=output_k, output_ratio=output_ratio, frequent=frequent,
                               seed=seed, source_sha256=file_sha256(model), log=log, iters=iters,
                               progress=not as_json)
    report.update(rep)
    if valid is not None:
        report["valid_ppl_after"] = evaluate_ids(slim, valid, vocab.eos_id, batch_size=10).perplexity
    cfg = {"model": slim.config.to_dict(), "compressed_from": {"file": str(Path(model).resolve()),
                                                              **{k: v for k, v in rep.items()}}}
    sio.save(out, sio.Checkpoint(config=cfg, vocab=list(vocab.words), vocab_counts=vocab.counts,
                                 params=slim.params_numpy(), **mapping_fields(slim)))
    p = report["parameters"]
    line = (f"wrote {out}: {p['after']:,} parameters (dense {p['before']:,}, "
            f"{p['after'] / p['before']:.3f}); k-means {report['seconds']:.1f} s")
    if frequent:
        line += (f"; {report['frequent']} frequent words ({report['frequent_token_share'] * 100:.1f}% "
                 f"of the training tokens) kept exact")
    if valid is not None:
        line += (f"; valid ppl {report['valid_ppl_before']:.2f} -> {report['valid_ppl_after']:.2f} "
                 "(batch 10, before fine-tuning)")
    log(line)
    if as_json:
        click.echo(_json(report))


# ---------------------------------------------------------------------------
# score / generate / rerank: applying a trained model
# ---------------------------------------------------------------------------
def _read_lines(path) -> list:
    """Lines of a UTF-8 text file ('-': stdin), without their line ends (and
    a leading byte-order mark); a decoding error is one line naming the line."""
    from .mt.nbest import read_lines

    try:
        return read_lines(path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None

def _load_lm(model, threads, device="cpu"):
    from .inference import LM

    if threads:
        from .threads import set_threads

        set_threads(threads)
    return LM.load(model, device)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--words", is_flag=True, help="Also give every word's log-probability.")
@click.option("--continuous", is_flag=True,
              help="Carry the LSTM state from one line to the next (one stream, as `evaluate "
                   "--batch-size 1` does) instead of scoring each line on its own.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Sentences scored together (independent lines only).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sentence, then one with the totals.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_device_option
@friendly_errors
def score(model, file, words, continuous, batch_size, threads, as_json, quiet, device):
    """Log-probability of each line of FILE ('-': stdin) under MODEL.

    Each line is a sentence: its words (OOV words count as <unk> and are
    reported) and the <eos> that ends it are predicted, the first from the
    <eos> prime and a fresh state.  Text output: one tab-separated line per
    sentence -- natural-log probability, log10 probability, tokens (words +
    <eos>), OOV words, perplexity, the sentence -- then, with --words, one
    indented line per token.  Totals and the perplexity go to stderr.
    """
    from .inference import LOG10_E
    from .progress import Progress

    lm = _load_lm(model, threads, device)
    lines = _read_lines(file)
    t0 = time.perf_counter()
    prog = Progress(max(len(lines), 1), "score", enabled=not quiet)
    scores = lm.score(lines, batch_size=batch_size, continuous=continuous,
                      progress=lambda done: prog.update(done, f"{done:,} sentences"))
    prog.close()
    secs = time.perf_counter() - t0
    for i, (line, s) in enumerate(zip(lines, scores)):
        if as_json:
            click.echo(_json({"sentence": i, "text": line, **s.to_dict(words)}))
            continue
        click.echo(f"{s.logprob:.4f}\t{s.log10prob:.4f}\t{s.tokens}\t{s.oov}\t{s.perplexity:.2f}\t{line}")
        if words:
            for w, lp in zip(s.words, s.logprobs):
                click.echo(f"\t{w}\t{lp:.4f}\t{lp * LOG10_E:.4f}")
    tokens = sum(s.tokens for s in scores)
    total = sum(s.logprob for s in scores)
    summary = {"sentences": len(scores), "tokens": tokens, "oov": sum(s.oov for s in scores),
               "logprob": total, "log10prob": total * LOG10_E,
               "perplexity": float(np.exp(-total / tokens)) if tokens else float("nan"),
               "continuous": continuous, "seconds": secs,
               "sentences_per_s": len(scores) / max(secs, 1e-9)}
    if as_json:
        click.echo(_json({"total": summary}))
    else:
        click.echo(f"{summary['sentences']:,} sentences, {tokens:,} tokens, {summary['oov']:,} OOV; "
                   f"logprob {total:.2f} (log10 {summary['log10prob']:.2f}), "
                   f"perplexity {summary['perplexity']:.3f}; "
                   f"{summary['sentences_per_s']:,.0f} sentences/s", err=True)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--prompt", default="", help="Words to start from (each sample continues them).")
@click.option("--length", type=click.IntRange(min=0), default=50, show_default=True, help="Words to draw per sample, at most.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Divide the scores by this: <1 sharper, >1 flatter.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Draw only among the K most likely words (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed: the same seed gives the same text.")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True, help="Samples (drawn in parallel).")
@click.option("--through-eos", is_flag=True, help="Keep going past <eos> (as a line break) instead of stopping.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample.")
@_device_option
@friendly_errors
def generate(model, prompt, length, temperature, top_k, seed, count, through_eos, threads, as_json,
             device):
    """Sample text from MODEL, one sample per line.

    Each sample starts from a fresh state and the <eos> prime (the start of
    a sentence), reads --prompt, then draws words until <eos> or --length.
    """
    lm = _load_lm(model, threads, device)
    texts = lm.generate(prompt, length=length, temperature=temperature, top_k=top_k, seed=seed,
                        count=count, stop_at_eos=not through_eos)
    for i, t in enumerate(texts):
        if as_json:
            click.echo(_json({"sample": i, "seed": seed, "text": t}))
        else:
            click.echo(t + ("\n" if through_eos and i < len(texts) - 1 else ""))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("nbest_file", metavar="NBEST", type=click.Path(dir_okay=False))
@click.option("--weights", help="Feature weights, e.g. 'TM0=1 WordPenalty0=-0.3 SlimLM0=0.2' "
              "(one value per feature value, comma-separated for multi-valued features).")
@click.option("--tune", "dev_nbest", type=click.Path(dir_okay=False),
              help="Development n-best list: learn the weights that maximise its corpus BLEU (needs --refs).")
@click.option("--refs", "dev_refs", type=click.Path(dir_okay=False),
              help="References of the --tune list, one line per sentence id.")
@click.option("--test-refs", type=click.Path(dir_okay=False),
              help="References of NBEST: report its BLEU before and after reranking.")
@click.option("--feature-name", default="SlimLM0", show_default=True, help="Name of the added LM feature.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the reranked n-best list (LM feature added, new scores).")
@click.option("--best", type=click.Path(dir_okay=False), help="Write the 1-best translations here [default: stdout].")
@click.option("--restarts", type=click.IntRange(min=0), default=2, show_default=True, help="Random restarts of tuning.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of tuning's restarts.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Hypotheses scored together.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads [default: all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (weights, BLEU) as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@_device_option
@friendly_errors
def rerank(model, nbest_file, weights, dev_nbest, dev_refs, test_refs, feature_name, out, best,
           restarts, seed, batch_size, threads, as_json, quiet, device):
    """Rerank a Moses n-best list NBEST with MODEL as an extra feature.

    Every hypothesis gets the feature --feature-name: its natural-log
    probability under MODEL (as a sentence, from a fresh state).  Weights
    come from --weights, or are tuned for corpus BLEU on --tune/--refs
    (MERT-style line search, starting from the decoder's weights recovered
    from its scores, LM weight 0).  Without either, the feature is added and
    nothing is reordered.  Writes the 1-best translations (stdout or
    --best) and, with --out, the reranked list; reports BLEU with --refs
    and --test-refs.
    """
    from .mt import rerank_nbest

    if bool(dev_nbest) != bool(dev_refs):
        raise click.UsageError("--tune and --refs go together: the development n-best list and its references")
    from .trainer import check_output

    for path, what in ((out, "--out"), (best, "--best")):
        if path:  # before the scoring: a typo costs seconds
            check_output(path, what=what)
    res = rerank_nbest(_load_lm(model, threads, device), nbest_file, weights=weights, dev_nbest=dev_nbest,
                       dev_refs=dev_refs, test_refs=test_refs, feature_name=feature_name, out=out,
                       best=best, restarts=restarts, seed=seed, batch_size=batch_size, quiet=quiet)
    if not res.reranked:
        click.echo("no --weights or --tune: the LM feature was added, the order is the decoder's", err=True)
    if as_json:
        click.echo(_json(res.summary))
        return
    if not best:
        for line in res.best:
            click.echo(line)
    for line in res.report():
        click.echo(line, err=True)

@main.group()
def experiment():
    """Plans of many training runs: run them (resumable, in parallel), see where they stand.

    \b
      slimnp experiment status experiments/fig4-ptb.toml
      slimnp experiment run experiments/fig4-ptb.toml --jobs 2 --threads 1
      slimnp plot experiments/results/fig4-ptb.jsonl --out fig4.png

    A plan is a TOML file of runs, each a set of `slimnp train` options
    (the slimnp.experiment module documents the format).
    """


def _plan_errors(fn):
    """Plan errors are one line; the rest as every command's."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .experiment import PlanError

        try:
            return fn(*args, **kwargs)
        except PlanError as exc:
            raise click.ClickException(str(exc)) from None

    return friendly_errors(wrapper)


def _parse_sets(sets) -> dict:
    from .experiment import _toml

    out = {}
    for item in sets:
        if "=" not in item:
            raise click.UsageError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = _toml().loads(f"x = {v}")["x"]
        except Exception:
            out[k.strip()] = v  # a bare word: a string
    return out


@experiment.command("run")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, help="Runs trained at once, each in its own process.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="CPU threads per run (jobs x threads should not exceed the cores).")
@click.option("--only", multiple=True, help="Run only these runs (repeatable).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override an option in every run, e.g. --set data=~/data/ptb (a changed setting makes existing checkpoints stale).")
@_device_option
@_plan_errors
def experiment_run(plan, jobs, threads, only, sets, device):
    """Train every run of PLAN that has no result yet; append each result.

    Finished runs are skipped; stopped ones (Ctrl-C, kill, end of a
    session) continue from their checkpoints.  Each finished run adds one
    JSON line to the plan's results file (config, parameters per layer,
    valid/test perplexity, epochs, times, tok/s, machine, version, commit).
    """
    from .experiment import Runner, load_plan, resolve

    p = load_plan(plan, _parse_sets(sets))
    resolve(p)
    code = Runner(p, jobs=jobs, threads=threads, device=device, only=only,
                  log=lambda m: click.echo(m, err=True)).run()
    sys.exit(code)


@experiment.command("status")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="As for `experiment run`.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run.")
@_plan_errors
def experiment_status(plan, sets, as_json):
    """Each run of PLAN: its state, size (matched sizes resolved) and results."""
    from .experiment import configs_of, load_plan, parameter_counts, resolve, status

    p = load_plan(plan, _parse_sets(sets))
    resolve(p)
    rows = []
    for run, state, rec in status(p):
        mc, tc = configs_of(run.options)
        n = parameter_counts(mc)["total"]
        row = {"run": run.name, "state": state, "parameters": n, "hidden": mc.hidden,
               "embedding_size": mc.word_size, "epochs": tc.epochs, "matched": run.matched,
               "valid_ppl": rec and rec.get("valid_ppl"), "test_ppl": rec and rec.get("test_ppl")}
        rows.append(row)
        if as_json:
            click.echo(_json(row))
    if as_json:
        return
    click.echo(f"{p.path}: {p.description}" if p.description else str(p.path))
    click.echo(f"results: {p.results}   checkpoints: {p.runs_dir}")
    click.echo(f"{'run':<18} {'parameters':>11} {'H':>4} {'E':>4}  {'valid':>8} {'test':>8}  state")
    for r in rows:
        v = f"{r['valid_ppl']:8.2f}" if r["valid_ppl"] else f"{'-':>8}"
        t = f"{r['test_ppl']:8.2f}" if r["test_ppl"] else f"{'-':>8}"
        m = f"  (matches {r['matched']['run']}: {r['matched']['target_parameters']:,})" if r["matched"] else ""
        click.echo(f"{r['run']:<18} {r['parameters']:>11,} {r['hidden']:>4} {r['embedding_size']:>4}  "
                   f"{v} {t}  {r['state']}{m}")


def _register_plot():
    from .plot import plot_command

    main.add_command(plot_command, "plot")


_register_plot()


@experiment.command("worker", hidden=True)
@click.argument("spec", type=click.Path(dir_okay=False, exists=True))
@friendly_errors
def experiment_worker(spec):
    """One run of a plan (started by `experiment run`)."""
    from .experiment import work

    work(spec)


@main.group()
def data():
    """Get corpora: download PTB / WikiText-2, or write a synthetic one."""


@data.command("fetch")
@click.argument("name", type=click.Choice(["ptb", "wikitext-2"]))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--base-url", help="Fetch the same file names from this URL instead (a mirror).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@friendly_errors
def data_fetch(name, directory, base_url, quiet):
    """Download dataset NAME into DIRECTORY and verify its sha256 sums."""
    from .fetch import fetch
    from .progress import Progress

    bar = {}

    def progress(done, total):
        if quiet:
            return
        p = bar.get("p")
        if p is None or p.total != max(total, 1):
            if p is not None:
                p.close()
            p = bar["p"] = Progress(max(total, 1), "download")
        p.update(done, f"{done / 1e6:.1f}/{total / 1e6:.1f} MB", force=done >= total)

    paths = fetch(name, directory, base_url=base_url, progress=progress)
    if bar.get("p"):
        bar["p"].close()
    for p in paths:
        click.echo(f"ok  {p}")


@data.command("synthetic")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--vocab", type=int, default=1000, show_default=True, help="Words (including <eos>).")
@click.option("--tokens", type=int, default=1_000_000, show_default=True, help="Training tokens.")
@click.option("--eval-tokens", type=int, default=None, help="Tokens in valid and test each [default: tokens/12, at least 1000].")
@click.option("--states", type=int, default=None, help="HMM states [default: the built-in spec's].")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def data_synthetic(directory, vocab, tokens, eval_tokens, states, seed):
    """Write a synthetic corpus from a seeded hidden Markov model.

    Its exact per-token entropy is known, so corpus.json records the oracle
    perplexity of each split beside the unigram perplexity.
    """
    import dataclasses

    from .synthetic import DEFAULT_SPEC, write_corpus

    if vocab < 3:
        raise click.BadParameter(f"must be >= 3, got {vocab}", param_hint="--vocab")
    spec = dataclasses.replace(DEFAULT_SPEC, vocab=vocab, seed=seed,
                               support=min(DEFAULT_SPEC.support, vocab - 1),
                               **({"states": states} if states else {}))
    ev = eval_tokens or max(1000, tokens // 12)
    info = write_corpus(directory, spec, tokens, ev, ev)
    click.echo(f"wrote {directory}: {info['tokens']['train']:,} train tokens, vocab {vocab:,}; "
               f"oracle test PPL {info['oracle_perplexity']['test']:.2f}, "
               f"unigram test PPL {info['unigram_perplexity']['test']:.2f}")


@data.command("nbest")
@click.argument("refs", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="test", show_default=True, help="Writes NAME.nbest and NAME.ref.")
@click.option("--n", "n", type=click.IntRange(min=1), default=20, show_default=True, help="Hypotheses per sentence.")
@click.option("--min-edits", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--max-edits", type=click.IntRange(min=0), default=4, show_default=True)
@click.option("--noise", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Noise on the TM feature (0: it ranks by damage exactly).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N sentences.")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def data_nbest(refs, directory, name, n, min_edits, max_edits, noise, limit, seed):
    """Make a synthetic MT n-best list from reference sentences REFS.

    Each hypothesis is a reference damaged by random edits (swaps,
    deletions, substitutions, insertions); its TM0 feature is minus the
    number of edits plus noise.  A test bed for `slimnp rerank`: a good
    language model must raise BLEU when added.
    """
    from .mt.fakemt import write_task

    lines = [line for line in _read_lines(refs) if line.strip()][:limit]
    if not lines:
        raise click.ClickException(f"{refs}: no sentences")
    paths = write_task(lines, directory, name, n=n, max_edits=max_edits, noise=noise, seed=seed,
                       min_edits=min_edits)
    click.echo(f"wrote {paths['nbest']} ({len(lines):,} sentences, up to {n} hypotheses each) and {paths['ref']}")


if __name__ == "__main__":  # pragma: no cover
    main()
