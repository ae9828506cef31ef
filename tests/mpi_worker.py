"""What each rank runs in tests/test_distributed.py (under ``mpiexec -n 2``).

    python mpi_worker.py train RUNS.json     the runs listed, each data-parallel
    python mpi_worker.py crash OUTDIR        rank 1 raises in its third step

``train``: RUNS.json holds ``{"files": {...}, "runs": [{"name", "hp", "out",
"resume_epochs"?, "interrupt_at"?, "max_count"?}]}``; every rank trains each
run with ``run_training(..., comm=...)``, then ``resume_training`` when
``resume_epochs`` is given, or, with ``interrupt_at`` k, rank 1 alone gets a
SIGINT in step k (both ranks must stop after that same step), the checkpoint
is copied to ``<out stem>.interrupted.h5`` and the run resumed.  Each rank
writes ``<out stem>.rank<r>.json`` with the checksums of the parameters,
optimizer and RNG state it ends with.
"""
import json
import shutil
import signal
import sys
from pathlib import Path

from slimnp import distributed
from slimnp.distributed import digest
from slimnp.trainer import Trainer, resume_training, run_training


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
        summary = run_training(spec["files"], out, run["hp"], log=lambda m: None, progress=False,
                               comm=comm)
        distributed.Communicator.step = step
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
    run_training(files, Path(outdir) / "crash.h5", dict(TINY_HP), log=lambda m: None,
                 progress=False, comm=comm)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers
    {"train": train, "crash": crash}[sys.argv[1]](sys.argv[2])
