"""What denormal floats cost the engine, and what flushing them saves.

x86 cores take a slow microcode path for denormal (subnormal) operands and
results: float32 magnitudes below 1.18e-38.  A trained LSTM's gate
derivatives (sigma'(z) of saturated gates, products of tiny factors) can hold
many of them, and they then flow through the backward GEMMs.  slimnp flushes
them to zero by default (``slimnp train --denormals flush``:
:func:`slimnp.threads.flush_denormals`); this times both settings in the same
process, interleaved round by round, on

* the engine's GEMM shapes at the PM model on WikiText-2 (2x200 LSTM, T = 20,
  B = 20, so N = 400 tokens a segment), with ``--fraction`` of the entries of
  the operand that carries gradients denormal (the rest ~N(0, 0.1));
* one training step (``forward_backward`` of a 20x20 segment) of that model
  (V = 33,278, word vectors of 6 numbers) with its LSTM and projection
  weights scaled by ``--saturate`` from the usual +-0.1 init, so that the
  gates saturate and their derivatives underflow, as in a trained model;
* with ``--checkpoint FILE --text FILE``: one training step of a stored
  model on the first 400 tokens of the text (the measurement that found the
  problem: a WikiText-2 PM checkpoint), and its exact evaluation (batch 1,
  as ``slimnp evaluate``) of the text's first 2,000 tokens.

With ``--threads 2`` or more the GEMMs are also timed with only the calling
thread flushing (OpenBLAS's worker threads left as they started, keeping
denormals): the share of the saving that needs the workers restarted.

    python bench/denormals.py [--threads 1] [--fraction 0.1] [--saturate 100] \
        [--rounds 3] [--reps 5] [--checkpoint FILE --text FILE] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from common import format_machine, machine_info  # noqa: E402  (puts the checkout on sys.path)

H, T, B, V, E = 200, 20, 20, 33_278, 6
N = T * B

# name: (M, K, N) of A (M, K) @ B (K, N), and which operand carries denormals
GEMMS = {
    "Wx forward   x (N,H) @ Wx (H,4H)": (N, H, 4 * H, "A"),
    "dWx          x^T (H,N) @ dgates (N,4H)": (H, N, 4 * H, "B"),
    "dx           dgates (N,4H) @ Wx^T (4H,H)": (N, 4 * H, H, "A"),
    "dh per step  dgates (B,4H) @ Wh^T (4H,H)": (B, 4 * H, H, "A"),
    "dW_out       dlogits^T (V,N) @ h (N,E)": (V, N, E, "B"),
}


def laden(shape, fraction: float, rng) -> np.ndarray:
    """float32 ~N(0, 0.1) with ``fraction`` of the entries denormal (between
    1e-45 and 1e-38 in magnitude, log-uniform), made while denormals are kept
    (a flushing thread would turn them into zeros)."""
    from slimnp.threads import denormals_flushed

    with denormals_flushed(False):
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        pick = rng.random(shape) < fraction
        tiny = np.exp(rng.uniform(np.log(1.5e-45), np.log(1.1e-38), pick.sum()))
        a[pick] = (tiny * rng.choice([-1.0, 1.0], pick.sum())).astype(np.float32)
    return a


def best_of(fn, reps: int) -> float:
    fn()  # warm: OpenBLAS's workers start, caches fill
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def caller_only(on: bool):
    """Context: the calling thread alone flushes (``on``); Numba's pool and
    OpenBLAS's workers keep what they have (here: the modes' restore leaves
    them keeping denormals)."""
    import contextlib

    from slimnp.kernels import cpu

    @contextlib.contextmanager
    def ctx():
        # OpenBLAS starts its workers lazily, from the thread of the first
        # threaded call after a restart: make sure they are running (with
        # the caller's setting before the change) first
        one = np.ones((256, 256), np.float32)
        one @ one
        old = cpu.set_ftz_daz(cpu.MXCSR_FTZ_DAZ if on else 0)
        try:
            yield
        finally:
            cpu.set_ftz_daz(old)

    return ctx()


def measure(fn, modes: dict, rounds: int, reps: int) -> dict:
    """Median over ``rounds`` of the best of ``reps`` calls of ``fn`` under
    each mode's context; the modes alternate within a round (and the order
    flips every round) so that background load hits them alike."""
    times = {m: [] for m in modes}
    names = list(modes)
    for r in range(rounds):
        for m in (names if r % 2 == 0 else names[::-1]):
            with modes[m]():
                times[m].append(best_of(fn, reps))
    return {m: statistics.median(t) for m, t in times.items()}


def synthetic_step(saturate: float, rng):
    from slimnp.model import LanguageModel, ModelConfig

    m = LanguageModel(ModelConfig(vocab_size=V, hidden=H, layers=2, embedding_size=E))
    m.init_params(rng)
    p = m.params_numpy()
    m.load_params({k: v * saturate for k, v in p.items() if k.startswith(("lstm", "proj"))})
    x, y = (rng.integers(0, V, (T, B)).astype(np.int32) for _ in range(2))
    return m, x, y


def checkpoint_step(path: str, text: str):
    """The stored model, the step's inputs and targets, and a function that
    evaluates the text's first 2,000 tokens exactly."""
    from slimnp.evaluate import evaluate_ids
    from slimnp.modelfile import load_model

    m, vocab, _ = load_model(path)
    with open(text, encoding="utf-8") as f:
        lines = [next(f) for _ in range(3000)]
    ids = np.asarray(vocab.encode_lines([ln.rstrip("\n") for ln in lines]), np.int32)
    evaluate = lambda: evaluate_ids(m, ids[:2000], vocab.eos_id, batch_size=1)  # noqa: E731
    return m, ids[:N].reshape(T, B), ids[1 : N + 1].reshape(T, B), evaluate


def step_fn(m, x, y):
    state = m.zero_state(B)
    return lambda: m.forward_backward(x, y, state)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="OpenBLAS and Numba threads (default 1).")
    ap.add_argument("--fraction", type=float, default=0.1, help="Share of denormal entries in the GEMMs' gradient operand.")
    ap.add_argument("--saturate", type=float, default=100.0, help="Factor on the synthetic model's LSTM and projection weights.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--checkpoint", help="A model file to time one training step of (with --text).")
    ap.add_argument("--text", help="Text whose first 400 tokens feed --checkpoint's step (2,000 its evaluation).")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if bool(args.checkpoint) != bool(args.text):
        ap.error("--checkpoint and --text go together")

    from slimnp.threads import denormals_flushed, set_threads

    set_threads(args.threads)
    info = machine_info(args.threads, False)
    if not args.json:
        print(format_machine(info, short=True))
        print(f"threads {args.threads}; medians of {args.rounds} rounds of the best of {args.reps}")
    modes = {"keep": lambda: denormals_flushed(False), "flush": lambda: denormals_flushed(True)}
    gemm_modes = dict(modes)
    if args.threads > 1:
        gemm_modes["caller only"] = lambda: caller_only(True)
    rng = np.random.default_rng(0)
    rows = []

    def report(name, t, extra=""):
        row = {"case": name, **{f"{m}_ms": round(v * 1e3, 3) for m, v in t.items()},
               "keep_over_flush": round(t["keep"] / t["flush"], 2)}
        rows.append(row)
        if not args.json:
            cols = "  ".join(f"{m} {v * 1e3:8.2f} ms" for m, v in t.items())
            print(f"{name:44s} {cols}  keep/flush {t['keep'] / t['flush']:6.2f}{extra}")

    if not args.json:
        print(f"\nGEMMs, {args.fraction:.0%} of the gradient operand denormal:")
    for name, (m_, k_, n_, which) in GEMMS.items():
        a = laden((m_, k_), args.fraction, rng) if which == "A" else laden((m_, k_), 0.0, rng)
        b = laden((k_, n_), args.fraction, rng) if which == "B" else laden((k_, n_), 0.0, rng)
        out = np.empty((m_, n_), np.float32)
        report(name, measure(lambda: np.matmul(a, b, out=out), gemm_modes, args.rounds, args.reps))
    a, b = laden((N, 4 * H), 0.0, rng), laden((4 * H, H), 0.0, rng)
    report("dx, no denormals (control)", measure(lambda: a @ b, modes, args.rounds, args.reps))

    if not args.json:
        print("\none training step (forward_backward, 20x20 tokens):")
    m, x, y = synthetic_step(args.saturate, rng)
    report(f"PM 2x200 E=6 V=33K, weights x{args.saturate:g}",
           measure(step_fn(m, x, y), modes, args.rounds, args.reps))
    m, x, y = synthetic_step(1.0, rng)
    report("PM 2x200 E=6 V=33K, fresh init (control)",
           measure(step_fn(m, x, y), modes, args.rounds, args.reps))
    if args.checkpoint:
        m, x, y, evaluate = checkpoint_step(args.checkpoint, args.text)
        report(f"checkpoint {args.checkpoint}", measure(step_fn(m, x, y), modes, args.rounds, args.reps))
        report("  its evaluation, 2,000 tokens, batch 1", measure(evaluate, modes, args.rounds, args.reps))
        ppl = {}
        for mode, ctx in modes.items():
            with ctx():
                ppl[mode] = evaluate().perplexity
        rows[-1]["perplexity"] = ppl
        if not args.json:
            print("  its perplexity: " + ", ".join(f"{m} {v!r}" for m, v in ppl.items())
                  + ("  (bit-identical)" if len(set(ppl.values())) == 1 else "  (differ)"))
    if args.json:
        print(json.dumps({"machine": info, "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
