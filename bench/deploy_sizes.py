"""Bytes on disk against perplexity: which file to ship.

For each trained model (default: the runs of ``experiments/deploy-ptb.toml``
-- PTB small, dense, SE 1/8, SE 1/32, SE learned 1/32), the model alone as a
slimnp file (``modelfile.save_model``: parameters, tables, vocabulary; no
optimizer or training state), its int8 twin (``slimnp quantize``), and both
exported to ONNX (``slimnp export``): bytes of each, and the test perplexity
of the float32 and the int8 model (exact, one stream, as ``slimnp evaluate``).

    python bench/deploy_sizes.py [--runs experiments/runs/deploy-ptb] [--test ../shared/data/ptb/ptb.test.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import format_machine, machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = (("dense", "uncompressed"), ("slim 1/8", "se-8"), ("slim 1/32", "se-32"),
          ("learned 1/32", "learned-32"))


def measure(best: Path, test: Path, tmp: Path) -> dict:
    from slimnp.evaluate import evaluate_file
    from slimnp.export import export_onnx
    from slimnp.modelfile import load_model, save_model
    from slimnp.quantize import quantize_file

    model, vocab, _ = load_model(best)
    plain, q = tmp / f"{best.stem}.h5", tmp / f"{best.stem}.int8.h5"
    save_model(plain, model, vocab)
    quantize_file(plain, q, force=True)
    out = {"parameters": model.num_parameters}
    for key, path in (("h5", plain), ("h5_int8", q)):
        out[key] = path.stat().st_size
        out["ppl" if key == "h5" else "ppl_int8"] = evaluate_file(path, test, progress=False)["perplexity"]
        onnx = path.with_suffix(".onnx")
        export_onnx(path, onnx)
        out["onnx" if key == "h5" else "onnx_int8"] = onnx.stat().st_size
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=str(ROOT / "experiments" / "runs" / "deploy-ptb"))
    ap.add_argument("--test", default=str(ROOT.parent / "shared" / "data" / "ptb" / "ptb.test.txt"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from slimnp.threads import set_threads

    set_threads(a.threads)
    print(format_machine(machine_info(a.threads, False)), file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, run in MODELS:
            best = Path(a.runs) / f"{run}.best.h5"
            if not best.exists():
                print(f"{label}: {best} not found (run experiments/deploy-ptb.toml first)", file=sys.stderr)
                continue
            rows.append({"model": label, "run": run, **measure(best, Path(a.test), Path(tmp))})
    if a.json:
        print(json.dumps(rows))
        return
    mb = lambda n: f"{n / 1e6:.2f}"  # noqa: E731
    print(f"{'model':<13} {'parameters':>11} {'HDF5 MB':>8} {'int8 MB':>8} {'ONNX MB':>8} "
          f"{'ONNX int8':>9} {'PPL':>8} {'PPL int8':>9}")
    for r in rows:
        print(f"{r['model']:<13} {r['parameters']:>11,} {mb(r['h5']):>8} {mb(r['h5_int8']):>8} "
              f"{mb(r['onnx']):>8} {mb(r['onnx_int8']):>9} {r['ppl']:8.2f} {r['ppl_int8']:9.2f}")


if __name__ == "__main__":
    main()
