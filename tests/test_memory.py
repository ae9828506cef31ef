"""slimnp.memory: the estimate of a run's memory (its parts, against measured
peaks) and the check that refuses a run that does not fit, with both numbers
and settings that would fit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slimnp import memory
from slimnp.model import ModelConfig, param_shapes

from helpers import TINY_TRAIN, run_cli, tiny_corpus


# ---------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------
def test_estimate_counts_projections_and_slim_pools():
    V, H = 5000, 64
    dense = ModelConfig(vocab_size=V, hidden=H, layers=2)
    pm = ModelConfig(vocab_size=V, hidden=H, layers=2, embedding_size=16)
    slim = ModelConfig(vocab_size=V, hidden=H, layers=2, input="slim", input_k=8, input_m=1000,
                       output="slim", output_k=8, output_m=8 * 250)
    for mc in (dense, pm, slim):
        P = sum(int(np.prod(s)) for s in param_shapes(mc).values())
        for opt, copies in (("sgd", 2), ("adagrad", 3)):
            p = memory.parts(mc, optimizer=opt)
            assert p["parameters"] == 4 * P and p["parameters"] + p["gradients"] + p["optimizer"] == copies * 4 * P
    assert "proj_in/W" in param_shapes(pm)
    assert memory.parts(pm)["parameters"] < memory.parts(dense)["parameters"]
    assert memory.parts(slim)["parameters"] < memory.parts(pm)["parameters"]
    assert memory.parts(slim)["tables"] > 0 == memory.parts(dense)["tables"]
    # float64 doubles everything, two ranks halve the per-rank activations
    f64 = ModelConfig(vocab_size=V, hidden=H, layers=2, dtype="float64")
    assert memory.parts(f64)["parameters"] == 2 * memory.parts(dense)["parameters"]
    assert memory.parts(dense, ranks=2)["activations"] * 2 == memory.parts(dense)["activations"]
    # HashNet's shape (K = H): its output layer rebuilds the V x H matrix
    # (the dense strategy) instead of K x M/K x rows partial products
    hashnet = ModelConfig(vocab_size=V, hidden=H, layers=2, output="slim", output_k=H, output_m=H * 625)
    assert memory._output_buffers(hashnet, 100, 4) == 4 * (V * H + 100 * V + 100 * H) + 4 * V * H
    dp = ModelConfig(vocab_size=V, hidden=H, layers=2, output="slim", output_k=4, output_m=4 * 250)
    assert memory._output_buffers(dp, 100, 4) == 4 * (V * 100 + 4 * 250 * 100 + V + 100 * H)


def test_estimate_grows_with_the_vocabulary_and_the_batch():
    """More words: more parameters (embedding, softmax) and wider logits; more
    streams: more activations and logits, the parameters unchanged."""
    def parts(V, B):
        return memory.estimate(ModelConfig(vocab_size=V, hidden=64, layers=2), in_use=0, batch_size=B).host

    for B in (1, 20):
        totals = [sum(parts(V, B).values()) for V in (1_000, 10_000, 100_000)]
        assert totals == sorted(set(totals)), totals
    for V in (1_000, 100_000):
        by_batch = [parts(V, B) for B in (1, 8, 64)]
        assert [sum(p.values()) for p in by_batch] == sorted({sum(p.values()) for p in by_batch})
        assert by_batch[0]["activations"] < by_batch[1]["activations"] < by_batch[2]["activations"]
        assert len({p["parameters"] for p in by_batch}) == 1
    # the softmax's V x H matrix and the embedding's dominate at V = 100K
    assert parts(100_000, 20)["parameters"] > 2 * 4 * 100_000 * 64


MEASURE = r"""
import json, resource, sys
from slimnp import memory
from slimnp.trainer import run_training
from slimnp.options import configs
seen = []
check = memory.check
memory.check = lambda *a, **kw: seen.append(check(*a, **kw)) or seen[-1]
files, out, hp, warm = json.loads(sys.argv[1])
# compile every kernel first (a tiny run of the same kind), then reset the
# peak-RSS counter: Numba's compile-time memory is not the run's
run_training(warm[0], warm[1], *configs(hp), log=lambda m: None, progress=False, checkpoint_every=0)
seen.clear()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (Linux >= 4.0)
    reset = True
except OSError:
    reset = False
run_training(files, out, *configs(hp), log=lambda m: None, progress=False, checkpoint_every=0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if reset:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
print(json.dumps({"estimate": seen[0].host_total, "peak": peak}))
"""


def _big_vocab_corpus(d: Path, V: int, tokens: int) -> dict:
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(V)])
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    for split, n in (("train", tokens), ("valid", tokens // 4), ("test", tokens // 4)):
        toks = words[rng.integers(0, V, n)]
        (d / f"{split}.txt").write_text("\n".join(" ".join(toks[i:i + 20]) for i in range(0, n, 20)) + "\n")
    return {s: str(d / f"{s}.txt") for s in ("train", "valid", "test", "vocab")}


@pytest.mark.slow
@pytest.mark.parametrize("V, H, optimizer", [(40_000, 256, "adagrad"), (80_000, 256, "sgd")])
def test_memory_estimate_matches_the_measured_peak(tmp_path, V, H, optimizer):
    """Peak RSS of a whole run (training, validation, checkpoints, the final
    test) in a fresh process, against the estimate printed at its start."""
    files = _big_vocab_corpus(tmp_path / "c", V, 200)
    hp = dict(layers=1, hidden=H, dropout=0.0, init_scale=0.1, epochs=1, bptt=5, batch_size=4, lr=0.1,
              schedule="epoch", lr_decay=0.5, decay_start=1, decay_threshold=1.0, clip=5.0,
              optimizer=optimizer)
    # a clean environment: what earlier tests of the session left in os.environ
    # (kernel modes, thread layers) must not change what this process measures
    env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "LANG", "PYTHONPATH") if k in os.environ}
    env.update(NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    small = _big_vocab_corpus(tmp_path / "small", 300, 200)
    r = subprocess.run([sys.executable, "-c", MEASURE,
                        json.dumps([files, str(tmp_path / "m.h5"), hp, [small, str(tmp_path / "w.h5")]])],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = got["estimate"] / got["peak"]
    assert 0.75 <= ratio <= 1.25, got
    assert got["peak"] > 400e6  # the model, not the interpreter, dominates what is compared


# ---------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------
def _fake_host(monkeypatch, free):
    monkeypatch.setattr(memory, "host_available",
                        lambda: memory.Available(int(free), "MemAvailable in /proc/meminfo", 0))


def test_too_big_a_run_stops_with_both_numbers_and_what_would_fit(monkeypatch):
    mc = ModelConfig(vocab_size=793_471, hidden=650, layers=2)
    settings = dict(optimizer="adagrad", bptt=35, batch_size=20)
    need = memory.estimate(mc, in_use=0, **settings).host_total
    _fake_host(monkeypatch, 0.6 * need)
    monkeypatch.setattr(memory, "current_rss", lambda: 0)
    with pytest.raises(memory.NotEnoughMemory) as err:
        memory.check(mc, **settings)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("not enough memory: the run needs about ")
    assert "are available (MemAvailable in /proc/meminfo); would fit: " in msg
    assert msg.endswith("; pass --force-memory to try anyway")
    assert "--input slim --input-k 10" in msg  # K must divide 650
    # what it suggests does fit
    for tip in msg.split("would fit: ")[1].split("; pass")[0].split(", or "):
        assert "about" in tip
    memory.check(mc, force=True, **settings)  # --force-memory


def _number(text: str) -> float:
    """``"41.85 GB"`` -> 41.85e9 (human_bytes' units)."""
    value, unit = text.split()
    return float(value) * {"GB": 1e9, "MB": 1e6, "kB": 1e3, "bytes": 1}[unit]


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_refusal_says_what_the_run_needs_in_all_as_the_log_line_does(monkeypatch, ranks):
    """The process already holds 230 MB: the refusal quotes the run's whole
    peak and what is free plus what is held -- the log line's two numbers,
    times the ranks on the node -- not the difference ("needs 41.62 GB more
    memory" beside a log line of 41.85 GB read as a shortfall)."""
    from slimnp.errors import human_bytes

    mc = ModelConfig(vocab_size=793_471, hidden=650, layers=2)
    held = 230 * 10**6
    monkeypatch.setattr(memory, "current_rss", lambda: held)
    total = memory.estimate(mc, optimizer="adagrad").host_total  # this process's 230 MB included
    free = int(0.6 * total)
    monkeypatch.setattr(memory, "host_available",
                        lambda: memory.Available(free, "MemAvailable in /proc/meminfo", held))
    lines = []
    with pytest.raises(memory.NotEnoughMemory) as err:
        memory.check(mc, optimizer="adagrad", local_ranks=ranks, log=lines.append)
    msg = str(err.value)
    assert lines[0].startswith(f"memory: about {human_bytes(total)} (")
    assert f"; {human_bytes(free + held)} available" in lines[0]
    if ranks == 1:
        want = (f"the run needs about {human_bytes(total)} in all, {human_bytes(free + held)} are "
                "available (MemAvailable in /proc/meminfo, and the 230.0 MB this process holds already)")
    else:
        want = (f"the run needs about {human_bytes(2 * total)} in all (2 ranks on this node, "
                f"{human_bytes(total)} each), {human_bytes(free + 2 * held)} are available "
                "(MemAvailable in /proc/meminfo, and the 460.0 MB the ranks hold already)")
    assert msg.startswith(f"not enough memory: {want}; would fit: "), msg
    assert "more memory" not in msg
    # its two numbers are why it refused: the need exceeds what is available
    need = msg.split("needs about ")[1].split(" in all")[0]
    have = msg.split(" are available")[0].rsplit(", ", 1)[1]
    assert _number(need) > _number(have)
    # and where what is free plus held covers the whole peak (each rank's), it runs
    monkeypatch.setattr(memory, "host_available",
                        lambda: memory.Available(ranks * (total - held), "MemAvailable", held))
    assert memory.check(mc, optimizer="adagrad", local_ranks=ranks).host_total == total


def test_gpu_runs_are_checked_against_the_devices_free_memory(monkeypatch):
    mc = ModelConfig(vocab_size=200_000, hidden=512, layers=2)
    _fake_host(monkeypatch, 1e12)
    monkeypatch.setattr(memory, "device_available",
                        lambda: memory.Available(int(1e9), "free on the GPU of 80.00 GB"))
    lines = []
    with pytest.raises(memory.NotEnoughMemory, match=r"the GPU needs about .* 1\.00 GB are free on "
                                                     r"the GPU of 80\.00 GB"):
        memory.check(mc, device="gpu", log=lines.append, optimizer="adagrad")
    assert "GPU about" in lines[0] and "free on the GPU" in lines[0]
    monkeypatch.setattr(memory, "device_available",
                        lambda: memory.Available(int(100e9), "free on the GPU of 140.00 GB"))
    memory.check(mc, device="gpu", optimizer="adagrad")


def test_cli_refuses_a_run_that_does_not_fit_unless_forced(tmp_path, monkeypatch):
    tiny_corpus(tmp_path / "corpus", tokens=4000)
    _fake_host(monkeypatch, 1e6)  # 1 MB left
    r = run_cli("train", "--data", tmp_path / "corpus", "--out", tmp_path / "m.h5", *TINY_TRAIN)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("memory: about ") and lines[-1].startswith("Error: not enough memory: ")
    assert "1.0 MB are available" in lines[-1] and not (tmp_path / "m.h5").exists()
    r = run_cli("train", "--data", tmp_path / "corpus", "--out", tmp_path / "m.h5", "--force-memory",
                *TINY_TRAIN)
    assert r.exit_code == 0, r.output
