"""The slim softmax step fused per column block, against its three passes.

After the K GEMMs, the slim output layer's training step is a gather-sum,
a column softmax with its gradient and a segment sum back to the partial
products (``kernels.slim_gather_sum_t``, ``softmax_xent_t``,
``slim_segment_sum_t``); each pass walks K x V random rows of N floats.  The
fused kernel (``kernels/cpu.py``, ``slim_softmax_xent_fused``) runs the three
on ``--widths`` columns at a time, from a per-thread copy of those columns'
partial products.  The layer uses it where ``cpu.fused_width`` says the
blocks fit ``FUSED_BLOCK_BYTES``; this times it at any width, the budget
lifted, to show where that rule comes from (each width is a maximum,
narrowed as in the layer so that every thread gets as many blocks).  Both give the same nll and
gradient (checked before timing).

    python bench/fused_output.py --shape B --threads 2 --widths 32,64,128
    python bench/fused_output.py --shape D --threads 2

Shapes (V, K, M, N = bptt x batch): B and D are ``train_throughput.py``'s
slim configs, S8 / S32 the PTB sweeps' 1/8 and 1/32 points, W8 / W32
WikiText-2's.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import format_machine, machine_info  # noqa: E402  (puts the checkout on sys.path)

SHAPES = {"B": (10_000, 10, 10_000, 700), "D": (100_000, 8, 80_000, 400),
          "S8": (10_000, 8, 10_000, 400), "S32": (10_000, 8, 2_504, 400),
          "W8": (33_278, 8, 33_280, 400), "W32": (33_278, 8, 8_320, 400)}


def three_passes(PT, idx_kv, inv, b, targets, scale):
    from slimnp.kernels import cpu

    V, N = idx_kv.shape[1], PT.shape[2]
    zT = np.empty((V, N), PT.dtype)
    cpu.slim_gather_sum_t(PT, idx_kv, None, zT)
    nll = cpu.softmax_xent_t(zT, targets, scale, True, bias=b)
    dPT, db = PT.copy(), np.empty(V, PT.dtype)
    cpu.slim_segment_sum_t(zT, idx_kv, dPT, inv, db)
    return nll, dPT, db


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="B", choices=sorted(SHAPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--widths", default="32,64,128", help="column block widths to time")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    from slimnp.kernels import cpu, set_cpu_threads
    from slimnp.mapping import inverse_table

    set_cpu_threads(a.threads)
    V, K, M, N = SHAPES[a.shape]
    Mk = M // K
    rng = np.random.default_rng(0)
    idx_kv = np.stack([rng.permutation(np.arange(V) % Mk) for _ in range(K)]).astype(np.int32)
    inv = inverse_table(idx_kv, Mk)
    PT = rng.standard_normal((K, Mk, N)).astype(np.float32)
    b = (0.1 * rng.standard_normal(V)).astype(np.float32)
    targets = rng.integers(0, V, N)
    cpu.FUSED_BLOCK_BYTES = 1 << 40  # any width: this times them all

    def run_fused(cw):
        cpu.FUSED_MAX_WIDTH = cw
        dPT, db = PT.copy(), np.empty(V, PT.dtype)
        nll = cpu.slim_softmax_xent_fused(dPT, idx_kv, targets, 0.05, True, b, db)
        return nll, dPT, db

    widths = [int(x) for x in a.widths.split(",")]
    ref = three_passes(PT, idx_kv, inv, b, targets, 0.05)
    for cw in widths:
        out = run_fused(cw)
        if not (np.array_equal(ref[0], out[0]) and np.array_equal(ref[1], out[1])):
            raise SystemExit(f"width {cw}: the fused step differs from the three passes")
    print(format_machine(machine_info(threads=a.threads, torch_ok=False), short=True))
    print(f"shape {a.shape}: V={V:,} K={K} Mk={Mk:,} N={N}; partial products "
          f"{PT.nbytes / 2**20:.0f} MB; ms per call")
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        three_passes(PT, idx_kv, inv, b, targets, 0.05)
        line = f"  three passes {(time.perf_counter() - t0) * 1e3:7.1f}"
        for cw in widths:
            t0 = time.perf_counter()
            run_fused(cw)
            line += f"   fused width {cw} {(time.perf_counter() - t0) * 1e3:7.1f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
