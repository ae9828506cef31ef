"""Data-parallel training over MPI (slimnp.distributed).

The MPI tests launch ``mpiexec -n 2 python tests/mpi_worker.py ...`` (one
launch runs every data-parallel training) and compare what the ranks wrote
with single-process runs made here.  They skip without mpi4py or mpiexec.

Tolerance: two ranks with B/2 streams each sum the gradient in another order
than one process with B (two GEMMs and an allreduce instead of one GEMM), so
the runs agree to rounding, not bit for bit.  They train in float64, where
two epochs of SGD or Adagrad leave the parameters within rtol 1e-9, atol
1e-12 (measured: at most 8e-16 apart); a wrong shard, loss scale, row set or
RNG stream moves them by far more, or makes the ranks disagree.  A run and its resume with the same ranks are bit-exact.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slimnp import distributed as dist
from slimnp import io as sio
from slimnp.model import ModelConfig, param_shapes
from slimnp.trainer import resume_training, run_training
from slimnp.options import configs

from helpers import TINY_HP, tiny_corpus

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mpi_worker.py"


# ----------------------------------------------------------------------------
# No MPI needed: collective selection, sharding, volume, the missing extra
# ----------------------------------------------------------------------------
def test_choose_collective():
    assert dist.choose_collective("cpu", True, False) == "mpi"
    assert dist.choose_collective("cpu", True, True) == "mpi"  # NCCL is for device buffers
    assert dist.choose_collective("gpu", True, True) == "nccl"
    assert dist.choose_collective("gpu", True, False) == "mpi"  # staged through the host
    for device in ("cpu", "gpu"):
        for nccl in (False, True):
            with pytest.raises(dist.DistributedError, match=r"pip install 'slimnp\[mpi\]'"):
                dist.choose_collective(device, False, nccl)  # MPI starts the ranks: required
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        dist.choose_collective("tpu", True, True)


def test_launched_by_mpi_reads_the_launchers_variables():
    assert dist.launched_by_mpi({}) is None
    assert dist.launched_by_mpi({"PMI_RANK": "1", "PMI_SIZE": "4"}) == (1, 4)
    assert dist.launched_by_mpi({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}) == (0, 2)
    assert dist.launched_by_mpi({"PMI_RANK": "0", "PMI_SIZE": "1"}) is None  # a lone process


def test_shard_range():
    assert [dist.shard_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match="batch-size 10 must be divisible by the number of ranks 4"):
        dist.shard_range(10, 0, 4)
    # uneven (validation pieces): sizes differ by at most one, shares may be empty
    assert [dist.shard_range(5, r, 3, even=False) for r in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [dist.shard_range(1, r, 3, even=False) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize("pieces, ranks", [(4, 2), (5, 3), (2, 3), (1, 2)])
def test_sharded_evaluation_adds_up_to_evaluate_ids(pieces, ranks):
    from slimnp import LanguageModel, ModelConfig, make_rng
    from slimnp.evaluate import evaluate_ids

    model = LanguageModel(ModelConfig(vocab_size=30, hidden=8, layers=2, dtype="float64"))
    model.init_params(make_rng(3))
    ids = np.random.default_rng(0).integers(0, 30, 203).astype(np.int32)  # 203: a tail
    want = evaluate_ids(model, ids, 0, batch_size=pieces, bptt=9).nll
    got = sum(dist.evaluate_shard(model, ids, 0, pieces, 9, r, ranks) for r in range(ranks))
    assert got == pytest.approx(want, rel=1e-12)


def test_allreduce_bytes_from_param_shapes():
    dense = param_shapes(ModelConfig(vocab_size=10000, hidden=200, layers=2))
    n = 10000 * 200 + 2 * (200 * 800 * 2 + 800) + 10000 * 200 + 10000
    assert dist.allreduce_bytes(dense) == 4 * n
    assert dist.allreduce_bytes(dense, "float64") == 8 * n
    assert dist.ring_bytes_sent(1000, 1) == 0 and dist.ring_bytes_sent(1000, 2) == 1000
    assert dist.ring_bytes_sent(1000, 4) == 1500
    assert dist.traffic_line(8_000_000, 2).startswith("distributed: 2 ranks, allreduce 8.0 MB/step")


def test_distributed_without_mpi4py_says_what_to_install(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from slimnp.cli import main

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py -> ImportError
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    res = CliRunner().invoke(main, ["train", "--distributed", "--out", str(tmp_path / "m.h5")])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'slimnp[mpi]'" in lines[0], res.output
    assert not (tmp_path / "m.h5").exists()


# ----------------------------------------------------------------------------
# Under mpiexec -n 2
# ----------------------------------------------------------------------------
def _mpiexec():
    pytest.importorskip("mpi4py")
    # the mpich wheel installs mpiexec beside the interpreter: prefer that one
    for cand in (Path(sys.executable).parent / "mpiexec", shutil.which("mpiexec")):
        if cand and os.access(cand, os.X_OK):
            return str(cand)
    pytest.skip("mpiexec not found (pip install 'slimnp[mpi]')")


def _launch(args, timeout=120, n=2, cwd=None):
    """``mpiexec -n 2 python ARGS`` with one thread per rank; (rc, stdout, stderr, seconds)."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [_mpiexec(), "-n", str(n), sys.executable, *map(str, args)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=cwd, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # mpiexec and the ranks it started
        out, err = p.communicate()
        pytest.fail(f"mpiexec ran over {timeout} s (hung?)\n{out}\n{err}")
    return p.returncode, out, err, time.perf_counter() - t0


SLIM = dict(input="slim", input_k=4, input_m=48, output="slim", output_k=4, output_m=4 * 20)
RUNS = {  # name: settings over TINY_HP (batch 4: 2 streams per rank), float64
    "dense_sgd": dict(dtype="float64"),  # dropout 0.1: masks must match too
    "slim_sgd": dict(dtype="float64", dropout=0.0, **SLIM),
    "dense_adagrad_is": dict(dtype="float64", optimizer="adagrad", lr=0.2, loss="is", samples=15),
    "slim_tied_adagrad_is": dict(dtype="float64", optimizer="adagrad", lr=0.2, loss="is",
                                 samples=15, input="slim", output="slim", output_k=4,
                                 output_m=4 * 20, tie=True),
}
# resume: Adagrad, sampled loss and dropout (optimizer state and RNG carried over)
RESUME = dict(dtype="float64", epochs=2, optimizer="adagrad", lr=0.2, loss="is", samples=15, **SLIM)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every data-parallel run in one mpiexec launch; the directory they wrote."""
    _mpiexec()
    d = tmp_path_factory.mktemp("dist")
    files, _ = tiny_corpus(d / "corpus", tokens=4000)
    files = {k: str(v) for k, v in files.items()}
    plan = [dict(name=k, hp={**TINY_HP, **v}, out=str(d / f"{k}.h5")) for k, v in RUNS.items()]
    plan[1]["max_count"] = 1000  # slim_sgd: the allreduce in chunks of 1000 elements
    plan += [dict(name="resume_full", hp={**TINY_HP, **RESUME}, out=str(d / "resume_full.h5")),
             # 1 epoch, then resumed to 2
             dict(name="resume_epoch", hp={**TINY_HP, **RESUME, "epochs": 1},
                  out=str(d / "resume_epoch.h5"), resume_epochs=2),
             # SIGINT to rank 1 in step 9 of epoch 1: a checkpoint with a carried state
             dict(name="resume_signal", hp={**TINY_HP, **RESUME}, out=str(d / "resume_signal.h5"),
                  interrupt_at=9),
             # a timed checkpoint every 6 steps by rank 0's clock (rank 1's stands still)
             dict(name="resume_timer", hp={**TINY_HP, **RESUME}, out=str(d / "resume_timer.h5"),
                  timer_steps=6)]
    (d / "runs.json").write_text(json.dumps({"files": files, "runs": plan}))
    rc, out, err, _ = _launch([WORKER, "train", d / "runs.json"])
    assert rc == 0, out + err
    return d, files


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_equal_one_process(runs, name, tmp_path):
    d, files = runs
    run_training(files, tmp_path / "one.h5", *configs({**TINY_HP, **RUNS[name]}), log=lambda m: None,
                 progress=False)
    one, two = sio.load(tmp_path / "one.h5"), sio.load(d / f"{name}.h5")
    assert two.train_state["finished"] and two.train_state["epoch"] == 3
    for k in one.params:
        np.testing.assert_allclose(two.params[k], one.params[k], rtol=1e-9, atol=1e-12, err_msg=k)
    if "accumulator" in one.optimizer:
        np.testing.assert_allclose(two.optimizer["accumulator"], one.optimizer["accumulator"],
                                   rtol=1e-9)
    # the carried state gathered from both ranks, the RNG in step, sharded validation
    np.testing.assert_allclose(two.train_state["hidden"], one.train_state["hidden"], rtol=1e-9,
                               atol=1e-12)
    assert two.train_state["rng"] == one.train_state["rng"]
    h1, h2 = (json.loads(c.train_state["history"]) for c in (one, two))
    for a, b in zip(h1, h2):
        for key in ("valid_ppl", "train_loss", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-9), key
    # rank 0 alone wrote the metrics: one record per epoch, not one per rank
    recs = [json.loads(l) for l in (d / f"{name}.metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in recs] == ["epoch", "epoch", "final"]
    assert recs[-1]["ranks"] == 2


def test_rank_0s_clock_times_the_checkpoints_of_both_ranks(runs):
    """Rank 0's clock says a checkpoint is due every 6 steps, rank 1's never:
    both write it after the same step (the gather of the carried state would
    hang or fail otherwise), the run ends as an uninterrupted one, and the
    first timed checkpoint, resumed by 2 ranks, too (bit-exact)."""
    d, _ = runs
    recs = [json.loads(l) for l in (d / "resume_timer.metrics.jsonl").read_text().splitlines()]
    timed = [(r["epoch"], r["segment"]) for r in recs if r["event"] == "checkpoint"]
    nseg = sio.load(d / "resume_timer.timed.h5").train_state  # the first one
    assert (nseg["epoch"], nseg["segment"], nseg["finished"]) == (1, 6, False)
    assert nseg["hidden"].shape == (2, 2, 4, 16) and np.all(nseg["hidden"] != 0)
    assert timed[:3] == [(1, 6), (1, 12), (1, 18)] and len({e for e, _ in timed}) == 2, timed
    full = sio.load(d / "resume_full.h5")
    for name in ("resume_timer", "resume_timer.timed-resumed"):
        got = sio.load(d / f"{name}.h5")
        assert got.train_state["finished"]
        for k in full.params:
            np.testing.assert_array_equal(got.params[k], full.params[k], err_msg=f"{name} {k}")
        np.testing.assert_array_equal(got.optimizer["accumulator"], full.optimizer["accumulator"])


@pytest.mark.parametrize("name", ["resume_epoch", "resume_signal"])
def test_resume_with_two_ranks_is_bit_exact(runs, name):
    d, _ = runs
    full, part = sio.load(d / "resume_full.h5"), sio.load(d / f"{name}.h5")
    assert part.train_state["epoch"] == full.train_state["epoch"] == 3
    for k in full.params:
        np.testing.assert_array_equal(part.params[k], full.params[k], err_msg=k)
    np.testing.assert_array_equal(part.optimizer["accumulator"], full.optimizer["accumulator"])


def test_a_signal_to_one_rank_stops_both_after_the_same_step(runs):
    d, _ = runs
    st = sio.load(d / "resume_signal.interrupted.h5").train_state
    # rank 1 got SIGINT inside step 9's exchange, after it had sent "go on": both
    # ranks learn of it in step 10's and stop after that step
    assert (st["epoch"], st["segment"], st["finished"]) == (1, 10, False)
    assert st["hidden"].shape == (2, 2, 4, 16) and np.all(st["hidden"] != 0)  # both ranks' streams
    events = [json.loads(l)["event"] for l in (d / "resume_signal.metrics.jsonl").read_text().splitlines()]
    assert events == ["interrupted", "epoch", "epoch", "final"]


def test_a_two_rank_checkpoint_resumes_in_one_process(runs, tmp_path):
    """The file holds the whole (L, 2, B, H) state: any number of ranks dividing B can go on."""
    d, files = runs
    run_training(files, tmp_path / "one.h5", *configs({**TINY_HP, **RESUME}), log=lambda m: None,
                 progress=False)
    shutil.copy(d / "resume_signal.interrupted.h5", tmp_path / "two.h5")
    resume_training(tmp_path / "two.h5", log=lambda m: None, progress=False)
    one, two = sio.load(tmp_path / "one.h5"), sio.load(tmp_path / "two.h5")
    for k in one.params:
        np.testing.assert_allclose(two.params[k], one.params[k], rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("name", list(RUNS) + ["resume_full", "resume_epoch", "resume_signal",
                                                "resume_timer"])
def test_all_ranks_end_with_identical_parameters(runs, name):
    d, _ = runs
    r0, r1 = (json.loads((d / f"{name}.rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["size"]) == (0, 1, 2)
    for key in ("params", "optimizer", "rng"):
        assert r0[key] == r1[key], key
    # and they are the parameters rank 0 saved (the flat buffer: the model's order)
    ck = sio.load(d / f"{name}.h5")
    order = param_shapes(ModelConfig.from_dict(ck.config["model"]))
    assert r0["params"] == dist.digest(np.concatenate([ck.params[k].ravel() for k in order]))


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path):
    rc, out, err, seconds = _launch([WORKER, "crash", tmp_path], timeout=90)
    assert rc != 0
    assert "rank 1 of 2 failed: injected failure for the test; stopping all ranks" in out + err
    assert seconds < 60  # rank 0 waited in a collective: without the abort it would hang
    assert not (tmp_path / "crash.h5").exists()


def test_cli_distributed_run_logs_and_writes_once(tmp_path):
    files, _ = tiny_corpus(tmp_path / "c", tokens=3000)
    rc, out, err, _ = _launch(["-m", "slimnp", "train", "--distributed", "--train", files["train"],
                               "--valid", files["valid"], "--out", tmp_path / "m.h5", "-q", "--json",
                               "--epochs", "1", "--layers", "1", "--hidden", "16",
                               "--batch-size", "4", "--bptt", "7"])
    assert rc == 0, out + err
    assert err.count("distributed: 2 ranks, allreduce") == 1, err
    summary = [json.loads(l) for l in out.splitlines()]
    assert len(summary) == 1 and summary[0]["ranks"] == 2 and summary[0]["finished"]
    recs = (tmp_path / "m.metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["event"] for l in recs] == ["epoch", "final"]
    # batch 5 does not split over 2 ranks: one clear line, non-zero exit, no hang
    rc, out, err, _ = _launch(["-m", "slimnp", "train", "--distributed", "--train", files["train"],
                               "--valid", files["valid"], "--out", tmp_path / "b.h5", "-q",
                               "--batch-size", "5"])
    assert rc != 0 and "must be divisible by the number of ranks 2" in out + err


def test_nccl_backend_plumbing(monkeypatch):
    """Where a GPU run picks NCCL: the clique id made by rank 0 is broadcast
    over MPI, and a device buffer is summed by one NCCL allReduce on its own
    memory (a stand-in NCCL module and buffer; the real one needs GPUs)."""
    pytest.importorskip("mpi4py")
    from mpi4py import MPI

    calls = []

    class FakeNccl:
        NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = "f32", "f64", "sum"

        @staticmethod
        def get_unique_id():
            return b"uid"

        class NcclCommunicator:
            def __init__(self, size, uid, rank):
                calls.append(("init", size, uid, rank))

            def allReduce(self, send, recv, count, dtype, op, stream):
                calls.append(("allReduce", send, recv, count, dtype, op, stream))

    class DeviceBuf:  # what allreduce_ reads of a CuPy array
        dtype, size = np.dtype(np.float32), 12

        class data:
            ptr = 4096

    from slimnp import backend

    monkeypatch.setattr(backend, "current_stream_ptr", lambda buf: 7)
    c = dist.Communicator(MPI.COMM_SELF, "nccl", nccl=FakeNccl)
    assert calls == [("init", 1, b"uid", 0)]
    c.allreduce_(DeviceBuf())
    assert calls[-1] == ("allReduce", 4096, 4096, 12, "f32", "sum", 7)
    host = np.arange(4.0)
    c.allreduce_(host)  # host buffers still go through MPI
    np.testing.assert_array_equal(host, np.arange(4.0))
    with pytest.raises(dist.DistributedError):
        dist.Communicator(MPI.COMM_SELF, "gloo")
