"""Output-layer inference, the slim-embeddings paper's Table 7 setting, on CPU.

20 hidden vectors, H=2048, V=793,471, K=8, output compression 1/8, float32:
log-probabilities of the whole vocabulary for each hidden vector, by

* ``uncompressed`` -- NumPy ``h @ W.T + b`` then a log-softmax (W: V x H);
* ``slim``         -- slimnp's slim output layer: K GEMMs for the partial
  products, the K-term gather-sum per word (Numba), then the log-softmax.

Both measured in the same run (median of --repeats after a warm-up), with the
floor estimates: FLOPs over the measured GEMM rate and bytes over the
measured memory bandwidth.  The paper reports 0.7 s (slim) vs 2.7 s (full) on
its machine.

    python bench/output_layer.py [--vocab 793471] [--hidden 2048] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# slimnp sets this when imported first (see slimnp/__init__.py); NumPy is
# imported before it here, so set it before: OpenBLAS's spinning threads
# otherwise slow the gather-sum that follows the GEMMs from 55 to 95 ms.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimnp.kernels import cpu  # noqa: E402
from slimnp import kernels  # noqa: E402
from slimnp.buffers import Workspace  # noqa: E402
from common import format_machine, machine_info  # noqa: E402  (bench/ is sys.path[0])
from slimnp.layers import slim_log_probs_t  # noqa: E402
from slimnp.mapping import shuffle_assignment_pools  # noqa: E402


def log_softmax_rows(z):
    """In place: z - logsumexp(z) row by row (the 'full' reference's last step)."""
    m = z.max(axis=1, keepdims=True)
    z -= m
    lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
    z -= lse
    return z


def log_softmax_columns(zT):
    """In place, for the word-major (V, N) logits: each column minus its logsumexp."""
    m = zT.max(axis=0)
    zT -= m
    lse = np.log(np.exp(zT).sum(axis=0))
    zT -= lse
    return zT


def timeit(fn, repeats):
    fn()  # warm-up (and JIT)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=793_471)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=1 / 8, help="output compression (M/K = ratio*V)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-full", action="store_true", help="skip the uncompressed layer (needs V*H*4 bytes)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    N, H, V, K = a.rows, a.hidden, a.vocab, a.k
    d, Mk = H // K, max(1, round(a.ratio * V))
    rng = np.random.default_rng(0)
    h = rng.standard_normal((N, H), dtype=np.float32)
    b = rng.standard_normal(V, dtype=np.float32) * 0.01
    A = (rng.standard_normal((K, Mk, d), dtype=np.float32) * 0.02)
    idx_kv = np.ascontiguousarray(shuffle_assignment_pools(V, K, Mk, 0).T)
    rows = {}

    # slim, word-major layout (slimnp's choice for few rows): zT (V, N)
    zbuf, ws = np.empty((V, N), np.float32), Workspace()
    rows["slim"] = timeit(lambda: slim_log_probs_t(h, A, idx_kv, b, zbuf, ws), a.repeats)
    # its pieces, to compare with their floors
    hkT = np.ascontiguousarray(h.reshape(N, K, d).transpose(1, 2, 0))  # (K, d, N)
    PT = np.matmul(A, hkT)
    rows["slim: K GEMMs"] = timeit(lambda: np.matmul(A, hkT, out=PT), a.repeats)
    zT = np.empty((V, N), np.float32)
    rows["slim: gather-sum"] = timeit(lambda: cpu.slim_gather_sum_t(PT, idx_kv, b, zT), a.repeats)
    rows["slim: log-softmax"] = timeit(lambda: kernels.log_softmax_t(zT), a.repeats)  # (idempotent)
    rows["  (NumPy log-softmax)"] = timeit(lambda: log_softmax_columns(zT), a.repeats)

    if not a.skip_full:
        W = rng.standard_normal((V, H), dtype=np.float32) * 0.02
        rows["uncompressed"] = timeit(lambda: log_softmax_rows(h @ W.T + b), a.repeats)
        del W

    # measured ceilings: GEMM rate on a compute-bound square product, and a
    # memory-bound streaming copy
    X = rng.standard_normal((2048, 2048), dtype=np.float32)
    t_gemm = timeit(lambda: X @ X, 3)[0]
    gflops = 2 * 2048 ** 3 / t_gemm / 1e9
    big = np.ones(64 << 20, np.float32)
    out = np.empty_like(big)
    t_copy = timeit(lambda: np.copyto(out, big), 3)[0]
    gbs = 2 * big.nbytes / t_copy / 1e9
    flops_slim = 2 * N * K * Mk * d
    bytes_slim = A.nbytes + idx_kv.nbytes + 2 * zT.nbytes  # pools + tables + z written and read
    floor = max(flops_slim / (gflops * 1e9), bytes_slim / (gbs * 1e9))
    # the gather-sum alone: V*K rows of N partials read, z written, the table read
    gathered = V * K
    bytes_gather = gathered * N * 4 + zT.nbytes + idx_kv.nbytes
    gather_floor = bytes_gather / (gbs * 1e9)
    res = {"rows": N, "hidden": H, "vocab": V, "K": K, "pool_per_position": Mk,
           "gemm_gflops": gflops, "copy_gb_s": gbs, "slim_floor_s": floor,
           "times_s": {k: {"median": v[0], "min": v[1], "max": v[2]} for k, v in rows.items()}}
    if "uncompressed" in rows:
        res["speedup"] = rows["uncompressed"][0] / rows["slim"][0]
    res["slim_over_floor"] = rows["slim"][0] / floor
    res["partials_mb"] = PT.nbytes / 1e6
    res["gather_ns_per_row"] = rows["slim: gather-sum"][0] / gathered * 1e9
    res["gather_floor_s"] = gather_floor
    res["gather_over_floor"] = rows["slim: gather-sum"][0] / gather_floor
    machine = machine_info(threads=0, torch_ok=False)
    res["machine"] = machine
    if a.json:
        print(json.dumps(res))
        return
    print(format_machine(machine, short=True))
    print(f"output layer: N={N} H={H} V={V:,} K={K} M/K={Mk:,} float32")
    print(f"measured: GEMM {gflops:.0f} GFLOP/s, copy {gbs:.1f} GB/s; slim floor {floor * 1e3:.1f} ms "
          f"({flops_slim / 1e9:.2f} GFLOP, {bytes_slim / 1e6:.0f} MB)")
    print(f"{'step':<20}{'median ms':>12}{'min-max ms':>20}")
    for k, (med, lo, hi) in rows.items():
        print(f"{k:<20}{med * 1e3:12.1f}{f'{lo * 1e3:.1f}-{hi * 1e3:.1f}':>20}")
    print(f"gather-sum: {V * K:,} rows of {N * 4} bytes from {res['partials_mb']:,.0f} MB of partial products, "
          f"{res['gather_ns_per_row']:.1f} ns per row; its streaming floor {gather_floor * 1e3:.1f} ms "
          f"({bytes_gather / 1e6:,.0f} MB at the copy rate): {res['gather_over_floor']:.1f}x")
    if "speedup" in res:
        print(f"slim vs uncompressed: {res['speedup']:.1f}x faster; slim / floor: {res['slim_over_floor']:.1f}x")


if __name__ == "__main__":
    main()
