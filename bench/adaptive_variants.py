"""Parameters and validation perplexity after a short run of the adaptive
layers' combinations, beside slim layers of about the same size (issue 28:
which combination earns a full WikiText-2 run).

    python bench/adaptive_variants.py --train data/wikitext-2/train.txt \\
        --valid data/wikitext-2/valid.txt --train-bytes 300000 --valid-bytes 60000 \\
        --seeds 0,1,2 --threads 1

Each variant is one ``slimnp train`` run (:func:`slimnp.runs.train`, the
command's library call) on the first ``--train-bytes`` of the training text
and the first ``--valid-bytes`` of the validation text (cut at a line end),
Zaremba's small recipe otherwise (SGD, lr 1, BPTT 20, batch 20, clip 5, no
dropout) at ``--hidden``/``--layers``, ``--epochs`` epochs.  The variants,
in pairs of about the same parameter count:

=============================  ==============================================
adaptive                       dense input, adaptive softmax
slim-out                       dense input, slim softmax (K = --slim-k) at
                               ``--output-ratio`` 0.25
adaptive-slim-tails            adaptive softmax, tail clusters slim (K =
                               --tail-k, ratio 0.25)
slim-out-small                 slim softmax at ratio 0.125
adaptive-input                 adaptive input and softmax, untied
slim-tied                      slim input and output tied, ratio 0.5
adaptive-tied                  adaptive input and softmax tied band by band
slim-tied-small                slim tied, ratio 0.25
adaptive-tied-slim-tails       adaptive input tied to slim-tailed clusters
slim-tied-smaller              slim tied, ratio 0.125
full                           dense input, full softmax (the reference)
=============================  ==============================================

Prints one row per variant (mean and range over ``--seeds``): parameters,
those of the input and output layers, validation perplexity, and seconds
per run (wall clock of the whole run: vocabulary, training, validation,
files; on a loaded machine a rough figure).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import format_machine, machine_info  # noqa: E402  (bench/ is sys.path[0])

_SLIM = dict(output_kind="slim")
_SLIM_TIED = dict(input_kind="slim", output_kind="slim", tie=True)
VARIANTS = {  # name: the variant's options beyond the shared ones; "adaptive" marks --cutoffs users
    "full": {},
    "adaptive": dict(output_kind="adaptive"),
    "slim-out": dict(_SLIM, output_ratio=0.25),
    "adaptive-slim-tails": dict(output_kind="adaptive", output_ratio=0.25),
    "slim-out-small": dict(_SLIM, output_ratio=0.125),
    "adaptive-input": dict(input_kind="adaptive", output_kind="adaptive"),
    "slim-tied": dict(_SLIM_TIED, output_ratio=0.5),
    "adaptive-tied": dict(input_kind="adaptive", output_kind="adaptive", tie=True),
    "slim-tied-small": dict(_SLIM_TIED, output_ratio=0.25),
    "adaptive-tied-slim-tails": dict(input_kind="adaptive", output_kind="adaptive", tie=True,
                                     output_ratio=0.25),
    "slim-tied-smaller": dict(_SLIM_TIED, output_ratio=0.125),
}


def _head(src: Path, nbytes: int, dst: Path) -> Path:
    """The first ``nbytes`` of ``src`` up to the last whole line, written to ``dst``."""
    data = src.read_bytes()[:nbytes]
    dst.write_bytes(data[: data.rfind(b"\n") + 1])
    return dst


def options(name: str, args, files: dict, out: Path, seed: int) -> dict:
    o = dict(VARIANTS[name])
    if o.get("output_kind") == "adaptive" or o.get("input_kind") == "adaptive":
        o.update(cutoffs=args.cutoffs, div_value=args.div_value)
        if "output_ratio" in o:
            o["output_k"] = args.tail_k
    elif "output_ratio" in o:
        o["output_k"] = args.slim_k
    return dict(o, train_file=str(files["train"]), valid_file=str(files["valid"]), out=str(out),
                force=True, quiet=True, threads=args.threads, hidden=args.hidden, layers=args.layers,
                epochs=args.epochs, seed=seed)


def layer_parameters(path: Path) -> int:
    """Parameters of a model file's input and output layers."""
    import numpy as np

    from slimnp import io as sio
    from slimnp.model import ModelConfig, param_shapes

    shapes = param_shapes(ModelConfig.from_dict(sio.describe(path)["config"]["model"]))
    return sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(("embedding/", "output/")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--valid", type=Path, required=True)
    ap.add_argument("--train-bytes", type=int, default=300_000)
    ap.add_argument("--valid-bytes", type=int, default=60_000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--cutoffs", default="1000,3000")
    ap.add_argument("--div-value", type=float, default=4.0)
    ap.add_argument("--slim-k", type=int, default=8, help="K of the slim softmax")
    ap.add_argument("--tail-k", type=int, default=4, help="K of the slim tail clusters")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    from slimnp.runs import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {"train": _head(args.train, args.train_bytes, tmp / "train.txt"),
                 "valid": _head(args.valid, args.valid_bytes, tmp / "valid.txt")}
        if not args.json:
            print(format_machine(machine_info(threads=args.threads, torch_ok=False), short=True))
            print(f"{args.layers}x{args.hidden}, {args.epochs} epoch(s), cutoffs {args.cutoffs}, "
                  f"div {args.div_value:g}, seeds {args.seeds}")
            print(f"{'variant':<26} {'params':>10} {'in+out':>10} {'valid ppl':>10} {'range':>15} "
                  f"{'s/run':>6}")
        for name in names:
            ppl, secs = [], []
            for seed in seeds:
                out = tmp / f"{name}-{seed}.h5"
                t0 = time.perf_counter()
                summary = train(options(name, args, files, out, seed), log=lambda m: None)
                secs.append(time.perf_counter() - t0)
                ppl.append(summary["best_valid_ppl"])
                row = dict(variant=name, seed=seed, parameters=summary["parameters"],
                           layer_parameters=layer_parameters(out), valid_ppl=ppl[-1], seconds=secs[-1])
                if args.json:
                    print(json.dumps(row), flush=True)
            if not args.json:
                spread = f"{min(ppl):.1f}-{max(ppl):.1f}" if len(ppl) > 1 else ""
                print(f"{name:<26} {row['parameters']:>10,} {row['layer_parameters']:>10,} "
                      f"{sum(ppl) / len(ppl):>10.1f} {spread:>15} {sum(secs) / len(secs):>6.0f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
