"""The slim output layer's two strategies, by sub-vector length.

A training step of the output layer alone (loss, dh, the pools' and the
bias's gradients; ``SlimSoftmax.loss``) on N hidden vectors, for each K at a
fixed compression of the output matrix, by

* ``dp``    -- the paper's dynamic programming: K GEMMs for the partial
  products, the K-term gather-sum per word, the column softmax, the segment
  sum back into the partial products;
* ``dense`` -- the ``V x H`` word vectors rebuilt from the pools (one
  gather), a full softmax by GEMMs, the matrix's gradient scattered back.

The DP moves K*V*N partial products (H/d times the logits, d = H/K numbers
per sub-vector) through memory; the rebuilt matrix costs V*H numbers and
three GEMMs.  ``slimnp.layers.slim_output_strategy`` picks ``dense`` for
sub-vectors of at most ``DENSE_MAX_SUBVECTOR`` numbers; this is the
measurement behind that rule.  Both strategies alternate in one process
(median of --repeats each).

    python bench/output_strategy.py [--vocab 10000] [--hidden 200] [--rows 400]
        [--ks 8,20,40,200] [--ratio 0.125] [--threads 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import format_machine, machine_info, set_threads  # noqa: E402  (bench/ is sys.path[0])
from slimnp.buffers import ParamStore  # noqa: E402
from slimnp.layers import SlimSoftmax, slim_output_strategy  # noqa: E402
from slimnp.mapping import shuffle_assignment_pools  # noqa: E402


def _layer(V, H, K, Mk, strategy, seed):
    store = ParamStore()
    layer = SlimSoftmax(store, "out", V, H, K, K * Mk, shuffle_assignment_pools(V, K, Mk, seed), strategy)
    store.allocate()
    store.data[...] = np.random.default_rng(seed).uniform(-0.1, 0.1, store.data.size)
    return store, layer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=10_000)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--rows", type=int, default=400, help="hidden vectors per step (T*B: 20 x 20)")
    p.add_argument("--ks", default="8,20,40,200", help="sub-vectors per word (each must divide --hidden)")
    p.add_argument("--ratio", type=float, default=0.125, help="output matrix compression")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    set_threads(a.threads, "slimnp")
    V, H, N = a.vocab, a.hidden, a.rows
    rng = np.random.default_rng(0)
    h = rng.standard_normal((N, H)).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    out = []
    for K in (int(k) for k in a.ks.split(",")):
        if H % K:
            p.error(f"K = {K} does not divide --hidden {H}")
        Mk = max(1, round(a.ratio * V))  # pool rows: M*d = ratio * V*H with M = K*Mk
        layers = {s: _layer(V, H, K, Mk, s, K) for s in ("dp", "dense")}
        times = {s: [] for s in layers}
        for r in range(a.repeats + 1):  # the first round warms up (compiles, allocates)
            for s, (store, layer) in layers.items():
                store.zero_grad()
                t0 = time.perf_counter()
                layer.loss(h, targets, 1.0 / 20)
                if r:
                    times[s].append(time.perf_counter() - t0)
        row = {"K": K, "d": H // K, "auto": slim_output_strategy(V, H, K)}
        for s, ts in times.items():
            row[f"{s}_ms"] = statistics.median(ts) * 1e3
        row["dp_over_dense"] = row["dp_ms"] / row["dense_ms"]
        out.append(row)
    if a.json:
        print(json.dumps({"vocab": V, "hidden": H, "rows": N, "ratio": a.ratio, "results": out,
                          "machine": machine_info(threads=a.threads, torch_ok=False)}))
        return 0
    print(format_machine(machine_info(threads=a.threads, torch_ok=False), short=True))
    print(f"slim output layer, training step: V = {V:,}, H = {H}, N = {N}, output at {a.ratio:g}, "
          f"{a.threads} thread(s), median of {a.repeats}")
    print("     K      d    dp ms   dense ms   dp / dense   auto picks")
    for r in out:
        print(f"{r['K']:6d} {r['d']:6d} {r['dp_ms']:8.1f} {r['dense_ms']:10.1f} {r['dp_over_dense']:12.2f}"
              f"   {r['auto']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
