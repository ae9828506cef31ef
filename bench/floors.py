#!/usr/bin/env python
"""Floor estimates: what the benchmark configs could reach on this machine.

For each config and variant, the work of one training step and one
evaluation step is split into GEMM FLOPs (run at the measured GEMM rate) and
streamed bytes of the passes that are memory-bound (the softmax passes over
the (N, V) logits, the slim gather and segment sums, the optimizer's passes
over the parameters), run at the measured copy bandwidth.  The floor is
their sum: the time if every GEMM ran at the square-GEMM rate and every
other pass at memory speed, with nothing else (no recurrence, no Python).
Both ceilings are measured in the same run.  The "shaped" floor times each
of the step's GEMMs in the shape it has there (the recurrent ones are T
products of B = 20 rows each, far from the square rate) and adds the same
streamed bytes: a tighter bound, still without any pointwise work.

    python bench/floors.py [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")  # as slimnp sets it

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

F32 = 4  # bytes


def work(cfg: dict, variant: str, kind: str) -> tuple[float, float]:
    """(GEMM FLOPs, streamed bytes) of one step of ``kind`` ('train' or 'eval')."""
    L, H, V, T, B = cfg["L"], cfg["H"], cfg["V"], cfg["T"], cfg["B"]
    N = T * B
    lstm_gemms = 6 if kind == "train" else 2  # x Wx, h Wh (+ dWx, dWh, dx, dh)
    flops = L * lstm_gemms * 2 * N * H * 4 * H
    lstm_params = L * (2 * H * 4 * H + 4 * H)
    if variant == "dense":
        flops += (3 if kind == "train" else 1) * 2 * N * H * V
        # softmax: train reads+writes the logits 3 times, eval reads them twice
        stream = (6 if kind == "train" else 2) * N * V * F32
        params = V * H + V * H + V + lstm_params
        touched = params - V * H + min(N, V) * H  # embedding rows actually updated
    else:
        mc = common.slimnp_config(cfg, variant)
        K, M = mc.output_k, mc.output_m
        d = H // K
        flops += (3 if kind == "train" else 1) * 2 * N * M * d
        rows = K * V * N * F32  # one pass of the word-major gather (or segment sum)
        stream = (2 * rows if kind == "train" else rows) + (6 if kind == "train" else 2) * N * V * F32
        params = mc.input_m * (H // mc.input_k) + M * d + V + lstm_params
        touched = params
    if kind == "train":
        stream += 4 * touched * F32  # norm (read grad), update (read grad, read+write params)
    return flops, stream


def gemm_shapes(cfg: dict, variant: str, kind: str) -> list:
    """The step's GEMMs as ``(count, m, k, n)``: ``count`` products of an
    ``(m, k)`` by a ``(k, n)`` matrix, in the shapes slimnp runs them (the
    recurrent ones one time step at a time, B rows each)."""
    L, H, V, T, B = cfg["L"], cfg["H"], cfg["V"], cfg["T"], cfg["B"]
    N = T * B
    g = [(L, N, H, 4 * H),  # x Wx for every step at once
         (L * T, B, H, 4 * H)]  # h Wh, step by step
    if kind == "train":
        g += [(L * T, B, 4 * H, H),  # dgates Wh^T, step by step
              (2 * L, H, N, 4 * H),  # dWx, dWh
              (L, N, 4 * H, H)]  # dx
    if variant == "dense":
        g += [(1, N, H, V)] + ([(1, N, V, H), (1, V, N, H)] if kind == "train" else [])
    else:
        mc = common.slimnp_config(cfg, variant)
        K, Mk, d = mc.output_k, mc.output_m // mc.output_k, H // mc.output_k
        g += [(K, Mk, d, N)] + ([(K, N, Mk, d), (K, Mk, N, d)] if kind == "train" else [])
    return g


def time_gemm(m: int, k: int, n: int, cache: dict) -> float:
    """Seconds of one float32 ``(m, k) @ (k, n)`` product (best of a few)."""
    if (m, k, n) not in cache:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        out = np.empty((m, n), np.float32)
        reps = max(3, min(200, int(2e9 / (2 * m * k * n + 1))))
        np.matmul(a, b, out=out)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                np.matmul(a, b, out=out)
            best = min(best, (time.perf_counter() - t0) / reps)
        cache[(m, k, n)] = best
    return cache[(m, k, n)]


def measure_ceilings() -> tuple[float, float]:
    """(GEMM FLOP/s on a 2048^3 product, copy bytes/s on 256 MB)."""
    X = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    X @ X
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        X @ X
        ts.append(time.perf_counter() - t0)
    gemm = 2 * 2048 ** 3 / min(ts)
    a = np.ones(64 << 20, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        ts.append(time.perf_counter() - t0)
    return gemm, 2 * a.nbytes / min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(common.CONFIGS))
    ap.add_argument("--variant", default="dense,slim")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    gemm, copy = measure_ceilings()
    rows, timed = [], {}
    for name in common.parse_list(a.configs, common.CONFIGS, "config"):
        cfg = common.CONFIGS[name]
        for variant in common.parse_list(a.variant, common.VARIANTS, "variant"):
            for kind in ("train", "eval"):
                flops, stream = work(cfg, variant, kind)
                t = flops / gemm + stream / copy
                # the same streams, with each GEMM timed in its own shape
                shaped = sum(c * time_gemm(m, k, n, timed) for c, m, k, n in gemm_shapes(cfg, variant, kind))
                ts = shaped + stream / copy
                rows.append({"config": name, "variant": variant, "kind": kind, "gflop": flops / 1e9,
                             "stream_mb": stream / 1e6, "floor_ms": t * 1e3,
                             "floor_tok_s": cfg["T"] * cfg["B"] / t, "shaped_gemm_ms": shaped * 1e3,
                             "shaped_floor_ms": ts * 1e3, "shaped_floor_tok_s": cfg["T"] * cfg["B"] / ts})
    if a.json:
        print(json.dumps({"gemm_gflops": gemm / 1e9, "copy_gb_s": copy / 1e9, "rows": rows}))
        return
    print(common.format_machine(common.machine_info(threads=common.blas_threads(), torch_ok=False), short=True))
    print(f"measured ceilings: GEMM {gemm / 1e9:.0f} GFLOP/s, copy {copy / 1e9:.1f} GB/s")
    print("floor: every GEMM at the square rate; shaped: each GEMM timed in the shape the step runs it")
    print(f"{'config':<7}{'variant':<8}{'kind':<6}{'GFLOP':>8}{'stream MB':>11}{'floor ms':>10}{'floor tok/s':>13}"
          f"{'shaped GEMM ms':>16}{'shaped ms':>11}{'shaped tok/s':>14}")
    for r in rows:
        print(f"{r['config']:<7}{r['variant']:<8}{r['kind']:<6}{r['gflop']:8.2f}{r['stream_mb']:11.0f}"
              f"{r['floor_ms']:10.1f}{r['floor_tok_s']:13,.0f}{r['shaped_gemm_ms']:16.1f}"
              f"{r['shaped_floor_ms']:11.1f}{r['shaped_floor_tok_s']:14,.0f}")


if __name__ == "__main__":
    main()
