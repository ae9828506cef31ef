"""A training run as one library call: what ``slimnp train`` does, for the
CLI and the experiment runner alike.

:func:`train` takes the options of ``slimnp train`` as a dict (the names of
:data:`slimnp.options.TRAIN_OPTIONS`; unset ones take their defaults and the
recipe's values), checks that they go together, finds the data (the built-in
synthetic corpus when none is given), and starts, resumes or continues the
run (:func:`slimnp.trainer.run_training`, :func:`slimnp.trainer.resume_training`).
Mistakes in the options raise :class:`slimnp.options.OptionError`; the rest
of the library's errors pass through.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from .options import (MODEL_KIND_OPTIONS, MODEL_OPTIONS, TRAIN_OPTIONS, OptionError, complete,
                      configs, option, settings)

__all__ = ["train", "data_files"]

# what a fresh run's model kind is when no option changes it
_KIND_DEFAULTS = {k: option(k).default for k in MODEL_KIND_OPTIONS}
# --resume takes everything but the data from the checkpoint: every model and
# training option whose default is the recipe's (--epochs alone may change)
_RESUME_FIXED = tuple(o.name for o in TRAIN_OPTIONS if o.feeds in ("model", "train")
                      and o.default is None and o.name != "epochs")


def data_files(params: dict) -> dict | None:
    """``{'train', 'valid'[, 'test', 'vocab']: path}`` of ``--data`` or
    ``--train/--valid/--test``, or None when no data is given."""
    from .data import CorpusError, find_splits

    data, train, valid, test = (params.get(k) for k in ("data", "train_file", "valid_file", "test_file"))
    if data and (train or valid or test):
        raise OptionError("give either --data DIR or --train/--valid/--test, not both")
    if data:
        return find_splits(data)
    if train:
        if not valid:
            raise OptionError("--train needs --valid too (validation drives the lr schedule)")
        files = {"train": Path(train), "valid": Path(valid)}
        if test:
            files["test"] = Path(test)
        for k, p in files.items():
            if not p.is_file():
                raise CorpusError(f"{p}: no such file (--{k})")
        return files
    if valid or test:
        raise OptionError("--valid/--test need --train")
    return None


def _kind_changed(p: dict) -> bool:
    return any(p[k] != v for k, v in _KIND_DEFAULTS.items())


def train(options: dict, *, log=print, comm=None) -> dict:
    """Train (or resume) the run ``options`` describe; returns its summary.

    ``options``: ``slimnp train``'s options by name (``out``, ``data``,
    ``hidden``, ``input_kind``, ...).  ``log``: gets the progress lines.
    ``comm``: the ranks of a distributed run (:mod:`slimnp.distributed`),
    or None; with ``distributed=True`` and no ``comm`` the MPI job's ranks
    are joined here.
    """
    from .distributed import launched_by_mpi

    p = complete(options)
    if p["distributed"] and comm is None:
        from .distributed import init as init_distributed

        comm = init_distributed()
        p["threads"] = p["threads"] or comm.default_threads()  # the node's cores, shared by its ranks
    elif not p["distributed"] and (launch := launched_by_mpi()) and launch[0] == 0:
        log(f"warning: this is rank 0 of {launch[1]} MPI processes but --distributed is not "
            "set: every process trains a model of its own and writes the same files; "
            "add --distributed")
    from .threads import denormals_flushed

    # distributed: one rank's error must not leave the others waiting in a
    # collective; the denormal setting holds for the whole run, final test
    # evaluation included, and is undone after it
    with (comm.abort_on_error() if comm is not None else contextlib.nullcontext()), \
            denormals_flushed(p["denormals"] == "flush"):
        return _train(p, log, comm)


def _train(p: dict, log, comm) -> dict:
    from .trainer import resume_training, run_training

    root = comm is None or comm.is_root
    if p["threads"]:
        from .threads import set_threads

        set_threads(p["threads"])
    run = dict(device=p["device"], log=log, progress=not p["quiet"], comm=comm,
               checkpoint_every=p["checkpoint_every"], force_memory=p["force_memory"])
    if p["resume"]:
        given = [k for k in _RESUME_FIXED if p[k] is not None]
        if _kind_changed(p):
            given.append("input/output/mapping/tie")
        if given or p["data"] or p["train_file"] or p["out"] or p["init_from"]:
            names = ", ".join("--" + k.replace("_", "-") for k in given) or "data/--out options"
            raise OptionError(f"--resume continues the stored run; {names} cannot change "
                              "(only --epochs may be raised)")
        return resume_training(p["resume"], epochs=p["epochs"], **run)
    if p["init_from"]:
        model_opts = [k for k in MODEL_OPTIONS if p[k] is not None]
        if _kind_changed(p):
            model_opts.append("input/output/mapping/tie")
        if model_opts:
            raise OptionError(
                "--init-from takes the model from the file; "
                f"{', '.join('--' + k.replace('_', '-') for k in model_opts)} cannot be given")
        if not (p["data"] or p["train_file"]):
            raise OptionError("--init-from needs the training data: --data DIR or --train/--valid")
    out = Path(p["out"] or "model.h5")
    if root:  # before any work: a typo in --out costs seconds, not an epoch
        from ._atomic import check_output
        from .trainer import TrainingError

        check_output(out)
        if out.exists() and not p["force"]:
            raise TrainingError(
                f"{out} exists; continue it with `slimnp train --resume {out}`, "
                "or pass --force to overwrite it (or choose another --out)")
    files = data_files(p)
    corpus_info = None
    if files is None:
        from .synthetic import builtin_corpus

        if comm is not None and not root:
            comm.barrier()  # rank 0 generates the corpus first (see below)
        d, corpus_info = builtin_corpus(log if root else (lambda m: None))
        if comm is not None and root:
            comm.barrier()
        files = {s: d / f"{s}.txt" for s in ("train", "valid", "test")}
    model, train_cfg = configs(settings(p), seed=p["seed"], loss_average=p["loss_average"],
                               eval_batch_size=p["eval_batch_size"])
    return run_training(files, out, None if p["init_from"] else model, train_cfg,
                        min_count=p["min_count"], max_vocab=p["max_vocab"], corpus_info=corpus_info,
                        init_from=p["init_from"], **run)

