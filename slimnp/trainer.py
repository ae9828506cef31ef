"""Truncated-BPTT training with exact, resumable checkpoints.

An epoch walks B parallel streams of the training text (stream b is the b-th
contiguous chunk) in segments of ``bptt`` steps, carrying the LSTM state from
one segment to the next (gradients are truncated at segment borders) and
resetting it to zero at each epoch start, as in Zaremba et al. 2014.

Checkpoints are written atomically at every epoch end, every
``checkpoint_every`` minutes of wall-clock time inside an epoch (at a step
boundary), and when the run is interrupted (Ctrl-C / SIGTERM).  They hold the
parameters, optimizer state, learning rate, epoch, position inside the epoch,
carried state and the RNG state, so ``resume`` continues bit-for-bit: a run
stopped, or killed, and resumed ends with exactly the parameters of an
uninterrupted run, and a kill loses at most the minutes since the last one.

Data parallelism (``comm``, :mod:`slimnp.distributed`): each MPI rank trains
on its ``B/N`` of the streams with the global loss scale, the gradient buffer
is summed over ranks before every optimizer step, and only rank 0 logs and
writes files; checkpoints hold the whole ``(L, 2, B, H)`` carried state, so a
run resumes with any number of ranks that divides B (bit-for-bit with the
same number).  Rank 0's clock decides when a timed checkpoint is due and
the per-step exchange tells every rank, so all write it after the same step.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import distributed as dist
from . import io as sio
from . import memory
from ._atomic import append_line, check_output, file_sha256
from .backend import make_rng, to_numpy
from .data import Vocabulary, batchify, num_segments, segment
from .evaluate import evaluate_ids
from .model import LanguageModel, ModelConfig, config_from_dict
from .modelfile import (expected_model, expected_shapes, load_model, model_checkpoint,
                        model_from_checkpoint)
from .optim import OPTIMIZERS, Schedule, make_optimizer
from .sampled_losses import KINDS as SAMPLED_KINDS
from .sampled_losses import Sampled, prepare_model
from .errors import WriteError, json_dumps
from .progress import Progress, fmt_duration

#: The clock of timed checkpoints (tests replace it with a step counter).
_clock = time.monotonic
#: Minutes between checkpoints inside an epoch (``slimnp train --checkpoint-every``).
CHECKPOINT_EVERY = 10.0
#: Why a summary or metrics value can be missing (strict JSON writes null and this).
JSON_REASONS = {"best_valid_ppl": "no epoch has finished yet",
                "prev_valid_ppl": "no epoch has finished yet",
                "valid_ppl": "no validation text", "train_ppl": "the training loss overflowed",
                "test_ppl": "no test tokens", "ratio_to_oracle": "no test perplexity",
                "perplexity": "no tokens", "loss": "no tokens"}


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, data changed, ...); the message says why."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 13  # passes over the training text
    bptt: int = 20  # truncated-BPTT segment length T
    batch_size: int = 20  # B parallel streams
    lr: float = 1.0  # initial learning rate
    optimizer: str = "sgd"  # 'sgd' or 'adagrad' (slimnp.optim.OPTIMIZERS)
    loss: str = "softmax"  # training objective: 'softmax' (exact), 'is' or 'nce' (slimnp.sampled_losses)
    samples: int = 4000  # S, noise words per minibatch for 'is' / 'nce'
    clip: float = 5.0  # max global gradient norm (0: off)
    schedule: str = "epoch"  # 'epoch' (Zaremba), 'plateau' (Kim et al.), 'constant'
    lr_decay: float = 0.5  # multiplier applied by the schedule
    decay_start: int = 4  # 'epoch': lr0 * decay ** max(0, epoch - decay_start)
    decay_threshold: float = 1.0  # 'plateau': decay when valid PPL improves by less
    loss_average: str = "batch"  # 'batch': sum over T, mean over B (Zaremba); 'token': mean
    seed: int = 0  # init, dropout: the same seed gives the same model
    eval_batch_size: int = 10  # streams for per-epoch validation

    def validate(self) -> None:
        problems = []
        for name in ("epochs", "bptt", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.loss_average not in ("batch", "token"):
            problems.append(f"loss_average must be 'batch' or 'token', got {self.loss_average!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.loss not in SAMPLED_KINDS:
            problems.append(f"loss must be one of {', '.join(SAMPLED_KINDS)}, got {self.loss!r}")
        if self.loss != "softmax" and self.samples < 1:
            problems.append(f"samples must be >= 1, got {self.samples}")
        if self.schedule not in Schedule.KINDS:
            problems.append(f"schedule must be one of {', '.join(Schedule.KINDS)}, got {self.schedule!r}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d, "training")


@dataclass
class TrainState:
    epoch: int = 1  # the epoch being trained (1-based)
    segment: int = 0  # next segment inside that epoch
    lr: float = 1.0
    best_valid_ppl: float = math.inf
    prev_valid_ppl: float = math.inf
    epoch_nll: float = 0.0  # running sums of the current epoch
    epoch_tokens: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    finished: bool = False
    history: list = field(default_factory=list)


class Step(NamedTuple):
    """What one :meth:`Trainer.step` did."""

    nll: float  # the segment's summed loss over every rank's streams (NLL for softmax)
    stop: str | None  # a stop request to honour after this step (distributed: agreed)
    checkpoint: bool  # a timed checkpoint is due after this step (distributed: rank 0's clock)


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to stop after this step."""

    def __init__(self):
        self.requested = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread: no handlers, no harm
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:  # second signal: stop hard
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Owns a model, its optimizer, the data and the checkpoint files.

    Parameters
    ----------
    model, vocab : the model and its vocabulary
    train_ids, valid_ids : 1-D int32 token streams
    config : :class:`TrainConfig`
    out : checkpoint path (``.h5``); the best-validation model goes to
        ``<out stem>.best.h5`` and metrics to ``<out stem>.metrics.jsonl``
    data_info : JSON-able description of the data (paths, sha256), stored in
        the checkpoint so ``resume`` can find and verify it
    comm : a :class:`slimnp.distributed.Communicator` for data-parallel
        training (every rank builds the same Trainer; this one takes streams
        ``[r B/N, (r+1) B/N)``), or None for one process
    checkpoint_every : minutes of wall-clock time between checkpoints inside
        an epoch (written after the step during which they fell due; 0:
        only at epoch ends and interrupts)
    """

    def __init__(self, model: LanguageModel, vocab: Vocabulary, train_ids, valid_ids,
                 config: TrainConfig, out, data_info: dict | None = None,
                 log=print, progress: bool = True, comm=None,
                 checkpoint_every: float = CHECKPOINT_EVERY):
        config.validate()
        if not checkpoint_every >= 0:
            raise ValueError(f"checkpoint_every must be >= 0 minutes, got {checkpoint_every}")
        self.checkpoint_every = float(checkpoint_every)
        self._saved_at = None  # _clock() when self.out was last written (or the run resumed)
        self.comm = comm
        self.is_root = comm is None or comm.is_root
        if not self.is_root:  # rank 0 speaks for all
            log, progress = _quiet, False
        self.model, self.vocab, self.config = model, vocab, config
        self.train_ids = np.asarray(train_ids)
        self.valid_ids = np.asarray(valid_ids) if valid_ids is not None else None
        self.out = Path(out)
        self.best_path = self.out.with_name(self.out.stem + ".best" + self.out.suffix)
        self.metrics_path = self.out.with_name(self.out.stem + ".metrics.jsonl")
        self.data_info = data_info or {}
        self.log = log
        self.show_progress = progress
        self.optimizer = make_optimizer(config.optimizer, config.clip)
        self.schedule = Schedule(config.schedule, config.lr, config.lr_decay,
                                 config.decay_threshold, config.decay_start)
        self.rng = make_rng(config.seed)
        self.sampled = None
        if config.loss != "softmax":
            # noise: the smoothed unigram law of the training text; draws come
            # from self.rng, which checkpoints store (resume stays exact)
            from .alias_sampler import AliasSampler, unigram_noise

            counts = np.bincount(self.train_ids, minlength=model.config.vocab_size)
            self.sampled = Sampled(config.loss, config.samples,
                                   AliasSampler(unigram_noise(counts)), self.rng)
        self.state = TrainState(lr=config.lr)
        B = config.batch_size
        # this rank's streams [lo, hi): all of them in a single process
        self.lo, self.hi = (0, B) if comm is None else dist.shard_range(B, comm.rank, comm.size)
        self.hidden = model.zero_state(self.hi - self.lo)  # (L, 2, B/N, H)
        self.streams = batchify(self.train_ids, B)[self.lo : self.hi]  # (B/N, n)
        if self.streams.shape[1] < 2:
            raise ValueError(
                f"training text too short: {len(self.train_ids)} tokens cannot fill "
                f"{config.batch_size} streams; lower --batch-size")

    # -- construction ----------------------------------------------------------
    def init_params(self) -> None:
        self.model.init_params(self.rng)
        prepare_model(self.model, self.config.loss)

    @property
    def segments_per_epoch(self) -> int:
        return num_segments(self.streams.shape[1], self.config.bptt)

    # -- checkpoints -------------------------------------------------------------
    def checkpoint(self) -> sio.Checkpoint:
        """Everything :meth:`restore` needs (distributed: a collective call,
        every rank gets the whole carried state)."""
        st = dataclasses.asdict(self.state)
        st["history"] = json.dumps(st["history"])
        st["rng"] = self.rng.bit_generator.state
        # the whole (L, 2, B, H) state: every rank's streams, in rank order
        st["hidden"] = to_numpy(self.hidden) if self.comm is None else \
            self.comm.allgather_axis(self.hidden, axis=2)
        return model_checkpoint(self.model, self.vocab,
                                {"train": self.config.to_dict(), "data": self.data_info},
                                optimizer=self.optimizer.state_dict(), train_state=st)

    def save(self, path=None) -> None:
        """Write a checkpoint (distributed: every rank calls this, rank 0 writes)."""
        ck = self.checkpoint()
        if self.is_root:
            try:
                sio.save(path or self.out, ck)
            except WriteError as exc:  # say where the run can go on from
                there = (f"continue from the last checkpoint with `{self._relaunch()} --resume "
                         f"{self.out}`" if self.out.exists() else "start it again")
                raise WriteError(f"{exc.message}; training stopped: free space or fix the folder, "
                                 f"then {there}", exc.errno, exc.filename) from exc
        if path is None or Path(path) == self.out:
            self._saved_at = _clock()

    def restore(self, ck: sio.Checkpoint, release: bool = False) -> None:
        """Take parameters, optimizer and training state from a checkpoint.

        ``release``: drop the checkpoint's parameter arrays once they are
        loaded (``ck.params`` becomes empty), so the file's copy of the
        parameters and of Adagrad's accumulator are never both alive beside
        the model's (:mod:`slimnp.memory` counts one of them).
        """
        self.model.load_params(ck.params)
        if release:
            ck.params = {}
        self.optimizer.load_state_dict(ck.optimizer)
        st = dict(ck.train_state)
        self.rng.bit_generator.state = st.pop("rng")
        hidden = st.pop("hidden")  # (L, 2, B, H), all streams
        L, _, _, H = self.hidden.shape
        want = (L, 2, self.config.batch_size, H)
        if tuple(hidden.shape) != want:
            raise TrainingError(f"checkpoint carries state of shape {hidden.shape}, expected {want}")
        self.hidden = self.model.xp.asarray(np.ascontiguousarray(hidden[:, :, self.lo : self.hi]))
        st["history"] = json.loads(st.get("history", "[]"))
        fields = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in st.items() if k in fields})

    def _metrics(self, record: dict) -> None:
        """One strict-JSON line in the metrics log (rewritten atomically: a
        full disk leaves the earlier lines intact)."""
        if not self.is_root:
            return
        append_line(self.metrics_path, json_dumps(record, JSON_REASONS))

    # -- the loop ----------------------------------------------------------------
    def validate(self, ids) -> float:
        """Perplexity of ``ids`` with ``eval_batch_size`` pieces; distributed,
        each rank runs its share of the pieces and the NLL sums are added."""
        bptt = max(self.config.bptt, 50)
        if self.comm is None:
            return evaluate_ids(self.model, ids, self.vocab.eos_id,
                                batch_size=self.config.eval_batch_size, bptt=bptt).perplexity
        part = dist.evaluate_shard(self.model, ids, self.vocab.eos_id, self.config.eval_batch_size,
                                   bptt, self.comm.rank, self.comm.size)
        return math.exp(self.comm.sum(part) / len(ids))

    # -- data parallelism ----------------------------------------------------------
    def _masks(self, t: int):
        """Distributed: this rank's dropout masks for a segment of ``t`` steps.

        Drawn for the whole batch, as one process would, and cut to this rank's
        streams: every rank's generator then makes the same draws (it also
        draws the sampled losses' noise words) and the run equals a single
        process's.  None in a single process (``forward_backward`` draws them).
        """
        if self.comm is None:
            return None
        masks = self.model._masks(self.rng, t, self.config.batch_size)  # (t, B, H) each
        if masks is None:
            return None
        return [self.model.xp.ascontiguousarray(m[:, self.lo : self.hi]) for m in masks]

    def _relaunch(self) -> str:
        """The command that continues this run (for messages)."""
        if self.comm is None:
            return "slimnp train"
        return f"mpiexec -n {self.comm.size} slimnp train --distributed"

    def _check_ranks(self, when: str, everything: bool = False) -> None:
        """Checksums of what must be identical on every rank, compared over ranks."""
        if self.comm is None:
            return
        st, model = self.state, self.model
        items = {"parameters": dist.digest(model.store.data),
                 "optimizer state": dist.digest(getattr(self.optimizer, "acc", None)),
                 "RNG state": dist.digest(self.rng.bit_generator.state),
                 "training position": dist.digest([st.epoch, st.segment, st.lr])}
        if everything:
            items.update({
                "configuration": dist.digest(model.config.to_dict(), self.config.to_dict()),
                "mapping tables": dist.digest(*(model.mapping[k] for k in sorted(model.mapping))),
                "vocabulary": dist.digest("\n".join(self.vocab.words)),
                "training text": dist.digest(self.train_ids),
                "validation text": dist.digest(self.valid_ids)})
        self.comm.check_same(items, when, (
            "every rank must read the same files (same contents) with the same slimnp, NumPy and "
            "settings" if everything else
            "the ranks diverged while training (a bug, or a faulty node); the last checkpoint "
            "was left untouched"))

    def step(self, x, y, *, stop=None, checkpoint_due=None) -> Step:
        """One training step on the segment ``x, y`` at the learning rate ``state.lr``.

        In order: zero the gradients; forward and BPTT from the carried state
        (truncated: no gradient flows into it); distributed, sum the gradients
        and the loss over the ranks; stop on a non-finite loss with nothing
        updated; clip the global gradient norm and update the parameters;
        carry the final state to the next segment and count the segment in
        :attr:`state`.  :meth:`train` runs one per segment; the benchmarks
        time it (``bench/train_throughput.py``, ``bench/gpu_check.py``).

        Parameters
        ----------
        x, y : (t, B/N) int32 inputs and targets, time-major, on the host or
            the model's device; one column per stream of this rank (B/N: all
            B in a single process), as in the carried state
        stop : a function of nothing returning a pending stop request (a
            signal's name) or None.  Asked after the update, or, distributed,
            once the gradients are settled, so that every rank learns of a
            request on any one and all stop after the same step
        checkpoint_due : a function of nothing: is a timed checkpoint due
            after this step?  Asked once the gradients are settled;
            distributed, rank 0's answer holds for every rank

        Returns
        -------
        :class:`Step`: the segment's summed loss (every rank's streams) and the
        answers of ``stop`` and ``checkpoint_due``.

        Raises
        ------
        TrainingError
            the loss is NaN or infinite (the parameters are left as they were)
        """
        cfg, st, model, comm = self.config, self.state, self.model, self.comm
        x, y = model.xp.asarray(x), model.xp.asarray(y)
        if x.ndim != 2 or x.shape != y.shape or x.shape[1] != self.hidden.shape[2]:
            raise ValueError(f"x and y must both be (t, {self.hidden.shape[2]}) arrays (time-major, "
                             f"one column per stream), got {x.shape} and {y.shape}")
        ntok = x.size * (1 if comm is None else comm.size)  # tokens of the whole batch
        # the global batch's scale: the summed gradient is one process's
        scale = 1.0 / cfg.batch_size if cfg.loss_average == "batch" else 1.0 / ntok
        model.store.zero_grad(lazy=True)
        nll, new_hidden, _ = model.forward_backward(x, y, self.hidden, scale, self.rng,
                                                    masks=self._masks(x.shape[0]), sampled=self.sampled)
        due = bool(checkpoint_due()) if checkpoint_due is not None else False
        requested = None
        if comm is not None:  # sum gradients and NLL; agree on stopping and on rank 0's clock
            nll, requested, due = comm.step(model.store, nll, stop() if stop is not None else None,
                                            checkpoint=due)
        if not math.isfinite(nll):
            raise TrainingError(
                f"loss became {nll} at epoch {st.epoch}, segment {st.segment + 1}/"
                f"{self.segments_per_epoch} (lr {st.lr:g}); try a lower --lr or --clip. The last "
                f"good checkpoint ({self.out}) was left untouched.")
        self.optimizer.step(model.store.data, model.store.grad, st.lr, model.store.segments())
        self.hidden = new_hidden
        st.segment += 1
        st.epoch_nll += nll
        st.epoch_tokens += ntok
        st.tokens_seen += ntok
        if comm is None and stop is not None:  # one process: a signal counts up to the last moment
            requested = stop()
        return Step(nll, requested, due)

    def train(self) -> TrainState:
        """Train until ``config.epochs`` are done or a stop is requested.

        Returns the final :class:`TrainState` (``finished`` tells which).
        """
        cfg, st, model = self.config, self.state, self.model
        comm = self.comm
        nseg = self.segments_per_epoch
        if comm is not None:
            self.log(dist.traffic_line(model.store.grad.nbytes, comm.size))
            self._check_ranks("at the start", everything=True)
        every = self.checkpoint_every * 60.0  # seconds; 0: epoch ends only
        if st.segment or st.epoch > 1:
            self._saved_at = _clock()  # resumed: the file holds exactly this state
        start = _clock()
        with _StopFlag() as flag:
            while st.epoch <= cfg.epochs and not st.finished:
                with Progress(nseg, f"epoch {st.epoch}/{cfg.epochs}", enabled=self.show_progress) as prog:
                    t0 = time.perf_counter()
                    tok0 = st.epoch_tokens
                    requested = None  # a stop request (signal name) that every rank has seen
                    for i in range(st.segment, nseg):
                        x_bt, y_bt = segment(self.streams, i, cfg.bptt)  # (B/N, t) views
                        done = self.step(
                            np.ascontiguousarray(x_bt.T), np.ascontiguousarray(y_bt.T),  # (t, B/N)
                            stop=lambda: flag.requested,
                            # a timed checkpoint after this step? (not after the
                            # last: the epoch's end writes one anyway)
                            checkpoint_due=lambda: (every > 0 and i + 1 < nseg
                                                    and _clock() - (self._saved_at or start) >= every))
                        requested = done.stop
                        if done.checkpoint and not requested:  # (a stop writes one below)
                            t0 += self._save_inside_epoch(t0)  # writing is not training time
                        dt = time.perf_counter() - t0
                        if prog.enabled:
                            ppl = math.exp(min(st.epoch_nll / st.epoch_tokens, 700))
                            prog.update(i + 1, f"loss {st.epoch_nll / st.epoch_tokens:.3f} ppl {ppl:8.2f} "
                                        f"lr {st.lr:.4g} {(st.epoch_tokens - tok0) / max(dt, 1e-9):,.0f} "
                                        f"tok/s {self._saved_line()}")
                        if requested:
                            break
                elapsed = time.perf_counter() - t0
                st.train_seconds += elapsed
                if comm is None:
                    requested = flag.requested
                if requested and st.segment < nseg:
                    self.save()
                    self.log(f"stopped by {requested} at epoch {st.epoch}, segment "
                             f"{st.segment}/{nseg}; checkpoint written to {self.out} "
                             f"(continue with: {self._relaunch()} --resume {self.out})")
                    self._metrics({"event": "interrupted", "epoch": st.epoch, "segment": st.segment})
                    return st
                self._end_epoch(elapsed, tok0)
                if requested:
                    self.log(f"stopped by {requested} after epoch {st.epoch - 1}; "
                             f"checkpoint written to {self.out}")
                    return st
        st.finished = True
        self.save()
        return st

    def _save_inside_epoch(self, t0: float) -> float:
        """Write the timed checkpoint after the current step (a collective call
        when distributed); returns the seconds it took."""
        st = self.state
        w0 = time.perf_counter()
        before = st.train_seconds
        st.train_seconds = before + (w0 - t0)  # the file counts the epoch so far
        try:
            self.save()
        finally:
            st.train_seconds = before
        took = time.perf_counter() - w0
        self._metrics({"event": "checkpoint", "epoch": st.epoch, "segment": st.segment,
                       "write_seconds": took})
        return took

    def _saved_line(self) -> str:
        """``"saved 3:12 ago"``: how old the last checkpoint is (progress line)."""
        if self._saved_at is None:
            return "no checkpoint yet"
        return f"saved {fmt_duration(_clock() - self._saved_at)} ago"

    def _end_epoch(self, elapsed: float, tok0: int) -> None:
        st, cfg = self.state, self.config
        self._check_ranks(f"after epoch {st.epoch}")
        train_ppl = math.exp(min(st.epoch_nll / max(st.epoch_tokens, 1), 700))
        valid_ppl = self.validate(self.valid_ids) if self.valid_ids is not None else float("nan")
        speed = (st.epoch_tokens - tok0) / max(elapsed, 1e-9)
        improved = valid_ppl < st.best_valid_ppl
        rec = {"event": "epoch", "epoch": st.epoch, "lr": st.lr, "loss": cfg.loss,
               "train_loss": st.epoch_nll / max(st.epoch_tokens, 1),
               "train_ppl": train_ppl if cfg.loss != "nce" else None,  # NCE's loss is no NLL
               "valid_ppl": valid_ppl, "tokens_per_s": speed, "epoch_seconds": elapsed,
               "best": bool(improved)}
        st.history.append(rec)
        # the training loss: a perplexity for softmax, an importance-sampling
        # estimate of it for 'is', the logistic loss per token for 'nce'
        if cfg.loss == "nce":
            shown = f"nce loss  {st.epoch_nll / max(st.epoch_tokens, 1):9.4f}"
        else:
            shown = ("train ppl " if cfg.loss == "softmax" else "is ppl~   ") + f"{train_ppl:9.2f}"
        self.log(f"epoch {st.epoch:3d}  lr {st.lr:<8.4g} {shown}  "
                 f"valid ppl {valid_ppl:9.2f}  {speed:9,.0f} tok/s  {fmt_duration(elapsed)}"
                 + ("  *best" if improved else ""))
        next_lr = self.schedule.next_lr(st.lr, st.epoch, st.prev_valid_ppl, valid_ppl)
        if improved:
            st.best_valid_ppl = valid_ppl
        st.prev_valid_ppl = valid_ppl
        st.epoch += 1
        st.segment = 0
        st.epoch_nll, st.epoch_tokens = 0.0, 0
        st.lr = next_lr
        st.finished = st.epoch > cfg.epochs
        self.hidden = self.model.zero_state(self.hi - self.lo)
        if improved:
            self.save(self.best_path)
        self.save()
        self._metrics(rec)


# ---------------------------------------------------------------------------
# whole runs (what the CLI calls)
# ---------------------------------------------------------------------------
def _quiet(msg) -> None:
    """The log of ranks other than 0."""


def _stop_all_ranks_on_error(fn):
    """With ``comm`` (a distributed run), an exception on one rank prints one
    line naming it and aborts every rank (instead of leaving the others waiting
    in a collective forever): :meth:`slimnp.distributed.Communicator.abort_on_error`."""

    @functools.wraps(fn)
    def wrapper(*args, comm=None, **kw):
        if comm is None:
            return fn(*args, comm=None, **kw)
        with comm.abort_on_error():
            return fn(*args, comm=comm, **kw)

    return wrapper


def _encode_splits(vocab: Vocabulary, files: dict, log) -> dict:
    enc = {}
    for split, path in files.items():
        if path is None or split not in ("train", "valid", "test"):
            continue
        e = vocab.encode_file(path)
        enc[split] = e
        if split != "train" and e.n_oov:
            log(f"{split}: {e.n_tokens:,} tokens, OOV rate {e.oov_rate * 100:.2f}% (mapped to <unk>)")
    return enc


def _finish(trainer: Trainer, test, corpus_info, log, t_start) -> dict:
    """Final exact evaluation of the best model on test; the run's summary."""
    st = trainer.state
    summary = {"out": str(trainer.out), "best": str(trainer.best_path),
               "epochs_done": st.epoch - 1, "finished": st.finished,
               "best_valid_ppl": st.best_valid_ppl, "train_tokens_seen": st.tokens_seen,
               "train_seconds": st.train_seconds, "wall_seconds": time.perf_counter() - t_start,
               "parameters": trainer.model.num_parameters}
    if trainer.comm is not None:
        summary["ranks"] = trainer.comm.size
    if not st.finished or not trainer.is_root:  # the test evaluation is rank 0's
        return summary
    model = trainer.model
    # the best model: the parameters now if the last epoch was the best, else
    # read from its file into the model (no second model in memory) and the
    # final parameters read back from the checkpoint afterwards
    last_best = bool(st.history) and bool(st.history[-1].get("best"))
    swap = test is not None and trainer.best_path.exists() and not last_best
    if swap:
        sio.load_params_into(trainer.best_path, model.store.params)
    try:
        if test is not None:
            t0 = time.perf_counter()
            res = evaluate_ids(model, test.ids, trainer.vocab.eos_id, batch_size=1)
    finally:
        if swap:
            sio.load_params_into(trainer.out, model.store.params)
    if test is not None:
        summary.update(test_ppl=res.perplexity, test_tokens=res.tokens, test_oov_rate=test.oov_rate,
                       test_seconds=time.perf_counter() - t0)
        line = f"test perplexity {res.perplexity:.2f} ({res.tokens:,} tokens, exact)"
        if corpus_info:
            oracle = corpus_info["oracle_perplexity"]["test"]
            uni = corpus_info["unigram_perplexity"]["test"]
            summary.update(oracle_test_ppl=oracle, unigram_test_ppl=uni,
                           ratio_to_oracle=res.perplexity / oracle)
            line += (f"   oracle {oracle:.2f} (x{res.perplexity / oracle:.3f})   "
                     f"unigram {uni:.2f}")
        log(line)
    log(f"best valid perplexity {st.best_valid_ppl:.2f}; model: {trainer.best_path}; "
        f"wall time {fmt_duration(summary['wall_seconds'])}")
    trainer._metrics({"event": "final", **summary})
    return summary


def _check_outputs(out, what: str = "--out") -> None:
    """The checkpoint, best model and metrics paths of a run (:func:`check_output`)."""
    out = Path(out)
    check_output(out, what=what)
    for p in (out.with_name(out.stem + ".best" + out.suffix), out.with_name(out.stem + ".metrics.jsonl")):
        if p.is_dir():
            check_output(p, what=f"beside {out}")


def _memory_check(mc: ModelConfig, tc: TrainConfig, *, device, comm, force, log,
                  valid_tokens=None) -> None:
    """The run's memory estimate in the log; :class:`slimnp.memory.NotEnoughMemory`
    when it does not fit (rank 0 decides for a distributed run)."""
    if comm is not None and not comm.is_root:
        return
    memory.check(mc, device=device, force=force, log=log, valid_tokens=valid_tokens,
                 local_ranks=1 if comm is None else comm.local_size,
                 optimizer=tc.optimizer, loss=tc.loss, samples=tc.samples, bptt=tc.bptt,
                 batch_size=tc.batch_size, eval_batch_size=tc.eval_batch_size,
                 ranks=1 if comm is None else comm.size)


@_stop_all_ranks_on_error
def run_training(files: dict, out, model, train: TrainConfig, *, min_count=1, max_vocab=None,
                 corpus_info=None, device="cpu", log=print, progress=True, comm=None, init_from=None,
                 checkpoint_every: float = CHECKPOINT_EVERY, force_memory: bool = False) -> dict:
    """Build the vocabulary, the model and a :class:`Trainer`, and train.

    ``files`` maps 'train', 'valid' and optionally 'test' to text files (and
    optionally 'vocab' to a vocabulary file).  ``model``: the
    :class:`~slimnp.model.ModelConfig` to train (a ``vocab_size`` of 0 is
    filled in from the vocabulary built here; another value must equal its
    size), or a function of the vocabulary size returning one
    (:func:`slimnp.options.configs` makes both configs from CLI-style
    options); ``train``: the :class:`TrainConfig`.  ``comm``: a
    :class:`slimnp.distributed.Communicator` to train data-parallel (every
    rank calls this with the same arguments; rank 0 logs and writes the files).
    ``init_from``: a model file to start from (its config, vocabulary,
    parameters and tables; fresh optimizer and training state), e.g. one
    made by ``slimnp compress``; ``model`` must then be None, and
    ``min_count``, ``max_vocab`` and ``corpus_info`` are not used (the
    vocabulary is the file's; the run records ``init_from`` and its sha256).
    ``checkpoint_every``: minutes between checkpoints inside an epoch (0:
    epoch ends only).  Before the model is built, ``out``'s folder is checked
    (:func:`check_output`) and the memory the run needs is estimated and
    logged (:mod:`slimnp.memory`); a run that would not fit stops with
    :class:`slimnp.memory.NotEnoughMemory` unless ``force_memory``.
    Returns a summary dict (perplexities, times).
    """
    t_start = time.perf_counter()
    if not isinstance(train, TrainConfig):
        raise TypeError(f"train must be a TrainConfig, got {type(train).__name__}")
    if (init_from is None) == (model is None):
        raise TypeError("give exactly one of model (a ModelConfig) and init_from (a model file)")
    train.validate()
    if comm is not None and not comm.is_root:
        log, progress = _quiet, False
    if comm is None or comm.is_root:
        _check_outputs(out)
    if init_from is None:
        if files.get("vocab"):
            vocab = Vocabulary.read(files["vocab"])  # counted below, from the encoded text
        else:
            vocab = Vocabulary.build(files["train"], min_count=min_count, max_vocab=max_vocab)
        mc = _sized(model, len(vocab))
        mc.validate()  # before the slower encoding: a bad option fails fast
        enc = _encode_splits(vocab, files, log)
        if vocab.counts is None:
            vocab.count(enc["train"].ids)
        origin = dict(min_count=min_count, max_vocab=max_vocab, corpus=corpus_info)
        _memory_check(mc, train, device=device, comm=comm, force=force_memory, log=log,
                      valid_tokens=enc["valid"].n_tokens)
        model = LanguageModel(mc, device=device)
    else:  # the file's model and vocabulary (checked for memory before it is read)
        mc = ModelConfig.from_dict(expected_model(sio.read_config(init_from), init_from))
        _memory_check(mc, train, device=device, comm=comm, force=force_memory, log=log)
        model, vocab, _ = load_model(init_from, device)
        enc = _encode_splits(vocab, files, log)
        corpus_info = None  # not recorded for a run from a file (see the docstring)
        origin = dict(min_count=1, max_vocab=None, corpus=None, init_from=str(Path(init_from).resolve()),
                      init_from_sha256=file_sha256(init_from))
    data_info = {k: str(Path(v).resolve()) for k, v in files.items() if v is not None}
    data_info.update(train_sha256=file_sha256(files["train"]), **origin)
    trainer = Trainer(model, vocab, enc["train"].ids, enc["valid"].ids, train, out,
                      data_info=data_info, log=log, progress=progress, comm=comm,
                      checkpoint_every=checkpoint_every)
    if trainer.is_root and trainer.metrics_path.exists():
        trainer.metrics_path.unlink()  # a fresh run starts a fresh log
    if init_from is None:
        trainer.init_params()
    mc = model.config
    log(("" if init_from is None else f"starting from {init_from}: ")
        + f"vocab {len(vocab):,}  train {enc['train'].n_tokens:,} tokens  model {mc.layers}x{mc.hidden} "
        f"({model.num_parameters:,} parameters)  {trainer.segments_per_epoch:,} segments/epoch")
    trainer.train()
    return _finish(trainer, enc.get("test"), corpus_info, log, t_start)


def _sized(model, V: int) -> ModelConfig:
    """The :class:`ModelConfig` of :func:`run_training`'s ``model`` for a vocabulary of V words."""
    mc = model(V) if callable(model) else model
    if not isinstance(mc, ModelConfig):
        raise TypeError(f"model must be a ModelConfig (or a function of V returning one), "
                        f"got {type(mc).__name__}")
    if mc.vocab_size == 0:
        return dataclasses.replace(mc, vocab_size=V)
    if mc.vocab_size != V:
        raise ValueError(f"the model's vocab_size is {mc.vocab_size} but the vocabulary has {V} words "
                         "(vocab_size 0 takes the vocabulary's size)")
    return mc


@_stop_all_ranks_on_error
def resume_training(path, epochs=None, *, device="cpu", log=print, progress=True, comm=None,
                    allow_finished=False, checkpoint_every: float = CHECKPOINT_EVERY,
                    force_memory: bool = False) -> dict:
    """Continue the run stored in checkpoint ``path`` exactly where it stopped.

    A run that already finished its epochs is an error, unless
    ``allow_finished``: then only the final test evaluation runs again (the
    experiment runner's way to complete a run stopped during that evaluation).

    ``comm``: as in :func:`run_training`; every rank reads ``path`` and takes
    its streams' part of the carried state (the run must use as many ranks
    as the one that wrote the file, or any number dividing the batch).
    ``checkpoint_every``, ``force_memory``: as in :func:`run_training`; the
    folder and memory checks run before the checkpoint is read.
    """
    t_start = time.perf_counter()
    if comm is not None and not comm.is_root:
        log, progress = _quiet, False
    if comm is None or comm.is_root:
        _check_outputs(path, what="--resume")
    head = sio.read_config(path)
    if isinstance(head.get("train"), dict):
        tc0 = TrainConfig.from_dict(head["train"])
        _memory_check(ModelConfig.from_dict(expected_model(head, path)), tc0, device=device,
                      comm=comm, force=force_memory, log=log)
    ck = sio.load(path, expected_shapes=expected_shapes)
    cfg = ck.config
    if "train" not in cfg or "data" not in cfg or "train_sha256" not in cfg["data"]:
        raise TrainingError(f"{path} holds a model but no resumable training run")
    tc = TrainConfig.from_dict(cfg["train"])
    if epochs is not None:
        tc = dataclasses.replace(tc, epochs=epochs)
    st = ck.train_state
    if st.get("finished") and tc.epochs <= int(st["epoch"]) - 1 and not allow_finished:
        raise TrainingError(f"{path}: the run already finished its {int(st['epoch']) - 1} epochs; "
                            "pass a larger --epochs to train further")
    info = cfg["data"]
    files = {k: Path(info[k]) for k in ("train", "valid", "test") if info.get(k)}
    for k, p in files.items():
        if not p.is_file():
            raise TrainingError(f"cannot resume: {k} file {p} (recorded in {path}) is missing")
    if file_sha256(files["train"]) != info["train_sha256"]:
        raise TrainingError(f"cannot resume: {files['train']} changed since the checkpoint was written "
                            "(sha256 differs)")
    vocab = Vocabulary.from_words(list(ck.vocab), ck.vocab_counts)
    enc = _encode_splits(vocab, files, log)
    model = model_from_checkpoint(ck, path, device)
    trainer = Trainer(model, vocab, enc["train"].ids, enc["valid"].ids, tc, path,
                      data_info=info, log=log, progress=progress, comm=comm,
                      checkpoint_every=checkpoint_every)
    trainer.restore(ck, release=True)
    del ck, st  # the model and optimizer hold copies now: free the file's arrays (Adagrad: GBs)
    trainer.state.finished = trainer.state.epoch > tc.epochs
    log(f"resuming {path}: epoch {trainer.state.epoch}, segment {trainer.state.segment}"
        f"/{trainer.segments_per_epoch}, lr {trainer.state.lr:g}")
    trainer.train()
    return _finish(trainer, enc.get("test"), info.get("corpus"), log, t_start)
