"""Where a training step of the exact slim output layer spends its time.

One training step of ``SlimSoftmax`` on N = T*B hidden vectors (the loss,
dh, the pools' and the bias's gradients), phase by phase, at the shapes of a
benchmark config (default D: H = 512, V = 100K, N = 400; K = 8 at 1/10):

* ``gemm PT``     -- the K GEMMs ``PT[k] = A[k] h_k^T`` (the partial products);
* ``gather-sum``  -- ``zT[w] = b[w] + sum_k PT[k, idx[k, w]]`` (K*V rows of N);
* ``softmax``     -- the column softmax, the loss and ``dzT`` in place;
* ``segment-sum`` -- ``dPT[k, j] = sum of dzT[w] over idx[k, w] = j``, and ``db``;
* ``gemm dh``     -- ``dh_k = dPT_k^T A_k``;
* ``gemm dA``     -- ``dA_k = dPT_k h_k`` (the caller's GEMM into the gradient buffer).

Beside each phase: its floor, FLOPs over the GEMM rate and bytes over the copy
bandwidth measured in the same run (bench/floors.py's measurements), so the
profile says which phases are near what the machine can do and which are not.

    python bench/slim_output_profile.py [--config D] [--k 8] [--ratio 0.1] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import CONFIGS, format_machine, machine_info  # noqa: E402

from slimnp import kernels  # noqa: E402
from slimnp.buffers import Workspace  # noqa: E402
from slimnp.mapping import shuffle_assignment_pools  # noqa: E402


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rates(n=2048, repeats=3):
    """GEMM FLOP/s and copy bytes/s of this machine, now."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    c = np.empty_like(a)
    gemm = 2 * n ** 3 / _median_time(lambda: np.matmul(a, a, out=c), repeats)
    big = np.ones(64 << 20, np.float32)  # 256 MB: out of every cache
    dst = np.empty_like(big)
    copy = 2 * big.nbytes / _median_time(lambda: np.copyto(dst, big), repeats)
    return gemm, copy


def profile(V, H, N, K, ratio, repeats=5, seed=0):
    d, Mk = H // K, max(1, round(ratio * V))
    rng = np.random.default_rng(seed)
    A = (rng.standard_normal((K, Mk, d)) * 0.1).astype(np.float32)
    b = np.zeros(V, np.float32)
    h = rng.standard_normal((N, H)).astype(np.float32)
    idx_kv = np.ascontiguousarray(shuffle_assignment_pools(V, K, Mk, seed).T).astype(np.int32)
    targets = rng.integers(0, V, N).astype(np.int32)
    ws = Workspace(np)
    PT = ws.get("PT", (K, Mk, N), np.float32)
    zT = ws.get("zT", (V, N), np.float32)
    hk = h.reshape(N, K, d).transpose(1, 2, 0)
    dh3 = np.empty((N, K, d), np.float32)
    dA = np.empty_like(A)
    db = np.empty(V, np.float32)
    f4 = 4
    phases = {
        "gemm PT": (lambda: np.matmul(A, hk, out=PT), 2 * K * Mk * d * N, f4 * (A.size + h.size + PT.size)),
        "gather-sum": (lambda: kernels.slim_gather_sum_t(PT, idx_kv, b, zT), K * V * N,
                       f4 * (K * V * N + V * N)),
        "softmax": (lambda: kernels.softmax_xent_t(zT, targets, 1.0, True, bias=None), 4 * V * N,
                    f4 * 2 * V * N),
        "segment-sum": (lambda: kernels.slim_segment_sum_t(zT, idx_kv, PT, None, db), K * V * N,
                        f4 * (K * V * N + PT.size)),
        "gemm dh": (lambda: np.matmul(PT.transpose(0, 2, 1), A, out=dh3.transpose(1, 0, 2)),
                    2 * K * Mk * d * N, f4 * (A.size + h.size + PT.size)),
        "gemm dA": (lambda: np.matmul(PT, h.reshape(N, K, d).transpose(1, 0, 2), out=dA),
                    2 * K * Mk * d * N, f4 * (A.size + h.size + PT.size)),
    }
    for fn, _, _ in phases.values():  # warm-up: compile, fault the buffers in
        fn()
    out = {}
    for name, (fn, flops, nbytes) in phases.items():
        if name == "softmax":  # it overwrites zT with dzT: refill first, untimed
            times = []
            for _ in range(repeats):
                kernels.slim_gather_sum_t(PT, idx_kv, b, zT)
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
        else:
            t = _median_time(fn, repeats)
        out[name] = {"seconds": t, "flops": flops, "bytes": nbytes}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="D", choices=sorted(CONFIGS))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.1, help="entries per pool as a share of V")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from slimnp.threads import set_threads

    set_threads(a.threads)
    c = CONFIGS[a.config]
    V, H, N = c["V"], c["H"], c["T"] * c["B"]
    info = machine_info(a.threads, False)
    print(format_machine(info), file=sys.stderr)
    gemm_rate, copy_rate = _rates()
    prof = profile(V, H, N, a.k, a.ratio, a.repeats)
    total = sum(p["seconds"] for p in prof.values())
    dense_s = 3 * 2 * V * H * N / gemm_rate  # a full softmax's three GEMMs, at the GEMM floor
    rows = []
    for name, p in prof.items():
        floor = max(p["flops"] / gemm_rate if name.startswith("gemm") else 0.0, p["bytes"] / copy_rate)
        rows.append({"phase": name, "ms": p["seconds"] * 1e3, "share": p["seconds"] / total,
                     "floor_ms": floor * 1e3, "x_floor": p["seconds"] / floor if floor else None})
    if a.json:
        print(json.dumps({"config": a.config, "V": V, "H": H, "N": N, "K": a.k, "ratio": a.ratio,
                          "gemm_gflops": gemm_rate / 1e9, "copy_gbs": copy_rate / 1e9,
                          "phases": rows, "total_ms": total * 1e3,
                          "dense_gemm_floor_ms": dense_s * 1e3, "machine": info}))
        return
    print(f"config {a.config}: V={V:,} H={H} N={N} K={a.k} pools of {max(1, round(a.ratio * V)):,} "
          f"(d={H // a.k}); GEMM {gemm_rate / 1e9:.0f} GFLOP/s, copy {copy_rate / 1e9:.1f} GB/s, "
          f"{a.threads} thread(s)")
    print(f"{'phase':<12} {'ms':>8} {'share':>6} {'floor ms':>9} {'x floor':>8}")
    for r in rows:
        xf = f"{r['x_floor']:8.2f}" if r["x_floor"] else f"{'-':>8}"
        print(f"{r['phase']:<12} {r['ms']:8.1f} {r['share'] * 100:5.0f}% {r['floor_ms']:9.1f} {xf}")
    print(f"{'total':<12} {total * 1e3:8.1f}   (a full softmax's three GEMMs at the GEMM floor: "
          f"{dense_s * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
