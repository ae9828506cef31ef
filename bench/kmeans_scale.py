"""k-means at the paper's largest size: the output layer of the 793K-word model.

``slimnp compress`` of the One Billion Word model (V = 793,471, H = 2,048)
to 1/8 with K = 8 runs one k-means per pool: 793,471 slices of d = 256
numbers into k = 99,184 centroids.  One exact assignment pass of one pool is
``2 n k d`` = 40 TFLOP, so the search is the inverted file of
:func:`slimnp.compress.nearest_ivf`.  This times the whole layer (or
``--pools`` of it) and, on a row sample, compares the final labels with the
exact nearest centroids (agreement, and the sample's distortion against the
exact search's) and times the exact search for the ratio.

The rows are random normal numbers, not a trained embedding (none of that
size is at hand): no cluster structure, the hardest case for the inverted
file's recall.

    python bench/kmeans_scale.py                 # the full layer: 8 pools
    python bench/kmeans_scale.py --pools 1 --json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from common import format_machine, machine_info  # noqa: E402  (puts the checkout on sys.path)

from slimnp.compress import kmeans, nearest  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=793_471)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--k", type=int, default=8, help="sub-vectors per word (pools)")
    p.add_argument("--ratio", type=float, default=1 / 8, help="pool size M/K as a share of V")
    p.add_argument("--pools", type=int, default=None, help="time only this many pools (default all K)")
    p.add_argument("--iters", type=int, default=25, help="Lloyd iterations at most (slimnp compress's default)")
    p.add_argument("--check-rows", type=int, default=4000, help="rows compared with the exact search")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    V, d, K = a.vocab, a.hidden // a.k, a.k
    k = max(1, round(a.ratio * V))
    pools = min(K, a.pools or K)
    info = machine_info(threads=0, torch_ok=False)
    print(format_machine(info, short=True), file=sys.stderr)
    print(f"k-means: {pools} of {K} pools, each {V:,} x {d} into {k:,} centroids "
          f"(exact pass: {2 * V * k * d / 1e12:.1f} TFLOP per pool)", file=sys.stderr)
    rng = np.random.default_rng(0)
    rows = []
    for pool in range(pools):
        X = rng.standard_normal((V, d), dtype=np.float32)
        t0 = time.perf_counter()
        r = kmeans(X, k, seed=pool, iters=a.iters)
        secs = time.perf_counter() - t0
        sub = rng.choice(V, a.check_rows, replace=False)
        t1 = time.perf_counter()
        exact, d2 = nearest(X[sub], r.centroids)
        exact_secs = (time.perf_counter() - t1) * V / a.check_rows
        got = ((X[sub] - r.centroids[r.labels[sub]]) ** 2).sum(axis=1, dtype=np.float64)
        row = {"pool": pool, "seconds": round(secs, 1), "search": r.search, "sample": r.sample,
               "iterations": r.iterations, "seeding": r.seeding,
               "inertia_per_row": r.inertia / V, "first_iteration_per_row": r.history[0] / r.sample,
               "agreement_with_exact": float((exact == r.labels[sub]).mean()),
               "distortion_vs_exact": float(got.sum() / d2.sum()),
               "exact_pass_seconds_estimate": round(exact_secs, 1)}
        rows.append(row)
        print(f"pool {pool}: {secs:.0f} s ({r.search}, {r.iterations} iterations on {r.sample:,} rows); "
              f"labels = exact nearest for {row['agreement_with_exact']:.1%} of {a.check_rows} rows, "
              f"their distortion {row['distortion_vs_exact']:.3f}x the exact search's; "
              f"one exact pass would take ~{exact_secs:.0f} s", file=sys.stderr, flush=True)
        del X
    total = sum(r["seconds"] for r in rows)  # k-means alone, not the checks
    out = {"machine": info, "V": V, "d": d, "K": K, "k": k, "pools_timed": pools,
           "seconds_total": round(total, 1),
           "seconds_all_pools_estimate": round(total * K / pools, 1), "pools": rows}
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{pools} pool(s): {total:.0f} s; the layer's {K} pools: "
              f"~{math.ceil(total * K / pools / 60)} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
