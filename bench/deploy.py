"""Deployment speed: slimnp vs ONNX Runtime on the exported file vs PyTorch eager.

Two PTB-small-shaped models (2x200, V = 10K), built here with random weights
(speed does not depend on the weights): the dense model and its 1/8 slim
twin (input K = 8 with a pool of M = K V / 8, output K = 8 with pools of
V / 8 entries: sub-vectors of 25 numbers, the dynamic programming output
layer).  Each engine runs:

* ``stream``: per-token latency at B = 1, the step of a streaming decoder or
  scorer -- one token in, the next token's distribution over all V words
  and the new state out;
* ``score``: scoring throughput at B = 32 streams of T = 35 tokens, the
  log-probability of each next token.  slimnp and PyTorch run each segment
  as one call (the input projections and the output layer batched over
  T*B rows); the exported ONNX graph is a *step*, so ONNX Runtime runs T
  calls of B rows.

Engines: ``slimnp`` (``LanguageModel.nll``, what ``slimnp score`` runs),
``onnxruntime`` (``slimnp.export.export_onnx``'s file, CPU provider) and
``torch`` (``nn.Embedding``/``nn.LSTM``/``nn.Linear`` with the dense model's
weights, eager, ``inference_mode``, with its default oneDNN LSTM and
without it, ``torch no-dnn``; dense only; skipped when PyTorch is not
installed).  Before timing, every engine's per-token log-probabilities of a
segment are checked against slimnp's.  All engines get ``--threads`` threads.

    python bench/deploy.py                  # both models, 1 thread
    python bench/deploy.py --threads 2 --json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

import common  # bench/common.py (puts this checkout on sys.path): machine, threads, Zipf data

import numpy as np

V, H, L = 10_000, 200, 2
T_SCORE, B_SCORE = 35, 32
MODELS = {
    "dense": {},
    # the paper's 1/8 on both sides with K = 8 (d = H/K = 25: the DP output layer)
    "slim": dict(input="slim", input_k=8, input_m=V * 8 // 8, output="slim", output_k=8,
                 output_m=8 * (V // 8)),
}


def build(kind: str):
    from slimnp.backend import make_rng
    from slimnp.data import EOS, UNK, Vocabulary
    from slimnp.model import LanguageModel, ModelConfig

    model = LanguageModel(ModelConfig(vocab_size=V, hidden=H, layers=L, **MODELS[kind]))
    model.init_params(make_rng(0))
    return model, Vocabulary([EOS, UNK] + [f"w{i}" for i in range(V - 2)])


# ----------------------------------------------------------------------------
# engines: each gives stream(ids (1,), state) -> state and score(x, y (T, B)) -> nll (T, B)
# ----------------------------------------------------------------------------
class Slimnp:
    name = "slimnp"

    def __init__(self, model):
        self.m = model

    def zero(self, B):
        return self.m.zero_state(B)

    def stream(self, tok, state):
        # one token; the full softmax over V is computed for its nll
        x = np.asarray(tok, np.int32).reshape(1, -1)
        _, state = self.m.nll(x, x, state)
        return state

    def score(self, x, y, state):
        nll, _ = self.m.nll(x, y, state)
        return nll


class Onnx:
    name = "onnxruntime"

    def __init__(self, path, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def zero(self, B):
        return np.zeros((L, 2, B, H), np.float32)

    def stream(self, tok, state):
        _, state = self.s.run(["log_probs", "new_state"], {"ids": np.asarray(tok, np.int64),
                                                            "state": state})
        return state

    def score(self, x, y, state):
        T, B = x.shape
        nll = np.empty((T, B))
        for t in range(T):
            lp, state = self.s.run(["log_probs", "new_state"], {"ids": x[t].astype(np.int64),
                                                                 "state": state})
            nll[t] = -lp[np.arange(B), y[t]]
        return nll


class Torch:
    """``mkldnn``: PyTorch's default CPU LSTM (oneDNN); False runs its native
    kernels (``torch.backends.mkldnn.flags(enabled=False)``)."""

    def __init__(self, model, mkldnn=True):
        import torch
        from torch import nn

        p = model.params_numpy()
        self.torch, self.mkldnn = torch, mkldnn
        self.name = "torch eager" if mkldnn else "torch no-dnn"
        self.emb = nn.Embedding(V, H)
        self.lstm = nn.LSTM(H, H, L)  # time-major
        self.out = nn.Linear(H, V)
        # slimnp's gates [i f o g] (slimnp.kernels.reference) -> torch's [i f g o]
        perm = np.concatenate([np.arange(k * H, (k + 1) * H) for k in (0, 1, 3, 2)])
        with torch.no_grad():
            self.emb.weight.copy_(torch.from_numpy(p["embedding/W"]))
            for l in range(L):
                getattr(self.lstm, f"weight_ih_l{l}").copy_(torch.from_numpy(p[f"lstm{l}/Wx"].T[perm]))
                getattr(self.lstm, f"weight_hh_l{l}").copy_(torch.from_numpy(p[f"lstm{l}/Wh"].T[perm]))
                getattr(self.lstm, f"bias_ih_l{l}").copy_(torch.from_numpy(p[f"lstm{l}/b"][perm]))
                getattr(self.lstm, f"bias_hh_l{l}").zero_()
            self.out.weight.copy_(torch.from_numpy(p["output/W"]))
            self.out.bias.copy_(torch.from_numpy(p["output/b"]))

    def zero(self, B):
        z = self.torch.zeros(L, B, H)
        return (z, z.clone())

    def _run(self, x, state):
        with self.torch.backends.mkldnn.flags(enabled=self.mkldnn):
            h, state = self.lstm(self.emb(x), state)
            return self.torch.log_softmax(self.out(h), dim=-1), state

    def stream(self, tok, state):
        with self.torch.inference_mode():
            _, state = self._run(self.torch.as_tensor(np.asarray(tok, np.int64)).view(1, -1), state)
        return state

    def score(self, x, y, state):
        torch = self.torch
        with torch.inference_mode():
            lp, _ = self._run(torch.from_numpy(x.astype(np.int64)), state)
            return -torch.gather(lp, 2, torch.from_numpy(y.astype(np.int64))[..., None])[..., 0].numpy()


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------
def time_stream(engine, toks, warmup):
    state = engine.zero(1)
    for t in toks[:warmup]:
        state = engine.stream(t[None], state)
    times = []
    for t in toks[warmup:]:
        t0 = time.perf_counter()
        state = engine.stream(t[None], state)
        times.append(time.perf_counter() - t0)
    return times


def time_score(engine, segs, warmup):
    times = []
    for i, (x, y) in enumerate(segs):
        t0 = time.perf_counter()
        engine.score(x, y, engine.zero(x.shape[1]))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default="dense,slim", help="comma-separated: dense, slim")
    ap.add_argument("--threads", type=int, default=1, help="threads for every engine")
    ap.add_argument("--tokens", type=int, default=300, help="timed streaming steps per engine and round")
    ap.add_argument("--segments", type=int, default=4, help="timed scoring segments per engine and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; engines alternate within each")
    ap.add_argument("--no-torch", action="store_true", help="skip torch as if it were not installed")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args(argv)
    kinds = common.parse_list(args.models, list(MODELS), "model")
    torch_ok, torch_note = common.torch_status(args.no_torch)
    # torch's oneDNN flags warn about Intel GPUs on every CPU-only build
    warnings.filterwarnings("ignore", message="TF32 acceleration")
    import onnxruntime

    from slimnp.export import export_onnx

    machine = common.machine_info(args.threads, torch_ok)
    machine["onnxruntime"] = onnxruntime.__version__
    common.log(common.format_machine(machine, short=True) + f", onnxruntime {onnxruntime.__version__}")
    common.log(f"threads: {args.threads} for every engine; random weights (speed does not depend on "
               "them); other processes on this machine compete for the cores (load average above)")
    if torch_note:
        common.log(torch_note)
    common.set_threads(args.threads, "slimnp")  # OpenBLAS + Numba
    if torch_ok:
        common.set_threads(args.threads, "torch")
    stream_ids = common.zipf_streams(V, 1, 20 + args.tokens, seed=1)[0]
    cfg = dict(V=V, T=T_SCORE, B=B_SCORE)
    segs = common.segments(cfg, 1 + args.segments, seed=2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            model, vocab = build(kind)
            path = os.path.join(tmp, f"{kind}.onnx")
            info = export_onnx(model, path, vocab=vocab)
            engines = [Slimnp(model), Onnx(path, args.threads)]
            if torch_ok and kind == "dense":
                engines += [Torch(model), Torch(model, mkldnn=False)]
            # equivalence first: every engine's per-token nll of one segment
            x, y = segs[0]
            ref = engines[0].score(x, y, engines[0].zero(B_SCORE))
            check = {e.name: float(np.abs(e.score(x, y, e.zero(B_SCORE)) - ref).max()) for e in engines[1:]}
            common.log(f"{kind}: {model.num_parameters:,} parameters, ONNX file {info['bytes'] / 1e6:.2f} MB "
                       f"(compressed: {', '.join(info['compressed']) or 'none'}); max |nll - slimnp's| "
                       + ", ".join(f"{k} {v:.1e}" for k, v in check.items()))
            acc = {e.name: {"stream": [], "score": []} for e in engines}
            for r in range(args.rounds):
                for e in (engines if r % 2 == 0 else engines[::-1]):
                    acc[e.name]["stream"] += time_stream(e, stream_ids, 20)
                    acc[e.name]["score"] += time_score(e, segs, 1)
            for e in engines:
                st, sc = acc[e.name]["stream"], acc[e.name]["score"]
                q = statistics.quantiles(st, n=10)
                results.append({
                    "model": kind, "engine": e.name, "parameters": model.num_parameters,
                    "onnx_bytes": info["bytes"], "max_abs_nll_diff": check.get(e.name, 0.0),
                    "stream_ms_per_token": {"median": statistics.median(st) * 1e3, "p10": q[0] * 1e3,
                                            "p90": q[-1] * 1e3, "n": len(st)},
                    "score_tok_s": {"median": T_SCORE * B_SCORE / statistics.median(sc),
                                    "min": T_SCORE * B_SCORE / max(sc), "max": T_SCORE * B_SCORE / min(sc),
                                    "n": len(sc)}})
    if args.json:
        print(json.dumps({"machine": machine, "threads": args.threads, "results": results}, indent=1))
        return
    print(f"{'model':<7} {'engine':<12} {'stream B=1 ms/token':>26} {'score B=32 tok/s':>28}")
    print(f"{'':<7} {'':<12} {'median (p10-p90)':>26} {'median (min-max)':>28}")
    for r in results:
        s, c = r["stream_ms_per_token"], r["score_tok_s"]
        print(f"{r['model']:<7} {r['engine']:<12} "
              f"{s['median']:>10.3f} ({s['p10']:.3f}-{s['p90']:.3f}) "
              f"{c['median']:>12,.0f} ({c['min']:,.0f}-{c['max']:,.0f})")


if __name__ == "__main__":
    main()
