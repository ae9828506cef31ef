#!/usr/bin/env python
"""slimnp on an NVIDIA GPU vs PyTorch (cuDNN) on the same GPU, in one bounded run.

Sections (each under its own time limit, the whole run under --budget
seconds; progress lines go to stdout as they happen, the summary table at
the end, everything also as JSON to --json-out):

* train  -- training tokens/s for configs B, C, D of BENCHMARKS.rst: slimnp
  dense and slim on the GPU (the trainer's step: zero grads, forward + BPTT,
  clip 5 + SGD) against PyTorch ``nn.Embedding -> nn.LSTM (cuDNN) ->
  nn.Linear`` with ``cross_entropy``, ``clip_grad_norm_`` and SGD;
* large  -- a One-Billion-Word-sized model: V = 793,471, 2 x 2048 LSTM,
  slim input 1/32 and output 1/8 (K = 8), importance sampling with S
  proposals, Adagrad; PyTorch's dense model with the full softmax beside it;
* table7 -- the paper's Table 7 output layer: log-probabilities of all
  793,471 words for N = 20 hidden vectors, H = 2048: slim (K GEMMs, the
  gather-sum, the column log-softmax) against the uncompressed ``h W^T + b``
  and log-softmax (CuPy and PyTorch).

    PYTHONPATH=. python bench/gpu_check.py --budget 330 --json-out $OUT/gpu_check.json

Timing: every step ends in a host read of the loss (slimnp's
``forward_backward`` returns a float, PyTorch's ``loss.item()``), so a step's
wall time includes all of its GPU work; the output-layer timings synchronise
the device explicitly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import common  # noqa: E402

T_START = time.perf_counter()


def say(*a):
    print(f"[{time.perf_counter() - T_START:6.1f}s]", *a, flush=True)


class Timeout(Exception):
    pass


_deadlines: list = []  # nested limits: the innermost deadline never outlives the outer ones


@contextlib.contextmanager
def limit(seconds: float):
    """Raise :class:`Timeout` in the main thread after ``seconds`` (SIGALRM),
    or at the enclosing limit's deadline if that comes first."""
    def handler(signum, frame):
        raise Timeout(f"over the time limit ({seconds:.0f} s)")

    now = time.monotonic()
    deadline = min([now + seconds] + _deadlines[-1:])
    _deadlines.append(deadline)
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(0.5, deadline - now))
    try:
        yield
    finally:
        _deadlines.pop()
        left = _deadlines[-1] - time.monotonic() if _deadlines else 0
        signal.setitimer(signal.ITIMER_REAL, max(0.5, left) if _deadlines else 0)
        signal.signal(signal.SIGALRM, old)


def time_left() -> float:
    """Seconds to the innermost deadline (inf without one)."""
    return _deadlines[-1] - time.monotonic() if _deadlines else math.inf


DEVICE = "gpu"  # --device cpu: a dry run of this script on a machine without a GPU (tiny sizes)


def sync():
    if DEVICE == "gpu":
        from slimnp.backend import get_xp

        get_xp("gpu").cuda.Device().synchronize()


def torch_device():
    return "cuda" if DEVICE == "gpu" else "cpu"


def time_steps(step, segs, warmup, steps):
    for i in range(warmup):
        step(*segs[i % len(segs)])
    ts = []
    for i in range(steps):
        x, y = segs[(warmup + i) % len(segs)]
        t0 = time.perf_counter()
        loss = step(x, y)
        ts.append(time.perf_counter() - t0)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss}")
    return ts


# ---------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------
def slimnp_train_step(model, B, lr=1.0, optimizer="sgd", sampled=None):
    """:meth:`slimnp.trainer.Trainer.step` on the GPU (the host segment is
    copied to the device inside the step, as in training)."""
    trainer = common.slimnp_trainer(model, B, lr=lr, optimizer=optimizer, sampled=sampled)

    def step(x, y):
        return trainer.step(x, y).nll

    return step


def torch_train_step(cfg, lr=1.0):
    import torch
    import torch.nn.functional as F

    with torch.device(torch_device()):  # built and initialised on the GPU (the large model: 13 GB)
        model = common.build_torch(cfg)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    z = torch.zeros(cfg["L"], cfg["B"], cfg["H"], device=torch_device())
    state = [(z, z.clone())]
    V, B = cfg["V"], cfg["B"]

    def step(x, y):
        xt = torch.from_numpy(x).long().to(torch_device(), non_blocking=True)
        yt = torch.from_numpy(y).long().to(torch_device(), non_blocking=True)
        opt.zero_grad(set_to_none=True)
        logits, (h, c) = model(xt, state[0])
        loss = F.cross_entropy(logits.view(-1, V), yt.view(-1), reduction="sum") / B
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        state[0] = (h.detach(), c.detach())
        return loss.item() * B

    return step, model


def slimnp_gpu_model(mc):
    from slimnp.backend import make_rng
    from slimnp.model import LanguageModel

    model = LanguageModel(mc, device=DEVICE)
    model.init_params(make_rng(0))
    return model


def free_gpu():
    import gc

    gc.collect()
    try:
        from slimnp.backend import get_xp

        if DEVICE == "gpu":
            get_xp("gpu").get_default_memory_pool().free_all_blocks()
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ---------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------
def section_train(a, rows):
    for name in a.configs.split(","):
        cfg = common.CONFIGS[name]
        segs = common.segments(cfg, a.warmup + a.steps, seed=0)
        tokens = cfg["T"] * cfg["B"]
        for engine in ("slimnp dense", "slimnp slim", "torch dense"):
            row = {"section": "train", "config": name, "shape": common.shape_str(cfg), "engine": engine}
            if time_left() < 10:
                row["error"] = "skipped: budget spent"
                rows.append(row)
                continue
            try:
                with limit(a.step_limit):
                    if engine.startswith("slimnp"):
                        model = slimnp_gpu_model(common.slimnp_config(cfg, engine.split()[1]))
                        row["parameters"] = model.num_parameters
                        step = slimnp_train_step(model, cfg["B"])
                    else:
                        step, model = torch_train_step(cfg)
                        row["parameters"] = sum(p.numel() for p in model.parameters())
                    ts = time_steps(step, segs, a.warmup, a.steps)
                row.update(tok_s=tokens / statistics.median(ts), step_ms=statistics.median(ts) * 1e3,
                           step_ms_min=min(ts) * 1e3, step_ms_max=max(ts) * 1e3)
                say(f"train {name} {engine:13s} {row['tok_s']:>12,.0f} tok/s  "
                    f"(median step {row['step_ms']:.2f} ms, {row['step_ms_min']:.2f}-{row['step_ms_max']:.2f})")
            except Exception as exc:  # noqa: BLE001  (report and go on)
                row["error"] = f"{type(exc).__name__}: {exc}"
                say(f"train {name} {engine}: FAILED {row['error']}")
                if not isinstance(exc, Timeout):
                    traceback.print_exc(limit=6)
            rows.append(row)
            model = step = None
            free_gpu()


def section_large(a, rows):
    from slimnp.model import ModelConfig
    from slimnp.sampled_losses import Sampled, prepare_model
    from slimnp.alias_sampler import AliasSampler

    V, H, L, T, B, K = a.large_vocab, a.large_hidden, 2, 20, a.large_batch, 8
    cfg = dict(L=L, H=H, V=V, T=T, B=B)
    p = 1.0 / np.arange(1, V + 1)
    p /= p.sum()
    rng = np.random.default_rng(0)
    ids = AliasSampler(p).sample(rng, (a.steps + a.warmup) * (T * B + B)).astype(np.int32)
    segs = []
    for i in range(a.steps + a.warmup):
        chunk = ids[i * (T + 1) * B:(i + 1) * (T + 1) * B].reshape(T + 1, B)
        segs.append((np.ascontiguousarray(chunk[:-1]), np.ascontiguousarray(chunk[1:])))
    shape = f"{L}x{H} V{V:,} T{T} B{B}"
    for engine in ("slimnp slim IS adagrad", "torch dense softmax sgd"):
        row = {"section": "large", "shape": shape, "engine": engine}
        if time_left() < 20:
            row["error"] = "skipped: budget spent"
            rows.append(row)
            continue
        try:
            with limit(a.large_limit):
                if engine.startswith("slimnp"):
                    mc = ModelConfig(vocab_size=V, hidden=H, layers=L, input="slim", input_k=K,
                                     input_m=int(round(V * K / 32)), output="slim", output_k=K,
                                     output_m=K * int(round(V / 8)))
                    model = slimnp_gpu_model(mc)
                    prepare_model(model, "is")
                    q = p ** 0.75
                    sampled = Sampled("is", a.samples, AliasSampler(q / q.sum()),
                                      np.random.default_rng(1))
                    row["parameters"] = model.num_parameters
                    step = slimnp_train_step(model, B, lr=0.1, optimizer="adagrad", sampled=sampled)
                else:
                    step, model = torch_train_step(cfg, lr=0.1)  # full softmax over V
                    row["parameters"] = sum(p_.numel() for p_ in model.parameters())
                ts = time_steps(step, segs, a.warmup, a.steps)
            row.update(tok_s=T * B / statistics.median(ts), step_ms=statistics.median(ts) * 1e3)
            say(f"large {engine:24s} {row['parameters']:>13,} params  {row['tok_s']:>10,.0f} tok/s  "
                f"(median step {row['step_ms']:.1f} ms)")
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"
            say(f"large {engine}: FAILED {row['error']}")
            if not isinstance(exc, Timeout):
                traceback.print_exc(limit=6)
        rows.append(row)
        model = step = None
        free_gpu()


def _time_gpu(fn, repeats, sync_fn):
    fn()
    sync_fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync_fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def section_table7(a, rows):
    from slimnp.backend import get_xp
    from slimnp.kernels import log_softmax_t
    from slimnp.buffers import Workspace
    from slimnp.layers import slim_log_probs_t
    from slimnp.mapping import shuffle_assignment_pools

    cp = get_xp(DEVICE)
    N, H, V, K = 20, a.large_hidden, a.large_vocab, 8
    d, Mk = H // K, int(round(V / 8))
    rng = np.random.default_rng(0)

    def randn(shape, scale):
        """Gaussian float32 drawn where it will live (6.5 GB of W: not on the host)."""
        if DEVICE == "gpu":
            return cp.random.standard_normal(shape, dtype=cp.float32) * cp.float32(scale)
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    h = randn((N, H), 1.0)
    b = randn(V, 0.01)
    A = randn((K, Mk, d), 0.02)
    idx_kv = cp.asarray(np.ascontiguousarray(shuffle_assignment_pools(V, K, Mk, 0).T))
    zbuf, ws = cp.empty((V, N), cp.float32), Workspace(cp)
    res = {}
    with limit(a.step_limit):
        res["slim (K GEMMs + gather-sum + column log-softmax)"] = _time_gpu(
            lambda: slim_log_probs_t(h, A, idx_kv, b, zbuf, ws), a.repeats, sync)
        hkT = cp.ascontiguousarray(h.reshape(N, K, d).transpose(1, 2, 0))
        PT = cp.matmul(A, hkT)
        res["  slim: K GEMMs"] = _time_gpu(lambda: cp.matmul(A, hkT, out=PT), a.repeats, sync)
        res["  slim: column log-softmax"] = _time_gpu(lambda: log_softmax_t(zbuf), a.repeats, sync)
        A = PT = hkT = None  # free the pools before the 6.5 GB dense matrix
        free_gpu()
        W = randn((V, H), 0.02)

        def full_cupy():
            zT = W @ h.T  # (V, N): the word-major layout, then the same log-softmax kernel
            log_softmax_t(zT, b)

        res["uncompressed, CuPy (GEMM + log-softmax kernel)"] = _time_gpu(full_cupy, a.repeats, sync)
        try:
            import torch

            dev = torch_device()
            Wt = torch.as_tensor(W, device=dev)
            ht, bt = torch.as_tensor(h, device=dev), torch.as_tensor(b, device=dev)
            res["uncompressed, PyTorch (addmm + log_softmax)"] = _time_gpu(
                lambda: torch.log_softmax(torch.addmm(bt, ht, Wt.T), dim=1), a.repeats,
                torch.cuda.synchronize if dev == "cuda" else (lambda: None))
            Wt = None
        except Exception as exc:  # noqa: BLE001
            say(f"table7 torch: {type(exc).__name__}: {exc}")
        W = None
    free_gpu()
    for k, (med, lo, hi) in res.items():
        rows.append({"section": "table7", "engine": k, "ms": med * 1e3, "ms_min": lo * 1e3,
                     "ms_max": hi * 1e3})
        say(f"table7 {k:50s} {med * 1e3:8.2f} ms  ({lo * 1e3:.2f}-{hi * 1e3:.2f})")


def report(rows, info):
    print("\n" + "=" * 78)
    print(f"GPU: {info.get('gpu')}  CuPy {info.get('cupy')}  PyTorch {info.get('torch')} "
          f"(cuDNN {info.get('cudnn')})")
    train = [r for r in rows if r["section"] == "train"]
    if train:
        print(f"\n{'config':7}{'shape':22}{'engine':16}{'tok/s':>12}{'step ms':>10}{'vs torch':>10}")
        for r in train:
            torch_row = next((t for t in train if t["config"] == r["config"] and t["engine"] == "torch dense"
                              and "tok_s" in t), None)
            ratio = f"{r['tok_s'] / torch_row['tok_s']:.2f}" if torch_row and "tok_s" in r else "-"
            tok = f"{r['tok_s']:,.0f}" if "tok_s" in r else r.get("error", "-")[:30]
            ms = f"{r['step_ms']:.2f}" if "step_ms" in r else "-"
            print(f"{r['config']:7}{r['shape']:22}{r['engine']:16}{tok:>12}{ms:>10}{ratio:>10}")
    large = [r for r in rows if r["section"] == "large"]
    for r in large:
        tok = f"{r['tok_s']:,.0f} tok/s, step {r['step_ms']:.1f} ms" if "tok_s" in r else r.get("error")
        print(f"large {r['shape']} {r['engine']}: {r.get('parameters', 0):,} params, {tok}")
    t7 = {r["engine"]: r for r in rows if r["section"] == "table7"}
    if t7:
        print("\nTable 7 output layer (N=20, H=2048, V=793,471, K=8, 1/8):")
        for k, r in t7.items():
            print(f"  {k:52s}{r['ms']:9.2f} ms")
        slim = t7.get("slim (K GEMMs + gather-sum + column log-softmax)")
        for k in ("uncompressed, CuPy (GEMM + log-softmax kernel)", "uncompressed, PyTorch (addmm + log_softmax)"):
            if slim and k in t7:
                print(f"  {k.split(',')[1].strip().split(' ')[0]} uncompressed / slim: "
                      f"{t7[k]['ms'] / slim['ms']:.2f}x (target >= 3x)")
    print("=" * 78, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="table7,train,large")
    ap.add_argument("--configs", default="B,C,D")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=10, help="output-layer repetitions")
    ap.add_argument("--samples", type=int, default=4000, help="IS proposals of the large model")
    ap.add_argument("--large-vocab", type=int, default=793_471)
    ap.add_argument("--large-hidden", type=int, default=2048)
    ap.add_argument("--large-batch", type=int, default=32)
    ap.add_argument("--step-limit", type=float, default=60, help="seconds per engine and config")
    ap.add_argument("--large-limit", type=float, default=90, help="seconds per large-model engine")
    ap.add_argument("--budget", type=float, default=330, help="seconds for the whole run")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                    help="cpu: a dry run of the script itself (give tiny sizes)")
    a = ap.parse_args(argv)
    global DEVICE
    DEVICE = a.device

    from slimnp.backend import DeviceUnavailable, get_xp

    info = {}
    try:
        cp = get_xp(DEVICE)
    except DeviceUnavailable as exc:
        sys.exit(f"gpu_check: {exc}")
    if DEVICE == "gpu":
        props = cp.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info["cupy"] = cp.__version__
    else:
        info["gpu"] = "none (--device cpu dry run)"
    try:
        import torch

        info["torch"], info["cudnn"] = torch.__version__, torch.backends.cudnn.version()
        info["torch_cuda"] = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        info["torch"] = f"unavailable ({exc})"
    say(f"GPU {info['gpu']}, CuPy {info.get('cupy')}, PyTorch {info.get('torch')}")
    if DEVICE == "gpu":
        t0 = time.perf_counter()
        from slimnp.kernels import gpu

        gpu.compile_all()
        say(f"compiled {2 * len(gpu.KERNELS)} kernels in {time.perf_counter() - t0:.1f} s")
    rows = []
    sections = {"train": section_train, "large": section_large, "table7": section_table7}
    for name in a.sections.split(","):
        left = a.budget - (time.perf_counter() - T_START)
        if left < 20:
            say(f"skipping section {name}: budget spent")
            rows.append({"section": name, "engine": "-", "error": "skipped: budget spent"})
            continue
        say(f"section {name} ({left:.0f} s of budget left)")
        try:
            with limit(left):
                sections[name](a, rows)
        except Exception as exc:  # noqa: BLE001
            say(f"section {name} stopped: {type(exc).__name__}: {exc}")
            rows.append({"section": name, "engine": "-", "error": f"{type(exc).__name__}: {exc}"})
        free_gpu()
    report(rows, info)
    if a.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(a.json_out)), exist_ok=True)
        with open(a.json_out, "w") as f:
            json.dump({"info": info, "rows": rows, "args": vars(a)}, f, indent=1)
        say(f"wrote {a.json_out}")


if __name__ == "__main__":
    main()
