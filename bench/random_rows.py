"""What a random row costs on this machine, by the size of the array it comes from.

The slim output layer's gather-sum reads one row of N partial products per
(word, pool) at a random entry: its speed is set by how the memory system
serves random rows once the partial products leave the caches.  This sums
``--rows`` rows of ``--row-bytes`` bytes drawn at random from arrays of
growing size (one thread, a compiled loop) and prints ns per row: flat while
the array fits a cache level, rising to a DRAM round trip beyond.

It also times the same rows read as a chain (each row holds the index of the
next, so one load waits for the previous): the latency of one row.  Latency
over the independent loop's ns per row is how many rows the core keeps in
flight -- the memory-level parallelism that bounds a random gather once it
misses the caches.

With ``--threads T`` the independent loop also runs on T threads at once
(each on its own share of the rows): ns per row for the whole machine and
the bytes per second random rows arrive at, the rate a parallel gather-sum
cannot beat.

    python bench/random_rows.py [--row-bytes 80] [--sizes-mb 0.25,1,4,8,16,64,256] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from common import format_machine, machine_info  # noqa: E402  (puts the checkout on sys.path)


def _gather_kernel():
    import numba as nb

    @nb.njit(nogil=True, error_model="numpy", boundscheck=False)
    def gather(P, idx, out):
        N = P.shape[1]
        for i in range(idx.shape[0]):
            p = P[idx[i]]
            for n in range(N):
                out[n] += p[n]

    return gather


def _chase_kernel():
    import numba as nb

    @nb.njit(nogil=True, error_model="numpy", boundscheck=False)
    def chase(P, steps, out):
        # P is uint32; column 0 of row i holds the row read after it (one
        # random cycle through all rows), so each load waits for the last.
        N = P.shape[1]
        i = 0
        for _ in range(steps):
            p = P[i]
            for n in range(1, N):
                out[n] += p[n]
            i = p[0]
        return i

    return chase


def _cycle(n: int, rng) -> np.ndarray:
    """next[i] for a single random cycle through all n rows."""
    order = rng.permutation(n)
    nxt = np.empty(n, np.uint32)
    nxt[order] = np.roll(order, -1)
    return nxt


def _parallel_ns(gather, P, idx, threads: int) -> float:
    """ns per row, machine-wide, with ``threads`` threads each gathering its share of ``idx``."""
    shares = np.array_split(idx, threads)
    accs = [np.zeros(P.shape[1], np.float32) for _ in shares]
    workers = [threading.Thread(target=gather, args=(P, s, acc)) for s, acc in zip(shares, accs)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (time.perf_counter() - t0) / idx.shape[0] * 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row-bytes", type=int, default=80, help="bytes per row (80: N = 20 float32, Table 7)")
    p.add_argument("--sizes-mb", default="0.25,1,4,8,16,64,256")
    p.add_argument("--rows", type=int, default=4_000_000, help="random rows read per size")
    p.add_argument("--threads", type=int, default=1, help="also run the independent loop on this many threads at once")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    gather = _gather_kernel()
    chase = _chase_kernel()
    width = max(1, a.row_bytes // 4)
    rng = np.random.default_rng(0)
    out = []
    for mb in (float(x) for x in a.sizes_mb.split(",")):
        n = max(1, int(mb * 2**20 / (4 * width)))
        P = np.ones((n, width), np.float32)
        idx = rng.integers(0, n, a.rows).astype(np.uint32)
        acc = np.zeros(width, np.float32)
        gather(P, idx[:1000], acc)  # compile, touch
        t0 = time.perf_counter()
        gather(P, idx, acc)
        ns = (time.perf_counter() - t0) / a.rows * 1e9
        C = np.ones((n, width), np.uint32)
        C[:, 0] = _cycle(n, rng)
        steps = min(a.rows, max(n, 100_000))
        cacc = np.zeros(width, np.uint32)
        chase(C, 1000, cacc)  # compile
        t0 = time.perf_counter()
        chase(C, steps, cacc)
        latency = (time.perf_counter() - t0) / steps * 1e9
        r = {"array_mb": mb, "ns_per_row": ns, "latency_ns": latency, "rows_in_flight": latency / ns}
        if a.threads > 1:
            r["threads"] = a.threads
            r["ns_per_row_all_threads"] = _parallel_ns(gather, P, idx, a.threads)
            r["gb_per_s_all_threads"] = 4 * width / r["ns_per_row_all_threads"]
        out.append(r)
    if a.json:
        print(json.dumps({"row_bytes": 4 * width, "results": out, "machine": machine_info(threads=1, torch_ok=False)}))
        return 0
    print(format_machine(machine_info(threads=1, torch_ok=False), short=True))
    print(f"random rows of {4 * width} bytes, one thread: independent loads, a dependent chain, their ratio")
    for r in out:
        print(f"  array {r['array_mb']:8.2f} MB   {r['ns_per_row']:7.1f} ns per row   "
              f"latency {r['latency_ns']:7.1f} ns   rows in flight {r['rows_in_flight']:5.1f}"
              + (f"   {r['threads']} threads: {r['ns_per_row_all_threads']:6.1f} ns per row, "
                 f"{r['gb_per_s_all_threads']:5.2f} GB/s" if "threads" in r else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
