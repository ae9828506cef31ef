"""Shared machinery of the throughput benchmarks (slimnp vs PyTorch).

``train_throughput.py`` and ``eval_throughput.py`` only say how to build one
engine for one config and what one timed step is; everything else lives here:
the config table, the Zipf data, thread settings, machine description, the
timing loop, the per-engine subprocess isolation (so peak RSS belongs to one
engine), the driver (rounds, interleaving) and the output (table / JSON).

Torch is optional: it is imported only inside the torch engine (and, for the
version line, in the parent), never in a slimnp child.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# slimnp sets this at import (see slimnp/__init__.py); NumPy is imported
# below, before slimnp, so set it here for the slimnp engine.  PyTorch uses
# its own BLAS and threads and is unaffected.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # benchmark the checkout these scripts live in
    sys.path.insert(0, REPO)

# name -> shape: L layers x H hidden, V vocabulary, T bptt steps, B batch
CONFIGS = {
    "A": dict(L=2, H=200, V=10_000, T=20, B=20),
    "B": dict(L=2, H=300, V=10_000, T=35, B=20),
    "C": dict(L=2, H=650, V=10_000, T=35, B=20),
    "D": dict(L=2, H=512, V=100_000, T=20, B=20),
    # WikiText-2's vocabulary with the small recipe (issue 5's loss comparison)
    "W": dict(L=2, H=200, V=33_278, T=20, B=20),
}

# slimnp model variants: extra ModelConfig fields on top of the dense model.
# A new variant is one entry here, e.g. "slim": {"embedding": "slim", ...};
# if this checkout's ModelConfig does not know the fields, the variant is
# reported as unavailable.
VARIANTS = {
    "dense": {},
    # the issue's slim setting: input K=10 at 10% of the dense table
    # (M = 0.1*K*V), output K=10 at 1/10 (M/K = V/10); K=8 where 10 does
    # not divide H (config D, H = 512)
    "slim": {"input": "slim", "input_k": 10, "input_ratio": 0.1,
             "output": "slim", "output_k": 10, "output_ratio": 0.1},
    # the adaptive softmax (Grave et al. 2017); PyTorch runs
    # nn.AdaptiveLogSoftmaxWithLoss with the same cutoffs (TORCH_VARIANTS)
    "adaptive": {"output": "adaptive", "cutoffs": (2000, 10000), "div_value": 4.0},
}
# variants PyTorch has an equivalent of; the others are compared with its dense model
TORCH_VARIANTS = ("dense", "adaptive")


def torch_variant(variant: str) -> str:
    return variant if variant in TORCH_VARIANTS else "dense"


def variant_fields(cfg: dict, variant: str) -> dict:
    """``VARIANTS[variant]`` for config ``cfg``: adaptive cutoffs at or above
    V dropped (configs A-C, V = 10K: one tail cluster from 2000 on)."""
    extra = dict(VARIANTS[variant])
    if "cutoffs" in extra:
        extra["cutoffs"] = tuple(c for c in extra["cutoffs"] if c < cfg["V"])
    return extra

ENGINES = ("slimnp", "torch")
NO_TORCH_ENV = "SLIMNP_BENCH_NO_TORCH"
_CHILD_MARK = "@@BENCH_RESULT@@ "


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def shape_str(c: dict) -> str:
    v = f"{c['V'] // 1000}K" if c["V"] % 1000 == 0 else str(c["V"])
    return f"{c['L']}x{c['H']} V{v} T{c['T']} B{c['B']}"


def parse_list(s: str, allowed, what: str) -> list:
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {what} {', '.join(bad) or repr(s)}; choose from {', '.join(allowed)}")
    return items


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------
def zipf_streams(V: int, B: int, n: int, seed: int = 0, s: float = 1.0) -> np.ndarray:
    """``(B, n)`` int32 token ids drawn i.i.d. from a Zipf law over ``V`` words.

    ``p(k) ~ 1 / (k + 1)^s`` for id ``k`` (id 0 the most frequent), seeded,
    so both engines see exactly the same stream.
    """
    p = 1.0 / np.arange(1, V + 1, dtype=np.float64) ** s
    p /= p.sum()
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.choice(V, size=(B, n), p=p).astype(np.int32)


def segments(cfg: dict, nseg: int, seed: int = 0) -> list:
    """``nseg`` consecutive, distinct BPTT segments ``(x, y)``, time-major (T, B) int32."""
    T, B = cfg["T"], cfg["B"]
    streams = zipf_streams(cfg["V"], B, nseg * T + 1, seed)
    return [(np.ascontiguousarray(streams[:, i * T:(i + 1) * T].T),
             np.ascontiguousarray(streams[:, i * T + 1:(i + 1) * T + 1].T))
            for i in range(nseg)]


# ----------------------------------------------------------------------------
# threads and machine
# ----------------------------------------------------------------------------
def blas_threads():
    from slimnp.threads import blas_threads as get

    return get()


def set_threads(n: int, engine: str) -> None:
    """Give ``engine`` ``n`` threads: torch intra-op threads, or slimnp's BLAS + Numba."""
    if engine == "torch":
        import torch

        torch.set_num_threads(n)
        return
    from slimnp.threads import set_threads as slimnp_set_threads

    slimnp_set_threads(n)


def torch_status(no_torch: bool):
    """``(available, note)``; ``--no-torch`` or ``SLIMNP_BENCH_NO_TORCH=1`` simulate its absence."""
    if no_torch or os.environ.get(NO_TORCH_ENV, "") not in ("", "0"):
        return False, "torch disabled (--no-torch / SLIMNP_BENCH_NO_TORCH): slimnp only, ratio null"
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed (pip install torch==2.13.0): slimnp only, ratio null"
    try:
        import torch  # noqa: F401  (the parent only; slimnp children never import it)
    except Exception as exc:
        return False, f"torch does not import ({type(exc).__name__}: {exc}): slimnp only, ratio null"
    return True, None


def machine_info(threads: int, torch_ok: bool) -> dict:
    """slimnp.machine's description of this machine, with the load, the
    libraries and the thread settings a throughput depends on."""
    from slimnp import machine

    info = {"cpu": machine.cpu_name(), "cores": os.cpu_count(), "usable_cores": machine.usable_cores(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "numpy": np.__version__}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
        # the kernel set OpenBLAS picked at load time (not the build's target in its configuration string)
        from slimnp.threads import blas_core

        info["blas_kernel"] = blas_core() or "unknown"
    except Exception:
        info["blas"], info["blas_kernel"] = "unknown", "unknown"
    info["l3_cache"] = machine.l3_cache()
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads_default"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        info["numba"] = None
    info["blas_threads_default"] = blas_threads()
    info["torch"] = None
    if torch_ok:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads_default"] = torch.get_num_threads()
    info["threads"] = threads
    info["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                              "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
                   if k in os.environ}
    return info


def format_machine(m: dict, short: bool = False) -> str:
    """The machine lines of a benchmark's output (``short``: CPU and
    libraries only, for the benchmarks that do not compare engines)."""
    lines = [f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
             f"L3 {m.get('l3_cache', 'unknown')}, load average {' '.join(map(str, m['loadavg']))}",
             f"python {m['python']}, numpy {m['numpy']} (BLAS: {m['blas']}, "
             f"kernel {m.get('blas_kernel', 'unknown')}), "
             f"numba {m['numba']}, torch {m['torch'] or 'n/a'}",
             f"threads: --threads {m['threads']} for both engines (torch.set_num_threads; "
             f"slimnp OpenBLAS + Numba); library defaults: OpenBLAS "
             f"{m['blas_threads_default']}, Numba {m.get('numba_threads_default')}, "
             f"torch {m.get('torch_threads_default', 'n/a')}"]
    if short:
        lines = lines[:2]
    if m["env"]:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in m["env"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# slimnp / torch model construction (shared by train and eval)
# ----------------------------------------------------------------------------
class Unavailable(Exception):
    """The engine / variant cannot be built in this checkout."""


def slimnp_config(cfg: dict, variant: str):
    """The slimnp ``ModelConfig`` of ``cfg`` + ``VARIANTS[variant]`` (or :class:`Unavailable`)."""
    from slimnp.model import ModelConfig

    d = dict(vocab_size=cfg["V"], hidden=cfg["H"], layers=cfg["L"], dropout=0.0)
    try:
        from slimnp.options import slim_settings

        extra = variant_fields(cfg, variant)
        for side in ("input", "output"):
            # K must divide H: where 10 does not (D: H = 512), the largest
            # divisor of H up to K (8 for D, the paper's Table 7 choice)
            k = extra.get(f"{side}_k")
            if k and cfg["H"] % k:
                extra[f"{side}_k"] = max(j for j in range(1, k + 1) if cfg["H"] % j == 0)
        settings = slim_settings(extra, cfg["V"]) if extra else {}
        d.update(settings)
        # fields slim_settings does not translate (the adaptive softmax's) pass as they are
        d.update({k: v for k, v in extra.items() if k not in settings and not k.endswith("_ratio")})
        mc = ModelConfig.from_dict(d)
        mc.validate()
    except (TypeError, ValueError) as exc:
        raise Unavailable(f"variant {variant!r} unavailable in this slimnp: {exc}") from None
    return mc


def build_slimnp(cfg: dict, variant: str):
    from slimnp.backend import make_rng
    from slimnp.model import LanguageModel

    model = LanguageModel(slimnp_config(cfg, variant))
    model.init_params(make_rng(0))
    return model


def slimnp_trainer(model, B: int, lr: float = 1.0, optimizer: str = "sgd", sampled=None):
    """A :class:`slimnp.trainer.Trainer` around ``model`` whose ``step`` the
    benchmarks time: the trainer's own training step on B streams (zero the
    gradients, forward + BPTT from the carried state, clip at 5, update with
    ``optimizer`` at ``lr``; the loss summed over time, averaged over the
    batch).  ``sampled``: a :class:`slimnp.sampled_losses.Sampled` objective
    (its own noise law and generator) instead of the full softmax.  The
    trainer has no text of its own (the benchmarks pass their segments to
    ``step``) and writes no file."""
    from slimnp.data import EOS, UNK, Vocabulary
    from slimnp.trainer import TrainConfig, Trainer

    V = model.config.vocab_size
    vocab = Vocabulary([EOS, UNK] + [f"w{i}" for i in range(V - 2)])
    loss = "softmax" if sampled is None else sampled.kind
    cfg = TrainConfig(batch_size=B, lr=lr, optimizer=optimizer, clip=5.0, loss=loss,
                      samples=1 if sampled is None else sampled.S)
    trainer = Trainer(model, vocab, np.zeros(2 * B, np.int32), None, cfg, os.devnull,
                      log=lambda m: None, progress=False)
    trainer.sampled = sampled
    return trainer


def build_torch(cfg: dict, variant: str = "dense"):
    """The Zaremba model in PyTorch: Embedding -> L-layer LSTM -> Linear, float32;
    for ``variant`` 'adaptive' an ``nn.AdaptiveLogSoftmaxWithLoss`` (the slimnp
    variant's cutoffs and div_value) instead of the Linear.  ``nll_sum(x, y,
    state)`` gives the segment's summed NLL and the final state."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ZarembaLM(nn.Module):
        def __init__(self, V, H, L):
            super().__init__()
            self.embedding = nn.Embedding(V, H)
            self.lstm = nn.LSTM(H, H, L)  # time-major (T, B, H)
            if variant == "adaptive":
                a = variant_fields(cfg, "adaptive")
                self.output = nn.AdaptiveLogSoftmaxWithLoss(H, V, list(a["cutoffs"]),
                                                            div_value=a["div_value"])
            else:
                self.output = nn.Linear(H, V)

        def forward(self, x, state):
            h, state = self.lstm(self.embedding(x), state)
            return self.output(h), state

        def nll_sum(self, x, y, state):
            h, state = self.lstm(self.embedding(x), state)
            h = h.reshape(-1, h.shape[-1])
            if variant == "adaptive":
                return -self.output(h, y.reshape(-1)).output.sum(), state
            return F.cross_entropy(self.output(h), y.reshape(-1), reduction="sum"), state

    torch.manual_seed(0)
    model = ZarembaLM(cfg["V"], cfg["H"], cfg["L"]).float()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.1, 0.1)
    return model


def torch_zero_state(cfg: dict):
    import torch

    z = torch.zeros(cfg["L"], cfg["B"], cfg["H"], dtype=torch.float32)
    return (z, z.clone())


def torch_ids(x, y):
    import torch

    return torch.from_numpy(x).long(), torch.from_numpy(y).long()


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------
def time_steps(step, segs, warmup: int, steps: int, first_loss: list | None = None) -> list:
    """Run ``warmup`` untimed then ``steps`` timed calls of ``step(x, y)``; step seconds.

    ``step`` returns the segment's summed NLL; the first one (per token) is
    appended to ``first_loss`` if given (an equivalence check between engines).
    """
    n = len(segs)
    k = 0
    for _ in range(warmup):
        x, y = segs[k % n]
        loss = step(x, y)
        if first_loss is not None and not first_loss:
            first_loss.append(loss / x.size)
        k += 1
    times = []
    for _ in range(steps):
        x, y = segs[k % n]
        t0 = time.perf_counter()
        loss = step(x, y)
        times.append(time.perf_counter() - t0)
        if first_loss is not None and not first_loss:
            first_loss.append(loss / x.size)
        k += 1
    return times


def summarize(times: list, tokens: int) -> dict:
    """Median tok/s (``tokens`` / median step time), the min-max range and step spread."""
    med = statistics.median(times)
    return {"tok_s": tokens / med, "tok_s_min": tokens / max(times), "tok_s_max": tokens / min(times),
            "step_ms": {"median": med * 1e3, "min": min(times) * 1e3, "max": max(times) * 1e3,
                        "n": len(times), "all": [round(t * 1e3, 3) for t in times]}}


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kb / (1 << 20 if sys.platform == "darwin" else 1024), 1)


# ----------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------
def make_parser(description: str, extra=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma-separated configs: " + "; ".join(
                       f"{k} = {shape_str(v)}" for k, v in CONFIGS.items()))
    p.add_argument("--variant", default="dense",
                   help="comma-separated slimnp variants: " + ", ".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per engine and round")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds; engines alternate within each round (order flips each round)")
    p.add_argument("--threads", type=int, default=2, help="threads for each engine")
    p.add_argument("--seed", type=int, default=0, help="seed of the Zipf token stream")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each engine/config/round in its own subprocess (per-engine peak RSS)")
    p.add_argument("--no-torch", action="store_true",
                   help=f"skip torch as if it were not installed (also: {NO_TORCH_ENV}=1)")
    p.add_argument("--json", action="store_true",
                   help="print the results as a JSON list on stdout (human text goes to stderr)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    if extra:
        extra(p)
    return p


def _measure(bench, engine: str, cfg: dict, variant: str, args, segs) -> dict:
    """Build ``engine`` for ``cfg`` and time it; a result dict (in-process)."""
    set_threads(args.threads, engine)
    if engine == "slimnp":
        step = bench.slimnp_step(build_slimnp(cfg, variant), cfg, args)
    else:
        step = bench.torch_step(build_torch(cfg, variant), cfg, args)
    first = []
    times = time_steps(step, segs, args.warmup, args.steps, first)
    return {"times": times, "first_loss": first[0] if first else None}


def _child_main(bench, args) -> None:
    engine, name, variant = args._child.split(":")
    cfg = CONFIGS[name]
    try:
        segs = segments(cfg, args.warmup + args.steps, args.seed)
        res = _measure(bench, engine, cfg, variant, args, segs)
    except Unavailable as exc:
        res = {"unavailable": str(exc)}
    res["peak_rss_mb"] = peak_rss_mb()
    print(_CHILD_MARK + json.dumps(res), flush=True)


def _run_child(script: str, args, engine: str, name: str, variant: str) -> dict:
    cmd = [sys.executable, script, "--_child", f"{engine}:{name}:{variant}",
           "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += [a for a in args.extra_argv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for ln in reversed(proc.stdout.splitlines()):
        if ln.startswith(_CHILD_MARK):
            return json.loads(ln[len(_CHILD_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"child exited {proc.returncode}: " + " | ".join(tail)}


def _merge(acc: dict, res: dict) -> None:
    """Fold one round's result into an engine's accumulator."""
    for k in ("unavailable", "error"):
        if k in res:
            acc.setdefault(k, res[k])
    acc["times"].extend(res.get("times", []))
    if res.get("first_loss") is not None and acc.get("first_loss") is None:
        acc["first_loss"] = res["first_loss"]
    if res.get("peak_rss_mb") is not None:
        acc["peak_rss_mb"] = max(acc.get("peak_rss_mb") or 0.0, res["peak_rss_mb"])


def run(bench, description: str, script: str, argv=None, extra=None, extra_keys=()) -> list:
    """Parse ``argv`` and run the benchmark described by module ``bench``.

    ``bench`` provides ``KIND`` ('train' / 'eval'), ``slimnp_step(model, cfg,
    args)`` and ``torch_step(model, cfg, args)``, each returning a callable
    ``step(x, y) -> summed NLL`` that carries its own state between calls.
    ``extra`` adds script options; ``extra_keys`` names them (passed to children).
    """
    args = make_parser(description, extra).parse_args(argv)
    args.extra_argv = []
    for k in extra_keys:
        args.extra_argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args._child:
        _child_main(bench, args)
        return []
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit("--steps, --rounds and --threads must be >= 1, --warmup >= 0")
    names = parse_list(args.configs, CONFIGS, "config")
    variants = parse_list(args.variant, VARIANTS, "variant")
    torch_ok, note = torch_status(args.no_torch)
    machine = machine_info(args.threads, torch_ok)
    out = log if args.json else print
    out(format_machine(machine))
    out(f"{bench.KIND}: warm-up {args.warmup}, {args.steps} timed steps x {args.rounds} rounds per engine, "
        f"{'isolated subprocesses' if args.isolate else 'in-process (no RSS)'}")
    if note:
        out("NOTE: " + note)
    if machine["loadavg"][0] > (machine["usable_cores"] or 1) and args.threads > 1:
        out(f"WARNING: load average {machine['loadavg'][0]} exceeds the {machine['usable_cores']} usable "
            f"cores; with --threads {args.threads} spinning BLAS/OpenMP threads can slow both "
            "engines by an order of magnitude (compare --threads 1)")

    # slimnp variants this checkout cannot build are known before anything runs
    unavailable = {}
    for v in variants:
        try:
            slimnp_config(CONFIGS[names[0]], v)
        except Unavailable as exc:
            unavailable[v] = str(exc)
            out("NOTE: " + str(exc))
    # (engine, variant) jobs per config; torch: its equivalent of each variant
    jobs = [("slimnp", v) for v in variants if v not in unavailable]
    if torch_ok:
        jobs += [("torch", t) for t in dict.fromkeys(torch_variant(v) for v in variants)]
    acc = {(n, e, v): {"times": []} for n in names for e, v in jobs}

    if args.isolate:
        for r in range(args.rounds):
            for n in names:
                order = jobs if r % 2 == 0 else jobs[::-1]
                for e, v in order:
                    res = _run_child(script, args, e, n, v)
                    _merge(acc[(n, e, v)], res)
                    _progress(r, args.rounds, n, e, v, res, CONFIGS[n])
    else:
        for n in names:
            cfg = CONFIGS[n]
            segs = segments(cfg, args.warmup + args.steps, args.seed)
            steps = {}
            for e, v in jobs:  # build and warm up every engine once
                set_threads(args.threads, e)
                try:
                    model = build_slimnp(cfg, v) if e == "slimnp" else build_torch(cfg, v)
                except Unavailable as exc:
                    acc[(n, e, v)]["unavailable"] = str(exc)
                    continue
                steps[(e, v)] = (bench.slimnp_step if e == "slimnp" else bench.torch_step)(model, cfg, args)
                first = []
                time_steps(steps[(e, v)], segs, args.warmup, 0, first)
                acc[(n, e, v)]["first_loss"] = first[0] if first else None
            for r in range(args.rounds):
                order = jobs if r % 2 == 0 else jobs[::-1]
                for e, v in order:
                    if (e, v) not in steps:
                        continue
                    set_threads(args.threads, e)
                    res = {"times": time_steps(steps[(e, v)], segs, 0, args.steps)}
                    _merge(acc[(n, e, v)], res)
                    _progress(r, args.rounds, n, e, v, res, cfg)
            del steps

    results = []
    for n in names:
        cfg = CONFIGS[n]
        tokens = cfg["T"] * cfg["B"]
        for v in variants:
            tacc = acc.get((n, "torch", torch_variant(v)), {"times": []})
            tsum = summarize(tacc["times"], tokens) if tacc["times"] else None
            row = {"benchmark": bench.KIND, "config": n, "shape": shape_str(cfg), **cfg,
                   "variant": v, "slimnp_tok_s": None, "torch_tok_s": None, "ratio": None,
                   "slimnp": None, "torch": tsum,
                   "peak_rss_mb": {"slimnp": None, "torch": tacc.get("peak_rss_mb")},
                   "first_loss_per_token": {"slimnp": None, "torch": tacc.get("first_loss")},
                   "notes": []}
            if v in unavailable:
                row["notes"].append(unavailable[v])
            sacc = acc.get((n, "slimnp", v), {"times": []})
            for k in ("unavailable", "error"):
                for a, e in ((sacc, "slimnp"), (tacc, "torch")):
                    if k in a:
                        row["notes"].append(f"{e}: {a[k]}")
            if sacc["times"]:
                row["slimnp"] = summarize(sacc["times"], tokens)
                row["slimnp_tok_s"] = row["slimnp"]["tok_s"]
            row["peak_rss_mb"]["slimnp"] = sacc.get("peak_rss_mb")
            row["first_loss_per_token"]["slimnp"] = sacc.get("first_loss")
            if tsum:
                row["torch_tok_s"] = tsum["tok_s"]
            if row["slimnp_tok_s"] and row["torch_tok_s"]:
                row["ratio"] = row["slimnp_tok_s"] / row["torch_tok_s"]
            if not torch_ok:
                row["notes"].append(note)
            row["machine"] = machine
            row["settings"] = {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                               "threads": args.threads, "isolate": args.isolate, "seed": args.seed,
                               **{k: getattr(args, k) for k in extra_keys}}
            results.append(row)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_table(results))
    return results


def _progress(r, rounds, name, engine, variant, res, cfg):
    label = f"  round {r + 1}/{rounds} {name} {engine:6s}" + (f" ({variant})" if variant != "dense" else "")
    if res.get("times"):
        s = summarize(res["times"], cfg["T"] * cfg["B"])
        rss = f", peak RSS {res['peak_rss_mb']:.0f} MB" if res.get("peak_rss_mb") else ""
        log(f"{label}: {s['tok_s']:,.0f} tok/s (median step {s['step_ms']['median']:.1f} ms){rss}")
    else:
        log(f"{label}: {res.get('unavailable') or res.get('error')}")


# ----------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------
def _speed(s) -> str:
    if not s:
        return "n/a"
    return f"{s['tok_s']:,.0f} [{s['tok_s_min']:,.0f}-{s['tok_s_max']:,.0f}]"


def _num(x, fmt) -> str:
    return "n/a" if x is None else format(x, fmt)


def format_table(rows: list) -> str:
    head = ["config", "shape", "variant", "slimnp tok/s [min-max]", "torch tok/s [min-max]",
            "slimnp/torch", "RSS slimnp MB", "RSS torch MB"]
    body = [[r["config"], r["shape"], r["variant"], _speed(r["slimnp"]), _speed(r["torch"]),
             _num(r["ratio"], ".2f"), _num(r["peak_rss_mb"]["slimnp"], ".0f"),
             _num(r["peak_rss_mb"]["torch"], ".0f")] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {3, 4, 5, 6, 7}

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
    for r in rows:
        fl = r["first_loss_per_token"]
        if fl["slimnp"] is not None or fl["torch"] is not None:
            out.append(f"{r['config']}/{r['variant']}: first-step loss per token slimnp "
                       f"{_num(fl['slimnp'], '.4f')}, torch {_num(fl['torch'], '.4f')}")
        for note in dict.fromkeys(r["notes"]):
            out.append(f"{r['config']}/{r['variant']}: {note}")
    return "\n".join(out)
