#!/usr/bin/env python
"""The word-major gather-sum with software prefetch at several distances.

``kernels/cpu.py`` prefetches the pool rows of the word ``_PREFETCH_WORDS``
ahead (the first ``_PREFETCH_LINES`` + 1 cache lines of each).  This compiles
that kernel again at each ``--distances`` value (0: no prefetch; a value +
100: every line of the row, not just the first ones) and times them
alternately in one process, on the Table 7 shape (V = 793,471, K = 8, 1/8) with ``--rows``
columns: N = 20 gives 80-byte rows, N = 100 400-byte ones.

    python bench/prefetch_distance.py --rows 100
    python bench/prefetch_distance.py --rows 20 --distances 0,2,8
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import format_machine, machine_info  # noqa: E402  (puts the checkout on sys.path)


def _gather(distance: int, whole_rows: bool):
    """slimnp's own word-major gather-sum (``cpu._slim_gather_sum_t_impl``),
    compiled again with another prefetch distance (0: none) and, with
    ``whole_rows``, every line of each row prefetched."""
    import types

    import numba as nb

    from slimnp.kernels import cpu

    impl = cpu._slim_gather_sum_t_impl
    # a distance past the last word switches the prefetch off
    env = {**impl.__globals__, "_PREFETCH_WORDS": distance or 1 << 62}
    fn = types.FunctionType(impl.__code__, env, f"gather_{distance}_{int(whole_rows)}")
    kernel = nb.njit(parallel=True, nogil=True, error_model="numpy")(fn)

    def gather(PT, idx_kv, zT):
        kernel(PT, idx_kv, np.empty(0, PT.dtype), False, zT)

    lines = cpu._PREFETCH_LINES
    cpu._PREFETCH_LINES = 1 << 10 if whole_rows else lines  # read when the intrinsic is compiled
    try:
        gather(np.zeros((1, 1, 1), np.float32), np.zeros((1, 1), np.uint32), np.empty((1, 1), np.float32))
    finally:
        cpu._PREFETCH_LINES = lines
    return gather


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100, help="N: columns of the partial products")
    p.add_argument("--distances", default="0,2,4,8,16,104,108,116")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    from slimnp.kernels import set_cpu_threads

    set_cpu_threads(a.threads)
    V, K = 793_471, 8
    Mk = V // K  # 1/8 of the dense layer at K = 8: M = V entries, V/K per pool
    rng = np.random.default_rng(0)
    idx = rng.integers(0, Mk, (K, V)).astype(np.uint32)
    PT = rng.standard_normal((K, Mk, a.rows)).astype(np.float32)
    zT = np.empty((V, a.rows), np.float32)
    ds = [int(x) for x in a.distances.split(",")]
    fns = {d: _gather(d % 100, d >= 100) for d in ds}
    for d in ds:
        fns[d](PT, idx, zT)  # compile, touch
    times = {d: [] for d in ds}
    for r in range(a.repeats):
        for d in ds if r % 2 == 0 else ds[::-1]:
            t0 = time.perf_counter()
            fns[d](PT, idx, zT)
            times[d].append(time.perf_counter() - t0)
    print(format_machine(machine_info(threads=a.threads, torch_ok=False), short=True))
    print(f"N = {a.rows} ({4 * a.rows}-byte rows), partial products {PT.nbytes / 2**20:.0f} MB, "
          f"{a.threads} threads; median of {a.repeats}")
    for d in ds:
        t = float(np.median(times[d]))
        what = "no prefetch" if d == 0 else f"{d % 100} words ahead" + (", whole rows" if d >= 100 else "")
        print(f"  {what:<28} {t * 1e3:8.1f} ms  {t / (K * V) * 1e9:6.1f} ns per row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
