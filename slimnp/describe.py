"""What ``slimnp inspect`` shows of a model file: :func:`slimnp.io.describe`
(metadata only, no parameter read) plus the slim layers' report, and the
same as text."""
from __future__ import annotations

import json
from typing import Any

from . import io as sio

__all__ = ["describe", "describe_text"]


def describe(path) -> dict:
    """:func:`slimnp.io.describe` of a model file, with ``slim``: per slim
    layer, K, M, compression, pool usage (:func:`slimnp.mapping.slim_report`)."""
    from .mapping import slim_report
    from .model import ModelConfig, make_mapping

    info = sio.describe(path)
    mcfg = info.get("config", {}).get("model")
    if mcfg and (mcfg.get("input") == "slim" or mcfg.get("output") == "slim"):
        mc = ModelConfig.from_dict(mcfg)
        if mc.mapping == "hash":
            tables = make_mapping(mc)  # nothing stored: recompute from the seed
        else:
            tables = sio.load(path, params=False, optimizer=False, train_state=False, mapping=True).mapping
        nbytes = {d["name"][len("/mapping/"):]: d["nbytes"] for d in info["datasets"]
                  if d["name"].startswith("/mapping/")}
        info["slim"] = slim_report(mcfg, tables, nbytes)
    if mcfg and "adaptive" in (mcfg.get("input"), mcfg.get("output")):
        info["adaptive"] = adaptive_report(mcfg)
    return info


def adaptive_report(mcfg: dict) -> dict:
    """The adaptive layers' bands: the head's words, and per tail cluster
    its word range, vector size and (slim tails) its K pools' total size."""
    from .adaptive import clusters, tail_dims
    from .model import ModelConfig

    mc = ModelConfig.from_dict(mcfg)
    bands = clusters(mc.vocab_size, mc.cutoffs)
    dims = tail_dims(mc.word_size, len(bands), mc.div_value)
    tails = [{"words": [lo, hi], "size": d, **({"K": mc.output_k, "M": m} if mc.tail_m else {})}
             for (lo, hi), d, m in zip(bands, dims, mc.tail_m or [None] * len(bands))]
    return {"input": mc.input == "adaptive", "output": mc.output == "adaptive", "tied": mc.tie,
            "head_words": int(mc.cutoffs[0]), "div_value": mc.div_value, "tails": tails}


def _fmt_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def describe_text(info: dict) -> str:
    """:func:`describe`'s result as text, for ``slimnp inspect`` (no trailing newline)."""
    mb = info.get("file_size_bytes", 0) / 1e6
    lines = [
        f"file:        {info.get('file')}",
        f"size:        {mb:,.2f} MB ({info.get('file_size_bytes', 0):,} bytes)",
        f"format:      slimnp v{info.get('format_version')}, written by slimnp {info.get('slimnp_version')}"
        f" at {info.get('created')}",
        f"vocabulary:  {info.get('vocab_size', 0):,} words",
        "",
        "config:",
    ]
    config = info.get("config", {})
    width = max((len(k) for k in config), default=0)
    lines += [f"  {k:<{width}}  {_fmt_value(v)}" for k, v in config.items()] or ["  (empty)"]

    rows = [(d["name"], "(" + ", ".join(str(n) for n in d["shape"]) + ("," if len(d["shape"]) == 1 else "") + ")",
             d["dtype"], f"{d['size']:,}") for d in info.get("datasets", [])]
    header = ("dataset", "shape", "dtype", "elements")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines += ["", "datasets:"]
    for r in [header] + rows:
        lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}")

    lines += ["", f"parameters:  {info.get('parameters', 0):,}"]
    layers = info.get("layers", {})
    lw = max((len(k) for k in layers), default=0)
    nw = max((len(f"{n:,}") for n in layers.values()), default=0)
    lines += [f"  {k:<{lw}}  {n:>{nw},}" for k, n in layers.items()]
    mapping_bytes = info.get("mapping_bytes", 0)
    lines.append(f"mapping:     {mapping_bytes:,} bytes ({mapping_bytes / 1e6:,.2f} MB)")
    q = info.get("quantization")
    if q:  # a file of `slimnp quantize`
        total = q["int8_bytes"] + q["scale_bytes"] + q["float_bytes"]
        lines.append(f"quantized:   {q['scheme']}: {len(q['int8'])} arrays int8 {q['int8_bytes']:,} B + "
                     f"scales {q['scale_bytes']:,} B + float {q['float_bytes']:,} B = {total:,} B "
                     f"({total / max(q['float32_bytes'], 1):.2f}x of {q['float32_bytes']:,} B as float32); "
                     f"loaded as float32")
    for title, key in (("mapping settings", "mapping_attrs"), ("training state", "train_state"),
                       ("optimizer", "optimizer")):
        values = info.get(key) or {}
        if values:
            lines += ["", f"{title}:"]
            kw = max(len(k) for k in values)
            lines += [f"  {k:<{kw}}  {_fmt_value(v)}" for k, v in values.items()]
    return "\n".join(lines + _slim_lines(info) + _adaptive_lines(info))


def _slim_lines(info: dict) -> list:
    lines = []
    for side, r in info.get("slim", {}).items():
        line = (f"slim {side}: K={r['K']} M={r['M']} (sub-vectors of {r['sub_vector_size']}), "
                f"{r['pool_parameters']:,} parameters vs {r['dense_parameters']:,} dense "
                f"({r['compression']:.4f}), mapping {r['mapping']} seed {r['mapping_seed']}, "
                f"tables {r['table_bytes']:,} B")
        if "uses_min" in r:
            line += f", uses per sub-vector {r['uses_min']}..{r['uses_max']}"
        if r["tied_to_output"]:
            line += ", tied to the output pools"
        lines.append(line)
    return lines


def _adaptive_lines(info: dict) -> list:
    a = info.get("adaptive")
    if not a:
        return []
    sides = " and ".join(side for side in ("input", "output") if a[side]) + (", tied" if a["tied"] else "")
    tails = "; ".join(f"words {t['words'][0]:,}-{t['words'][1] - 1:,} in {t['size']}"
                      + (f" (slim: K={t['K']}, M={t['M']:,})" if "K" in t else "") for t in a["tails"])
    return [f"adaptive {sides}: head of {a['head_words']:,} words, div {a['div_value']:g}; tails: {tails}"]
