"""Large-vocabulary training: slim vs dense layers, memory and speed.

The setting of the paper's One Billion Word runs, scaled to one CPU box:
V = 793,471 words, an L x H LSTM, slim input at 1/32 and slim output at 1/8
(K = 8 sub-vectors each), trained with importance sampling (S proposals per
minibatch) -- against the same model with dense input and output layers.
Each variant runs in its own process (its peak RSS is its own) for a few
training steps on Zipf-distributed word ids; the table gives parameters,
the bytes that parameters + gradients + optimizer state need (computed),
the measured peak RSS, and tokens/s (median step).

A dense variant that would not fit in memory is not started: its row says
so, with the computed need.

    python bench/large_vocab.py                       # slim and dense, SGD
    python bench/large_vocab.py --optimizer adagrad --variants slim
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _config(a, variant):
    from slimnp.model import ModelConfig

    kw = {}
    if variant == "slim":
        K = 8
        kw = dict(input="slim", input_k=K, input_m=int(round(a.vocab * K / 32)),
                  output="slim", output_k=K, output_m=K * int(round(a.vocab / 8)))
    return ModelConfig(vocab_size=a.vocab, hidden=a.hidden, layers=a.layers, **kw)


def _state_bytes(cfg, optimizer):
    """Parameters + gradients (+ one Adagrad accumulator), float32."""
    import numpy as np

    from slimnp.model import param_shapes

    n = sum(int(np.prod(s)) for s in param_shapes(cfg).values())
    copies = 3 if optimizer == "adagrad" else 2
    return n, n * 4 * copies


def child(a, variant):
    import numpy as np

    from slimnp.model import LanguageModel
    from slimnp.optim import make_optimizer
    from slimnp.sampled_losses import Sampled, prepare_model
    from slimnp.alias_sampler import AliasSampler

    cfg = _config(a, variant)
    rng = np.random.default_rng(0)
    model = LanguageModel(cfg)
    model.init_params(rng)
    prepare_model(model, a.loss)
    # Zipf(1) word frequencies, as in natural text
    p = 1.0 / np.arange(1, a.vocab + 1)
    p /= p.sum()
    sampler = AliasSampler(p)
    noise = AliasSampler(p ** 0.75 / (p ** 0.75).sum())
    sampled = Sampled(a.loss, a.samples, noise, rng) if a.loss != "softmax" else None
    opt = make_optimizer(a.optimizer, 5.0)
    state = model.zero_state(a.batch)
    times = []
    for step in range(a.warmup + a.steps):
        ids = sampler.sample(rng, (a.bptt + 1) * a.batch).reshape(a.bptt + 1, a.batch)
        x, y = np.ascontiguousarray(ids[:-1]), np.ascontiguousarray(ids[1:])
        t0 = time.perf_counter()
        model.store.zero_grad(lazy=True)
        _, state, _ = model.forward_backward(x, y, state, 1.0 / a.batch, sampled=sampled)
        opt.step(model.store.data, model.store.grad, a.lr, model.store.segments())
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    n, need = _state_bytes(cfg, a.optimizer)
    print(json.dumps({"variant": variant, "parameters": n, "state_bytes": need,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "step_ms": med * 1e3, "tok_s": a.bptt * a.batch / med}))


def _available_bytes():
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=793_471)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bptt", type=int, default=20)
    ap.add_argument("--loss", choices=("is", "nce", "softmax"), default="is")
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--optimizer", choices=("sgd", "adagrad"), default="sgd")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default="slim,dense")
    ap.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a, a.child)
    rows = []
    for v in a.variants.split(","):
        n, need = _state_bytes(_config(a, v), a.optimizer)
        if need > 0.9 * _available_bytes():
            rows.append({"variant": v, "parameters": n, "state_bytes": need, "skipped":
                         f"needs {need / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} GiB available"})
            continue
        cmd = [sys.executable, __file__, "--child", v] + [f"--{k.replace('_', '-')}={val}" for k, val in
                                                          vars(a).items() if k not in ("child", "json", "variants")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"variant": v, "parameters": n, "state_bytes": need,
                         "skipped": f"failed: {out.stderr.strip().splitlines()[-1:]}"})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if a.json:
        print(json.dumps(rows))
        return
    from common import format_machine, machine_info  # bench/ is sys.path[0]

    print(format_machine(machine_info(threads=0, torch_ok=False), short=True))
    print(f"V={a.vocab:,} {a.layers}x{a.hidden} T={a.bptt} B={a.batch} loss={a.loss} S={a.samples} "
          f"optimizer={a.optimizer}; slim: K=8, input 1/32, output 1/8")
    print(f"{'variant':8} {'parameters':>14} {'params+grads+opt':>17} {'peak RSS':>10} {'tok/s':>8}")
    for r in rows:
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if "peak_rss_bytes" in r else "-"
        tok = f"{r['tok_s']:,.0f}" if "tok_s" in r else "-"
        print(f"{r['variant']:8} {r['parameters']:>14,} {r['state_bytes'] / 2**30:>13.2f} GiB {rss:>10} {tok:>8}"
              + (f"  ({r['skipped']})" if "skipped" in r else ""))
    by = {r["variant"]: r for r in rows}
    if "slim" in by and "dense" in by:
        s, d = by["slim"], by["dense"]
        print(f"dense/slim: parameters {d['parameters'] / s['parameters']:.1f}x"
              + (f", peak RSS {d['peak_rss_bytes'] / s['peak_rss_bytes']:.1f}x" if "peak_rss_bytes" in d else "")
              + (f", slim speed {s['tok_s'] / d['tok_s']:.2f}x dense" if "tok_s" in d else ""))


if __name__ == "__main__":
    main()
