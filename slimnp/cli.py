"""The ``slimnp`` command line: a thin click layer over the library.

Each command calls library functions; library errors that mean "the user
asked for something wrong" become one clear line on stderr and exit code 1.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import click

from ._version import __version__
from .options import TRAIN_OPTIONS, Option, OptionError, option


def _user_errors():
    from .backend import DeviceUnavailable
    from .data import CorpusError
    from .fetch import FetchError
    from .io import FormatError
    from .memory import NotEnoughMemory
    from .distributed import DistributedError
    from .trainer import TrainingError

    return (CorpusError, DeviceUnavailable, DistributedError, FetchError, FormatError,
            NotEnoughMemory, TrainingError, ValueError, OSError)


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

    return _schema_option(option("device"), callback=check)(fn)


def _click_type(o: Option):
    if o.kind == "int":
        return click.IntRange(min=o.low, max=o.high) if o.low is not None or o.high is not None else int
    if o.kind == "float":
        return (click.FloatRange(min=o.low, max=o.high, min_open=o.low_open)
                if o.low is not None or o.high is not None else float)
    if o.kind == "choice":
        return click.Choice(list(o.choices))
    if o.kind == "dir":
        return click.Path(file_okay=False)
    if o.kind == "file":
        return click.Path(dir_okay=False, exists=o.exists)
    return str


def _schema_option(o: Option, **override):
    """The click option of schema entry ``o`` (slimnp.options); ``override``:
    click keywords that differ for one command (help, default)."""
    decls = [o.flag] + ([o.short] if o.short else []) + [o.name]
    kw = dict(help=o.help, default=o.default, show_default=o.show_default, metavar=o.metavar)
    kw.update(is_flag=True) if o.kind == "flag" else kw.update(type=_click_type(o))
    kw.update(override)
    return click.option(*decls, **kw)


def _set_threads(ctx, param, value):
    if value:
        from .threads import set_threads

        set_threads(value)
    return value


def threads_option(fn=None, **override):
    """``--threads`` of every command (the threads are set as it is read)."""
    kw = dict(help="CPU threads [default: all cores].", callback=_set_threads)
    deco = _schema_option(option("threads"), **{**kw, **override})
    return deco if fn is None else deco(fn)


def denormals_option(fn):
    """``--denormals flush|keep`` (the schema's option and help, as ``slimnp
    train``'s): the command runs with denormal floats flushed to zero in
    every CPU thread (default) or kept, and leaves the setting as it found it."""

    @functools.wraps(fn)
    def run(*args, denormals, **kwargs):
        from .threads import denormals_flushed

        with denormals_flushed(denormals == "flush"):
            return fn(*args, **kwargs)

    return _schema_option(option("denormals"))(run)


def json_option(help="Print one JSON object."):
    return _schema_option(option("as_json"), help=help)


def quiet_option(help="No progress bar."):
    return _schema_option(option("quiet"), help=help)


def friendly_errors(fn):
    """Turn library errors into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except OptionError as exc:
            raise click.UsageError(str(exc)) from None
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
def _train_options(fn):
    """Every option of `slimnp train`, generated from slimnp.options.TRAIN_OPTIONS."""
    for o in reversed(TRAIN_OPTIONS):
        fn = _device_option(fn) if o.name == "device" else _schema_option(o)(fn)
    return fn


@main.command()
@_train_options
@friendly_errors
def train(**options):
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
    from .distributed import launched_by_mpi
    from .runs import train as train_run

    as_json = options["as_json"]
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    summary = train_run(options, log=log)
    rank = (launched_by_mpi() or (0, 1))[0] if options["distributed"] else 0
    if as_json and rank == 0:  # rank 0 speaks for a distributed run
        click.echo(_json(summary))
    return summary


# ---------------------------------------------------------------------------
# evaluate / inspect / compress
# ---------------------------------------------------------------------------
@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--batch-size", type=int, default=1, show_default=True, help="1 is exact; B>1 runs B pieces of the file in parallel from fresh states (faster, approximate).")
@threads_option
@json_option()
@quiet_option()
@_device_option
@denormals_option
@friendly_errors
def evaluate(model, file, batch_size, threads, as_json, quiet, device):
    """Exact perplexity of MODEL on the text FILE.

    Every token is predicted (the first from an <eos> prime); words outside
    the model's vocabulary count as <unk> and are reported as the OOV rate.
    """
    from .evaluate import evaluate_file

    out = evaluate_file(model, file, batch_size=batch_size, device=device, progress=not quiet)
    if as_json:
        click.echo(_json(out))
    else:
        click.echo(f"perplexity {out['perplexity']:.3f}  (loss {out['loss']:.4f} nats/token, "
                   f"{out['tokens']:,} tokens, OOV {out['oov_rate'] * 100:.2f}%, {out['seconds']:.1f} s)")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@json_option()
@friendly_errors
def inspect(model, as_json):
    """Show a model file: config, every dataset, parameter counts, training state."""
    from .describe import describe, describe_text

    info = describe(model)
    click.echo(_json(info, indent=2) if as_json else describe_text(info))


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
@threads_option
@json_option("Print the report as one JSON object.")
@denormals_option
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
    from .compress import compress_file

    if not input_k and not output_k:
        raise click.UsageError("give --input-k/--input-ratio and/or --output-k/--output-ratio")
    for side, k, r in (("input", input_k, input_ratio), ("output", output_k, output_ratio)):
        if bool(k) != (r is not None):
            raise click.UsageError(f"--{side}-k and --{side}-ratio go together")
    log = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    report = compress_file(model, out, input_k=input_k, input_ratio=input_ratio, output_k=output_k,
                           output_ratio=output_ratio, frequent=frequent, valid=valid_file, seed=seed,
                           iters=iters, force=force, log=log, progress=not as_json)
    if as_json:
        click.echo(_json(report))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--logits", is_flag=True, help="Also output the raw scores 'logits (B, V)' (adaptive output: "
              "the log-probabilities again, whose softmax is the model's distribution).")
@click.option("--opset", type=click.IntRange(min=13), default=None, help="ONNX opset to target [default: 17].")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@json_option("Print the summary as one JSON object.")
@friendly_errors
def export(model, out, logits, opset, force, as_json):
    """Write MODEL's one-step graph as an ONNX file (slim layers stay compressed).

    Inputs: token ids (B,) and the LSTM state (L, 2, B, H); outputs: the
    next word's log-probabilities (B, V) and the new state.  A slim input
    layer is a Gather from its pool, a slim output layer the K-pool dynamic
    programme: no V x H matrix is stored.  The vocabulary and the source
    file's sha256 travel in the metadata.  Needs pip install 'slimnp[onnx]'.
    """
    from .export import DEFAULT_OPSET, ExportError, export_onnx, summary_line

    if os.path.exists(out) and not force:
        raise ExportError(f"{out} exists; pass --force to overwrite it")
    info = export_onnx(model, out, logits=logits, opset=opset or DEFAULT_OPSET)
    click.echo(_json(info) if as_json else summary_line(info))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The quantized model file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@json_option("Print the report as one JSON object.")
@friendly_errors
def quantize(model, out, force, as_json):
    """Store MODEL's weights as int8 with a float32 scale per row.

    Embedding rows, slim pool entries, LSTM weight rows, the dense output
    matrix's rows and projections become int8 (symmetric: scale = max|row|
    / 127); biases stay float32.  Every command loads the file as float32
    (error at most scale/2 per weight); export keeps the int8 arrays
    (DequantizeLinear).  The optimizer and training state are dropped.
    """
    from .quantize import quantize_file, summary_line

    report = quantize_file(model, out, force=force)
    click.echo(_json(report) if as_json else summary_line(report))


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


def _load_lm(model, device="cpu"):
    from .inference import LM

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
@threads_option
@json_option("One JSON object per sentence, then one with the totals.")
@quiet_option()
@_device_option
@denormals_option
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
    from .inference import score_totals
    from .progress import Progress

    lm = _load_lm(model, device)
    lines = _read_lines(file)
    t0 = time.perf_counter()
    prog = Progress(max(len(lines), 1), "score", enabled=not quiet)
    scores = lm.score(lines, batch_size=batch_size, continuous=continuous,
                      progress=lambda done: prog.update(done, f"{done:,} sentences"))
    prog.close()
    summary = score_totals(scores, time.perf_counter() - t0, continuous)
    for i, (line, s) in enumerate(zip(lines, scores)):
        for text in ([_json({"sentence": i, "text": line, **s.to_dict(words)})] if as_json
                     else s.text_lines(line, words)):
            click.echo(text)
    if as_json:
        click.echo(_json({"total": summary}))
    else:
        click.echo(f"{summary['sentences']:,} sentences, {summary['tokens']:,} tokens, "
                   f"{summary['oov']:,} OOV; logprob {summary['logprob']:.2f} (log10 {summary['log10prob']:.2f}), "
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
@threads_option
@json_option("One JSON object per sample.")
@_device_option
@denormals_option
@friendly_errors
def generate(model, prompt, length, temperature, top_k, seed, count, through_eos, threads, as_json,
             device):
    """Sample text from MODEL, one sample per line.

    Each sample starts from a fresh state and the <eos> prime (the start of
    a sentence), reads --prompt, then draws words until <eos> or --length.
    """
    lm = _load_lm(model, device)
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
@threads_option
@json_option("Print the summary (weights, BLEU) as one JSON object.")
@quiet_option("No progress bars.")
@_device_option
@denormals_option
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
    from ._atomic import check_output

    for path, what in ((out, "--out"), (best, "--best")):
        if path:  # before the scoring: a typo costs seconds
            check_output(path, what=what)
    res = rerank_nbest(_load_lm(model, device), nbest_file, weights=weights, dev_nbest=dev_nbest,
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

# ---------------------------------------------------------------------------
# experiment plans, plots
# ---------------------------------------------------------------------------
@main.group()
def experiment():
    """Plans of many training runs: run them (resumable, in parallel), see where they stand.

    \b
      slimnp experiment status experiments/fig4-wt2.toml
      slimnp experiment run experiments/fig4-wt2.toml --jobs 2 --threads 1
      slimnp plot experiments/results/fig4-wt2.jsonl --out fig4.png

    A plan is a TOML file of runs, each a set of `slimnp train` options
    (the slimnp.experiment module documents the format).
    """


def _plan(plan, sets):
    from .experiment import load_plan, parse_sets, resolve

    p = load_plan(plan, parse_sets(sets))
    resolve(p)
    return p


_sets_option = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                            help="Override an option in every run, e.g. --set data=~/data/ptb (a changed "
                                 "setting makes existing checkpoints stale).")


@experiment.command("run")
@click.argument("plan", type=click.Path(dir_okay=False))
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True, help="Runs trained at once, each in its own process.")
@threads_option(default=1, show_default=True, help="CPU threads per run (jobs x threads should not exceed the cores).", callback=None)
@click.option("--only", multiple=True, help="Run only these runs (repeatable).")
@_sets_option
@_device_option
@friendly_errors
def experiment_run(plan, jobs, threads, only, sets, device):
    """Train every run of PLAN that has no result yet; append each result.

    Finished runs are skipped; stopped ones (Ctrl-C, kill, end of a
    session) continue from their checkpoints.  Each finished run adds one
    JSON line to the plan's results file (config, parameters per layer,
    valid/test perplexity, epochs, times, tok/s, machine, version, commit).
    """
    from .experiment import Runner

    code = Runner(_plan(plan, sets), jobs=jobs, threads=threads, device=device, only=only,
                  log=lambda m: click.echo(m, err=True)).run()
    sys.exit(code)


@experiment.command("status")
@click.argument("plan", type=click.Path(dir_okay=False))
@_sets_option
@json_option("One JSON object per run.")
@friendly_errors
def experiment_status(plan, sets, as_json):
    """Each run of PLAN: its state (checkpoint epoch and segment, training time left, last validation perplexity), size (matched sizes resolved) and results.

    With --json each line also has the run's history (per epoch: lr, train and validation perplexity; so far, for a run in progress), which `slimnp plot --kind curves` draws.
    """
    from .experiment import status_rows

    p = _plan(plan, sets)
    rows = status_rows(p)
    if as_json:
        for row in rows:
            click.echo(_json(row))
        return
    click.echo(f"{p.path}: {p.description}" if p.description else str(p.path))
    click.echo(f"results: {p.results}   checkpoints: {p.runs_dir}")
    click.echo(f"{'run':<18} {'parameters':>11} {'H':>4} {'E':>4}  {'valid':>8} {'test':>8}  state")
    for r in rows:
        v, t = (f"{r[k]:8.2f}" if r[k] else f"{'-':>8}" for k in ("valid_ppl", "test_ppl"))
        m = f"  (matches {r['matched']['run']}: {r['matched']['target_parameters']:,})" if r["matched"] else ""
        click.echo(f"{r['run']:<18} {r['parameters']:>11,} {r['hidden']:>4} {r['embedding_size']:>4}  "
                   f"{v} {t}  {r['state']}{m}")


@experiment.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@friendly_errors
def experiment_check(files):
    """Check every line of results FILES against the schema (slimnp.results)."""
    from .results import file_problems

    bad = 0
    for f in files:
        problems = file_problems(f)
        for run, pr in problems:
            click.echo(f"{f}: run {run!r}: {'; '.join(pr)}")
        bad += len(problems)
        if not problems:
            click.echo(f"{f}: every line current")
    sys.exit(1 if bad else 0)


@experiment.command("rewrite")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@friendly_errors
def experiment_rewrite(files):
    """Rewrite results FILES in the current form (paths relative to the
    plan, older line forms converted); every number is kept, and a current
    file is left untouched.  Run it while no runner appends to FILES."""
    from .results import rewrite

    for f in files:
        n = rewrite(f)
        click.echo(f"{f}: {n} line(s) rewritten" if n else f"{f}: current")


@experiment.command("record")
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("script", type=click.Path(dir_okay=False))
@click.argument("run")
@click.argument("command")
@click.argument("output")
@friendly_errors
def experiment_record(out, script, run, command, output):
    """Append to results file OUT the line of one COMMAND of SCRIPT, named
    RUN, from its printed OUTPUT (last line: its --json object); for scripts
    such as experiments/compress-ptb.sh."""
    from .results import record_command

    record_command(out, script, run, command, output)


@experiment.command("worker", hidden=True)
@click.argument("spec", type=click.Path(dir_okay=False, exists=True))
@friendly_errors
def experiment_worker(spec):
    """One run of a plan (started by `experiment run`)."""
    from .experiment import work

    work(spec)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--out", "-o", default="plot.png", show_default=True, type=click.Path(), help="PNG to write (960x600 pixels).")
@click.option("--kind", default="auto", show_default=True, metavar="ratio|k|curves|auto",
              help="ratio: perplexity vs compression (Figures 2, 4); k: perplexity vs K (Figure 5); "
                   "curves: validation perplexity per epoch; auto: curves for metrics files, else ratio.")
@click.option("--svg", is_flag=True, help="Also write an SVG beside the PNG.")
@click.option("--title", help="Title above the plot.")
@click.option("--metric", default="test_ppl", show_default=True, metavar="test_ppl|valid_ppl",
              help="Perplexity on the y axis of ratio and k plots.")
@click.option("--k-ratio", metavar="R", help="Compression of a k plot, e.g. 8 or 1/8 [default: the one with several K].")
@click.option("--method", "methods", multiple=True, metavar="NAME",
              help="Plot only rows of this method (repeatable; the uncompressed baseline always stays), "
                   "e.g. --method SE --method SM --method PM for Figure 4.")
@friendly_errors
def plot(files, out, kind, svg, title, metric, k_ratio, methods):
    """Plot results of `slimnp experiment run` or `slimnp train` metrics.

    \b
      slimnp plot experiments/results/sweeps-ptb.jsonl --out fig4.png
      slimnp plot experiments/results/sweeps-ptb.jsonl --kind k --out fig5.png
      slimnp plot runs/*.metrics.jsonl --out curves.png

    FILES are results files (*.jsonl, one line per finished run; several are
    concatenated) or training metrics files (*.metrics.jsonl).  Several seeds
    of one point are drawn as their mean with error bars.  Needs matplotlib:
    pip install 'slimnp[plot]'.
    """
    from .plot import plot_files

    click.echo(plot_files([Path(f) for f in files], Path(out), kind, svg, title, metric, k_ratio,
                          methods))


@main.group()
def data():
    """Get corpora: download PTB / WikiText-2, or write a synthetic one."""


@data.command("fetch")
@click.argument("name", type=click.Choice(["ptb", "wikitext-2"]))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--base-url", help="Fetch the same file names from this URL instead (a mirror).")
@quiet_option()
@friendly_errors
def data_fetch(name, directory, base_url, quiet):
    """Download dataset NAME into DIRECTORY and verify its sha256 sums."""
    from .fetch import fetch
    from .progress import DownloadBar

    bar = DownloadBar(enabled=not quiet)
    paths = fetch(name, directory, base_url=base_url, progress=bar)
    bar.close()
    for p in paths:
        click.echo(f"ok  {p}")


@data.command("synthetic")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--vocab", type=int, default=1000, show_default=True, help="Words (including <eos>).")
@click.option("--tokens", type=int, default=1_000_000, show_default=True, help="Training tokens.")
@click.option("--eval-tokens", type=int, default=None, help="Tokens in valid and test each [default: tokens/12, at least 1000].")
@click.option("--states", type=int, default=None, help="HMM states [default: the built-in spec's].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the hidden Markov model and of the text drawn from it.")
@friendly_errors
def data_synthetic(directory, vocab, tokens, eval_tokens, states, seed):
    """Write a synthetic corpus from a seeded hidden Markov model.

    Its exact per-token entropy is known, so corpus.json records the oracle
    perplexity of each split beside the unigram perplexity.
    """
    from .synthetic import write_synthetic

    info = write_synthetic(directory, vocab, tokens, eval_tokens, states, seed)
    click.echo(f"wrote {directory}: {info['tokens']['train']:,} train tokens, vocab {vocab:,}; "
               f"oracle test PPL {info['oracle_perplexity']['test']:.2f}, "
               f"unigram test PPL {info['unigram_perplexity']['test']:.2f}")


@data.command("nbest")
@click.argument("refs", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--name", default="test", show_default=True, help="Writes NAME.nbest and NAME.ref.")
@click.option("--n", "n", type=click.IntRange(min=1), default=20, show_default=True, help="Hypotheses per sentence.")
@click.option("--min-edits", type=click.IntRange(min=0), default=1, show_default=True, help="Fewest random edits per damaged hypothesis.")
@click.option("--max-edits", type=click.IntRange(min=0), default=4, show_default=True, help="Most random edits per damaged hypothesis.")
@click.option("--noise", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Noise on the TM feature (0: it ranks by damage exactly).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N sentences.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random edits and the noise.")
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
