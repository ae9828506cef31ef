"""Scoring throughput and memory: sentences/s of `slimnp score` in compressed form.

For each model (a file given with --model, or PTB-sized 2x200 models with a
10K vocabulary, dense and slim, built here with random weights -- speed does
not depend on the weights), scores the sentences of a text file (PTB's test
set when ../shared/data is there, else Zipf-distributed sentences of PTB's
length distribution) and reports sentences/s and tokens/s per batch size,
beside the model file's size and the process's resident memory after loading
and at its peak.  Each model runs in its own process (its own peak RSS).

    python bench/score_throughput.py
    python bench/score_throughput.py --model big.h5 --text test.txt --limit 200
    python bench/score_throughput.py --large --limit 200 --batch-sizes 64
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
PTB_TEST = os.path.join(REPO, "..", "shared", "data", "ptb", "ptb.test.txt")
LARGE_V = 793_471  # the paper's largest vocabulary (its Table 7)


def _rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _make_model(path, variant, V=10_000):
    """A model file with random weights: PTB-sized (2x200, V = 10K; slim is
    K = 10 at 1/10 in and out), or ``large``: the 793K-word slim model of
    ``large_vocab.py`` (2x1024; input K = 8 at 1/32, output K = 8 at 1/8)."""
    import numpy as np

    from slimnp.data import EOS, UNK, Vocabulary
    from slimnp.model import LanguageModel, ModelConfig
    from slimnp.modelfile import save_model

    kw, H = {}, 200
    if variant == "slim":
        kw = dict(input="slim", input_k=10, input_m=V, output="slim", output_k=10, output_m=10 * (V // 10))
    elif variant == "large":
        V, H, K = LARGE_V, 1024, 8
        kw = dict(input="slim", input_k=K, input_m=int(round(V * K / 32)),
                  output="slim", output_k=K, output_m=K * int(round(V / 8)))
    cfg = ModelConfig(vocab_size=V, hidden=H, layers=2, **kw)
    model = LanguageModel(cfg)
    model.init_params(np.random.default_rng(0))
    vocab = Vocabulary([EOS, UNK] + [f"w{i}" for i in range(V - 2)], np.ones(V, np.int64))
    save_model(path, model, vocab)


def _sentences(text, limit, V=10_000):
    import numpy as np

    if text and os.path.exists(text):
        with open(text, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    else:  # PTB-like: ~21 words per sentence, Zipf words
        rng = np.random.default_rng(0)
        p = 1.0 / np.arange(1, V - 1)
        p /= p.sum()
        lens = np.clip(rng.poisson(21, 3761), 1, None)
        lines = [" ".join(f"w{i}" for i in rng.choice(V - 2, n, p=p)) for n in lens]
    return lines[:limit] if limit else lines


def child(a):
    import slimnp

    rss0 = _rss()
    t0 = time.perf_counter()
    lm = slimnp.load(a.child)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss()
    lines = _sentences(a.text, a.limit, lm.model.config.vocab_size)
    lm.score(lines[:64])  # compile the kernels
    rows = []
    for bs in a.batch_sizes:
        t0 = time.perf_counter()
        scores = lm.score(lines, batch_size=bs)
        secs = time.perf_counter() - t0
        toks = sum(s.tokens for s in scores)
        rows.append({"batch_size": bs, "sentences_per_s": len(lines) / secs, "tokens_per_s": toks / secs})
    print(json.dumps({"model": a.child, "file_bytes": os.path.getsize(a.child),
                      "parameters": lm.model.num_parameters, "sentences": len(lines), "load_s": load_s,
                      "rss_before_load": rss0, "rss_loaded": rss_loaded,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rows": rows}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="Model file(s) to score with (default: PTB-sized dense and slim).")
    ap.add_argument("--text", default=PTB_TEST, help="Sentences, one per line [default: PTB test if present].")
    ap.add_argument("--limit", type=int, default=0, help="Score only the first N sentences.")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    ap.add_argument("--large", action="store_true",
                    help=f"Score with a {LARGE_V:,}-word slim model (2x1024, random weights) instead of the PTB-sized "
                         "ones; the text's words are all <unk> to it, which does not change the work per token.")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.large and a.model:
        ap.error("--large builds its own model; leave out --model")
    if a.child:
        return child(a)
    tmp = tempfile.TemporaryDirectory()
    models = a.model or []
    if not models:
        for v in ("large",) if a.large else ("dense", "slim"):
            path = os.path.join(tmp.name, "slim-793k.h5" if v == "large" else f"ptb-{v}.h5")
            _make_model(path, v)
            models.append(path)
    results = []
    for m in models:
        cmd = [sys.executable, __file__, "--child", m, "--text", a.text or "", "--limit", str(a.limit),
               "--batch-sizes", ",".join(map(str, a.batch_sizes))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if a.json:
        print(json.dumps(results))
        return
    from common import format_machine, machine_info  # bench/ is sys.path[0]

    print(format_machine(machine_info(threads=0, torch_ok=False), short=True))
    for r in results:
        mb = 2 ** 20
        print(f"{os.path.basename(r['model'])}: {r['parameters']:,} parameters, file {r['file_bytes'] / mb:,.1f} MB, "
              f"RSS +{(r['rss_loaded'] - r['rss_before_load']) / mb:,.1f} MB after load "
              f"({r['load_s']:.2f} s), peak {r['peak_rss'] / mb:,.1f} MB; {r['sentences']:,} sentences")
        for row in r["rows"]:
            print(f"  batch {row['batch_size']:>4}: {row['sentences_per_s']:>9,.0f} sentences/s "
                  f"{row['tokens_per_s']:>10,.0f} tokens/s")


if __name__ == "__main__":
    main()
