"""What each rank runs in tests/test_distributed.py (under ``mpiexec -n 2``).

    python mpi_worker.py train RUNS.json     the runs listed, each data-parallel
    python mpi_worker.py crash OUTDIR        rank 1 raises in its third step

``train``: RUNS.json holds ``{"files": {...}, "runs": [{"name", "hp", "out",
"resume_epochs"?, "interrupt_at"?, "max_count"?}]}``; every rank trains each
run with ``run_training(..., comm=...)``, then ``resume_training`` when
``resume_epochs`` is given, or, with ``interrupt_at`` k, rank 1 alone gets a
SIGINT in step k (both ranks must stop after that same step), the checkpoint
is copied to ``<out stem>.interrupted.h5`` and the run resumed.  With
``timer_steps`` k, the checkpoint clock counts training steps on rank 0 (a
checkpoint falls due every k steps) and stands still on rank 1, so only rank
0's clock can decide; the first timed checkpoint is copied to ``<out
stem>.timed.h5``, and once the run is done that copy is resumed to the end
as ``<out stem>.timed-resumed.h5``.  Each rank writes ``<out
stem>.rank<r>.json`` with the checksums of the parameters, optimizer and RNG
state it ends with.
"""
import json
import shutil
import signal
import sys
from pathlib import Path

from slimnp import distributed
from slimnp import trainer as trainer_module
from slimnp.distributed import digest
from slimnp.model import LanguageModel
from slimnp.trainer import Trainer, resume_training, run_training
from slimnp.options import configs


def _capture_trainers():
    """Remember every Trainer that trains (run_training keeps its own)."""
    seen = []
    orig = Trainer.train

    def train(self):
        seen.append(self)
        return orig(self)

    Trainer.train = train
    return seen


def train(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    comm = distributed.init()
    seen = _capture_trainers()
    step = distributed.Communicator.step
    for run in spec["runs"]:
        distributed.MAX_COUNT = run.get("max_count", 1 << 30)
        out = Path(run["out"])
        calls = []

        def interrupted_step(self, *a, **kw):  # rank 1 only: as if Ctrl-C reached it alone
            calls.append(1)
            if len(calls) == run["interrupt_at"]:
                signal.raise_signal(signal.SIGINT)
            return step(self, *a, **kw)

        if run.get("interrupt_at") and comm.rank == 1:
            distributed.Communicator.step = interrupted_step
        undo = _step_clock(comm, out) if run.get("timer_steps") else (lambda: None)
        summary = run_training(spec["files"], out, *configs(run["hp"]), log=lambda m: None, progress=False,
                               comm=comm, checkpoint_every=run.get("timer_steps", 10.0))
        undo()
        distributed.Communicator.step = step
        if run.get("timer_steps"):
            timed = out.with_name(f"{out.stem}.timed-resumed.h5")
            if comm.rank == 0:
                shutil.copy(out.with_name(f"{out.stem}.timed.h5"), timed)
            comm.barrier()
            resume_training(timed, log=lambda m: None, progress=False, comm=comm,
                            checkpoint_every=0)
        if run.get("interrupt_at"):
            assert not summary["finished"]
            if comm.rank == 0:
                shutil.copy(out, out.with_name(f"{out.stem}.interrupted.h5"))
            comm.barrier()
        if run.get("resume_epochs") or run.get("interrupt_at"):
            resume_training(out, epochs=run.get("resume_epochs"), log=lambda m: None,
                            progress=False, comm=comm)
        t = seen[-1]
        acc = getattr(t.optimizer, "acc", None)
        rec = {"rank": comm.rank, "size": comm.size, "params": digest(t.model.store.data),
               "optimizer": digest(acc), "rng": digest(t.rng.bit_generator.state)}
        out.with_name(f"{out.stem}.rank{comm.rank}.json").write_text(json.dumps(rec))


def _step_clock(comm, out):
    """The checkpoint clock in training steps (one "minute" a step) on rank 0,
    frozen on rank 1; rank 0 copies its first timed checkpoint.  Returns undo."""
    steps = [0]
    fb, save_inside = LanguageModel.forward_backward, Trainer._save_inside_epoch

    def counted(self, *a, **kw):
        steps[0] += 1
        return fb(self, *a, **kw)

    def save_and_copy(self, t0):
        took = save_inside(self, t0)
        copy = out.with_name(f"{out.stem}.timed.h5")
        if comm.rank == 0 and not copy.exists():
            shutil.copy(out, copy)
        return took

    LanguageModel.forward_backward = counted
    Trainer._save_inside_epoch = save_and_copy
    trainer_module._clock = (lambda: 60.0 * steps[0]) if comm.rank == 0 else (lambda: 0.0)

    def undo():
        LanguageModel.forward_backward, Trainer._save_inside_epoch = fb, save_inside
        trainer_module._clock = __import__("time").monotonic

    return undo


def crash(outdir):
    from slimnp.model import LanguageModel

    from helpers import TINY_HP, tiny_corpus

    comm = distributed.init()
    files, _ = tiny_corpus(Path(outdir) / f"corpus{comm.rank}", tokens=3000)
    if comm.rank == 1:
        orig, calls = LanguageModel.forward_backward, []

        def forward_backward(self, *a, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure for the test")
            return orig(self, *a, **kw)

        LanguageModel.forward_backward = forward_backward
    run_training(files, Path(outdir) / "crash.h5", *configs(dict(TINY_HP)), log=lambda m: None,
                 progress=False, comm=comm)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers
    {"train": train, "crash": crash}[sys.argv[1]](sys.argv[2])
