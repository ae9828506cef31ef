"""Ship a model: one ONNX step graph that ONNX Runtime (or any ONNX engine) runs.

:func:`export_onnx` writes the model's *step* -- one token per stream in,
the next token's distribution and the new state out -- with the slim layers
(Li, Kang and Zhang, AAAI 2018) and the adaptive layers kept as they are in
the model file, no ``V x E`` matrix formed:

* input, slim: ``Gather`` of each word's K pool rows by the stored table,
  then a ``Reshape`` that concatenates them -- the ``(V, H)`` matrix is
  never formed;
* output, slim: the paper's dynamic programming (Algorithm 1) -- one batched
  ``MatMul`` gives the K pools' partial products ``P[k] = A[k] h_k^T``, a
  ``Gather`` by the word -> pool-row table and a ``ReduceSum`` over K give
  the logits, then ``+ b`` and ``LogSoftmax``;
* output, adaptive (Grave et al., ICML 2017; :mod:`slimnp.adaptive`): the
  head's ``Gemm`` (``+ head/b`` with ``head_bias``) and ``LogSoftmax`` give
  ``g (B, c_0 + n)``; tail cluster ``i`` is ``h P_i^T`` (a ``Gemm``, ``(B,
  d_i)``), then its words' logits -- a ``Gemm`` against ``tail{i}/W``, or
  with slim tails the DP above on the cluster's own K pools ``tail{i}/A``
  and table ``output/tail{i}/rows (K, V_i)`` -- then ``LogSoftmax`` and
  ``+ g[c_0 + i]``; a ``Concat`` puts ``g[:c_0]`` and the n clusters side by
  side in word order: exact log-probabilities of all ``V`` words, already
  normalised (no ``LogSoftmax`` follows);
* input, adaptive (Baevski and Auli, ICLR 2019): every band ``j`` is computed
  for every id -- the id less the band's first word, ``Clip``-ped into the
  band, a ``Gather`` from ``embedding/band{j}/W`` (and, ``j >= 1``, a
  ``MatMul`` by ``band{j}/proj``) -- and a chain of ``Where(ids >= c_{j-1})``
  keeps each id's own band.  Tied to an adaptive output, band 0 reads the
  first ``c_0`` rows of ``output/head/W`` and band ``j`` cluster ``j - 1``'s
  ``tail{j-1}/W`` (or its pools, through the same table as the DP) and
  ``tail{j-1}/proj`` (``e P``): each shared array is stored once.

The graph, for ``L`` layers, hidden size ``H``, word-vector size ``E``
(``E < H``: the PM baseline's projections) and a dynamic batch ``B``::

    inputs   ids        (B,)           int64   the current token of each stream
             state      (L, 2, B, H)   float   state[l, 0] = h, state[l, 1] = c
                                               of layer l (zeros to start)
    outputs  log_probs  (B, V)         float   log p(next word | history)
             logits     (B, V)         float   only with ``logits=True``
             new_state  (L, 2, B, H)   float   to feed back as ``state``

    ids -> embedding (B, E) [-> @ proj_in/W (E, H)] -> L LSTM steps
        [-> @ proj_out/W (H, E)] -> output layer -> logits (B, V) -> LogSoftmax
                                  (adaptive: -> log_probs (B, V) directly)

``logits`` of an adaptive output: the adaptive softmax has no single
``(B, V)`` matrix of scores whose softmax is the distribution (each cluster
normalises its own), so ``logits`` there is the log-probabilities again --
what slimnp's own ``AdaptiveSoftmax.logits`` gives for sampling; their
softmax is the model's distribution, so a sampler that takes logits (with a
temperature, top-k) works unchanged.

Each LSTM step is ``G = [x, h] @ [[Wx], [Wh]] + b`` (one ``Gemm``), gates
``[i f o g]`` in slimnp's order (:mod:`slimnp.kernels.reference`),
``c' = f c + i g``, ``h' = o tanh(c')``.  Dropout is the identity at
inference and is not in the graph.  Scoring a sentence as ``slimnp score``
does: start from zeros and the ``<eos>`` id, feed each word in turn, read the
next word's entry of ``log_probs`` (tests/test_export.py checks exactly that).

Initializers keep slimnp's parameter names (``output/A`` ``(K, M/K, d)``,
``embedding/A`` ``(M, d)``, ...); the two exceptions are ``lstm{l}/W``
(``Wx`` and ``Wh`` stacked, ``(D+H, 4H)``) and the integer tables:
``embedding/idx (V, K)`` as stored, and ``output/rows (K, V)``, the output
table turned into rows of the K pools seen as one ``(M, d)`` array
(``idx_out[w, k] + k M/K``), which the DP's ``Gather`` reads, and for slim
tails likewise ``output/tail{i}/rows (K, V_i)`` of cluster ``i``'s table
(rows of its ``(M_i, d_i/K)`` pools).  The adaptive layers' parameters keep
their names: ``output/head/W``, ``output/head/b``, ``output/tail{i}/proj``,
``output/tail{i}/W`` or ``/A``, ``embedding/band{j}/W``, ``/proj``.
Tables are stored in the smallest unsigned type their values fit (uint16 up to 65,536
pool rows: ``2 V K`` bytes per slim side) and cast to int32 in the graph
(``Gather`` takes int32 or int64 indices; the cast of a constant is folded
when ONNX Runtime loads the file).  A ``hash`` mapping, which the model file
stores as a seed only, costs those bytes here too: the tables are written
out expanded.

The vocabulary and where the model came from travel in the file's
``metadata_props`` (:data:`META_VOCAB` ... below).

A quantized model file (``slimnp quantize``: int8 weights, a float32 scale
per row, :mod:`slimnp.io`) keeps its int8 arrays: such a parameter ``P`` of
shape ``(..., n)`` becomes the initializers ``P/int8 (R, n)`` int8 and
``P/scale (R,)`` float32 (``R`` rows: the leading axes flattened) and one
``DequantizeLinear`` (``axis=0``, zero point 0: omitted) whose output, after
a ``Reshape`` back to ``(..., n)`` where needed, is the float value ``P``
every other node reads, so the file shrinks as the model file did.
``lstm{l}/W`` stacks the int8 rows of ``Wx`` and ``Wh`` and their scales.
The adaptive layers' matrices (``head/W``, the tails' ``proj``, ``W`` and
pools ``A``, the bands' ``W`` and ``proj``) are int8 the same way wherever
the quantized file has them so (pools whose rows have one number stay float,
as ``slimnp quantize`` leaves them; the head bias always does).
``DequantizeLinear`` computes ``float32(q) * scale``, exactly the weights
slimnp scores the quantized file with.  (ONNX Runtime may fold the
dequantization into float initializers when it loads the graph: the memory
of a running session is not the file's.)

The ``onnx`` package is needed only here and only when exporting (``pip
install 'slimnp[onnx]'``); nothing else in slimnp imports it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ._version import __version__

__all__ = ["export_onnx", "ExportError", "OnnxUnavailable", "DEFAULT_OPSET", "MIN_OPSET",
           "META_FORMAT", "META_VOCAB", "META_CONFIG", "META_SHA256"]

#: The default ONNX opset: ONNX Runtime 1.12 and later run it.
DEFAULT_OPSET = 17
#: The oldest opset with ``Split``/``ReduceSum`` taking their sizes/axes as inputs.
MIN_OPSET = 13

# metadata_props keys
META_FORMAT = "slimnp.format"  # "slimnp-onnx-step 1": what the graph computes, its version
META_VOCAB = "slimnp.vocab"  # JSON list of the V words in id order
META_EOS = "slimnp.eos_id"
META_UNK = "slimnp.unk_id"
META_CONFIG = "slimnp.config"  # JSON: the model config (ModelConfig.to_dict)
META_SHA256 = "slimnp.source_sha256"  # sha256 of the model file exported (absent for an in-memory model)
META_SOURCE = "slimnp.source"  # the model file's name (no folder: the file travels)
META_STATE = "slimnp.state"  # the state's layout in words
FORMAT = "slimnp-onnx-step 1"

# protobuf's limit on one serialized message (what onnx.save_model writes)
_PROTOBUF_LIMIT = 2**31 - 1


class ExportError(ValueError):
    """A model that cannot be exported, or an export setting that is wrong;
    ``str()`` is one line.  A ``ValueError``, so the command line shows it
    as one line like every other library error."""


class OnnxUnavailable(ExportError):
    """The ``onnx`` package (the optional ``[onnx]`` extra) is missing."""


def _import_onnx():
    try:
        import onnx  # noqa: F401  (optional extra: pip install 'slimnp[onnx]')
        from onnx import helper, numpy_helper  # noqa: F401
    except ImportError as exc:
        raise OnnxUnavailable(f"ONNX export needs the onnx package ({exc}): "
                              "pip install 'slimnp[onnx]'") from None
    return onnx


# ----------------------------------------------------------------------------
# the graph
# ----------------------------------------------------------------------------
class _Graph:
    """Nodes and initializers of one graph, with unique value names.

    ``quant``: ``{parameter name: (q int8, scale float32)}`` of a quantized
    model file; :meth:`weight` stores those as int8.
    """

    def __init__(self, onnx, quant=None, ftype=None):
        self.onnx, self.h, self.nh = onnx, onnx.helper, onnx.numpy_helper
        self.nodes, self.inits, self._n = [], {}, 0
        self.quant, self.ftype = dict(quant or {}), ftype or onnx.TensorProto.FLOAT
        self.dequant = []  # the DequantizeLinear nodes: first in the graph (read by name anywhere)

    def weight(self, name: str, arr: np.ndarray, qs=None) -> str:
        """A parameter ``name``: a float initializer, or, for int8 rows ``qs
        = (q, scale)`` (default: ``quant[name]``), ``name/int8 (R, n)``,
        ``name/scale (R,)`` and ``DequantizeLinear`` (axis 0) to the value
        ``name`` of ``arr``'s shape and dtype (module docstring)."""
        qs = self.quant.get(name) if qs is None else qs
        if qs is None:
            return self.init(name, arr)
        q, scale = qs
        n = q.shape[-1]
        ins = [self.init(f"{name}/int8", np.ascontiguousarray(q, dtype=np.int8).reshape(-1, n)),
               self.init(f"{name}/scale", np.ascontiguousarray(scale, dtype=np.float32).reshape(-1))]
        steps = [("DequantizeLinear", dict(axis=0))]  # (R, n) float32 = float32(q) * scale[:, None]
        if self.ftype != self.onnx.TensorProto.FLOAT:  # a float64 model: the same values, widened
            steps.append(("Cast", dict(to=self.ftype)))
        if q.ndim != 2:
            steps.append(("Reshape", {}))
        for i, (op, attrs) in enumerate(steps):
            out = name if i == len(steps) - 1 else f"{name}/{op.lower()}"
            if op == "Reshape":
                ins = ins + [self.init(f"{name}/shape", np.asarray(q.shape, np.int64))]
            self.dequant.append(self.h.make_node(op, ins, [out], name=f"{op}_{name}", **attrs))
            ins = [out]
        return name

    def init(self, name: str, arr: np.ndarray) -> str:
        """An initializer (a stored array); returns its name."""
        if name in self.inits:
            raise AssertionError(f"initializer {name} declared twice")
        self.inits[name] = self.nh.from_array(np.asarray(arr, order="C"), name)
        return name

    def index_table(self, name: str, arr: np.ndarray) -> str:
        """An integer table stored in the smallest unsigned type its values
        fit (uint8, uint16; else int32) and cast to int32 for ``Gather``
        (which takes int32 or int64 indices); returns the int32 tensor's
        name.  The cast runs on a constant: ONNX Runtime folds it at load."""
        arr = np.asarray(arr)
        hi = int(arr.max()) if arr.size else 0
        small = next((t for t in (np.uint8, np.uint16) if hi <= np.iinfo(t).max), None)
        if small is None:
            return self.init(name, arr.astype(np.int32))
        stored = self.init(f"{name}/{np.dtype(small).name}", arr.astype(small))
        return self.op("Cast", [stored], out=name, to=self.onnx.TensorProto.INT32)

    def const(self, values, dtype=np.int64) -> str:
        """A small constant (shapes, axes, indices) as an initializer."""
        self._n += 1
        return self.init(f"const/{self._n}", np.asarray(values, dtype=dtype))

    def op(self, op_type: str, inputs, n_out: int = 1, out=None, **attrs):
        """Add a node; returns its output name (or names, ``n_out > 1``)."""
        self._n += 1
        outs = out or [f"{op_type.lower()}_{self._n}" + (f"_{i}" if n_out > 1 else "")
                       for i in range(n_out)]
        if isinstance(outs, str):
            outs = [outs]
        self.nodes.append(self.h.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self._n}",
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs


def _tables(model) -> dict:
    """The model's slim tables as host int32 arrays ``(V, K)``."""
    return {k: np.ascontiguousarray(np.asarray(v), dtype=np.int32) for k, v in model.mapping.items()}


def _index_bytes(hi: int) -> int:
    """Bytes per entry of a table whose largest value is ``hi`` (:meth:`_Graph.index_table`)."""
    return 1 if hi <= 0xFF else 2 if hi <= 0xFFFF else 4


def _global_rows(idx_vk: np.ndarray, Mk: int) -> np.ndarray:
    """``rows (K, V)``: word w's k-th output sub-vector as a row of the K
    pools seen as one ``(M, d)`` array, ``idx_out[w, k] + k M/K``."""
    K = idx_vk.shape[1]
    return np.ascontiguousarray((idx_vk + (np.arange(K, dtype=np.int32) * Mk)[None, :]).T)


def _input_layer(g: _Graph, c, p: dict, tables: dict, ids: str) -> tuple[str, dict]:
    """Word vectors ``(B, E)`` of ``ids``; and what the layer is."""
    V, E = c.vocab_size, c.word_size
    if c.input == "dense":
        W = "output/W" if c.tie else g.weight("embedding/W", p["embedding/W"])  # (V, E)
        return g.op("Gather", [W, ids], axis=0), {"kind": "dense", "slim": False, "shape": [V, E],
                                                  "tied": c.tie, "table_bytes": 0}
    if not c.tie:
        K, M = c.input_k, c.input_m
        d = E // K
        idx = g.index_table("embedding/idx", tables["input/idx"])  # (V, K) rows of the pool
        A = g.weight("embedding/A", p["embedding/A"].reshape(M, d))  # (M, d)
        sub = g.op("Gather", [idx, ids], axis=0)  # (B, K)
        X = g.op("Gather", [A, sub], axis=0)  # (B, K, d)
        info = {"kind": "slim", "slim": True, "K": K, "M": M, "pool": [M, d], "table": [V, K], "tied": False,
                "table_bytes": V * K * _index_bytes(M - 1)}
        return g.op("Reshape", [X, g.const([0, E])]), info  # (B, K*d): the K parts side by side
    # tied: the rows of the K output pools A (K, M/K, d), read in place
    K, Mk = c.output_k, c.output_m // c.output_k
    X = _pool_vectors(g, "output/A", "output/rows", ids, K, Mk)  # (B, E)
    info = {"kind": "slim", "slim": True, "K": K, "M": c.output_m, "pool": "output/A",
            "table": "output/rows", "tied": True, "table_bytes": 0}
    return X, info


def _pool_vectors(g: _Graph, A: str, rows: str, ids: str, K: int, Mk: int) -> str:
    """``(B, K d)``: each id's K sub-vectors read from the pools ``A (K, Mk,
    d)`` by the global rows ``rows (K, V)`` (``idx[w, k] + k Mk``, what the
    DP's ``Gather`` reads), side by side.  ``GatherND`` picks ``A[k,
    idx[w, k]]`` straight from the ``(K, Mk, d)`` initializer the DP
    multiplies (ONNX Runtime folds a ``Reshape`` of an initializer into a
    second, reshaped initializer: two copies of the pools in memory)."""
    glob = g.op("Gather", [rows, ids], axis=1)  # (K, B) int32, global rows
    local = g.op("Sub", [g.op("Cast", [glob], to=g.onnx.TensorProto.INT64),
                         g.const(np.arange(K)[:, None] * Mk)])  # (K, B) rows within pool k
    kk = g.op("Expand", [g.const(np.arange(K)[:, None]), g.op("Shape", [local])])  # (K, B): k
    ind = g.op("Concat", [g.op("Unsqueeze", [kk, g.const([2])]),
                          g.op("Unsqueeze", [local, g.const([2])])], axis=2)  # (K, B, 2)
    X = g.op("Transpose", [g.op("GatherND", [A, ind])], perm=[1, 0, 2])  # (B, K, d)
    return g.op("Reshape", [X, g.const([0, -1])])  # (B, K*d): the K parts side by side


def _slim_scores(g: _Graph, x: str, A: str, rows: str, K: int, M: int, d: int) -> str:
    """Logits ``(B, V')`` (no bias) of ``x (B, K d)`` against the words whose
    sub-vectors ``rows (K, V')`` picks from the pools ``A (K, M/K, d)``:
    the paper's dynamic programming (Li et al. 2018, Algorithm 1)."""
    # (1) the K GEMMs as one batched MatMul: PT[k] = A[k] x_k^T, every
    #     distinct partial product, word-major as slimnp computes it
    xT = g.op("Transpose", [g.op("Reshape", [x, g.const([0, K, d])])], perm=[1, 2, 0])  # (K, d, B)
    PT = g.op("Reshape", [g.op("MatMul", [A, xT]), g.const([M, -1])])  # (K*M/K, B)
    # (2) the K-term gather-sum per word: z[w] = sum_k PT[rows[k, w]]
    Z = g.op("Gather", [PT, rows], axis=0)  # (K, V', B)
    zT = g.op("ReduceSum", [Z, g.const([0])], keepdims=0)  # (V', B)
    return g.op("Transpose", [zT], perm=[1, 0])  # (B, V')


def _lstm_step(g: _Graph, l: int, x: str, state: str, p: dict, H: int) -> tuple[str, str]:
    """One layer, one time step: ``(h', c')``, each ``(B, H)``."""
    Wx, Wh, b = p[f"lstm{l}/Wx"], p[f"lstm{l}/Wh"], p[f"lstm{l}/b"]
    qx, qh = g.quant.get(f"lstm{l}/Wx"), g.quant.get(f"lstm{l}/Wh")
    both = (np.concatenate([qx[0], qh[0]]), np.concatenate([qx[1], qh[1]])) if qx and qh else None
    W = g.weight(f"lstm{l}/W", np.concatenate([Wx, Wh], axis=0), both)  # (D+H, 4H): [Wx; Wh]
    bias = g.init(f"lstm{l}/b", b)  # (4H,)
    s = g.op("Gather", [state, g.const(l)], axis=0)  # (2, B, H)
    h = g.op("Gather", [s, g.const(0)], axis=0)  # (B, H)
    c = g.op("Gather", [s, g.const(1)], axis=0)
    G = g.op("Gemm", [g.op("Concat", [x, h], axis=1), W, bias])  # (B, 4H): x Wx + h Wh + b
    gi, gf, go, gg = g.op("Split", [G, g.const([H] * 4)], n_out=4, axis=1)  # [i f o g]
    i, f, o = (g.op("Sigmoid", [a]) for a in (gi, gf, go))
    cand = g.op("Tanh", [gg])
    c_new = g.op("Add", [g.op("Mul", [f, c]), g.op("Mul", [i, cand])])  # c' = f c + i g
    h_new = g.op("Mul", [o, g.op("Tanh", [c_new])])  # h' = o tanh(c')
    return h_new, c_new


def _output_layer(g: _Graph, c, p: dict, tables: dict, top: str) -> tuple[str, dict]:
    """Logits ``(B, V)`` of the top hidden states ``(B, E)``."""
    V, E = c.vocab_size, c.word_size
    if c.output == "full":
        W = g.weight("output/W", p["output/W"])  # (V, E)
        b = g.init("output/b", p["output/b"])  # (V,)
        return g.op("Gemm", [top, W, b], transB=1), {"kind": "dense", "slim": False, "shape": [V, E],
                                                     "table_bytes": 0}
    K, M = c.output_k, c.output_m
    Mk, d = M // K, E // K
    A = g.weight("output/A", p["output/A"])  # (K, Mk, d): K disjoint pools
    b = g.init("output/b", p["output/b"])
    z = _slim_scores(g, top, A, "output/rows", K, M, d)  # (B, V); rows: cast by build_graph
    info = {"kind": "slim", "slim": True, "K": K, "M": M, "pools": [K, Mk, d], "table": [K, V],
            "table_bytes": V * K * _index_bytes(M - 1)}
    return g.op("Add", [z, b]), info


# ----------------------------------------------------------------------------
# the adaptive layers (slimnp.adaptive): the same bands on both sides
# ----------------------------------------------------------------------------
def _bands(c) -> tuple[list, list]:
    """``([c_0, ..., c_n = V], [d_0, ..., d_{n-1}])``: the adaptive layers'
    cutoffs and tail clusters' vector sizes (:mod:`slimnp.adaptive`)."""
    from .adaptive import tail_dims

    cut = [int(x) for x in c.cutoffs] + [c.vocab_size]
    return cut, tail_dims(c.word_size, len(c.cutoffs), c.div_value)


def _tail_rows_name(i: int) -> str:
    """The int32 ``(K, V_i)`` global-row table of slim tail cluster ``i``."""
    return f"output/tail{i}/rows"


def _adaptive_input(g: _Graph, c, p: dict, ids: str) -> tuple[str, dict]:
    """Word vectors ``(B, E)`` of ``ids`` through the adaptive input's bands.

    Every band is computed for every id, its local id clipped into the band
    (``B`` rows of a ``d_j x E`` projection each: the step's cost is the
    LSTM's, not this), and ``Where`` keeps each id's own band: ids at or
    above band ``j``'s first word take band ``j``'s vector, so after the
    last band each id holds the band it falls in.  A selection, not a sum
    of masked terms: each id's vector is its own band's alone, computed as
    slimnp computes it."""
    E = c.word_size
    cut, dims = _bands(c)
    lo = [0] + cut[:-1]  # band j: [lo[j], cut[j]); band 0 the head words
    slim = c.tie and bool(c.tail_m)
    K = c.output_k
    x = None
    for j, d in enumerate([E] + dims):
        local = ids if j == 0 else g.op("Sub", [ids, g.const(lo[j])])
        local = g.op("Clip", [local, g.const(0), g.const(cut[j] - lo[j] - 1)])  # (B,) in the band
        if not c.tie:
            W = g.weight(f"embedding/band{j}/W", p[f"embedding/band{j}/W"])  # (V_j, d_j)
            proj = g.weight(f"embedding/band{j}/proj", p[f"embedding/band{j}/proj"]) if j else None
            e = g.op("Gather", [W, local], axis=0)  # (B, d_j)
        elif j == 0:  # the head words' rows come first in head/W (c_0 + n, E)
            proj, e = None, g.op("Gather", ["output/head/W", local], axis=0)
        else:  # tail cluster j - 1's vectors (or pools) and projection (d, E), used as e P
            t = f"output/tail{j - 1}"
            proj = f"{t}/proj"
            e = _pool_vectors(g, f"{t}/A", _tail_rows_name(j - 1), local, K,
                              c.tail_m[j - 1] // K) if slim else \
                g.op("Gather", [f"{t}/W", local], axis=0)  # (B, d)
        if proj is not None:
            e = g.op("MatMul", [e, proj])  # (B, E)
        if x is None:
            x = e
        else:
            mine = g.op("Unsqueeze", [g.op("GreaterOrEqual", [ids, g.const(lo[j])]), g.const([1])])
            x = g.op("Where", [mine, e, x])  # (B, E): band j's vector from its first word on
    info = {"kind": "adaptive", "slim": slim, "bands": [[cut[j] - lo[j], d] for j, d in
                                                         enumerate([E] + dims)],
            "tied": bool(c.tie), "table_bytes": 0}
    if slim:
        info["K"] = K
    return x, info


def _adaptive_output(g: _Graph, c, p: dict, top: str) -> tuple[str, dict]:
    """Log-probabilities ``(B, V)`` of the top hidden states ``(B, E)`` under
    the adaptive softmax, every word's: with ``g = log_softmax(h head/W^T +
    head/b)``, the head words' ``g[w]``, then per tail cluster ``i`` (in
    word order) ``g[c_0 + i] + log_softmax(h P_i^T W_i^T)`` -- or, with slim
    tails, the cluster's logits by the DP on its own pools.  Already
    normalised: no ``LogSoftmax`` follows."""
    E = c.word_size
    cut, dims = _bands(c)
    n, c0, K = len(dims), cut[0], c.output_k
    head = [top, g.weight("output/head/W", p["output/head/W"])]  # (c_0 + n, E)
    if c.head_bias:
        head.append(g.init("output/head/b", p["output/head/b"]))  # (c_0 + n,)
    lp = g.op("LogSoftmax", [g.op("Gemm", head, transB=1)], axis=1)  # (B, c_0 + n)
    parts = g.op("Split", [lp, g.const([c0] + [1] * n)], n_out=n + 1, axis=1)  # (B, c_0), n x (B, 1)
    out, tails, table_bytes = [parts[0]], [], 0
    for i, d in enumerate(dims):
        Vi, t = cut[i + 1] - cut[i], f"output/tail{i}"
        q = g.op("Gemm", [top, g.weight(f"{t}/proj", p[f"{t}/proj"])], transB=1)  # (B, d): h P^T
        if c.tail_m:
            M = int(c.tail_m[i])
            A = g.weight(f"{t}/A", p[f"{t}/A"])  # (K, M/K, d/K)
            u = _slim_scores(g, q, A, _tail_rows_name(i), K, M, d // K)  # (B, V_i)
            tails.append({"words": Vi, "size": d, "M": M})
            table_bytes += Vi * K * _index_bytes(M - 1)
        else:
            u = g.op("Gemm", [q, g.weight(f"{t}/W", p[f"{t}/W"])], transB=1)  # (B, V_i)
            tails.append({"words": Vi, "size": d})
        # the cluster's own log-softmax, plus the head's log-probability of the cluster
        out.append(g.op("Add", [g.op("LogSoftmax", [u], axis=1), parts[i + 1]]))
    info = {"kind": "adaptive", "slim": bool(c.tail_m), "cutoffs": cut[:-1], "div_value": c.div_value,
            "head": [c0 + n, E], "head_bias": bool(c.head_bias), "tails": tails,
            "table_bytes": table_bytes}
    if c.tail_m:
        info["K"] = K
    return g.op("Concat", out, axis=1), info  # (B, V): the words in id order


def build_graph(onnx, model, *, logits: bool = False, opset: int = DEFAULT_OPSET, quant=None):
    """The step graph of ``model`` as an ``onnx.ModelProto`` (no metadata);
    and a description of its layers.  ``quant``: ``{name: (q, scale)}``, the
    int8 rows of a quantized model file (their dequantized values must be
    ``model``'s parameters)."""
    c = model.config
    if c.input not in ("dense", "slim", "adaptive") or c.output not in ("full", "slim", "adaptive"):
        raise ExportError(f"ONNX export knows dense, slim and adaptive layers; this model has "
                          f"input {c.input!r}, output {c.output!r}")
    helper, TP = onnx.helper, onnx.TensorProto
    ftype = TP.DOUBLE if np.dtype(c.dtype) == np.float64 else TP.FLOAT  # the model's dtype
    p = model.params_numpy()
    tables = _tables(model)
    L, H, V = c.layers, c.hidden, c.vocab_size
    g = _Graph(onnx, quant, ftype)
    # the output's tables first: a tied input layer reads them too
    if c.output == "slim":
        g.index_table("output/rows", _global_rows(tables["output/idx"], c.output_m // c.output_k))
    if c.output == "adaptive" and c.tail_m:
        for i, m in enumerate(c.tail_m):
            g.index_table(_tail_rows_name(i), _global_rows(tables[f"output/tail{i}/idx"], m // c.output_k))
    # a tied input layer reads the output layer's initializers by name
    if c.input == "adaptive":
        x, in_info = _adaptive_input(g, c, p, "ids")  # (B, E)
    else:
        x, in_info = _input_layer(g, c, p, tables, "ids")  # (B, E)
    if c.embedding_size and c.embedding_size != H:
        x = g.op("MatMul", [x, g.weight("proj_in/W", p["proj_in/W"])])  # (B, H)
    news = []
    for l in range(L):
        h, cc = _lstm_step(g, l, x, "state", p, H)
        news.append(g.op("Concat", [g.op("Unsqueeze", [h, g.const([0, 1])]),
                                    g.op("Unsqueeze", [cc, g.const([0, 1])])], axis=1))  # (1, 2, B, H)
        x = h
    g.op("Concat", news, out="new_state", axis=0)  # (L, 2, B, H)
    if c.embedding_size and c.embedding_size != H:
        x = g.op("MatMul", [x, g.weight("proj_out/W", p["proj_out/W"])])  # (B, E)
    outputs = [helper.make_tensor_value_info("log_probs", ftype, ["B", V])]
    if c.output == "adaptive":
        # log-probabilities already; `logits` repeats them, as slimnp's own
        # AdaptiveSoftmax.logits does (module docstring)
        z, out_info = _adaptive_output(g, c, p, x)  # (B, V)
        g.op("Identity", [z], out="log_probs")
    else:
        z, out_info = _output_layer(g, c, p, tables, x)  # (B, V)
        g.op("LogSoftmax", [z], out="log_probs", axis=1)
    if logits:
        g.op("Identity", [z], out="logits")
        outputs.append(helper.make_tensor_value_info("logits", ftype, ["B", V]))
    outputs.append(helper.make_tensor_value_info("new_state", ftype, [L, 2, "B", H]))
    inputs = [helper.make_tensor_value_info("ids", TP.INT64, ["B"]),
              helper.make_tensor_value_info("state", ftype, [L, 2, "B", H])]
    graph = helper.make_graph(g.dequant + g.nodes, "slimnp_step", inputs, outputs, list(g.inits.values()),
                              doc_string="slimnp LSTM language model, one step: ids (B,), state "
                                         "(L, 2, B, H) -> log_probs (B, V), new_state")
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="slimnp", producer_version=__version__)
    # the IR version the opset came with, not the newest this onnx knows:
    # older runtimes refuse a newer IR version even when they know the ops
    proto.ir_version = _ir_version(onnx, opset)
    return proto, {"input": in_info, "output": out_info}


def _ir_version(onnx, opset: int) -> int:
    try:
        return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    except Exception:  # an onnx without the table: its own IR version
        return onnx.IR_VERSION


def _array_bytes(proto) -> tuple[int, int, int]:
    """``(float bytes, integer table bytes, int8 weight bytes)`` of the
    initializers, constants (and the int8 weights' shapes) apart."""
    fl = it = i8 = 0
    for t in proto.graph.initializer:
        if t.name.startswith("const/") or t.name.endswith("/shape"):
            continue
        n = len(t.raw_data)
        if t.data_type in (1, 11):  # FLOAT, DOUBLE (the int8 weights' scales too)
            fl += n
        elif t.data_type == 3:  # INT8: quantized weights
            i8 += n
        else:
            it += n
    return fl, it, i8


def _quantized(source, model) -> dict:
    """``{name: (q, scale)}`` of the model file ``source`` if it is quantized
    and ``model`` still holds its dequantized weights; else ``{}`` (a float
    file, or a model changed since it was read: exported as it is, in float)."""
    from . import io as sio

    if not source or not sio.describe(source).get("quantization"):
        return {}
    ck = sio.load(source, optimizer=False, train_state=False, mapping=False, dequantize=False)
    p = model.params_numpy()
    quant = {name: (ck.params[name], s) for name, s in ck.scales.items()}
    same = all(name in p and np.array_equal(sio.dequantize_rows(q, s).astype(p[name].dtype), p[name])
               for name, (q, s) in quant.items())
    return quant if same else {}


# ----------------------------------------------------------------------------
# the public function
# ----------------------------------------------------------------------------
def _resolve(source, vocab):
    """``(model, vocab, model file or None)`` of what :func:`export_onnx` was given."""
    from .inference import LM
    from .model import LanguageModel
    from .modelfile import load_model

    if isinstance(source, LM):
        return source.model, vocab or source.vocab, source.path
    if isinstance(source, LanguageModel):
        return source, vocab, None
    if isinstance(source, (str, os.PathLike)):
        model, file_vocab, _ = load_model(source)  # FormatError: one line naming the file
        return model, vocab or file_vocab, str(source)
    raise TypeError(f"expected a model file path, an slimnp.LM or a LanguageModel, "
                    f"got {type(source).__name__}")


def export_onnx(model_path_or_model, out_path, *, logits: bool = False, opset: int = DEFAULT_OPSET,
                vocab=None) -> dict:
    """Write a model's step graph as an ONNX file, slim layers kept compressed.

    Parameters
    ----------
    model_path_or_model : path of a slimnp model file, an :class:`slimnp.LM`
        (``slimnp.load(...)``) or a :class:`~slimnp.model.LanguageModel`
    out_path : the ``.onnx`` file to write (replaced atomically)
    logits : also output the unnormalised scores ``logits (B, V)``
    opset : the ONNX opset to target, ``MIN_OPSET`` (13) or newer
    vocab : a :class:`~slimnp.data.Vocabulary` for a bare ``LanguageModel``
        (or to override the file's); None: the model file's

    The graph (module docstring): ``ids (B,) int64``, ``state (L, 2, B, H)``
    in; ``log_probs (B, V)`` (``logits (B, V)``), ``new_state (L, 2, B,
    H)`` out, ``B`` dynamic.  A slim input layer is a ``Gather`` from its
    pool; a slim output layer the K-pool dynamic programming of Li et al.
    (2018), Algorithm 1, so no ``V x H`` matrix is stored or computed.  The
    adaptive softmax and adaptive input are exported band by band (slim
    tails by the same DP per cluster); an adaptive output's ``log_probs``
    are the exact factorised log-probabilities of all ``V`` words, and its
    ``logits`` (no single score matrix exists) those log-probabilities
    again.  The file's ``metadata_props`` hold the vocabulary (``slimnp.vocab``, a JSON
    list), ``slimnp.eos_id``, ``slimnp.unk_id``, the model config
    (``slimnp.config``, JSON) and the model file's sha256
    (``slimnp.source_sha256``).

    Returns
    -------
    dict : ``path``, ``bytes`` (the file), ``opset``, ``inputs`` and
        ``outputs`` (name -> shape, ``"B"`` dynamic), ``layers`` (input and
        output: kind, slim, K, M, table shapes and bytes; adaptive: the
        bands, the head, the tails' sizes), ``compressed`` (the layers that
        keep slim pools and tables: a slim layer, an adaptive output with
        slim tails, an adaptive input tied to one), ``parameter_bytes``
        (the parameters' initializers: float, or int8 and their scales),
        ``table_bytes`` (integer tables), ``quantized`` (None, or for a
        quantized model file: ``scheme``, ``int8`` (the model file's int8
        parameters), ``int8_bytes``, ``scale_bytes``), ``metadata_bytes``,
        ``source_sha256``.

    Raises
    ------
    OnnxUnavailable (an ExportError)
        the ``onnx`` package is missing: ``pip install 'slimnp[onnx]'``
    ExportError (a ValueError)
        a layer ONNX export does not know, a bad ``opset``,
        no vocabulary, or a model over protobuf's 2 GB limit
    slimnp.io.FormatError (a ValueError)
        the model file is missing, not a slimnp model, or damaged
    slimnp.errors.WriteError (an OSError)
        ``out_path`` cannot be written (checked before anything is built)
    """
    onnx = _import_onnx()
    from ._atomic import atomic_path, check_output, file_sha256
    from .io import QUANTIZATION

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset must be an integer in [{MIN_OPSET}, {newest}] (this onnx "
                          f"{onnx.__version__}), got {opset!r}")
    out_path = Path(out_path)
    check_output(out_path)  # a folder that cannot be written fails before the model loads
    model, vocab, source = _resolve(model_path_or_model, vocab)
    c = model.config
    if vocab is None:
        raise ExportError("no vocabulary: pass vocab= with a bare LanguageModel (the ONNX file "
                          "carries the words)")
    if len(vocab) != c.vocab_size:
        raise ExportError(f"vocabulary has {len(vocab)} words, the model {c.vocab_size}")

    quant = _quantized(source, model)
    proto, layers = build_graph(onnx, model, logits=logits, opset=opset, quant=quant)
    sha = file_sha256(source) if source else None
    meta = {META_FORMAT: FORMAT, META_VOCAB: json.dumps(list(vocab.words), ensure_ascii=False),
            META_EOS: str(vocab.eos_id), META_UNK: str(vocab.unk_id),
            META_CONFIG: json.dumps(c.to_dict(), sort_keys=True),
            META_STATE: f"state (L, 2, B, H) = ({c.layers}, 2, B, {c.hidden}): state[l, 0] = h, "
                        f"state[l, 1] = c of layer l; zeros at the start of a stream, whose "
                        f"first input is eos_id"}
    if sha:
        meta[META_SHA256] = sha
        meta[META_SOURCE] = Path(source).name
    onnx.helper.set_model_props(proto, meta)
    fl, it, i8 = _array_bytes(proto)
    if fl + it + i8 > _PROTOBUF_LIMIT - (64 << 20):
        raise ExportError(f"the model's {fl + it:,} bytes of arrays exceed the 2 GB a single ONNX "
                          "(protobuf) file holds; export a slim model (slimnp compress)")
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    with atomic_path(out_path, needed=len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)

    def shapes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in values}

    return {"path": str(out_path), "bytes": len(data), "opset": opset,
            "inputs": shapes(proto.graph.input), "outputs": shapes(proto.graph.output),
            "layers": layers,
            "compressed": [side for side in ("input", "output") if layers[side]["slim"]],
            "parameter_bytes": fl + i8, "table_bytes": it,
            "quantized": {"scheme": QUANTIZATION, "int8": sorted(quant), "int8_bytes": i8,
                          "scale_bytes": sum(int(s.nbytes) for _, s in quant.values())} if quant else None,
            "metadata_bytes": sum(len(k.encode()) + len(v.encode()) for k, v in meta.items()),
            "mapping": c.mapping if layers["input"]["slim"] or layers["output"]["slim"] else None,
            "source_sha256": sha}


# ----------------------------------------------------------------------------
# the command (click-free: `slimnp export` wraps it, `python -m slimnp.export` runs it)
# ----------------------------------------------------------------------------
def summary_line(info: dict) -> str:
    """One line for the user about an :func:`export_onnx` result."""
    from .errors import human_bytes

    def layer(side, d):
        if d["kind"] == "adaptive" and side == "input":
            sizes = ",".join(str(s) for _, s in d["bands"])
            how = ", tied" if d["tied"] else ""
            how += f", slim tails K={d['K']}" if d["slim"] else ""
            return f"input adaptive ({len(d['bands'])} bands of sizes {sizes}{how})"
        if d["kind"] == "adaptive":
            sizes = ",".join(str(t["size"]) for t in d["tails"])
            slim = f", slim tails K={d['K']} (K-pool DP)" if d["slim"] else ""
            bias = ", head bias" if d["head_bias"] else ""
            return (f"output adaptive (head {d['head'][0]}, {len(d['tails'])} tail clusters of sizes "
                    f"{sizes}{slim}{bias})")
        if d["kind"] != "slim":
            return f"{side} dense"
        how = "pool Gather" if side == "input" else "K-pool DP"
        return f"{side} slim ({how}, K={d['K']}, M={d['M']}{', tied' if d.get('tied') else ''})"

    outs = ", ".join(info["outputs"])
    int8 = ", int8 with a float32 scale per row" if info.get("quantized") else ""
    return (f"wrote {info['path']}: {human_bytes(info['bytes'])} (parameters "
            f"{human_bytes(info['parameter_bytes'])}{int8}, tables {human_bytes(info['table_bytes'])}, "
            f"metadata {human_bytes(info['metadata_bytes'])}); opset {info['opset']}; "
            f"{layer('input', info['layers']['input'])}, {layer('output', info['layers']['output'])}; "
            f"outputs {outs}")
