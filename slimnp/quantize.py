"""int8 storage of a model file: ``slimnp quantize``.

:func:`quantize_file` rewrites a model file with its weight matrices as
symmetric int8, one float32 scale per row (a vector along the last axis):

======================  ================  ==========================================
parameter               shape             one scale per
======================  ================  ==========================================
``embedding/W``         ``(V, E)``        word (dense input row)
``embedding/A``         ``(M, d)``        slim input pool entry
``output/W``            ``(V, E)``        word (dense output row)
``output/A``            ``(K, M/K, d)``   slim output pool entry
``lstm{l}/Wx``, ``Wh``  ``(D, 4H)``       row (one input unit's weights, 4 gates)
``proj_in/W`` ...       ``(E, H)`` ...    row
======================  ================  ==========================================

What stays float (as stored, float32 for slimnp's models): every 1-D
parameter (the biases  ``lstm{l}/b (4H,)``, ``output/b (V,)``; the adaptive
softmax's biases) and any array whose rows have a single element (an int8
value and its float32 scale, 5 bytes, would outweigh the 4 of the float).
The biases are a small part of a model's bytes (``4H + V`` of
``~8H^2 + 2VH`` for one dense layer) and a bias error shifts every logit of
its word, so they keep full precision.

The arithmetic (:func:`slimnp.io.quantize_rows`) and the file layout (int8
``/params/<name>`` beside float32 ``/param_scales/<name>``, format version 2)
are :mod:`slimnp.io`'s, where they are read back: every reader
(:func:`slimnp.modelfile.load_model`, and so ``evaluate``, ``score``,
``generate``, ``rerank``, ``export``, ``train --init-from``) gets float32
weights ``float32(q) * scale``, within ``scale / 2 = max|row| / 254`` of the
originals.  ``slimnp export`` of a quantized file keeps the int8 arrays
(``DequantizeLinear`` in the graph, :mod:`slimnp.export`).

A quantized file is a model to apply, not a run to resume: the optimizer
state and the training state are dropped (a resumed run could not continue
bit for bit from rounded weights), and the source's ``train`` and ``data``
config sections move under ``quantized_from`` (at the top they would make
the file look resumable).  ``train --init-from q.h5`` fine-tunes from the
dequantized weights in float32 (and writes float32 files).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import io as sio

__all__ = ["quantize_file", "quantize_checkpoint", "quantizable", "summary_line", "QuantizeError"]


class QuantizeError(ValueError):
    """A model that cannot be quantized or an output that may not be written; one line."""


def quantizable(name: str, arr: np.ndarray) -> bool:
    """Whether parameter ``name`` is stored as int8 rows: a float array of at
    least 2 axes whose rows have at least 2 elements (module docstring)."""
    arr = np.asarray(arr)
    return arr.dtype.kind == "f" and arr.ndim >= 2 and arr.shape[-1] >= 2


def quantize_checkpoint(ck: sio.Checkpoint, source_name: str = "", source_sha256: str = "") -> tuple:
    """``(quantized checkpoint, per-parameter report)`` of a model checkpoint
    (``sio.load(..., dequantize=False)``; its int8 parameters are kept as they
    are, so quantizing a quantized file changes no array).

    The report maps each parameter to ``shape``, ``int8`` (bool) and, for a
    parameter quantized here, ``max_abs_error`` and ``max_error_over_scale``
    (at most 0.5, plus float32 rounding).
    """
    params, scales, report = {}, dict(ck.scales), {}
    for name, arr in ck.params.items():
        arr = np.asarray(arr)
        entry = {"shape": list(arr.shape), "int8": name in scales}
        if name not in scales and quantizable(name, arr):
            try:
                q, s = sio.quantize_rows(arr)
            except ValueError as exc:
                raise QuantizeError(f"{source_name or 'model'}: parameter {name}: {exc}") from None
            err = np.abs(sio.dequantize_rows(q, s).astype(np.float64) - arr)  # (..., n)
            with np.errstate(divide="ignore", invalid="ignore"):
                over = np.where(s[..., None] > 0, err / s[..., None].astype(np.float64), 0.0)
            entry.update(int8=True, max_abs_error=float(err.max(initial=0.0)),
                         max_error_over_scale=float(over.max(initial=0.0)))
            arr, scales[name] = q, s
        params[name] = arr
        report[name] = entry
    config = dict(ck.config)
    if "quantized_from" not in config:  # a quantized file keeps its record
        config["quantized_from"] = {
            "file": source_name, "sha256": source_sha256, "scheme": sio.QUANTIZATION,
            **{k: config.pop(k) for k in ("train", "data") if k in config}}
    out = sio.Checkpoint(config=config, vocab=list(ck.vocab), params=params, mapping=dict(ck.mapping),
                         mapping_attrs=dict(ck.mapping_attrs), vocab_counts=ck.vocab_counts, scales=scales)
    return out, report


def quantize_file(src, out, *, force: bool = False) -> dict:
    """``slimnp quantize``: the model file ``src`` with int8 weights, written to ``out``.

    Parameters
    ----------
    src : a slimnp model file (float, or already quantized: then copied
        with every array unchanged)
    out : the file to write (atomically); not overwritten unless ``force``
    force : overwrite an existing ``out``

    Returns
    -------
    dict : ``path``, ``source``, ``source_sha256``, ``scheme``, ``bytes``
        (the file written), ``source_bytes``, ``ratio`` (bytes over
        source_bytes), ``parameter_bytes`` (``before``: the source's
        parameters as stored; ``after``: int8 + scales + the float ones),
        ``int8`` and ``float`` (parameter names), ``dropped`` (the source's
        optimizer and training state, where it had them), ``parameters``
        (per parameter: ``shape``, ``int8``, ``max_abs_error``,
        ``max_error_over_scale``).

    Raises
    ------
    slimnp.io.FormatError (a ValueError)
        ``src`` is missing, not a slimnp model file, or damaged.
    QuantizeError (a ValueError)
        ``out`` exists and not ``force``; a parameter holds NaN or infinity.
    slimnp.errors.WriteError (an OSError)
        ``out`` cannot be written (checked before ``src`` is read).
    """
    from ._atomic import check_output, file_sha256
    from .modelfile import expected_shapes

    out = Path(out)
    check_output(out)
    if out.exists() and not force:
        raise QuantizeError(f"{out} exists; pass --force to overwrite it")
    ck = sio.load(src, expected_shapes=expected_shapes, optimizer=False, train_state=False,
                  dequantize=False)
    has = sio.describe(src)  # metadata only: what the source holds beside the model
    dropped = [k for k in ("optimizer", "train_state") if has[k] or any(
        d["name"].startswith(f"/{k}/") for d in has["datasets"])]
    sha = file_sha256(src)
    qck, per_param = quantize_checkpoint(ck, Path(src).name, sha)
    before = sum(int(np.asarray(a).nbytes) for a in ck.params.values()) + \
        sum(int(s.nbytes) for s in ck.scales.values())
    after = sum(int(a.nbytes) for a in qck.params.values()) + sum(int(s.nbytes) for s in qck.scales.values())
    sio.save(out, qck)
    size, src_size = os.path.getsize(out), os.path.getsize(src)
    return {"path": str(out), "source": str(src), "source_sha256": sha, "scheme": sio.QUANTIZATION,
            "bytes": size, "source_bytes": src_size, "ratio": size / src_size,
            "parameter_bytes": {"before": before, "after": after},
            "int8": sorted(qck.scales), "float": sorted(set(qck.params) - set(qck.scales)),
            "dropped": dropped, "parameters": per_param}


def summary_line(report: dict) -> str:
    """One line for the user about a :func:`quantize_file` result."""
    from .errors import human_bytes

    pb = report["parameter_bytes"]
    worst = max((p.get("max_abs_error", 0.0) for p in report["parameters"].values()), default=0.0)
    line = (f"wrote {report['path']}: {human_bytes(report['bytes'])} ({report['ratio']:.2f}x of "
            f"{human_bytes(report['source_bytes'])}); parameters {human_bytes(pb['before'])} -> "
            f"{human_bytes(pb['after'])}: {len(report['int8'])} int8 with a float32 scale per row "
            f"(largest error {worst:.3g}), {len(report['float'])} float ({', '.join(report['float'])})")
    if report["dropped"]:
        line += "; dropped " + " and ".join(k.replace("_", " ") for k in report["dropped"])
    return line
