"""slimnp's own throughput at two commits, interleaved: did a change slow it?

A refactor must not cost speed; on a shared machine one timing before and
one after says little.  This checks out both commits into temporary git
worktrees, then runs ``train_throughput.py --no-torch`` (each commit's own
copy, importing its own slimnp) for one commit, then the other, then the
other way round, for ``--rounds`` pairs, and reports per config and variant
the median tok/s of each commit and their ratio, with the spread of the
per-round ratios.

    python bench/compare_commits.py d292529 HEAD --configs A,B --variant dense,slim --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import format_machine, machine_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args) -> str:
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, text=True).stdout.strip()


def _measure(tree: str, a) -> dict:
    """``{(config, variant): tok/s}`` of one run of ``tree``'s train_throughput.py."""
    cmd = [sys.executable, os.path.join(tree, "bench", "train_throughput.py"), "--no-torch", "--json",
           "--configs", a.configs, "--variant", a.variant, "--threads", str(a.threads),
           "--steps", str(a.steps), "--rounds", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=tree)
    rows = json.loads(out.stdout)
    return {(r["config"], r.get("variant", "dense")): r["slimnp_tok_s"] for r in rows
            if r.get("slimnp_tok_s")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--configs", default="A,B")
    p.add_argument("--variant", default="dense,slim")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    revs = {"before": _git("rev-parse", "--short", a.before), "after": _git("rev-parse", "--short", a.after)}
    print(format_machine(machine_info(a.threads, False), short=True), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="slimnp-ab-") as tmp:
        trees = {}
        for side, rev in revs.items():
            trees[side] = os.path.join(tmp, side)
            _git("worktree", "add", "--detach", trees[side], rev)
        try:
            seen = {"before": [], "after": []}
            for rnd in range(a.rounds):
                order = ("before", "after") if rnd % 2 == 0 else ("after", "before")
                for side in order:
                    seen[side].append(_measure(trees[side], a))
                    print(f"round {rnd + 1}/{a.rounds} {side} ({revs[side]}): "
                          + ", ".join(f"{c}/{v} {t:,.0f} tok/s" for (c, v), t in seen[side][-1].items()),
                          file=sys.stderr, flush=True)
        finally:
            for t in trees.values():
                subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", t], capture_output=True)
    print(f"{'config':8}{'variant':9}{revs['before']:>12}{revs['after']:>12}{'after/before':>14}"
          f"{'per-round range':>20}")
    for key in seen["before"][0]:
        b = [r[key] for r in seen["before"] if key in r]
        f = [r[key] for r in seen["after"] if key in r]
        ratios = [y / x for x, y in zip(b, f)]
        print(f"{key[0]:8}{key[1]:9}{statistics.median(b):12,.0f}{statistics.median(f):12,.0f}"
              f"{statistics.median(f) / statistics.median(b):14.3f}"
              f"{f'{min(ratios):.3f}-{max(ratios):.3f}':>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
