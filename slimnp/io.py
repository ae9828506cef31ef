"""Self-describing HDF5 model and checkpoint files.

One HDF5 file holds everything needed to rebuild a model or to resume
training: parameters, slim mapping tables, vocabulary, configuration,
optimizer state and training state.  No pickle is used anywhere, so a file
can be inspected with any HDF5 tool and loading one never executes code.

File layout (format version 1; version 2 adds int8 parameters)
---------------------------------------------------------------
Root attributes
    ``format`` (``"slimnp"``), ``format_version`` (int), ``config`` (JSON text
    of a dict), ``slimnp_version`` and ``created`` (ISO 8601 time, UTC);
    ``quantization`` (:data:`QUANTIZATION`) in a file with int8 parameters.
``/vocab``
    1-D dataset of variable-length UTF-8 strings, in id order.
``/vocab_counts``
    Optional 1-D ``int64`` dataset of word counts.
``/params/<layer>/<name>``
    Parameter arrays, stored with their own dtype.  On the Python side the
    keys are flat, ``"<layer>/<name>"`` (e.g. ``"lstm0/Wx"``); keys with more
    slashes map to deeper groups.
``/param_scales/<layer>/<name>``
    Only in a quantized file (see "int8 parameters" below): the ``float32``
    scales of the parameter ``/params/<layer>/<name>`` stored as ``int8``.
``/mapping/<name>``
    Integer tables (e.g. ``input/idx``), stored with the smallest integer
    dtype that holds their value range.  The original dtype is kept in the
    dataset attribute ``orig_dtype`` and restored on load.  Non-array values
    (hash seed, hash name, ...) are attributes of the ``/mapping`` group.
``/optimizer``, ``/train_state``
    Trees of values, see "Value trees" below.  Optimizer settings are
    attributes; per-element state is a dataset, e.g. Adagrad's
    ``/optimizer/accumulator`` (float, as long as all parameters together),
    read back with its dtype and bits unchanged.  ``load(...,
    optimizer=False)`` skips it, as loading a model for evaluation does.

Checksums
---------
Every non-empty array dataset except the vocabulary's strings (parameters,
mapping tables, optimizer and training state, word counts) is stored chunked
with HDF5's Fletcher-32 filter: HDF5 verifies each chunk as it reads it, and a
damaged or half-copied file is reported as such, naming the dataset, instead
of loading garbage.  The filter is transparent to readers (any HDF5 library
reads such a file), so the format version stays 1; files written before it
(plain contiguous datasets) load as before.

int8 parameters (format version 2)
----------------------------------
``slimnp quantize`` (:mod:`slimnp.quantize`) stores weight matrices as
symmetric int8 with one float32 scale per row, a row being a vector along
the last axis (a word's row of ``embedding/W`` or ``output/W``, a pool entry
of ``embedding/A (M, d)`` or ``output/A (K, M/K, d)``, a row of ``lstm{l}/Wx``
``(D, 4H)`` and ``lstm{l}/Wh`` ``(H, 4H)``).  For an array ``w`` of shape
``(..., n)``::

    scale[...] = float32(max_j |w[..., j]| / 127)     # shape (...), 0 for a zero row
    q[..., j]  = clip(round(w[..., j] / scale[...]), -127, 127)   # int8
    w_hat      = float32(q) * scale[..., None]        # one float32 product

so ``|w - w_hat| <= scale / 2`` elementwise (:func:`quantize_rows`,
:func:`dequantize_rows`; ONNX's ``DequantizeLinear`` with zero point 0
computes the same ``w_hat``).  Such a parameter is an ``int8`` dataset in
``/params`` (its shape is the parameter's) with the attribute
``quantization`` = :data:`QUANTIZATION`; its scales are the ``float32``
dataset of the same name under ``/param_scales``.  :func:`load` and
:func:`load_params_into` return ``w_hat`` as ``float32`` (``load(...,
dequantize=False)`` gives the stored int8 arrays and ``Checkpoint.scales``).

A file holding int8 parameters is written as format version 2, with the
root attribute ``quantization``; every other file is still version 1, so
older slimnp versions keep reading the files they always read.  The bump is
needed: a version-1 reader would take the int8 values for weights (±127)
and compute garbage; it refuses a version-2 file with "written by a newer
slimnp ... upgrade slimnp".

Value trees
-----------
``mapping_attrs``, ``optimizer`` and ``train_state`` are dicts stored with one
convention:

* ``numpy.ndarray`` values become datasets (a key containing ``/`` makes
  intermediate groups, and comes back as the same flat key);
* ``bool``, ``int`` (within int64), ``float``, ``str`` and NumPy scalars
  become plain HDF5 attributes and come back as the Python type;
* a dict that contains arrays somewhere inside becomes a sub-group marked
  with the attribute ``_dict = True`` and comes back as a nested dict;
* anything else (dicts without arrays, lists, ``None``, ints beyond 64 bits,
  e.g. ``numpy.random.Generator.bit_generator.state``) is stored as JSON
  text in an attribute whose name is listed in the group attribute
  ``_json_keys`` (itself a JSON list).  JSON keeps Python ints exact at any
  size; tuples come back as lists and NumPy scalars inside such values come
  back as Python scalars.

The names ``_dict`` and ``_json_keys`` are reserved and cannot be used as keys.

Saving is atomic: the file is written to ``.<name>.tmp-<pid>`` in the target
directory, synced to disk and renamed over the target, so a crash or an error
never leaves a half-written model behind and never damages the previous one.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import h5py
import numpy as np

from ._version import __version__ as _SLIMNP_VERSION
from slimnp._atomic import atomic_path
from slimnp.errors import cause_of, error_number

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "QUANTIZATION",
    "FormatError",
    "Checkpoint",
    "save",
    "load",
    "read_config",
    "describe",
    "quantize_rows",
    "dequantize_rows",
]

FORMAT = "slimnp"
#: The newest format version this slimnp reads.  A file is written as
#: version 1 unless it holds int8 parameters (version 2; module docstring).
FORMAT_VERSION = 2
_PLAIN_VERSION = 1
#: The one quantization scheme: symmetric int8, a float32 scale per row
#: (per vector along the last axis), zero point 0.
QUANTIZATION = "int8-symmetric-per-row"
_QMAX = 127

# Reserved attribute names of the value-tree convention (see module docstring).
_JSON_KEYS_ATTR = "_json_keys"
_DICT_MARK_ATTR = "_dict"
_RESERVED = frozenset({_JSON_KEYS_ATTR, _DICT_MARK_ATTR})

PathLike = Union[str, "os.PathLike[str]"]
ShapeSpec = Union[Mapping[str, Tuple[int, ...]], Callable[[dict], Mapping[str, Tuple[int, ...]]]]


class FormatError(ValueError):
    """A file is missing, unreadable, foreign, too new or does not fit the model.

    The message is a single line naming the file and what is wrong with it.
    """


@dataclass
class Checkpoint:
    """Everything stored in one slimnp model or checkpoint file.

    Attributes
    ----------
    config : dict
        Model/training configuration; must be JSON-serialisable.
    vocab : list of str
        Words in id order.
    params : dict of str to numpy.ndarray
        Parameters with flat ``"layer/name"`` keys.
    mapping : dict of str to numpy.ndarray
        Integer mapping tables; shrunk on disk, original dtype on load.
    mapping_attrs : dict
        Non-array mapping settings (hash seed, hash name, ...).
    optimizer : dict
        Optimizer state (value-tree convention, see module docstring).
    train_state : dict
        Training state (value-tree convention, see module docstring).
    vocab_counts : numpy.ndarray or None
        Optional word counts, stored as int64.
    scales : dict of str to numpy.ndarray
        The float32 row scales of the parameters held as int8 (shape: the
        parameter's without its last axis); empty for a float file.  Filled
        only by ``load(..., dequantize=False)``; :func:`save` writes such a
        checkpoint as format version 2 (module docstring, "int8 parameters").
    attrs : dict
        Root attributes read back by :func:`load` (``format``,
        ``format_version``, ``slimnp_version``, ``created``).  Ignored by
        :func:`save`, which always writes fresh values.
    """

    config: dict
    vocab: List[str]
    params: Dict[str, np.ndarray]
    mapping: Dict[str, np.ndarray] = field(default_factory=dict)
    mapping_attrs: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    train_state: dict = field(default_factory=dict)
    vocab_counts: Optional[np.ndarray] = None
    attrs: dict = field(default_factory=dict)
    scales: Dict[str, np.ndarray] = field(default_factory=dict)


# --------------------------------------------------------------------------
# int8 rows (module docstring, "int8 parameters")
# --------------------------------------------------------------------------

#: Elements quantized per block (bounds the float64 temporaries of a large layer).
_BLOCK = 1 << 20


def quantize_rows(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per row (vector along the last axis).

    Parameters
    ----------
    w : numpy.ndarray, float, shape ``(..., n)``, finite

    Returns
    -------
    q : numpy.ndarray, int8, shape ``(..., n)``
        ``clip(round(w / scale[..., None]), -127, 127)``; 0 in a zero row.
    scale : numpy.ndarray, float32, shape ``(...)``
        ``float32(max |w| / 127)`` of each row.

    ``dequantize_rows(q, scale)`` is then within ``scale / 2`` of ``w``
    elementwise (plus float32's rounding of that product).
    """
    w = np.asarray(w)
    if w.ndim < 1 or w.dtype.kind != "f":
        raise ValueError(f"quantize_rows takes a float array of at least one axis, got dtype {w.dtype}, "
                         f"shape {w.shape}")
    n = w.shape[-1]
    rows = w.reshape(-1, n)  # (R, n): a view of a contiguous parameter
    q = np.empty(rows.shape, np.int8)
    scale = np.empty(rows.shape[0], np.float32)
    step = max(1, _BLOCK // max(n, 1))
    for lo in range(0, rows.shape[0], step):
        blk = rows[lo:lo + step].astype(np.float64)  # (r, n); the arithmetic in float64
        if not np.isfinite(blk).all():
            raise ValueError("cannot quantize an array holding NaN or infinity")
        s32 = (np.abs(blk).max(axis=1) / _QMAX).astype(np.float32) if n else np.zeros(len(blk), np.float32)
        s = s32.astype(np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            qb = np.where(s > 0, np.rint(blk / s), 0.0)
        q[lo:lo + step] = np.clip(qb, -_QMAX, _QMAX)
        scale[lo:lo + step] = s32
    return q.reshape(w.shape), scale.reshape(w.shape[:-1])


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``float32(q) * scale[..., None]``, float32: the inverse of :func:`quantize_rows`
    (one rounding per element, as ONNX's ``DequantizeLinear`` computes it)."""
    out = np.asarray(q).astype(np.float32)
    out *= np.asarray(scale, dtype=np.float32)[..., None]
    return out


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _py_scalar(value: Any) -> Any:
    """A NumPy bool/integer/floating scalar as the Python type; others unchanged."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _json_default(obj: Any) -> Any:
    """Convert NumPy scalars/arrays that ``json`` does not know natively."""
    if isinstance(obj, (np.bool_, np.integer, np.floating)):
        return _py_scalar(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _to_json(value: Any, where: str) -> str:
    _check_str_keys(value, where)
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot store {where}: {exc}") from exc


def _check_str_keys(value: Any, where: str) -> None:
    # json.dumps silently turns int keys into strings, which would break the
    # promise of an exact round trip, so refuse them up front.
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"cannot store {where}: dict key {k!r} is not a str")
            _check_str_keys(v, f"{where}/{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_str_keys(v, f"{where}[{i}]")


def _is_native_scalar(value: Any) -> bool:
    """True for values stored as a plain HDF5 attribute."""
    if isinstance(value, (bool, np.bool_, str, float, np.floating)):
        return True
    if isinstance(value, np.integer):
        return True
    if isinstance(value, int):
        # Larger ints do not fit an HDF5 integer; they go through JSON.
        return -(2**63) <= value < 2**63
    return False


def _from_attr(value: Any) -> Any:
    """Turn an attribute value read by h5py back into a Python scalar."""
    value = _py_scalar(value)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _contains_array(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, dict):
        return any(_contains_array(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_array(v) for v in value)
    return False


def _as_storable_array(value: Any, where: str) -> np.ndarray:
    arr = np.asarray(value)
    # h5py cannot store Python objects or NumPy unicode arrays; say so
    # clearly instead of letting a cryptic TypeError surface.
    if arr.dtype.kind in "OUV":
        raise TypeError(f"cannot store {where}: arrays of dtype {arr.dtype} are not supported")
    return np.ascontiguousarray(arr)


def _smallest_int_dtype(arr: np.ndarray) -> np.dtype:
    """Smallest integer dtype holding every value of ``arr``."""
    if arr.size == 0:
        return np.dtype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    candidates = (np.uint8, np.uint16, np.uint32, np.uint64) if lo >= 0 else (
        np.int8, np.int16, np.int32, np.int64)
    for dt in candidates:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    return arr.dtype  # pragma: no cover - int64/uint64 always fit


def _check_key(key: Any, where: str) -> None:
    if not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/") or "//" in key:
        raise ValueError(f"cannot store {where}: invalid key {key!r} (need a non-empty relative name)")
    if key in _RESERVED:
        raise ValueError(f"cannot store {where}: key {key!r} is reserved")


def _check_no_prefix_clash(paths: List[str], where: str) -> None:
    # "a" (array or array-dict) next to "a/b" would land in the same HDF5
    # group and could not be told apart on load.
    known = set(paths)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in known:
                raise ValueError(f"cannot store {where}: key {'/'.join(parts[:i])!r} clashes with {p!r}")


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _dataset_kw(arr: np.ndarray, filters: Mapping[str, Any]) -> dict:
    """``create_dataset`` keywords of ``arr``: ``filters`` (checksum,
    compression), which need a chunked layout, for arrays with elements."""
    if arr.ndim == 0 or arr.size == 0:
        return {}
    return dict(filters, chunks=True) if filters else {}


def _create(group: h5py.Group, name: str, arr: np.ndarray, filters: Mapping[str, Any]):
    return group.create_dataset(name, data=arr, **_dataset_kw(arr, filters))


def _write_tree(group: h5py.Group, tree: Mapping[str, Any], where: str, filters: Mapping[str, Any]) -> None:
    """Write a value tree into ``group`` (see "Value trees" in the module doc)."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"cannot store {where}: expected a dict, got {type(tree).__name__}")
    json_keys = []
    group_paths = []
    for key, value in tree.items():
        _check_key(key, where)
        if isinstance(value, np.ndarray):
            group_paths.append(key)
        elif isinstance(value, Mapping) and _contains_array(value):
            group_paths.append(key)
    _check_no_prefix_clash(group_paths, where)

    for key, value in tree.items():
        item = f"{where}/{key}"
        if isinstance(value, np.ndarray):
            _create(group, key, _as_storable_array(value, item), filters)
        elif isinstance(value, Mapping) and _contains_array(value):
            sub = group.create_group(key)
            sub.attrs[_DICT_MARK_ATTR] = True
            _write_tree(sub, value, item, filters)
        elif _is_native_scalar(value):
            group.attrs[key] = value
        else:
            if _contains_array(value):
                raise TypeError(f"cannot store {item}: arrays inside lists are not supported; use a dict")
            group.attrs[key] = _to_json(value, item)
            json_keys.append(key)
    if json_keys:
        group.attrs[_JSON_KEYS_ATTR] = json.dumps(json_keys)


def _write_file(f: h5py.File, ckpt: Checkpoint, filters: Mapping[str, Any]) -> None:
    """Write every part of ``ckpt`` into the open (temporary) file ``f``."""
    if not isinstance(ckpt.config, Mapping):
        raise TypeError(f"cannot store config: expected a dict, got {type(ckpt.config).__name__}")
    _check_str_keys(ckpt.config, "config")
    try:
        config_text = json.dumps(dict(ckpt.config), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot store config: {exc}") from exc

    _check_scales(ckpt.params, ckpt.scales)
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = np.int64(FORMAT_VERSION if ckpt.scales else _PLAIN_VERSION)
    if ckpt.scales:
        f.attrs["quantization"] = QUANTIZATION
    f.attrs["config"] = config_text
    f.attrs["slimnp_version"] = str(_SLIMNP_VERSION)
    f.attrs["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    vocab = list(ckpt.vocab)
    for i, word in enumerate(vocab):
        if not isinstance(word, str):
            raise TypeError(f"cannot store vocab: entry {i} is {type(word).__name__}, not str")
    f.create_dataset("vocab", data=np.array(vocab, dtype=object), shape=(len(vocab),),
                     dtype=h5py.string_dtype("utf-8"))
    if ckpt.vocab_counts is not None:
        counts = np.asarray(ckpt.vocab_counts)
        if counts.dtype.kind not in "iub":
            raise TypeError(f"cannot store vocab_counts: expected integers, got dtype {counts.dtype}")
        _create(f, "vocab_counts", counts.astype(np.int64), filters)

    params = f.create_group("params")
    _write_params(params, ckpt.params, filters)
    if ckpt.scales:
        scales = f.create_group("param_scales")
        for name, scale in ckpt.scales.items():
            params[name].attrs["quantization"] = QUANTIZATION
            _create(scales, name, np.ascontiguousarray(scale, dtype=np.float32), filters)

    mapping = f.create_group("mapping")
    _check_no_prefix_clash(list(ckpt.mapping), "mapping")
    for name, table in ckpt.mapping.items():
        _check_key(name, "mapping")
        arr = _as_storable_array(table, f"mapping/{name}")
        stored = arr.astype(_smallest_int_dtype(arr)) if arr.dtype.kind in "iu" else arr
        ds = _create(mapping, name, stored, filters)
        ds.attrs["orig_dtype"] = arr.dtype.str
    for key, value in ckpt.mapping_attrs.items():
        if isinstance(value, np.ndarray):
            raise TypeError(f"cannot store mapping_attrs/{key}: arrays belong in mapping, not mapping_attrs")
    _write_tree(mapping, ckpt.mapping_attrs, "mapping_attrs", filters)

    _write_tree(f.create_group("optimizer"), ckpt.optimizer, "optimizer", filters)
    _write_tree(f.create_group("train_state"), ckpt.train_state, "train_state", filters)


def _check_scales(params: Mapping[str, Any], scales: Mapping[str, Any]) -> None:
    """Every scale belongs to an int8 parameter and has its shape less the last axis."""
    for name, scale in scales.items():
        arr = params.get(name)
        if arr is None:
            raise ValueError(f"cannot store scales/{name}: there is no parameter {name}")
        arr, scale = np.asarray(arr), np.asarray(scale)
        if arr.dtype != np.int8 or arr.ndim < 1:
            raise ValueError(f"cannot store scales/{name}: parameter {name} is {arr.dtype} "
                             f"{arr.shape}, not int8 (quantize_rows makes both)")
        if scale.shape != arr.shape[:-1] or scale.dtype.kind != "f":
            raise ValueError(f"cannot store scales/{name}: expected float scales of shape "
                             f"{arr.shape[:-1]}, got {scale.dtype} {scale.shape}")


def _write_params(group: h5py.Group, params: Mapping[str, Any], filters: Mapping[str, Any]) -> None:
    _check_no_prefix_clash(list(params), "params")
    for name, value in params.items():
        _check_key(name, "params")
        _create(group, name, _as_storable_array(value, f"params/{name}"), filters)


#: File bytes beside the data: per dataset (object header, chunk index) and per file.
_DATASET_OVERHEAD = 4096
_FILE_OVERHEAD = 16384


def _array_bytes(tree: Any) -> int:
    """Bytes of the arrays inside a value tree, with their datasets' overhead."""
    if isinstance(tree, np.ndarray):
        return int(tree.nbytes) + _DATASET_OVERHEAD
    if isinstance(tree, Mapping):
        return sum(_array_bytes(v) for v in tree.values())
    return 0


def payload_bytes(ckpt: Checkpoint) -> int:
    """About the size of the file :func:`save` writes for ``ckpt`` (quoted
    when the disk is full)."""
    n = _FILE_OVERHEAD + sum(_array_bytes(t) for t in (ckpt.params, ckpt.scales, ckpt.mapping,
                                                        ckpt.optimizer, ckpt.train_state))
    n += sum(len(w.encode("utf-8")) + 16 for w in ckpt.vocab)  # strings and their heap entries
    if ckpt.vocab_counts is not None:
        n += 8 * len(ckpt.vocab_counts) + _DATASET_OVERHEAD
    return n


def save(path: PathLike, ckpt: Checkpoint, *, compression: Optional[str] = None,
         checksum: bool = True) -> None:
    """Write ``ckpt`` to ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target file; replaced only once the new file is completely on disk.
    ckpt : Checkpoint
        What to store.  ``ckpt.attrs`` is ignored; fresh root attributes are
        written.
    compression : str, optional
        h5py compression filter for array datasets (e.g. ``"gzip"``).
    checksum : bool, default True
        Fletcher-32 checksums on every array dataset (see "Checksums" in the
        module doc); ``False`` writes plain contiguous datasets, as slimnp
        did before checksums (tests of old files use it).

    Raises
    ------
    TypeError, ValueError
        A value cannot be stored (the message names it).
    slimnp.errors.WriteError
        Writing failed (disk full, permission denied, ...): an ``OSError``
        whose message is one line naming ``path`` and what was kept.

    Notes
    -----
    The data go to ``.<name>.tmp-<pid>`` in the target directory, which is
    flushed, fsync'ed and renamed onto ``path`` with :func:`os.replace`; the
    directory is then fsync'ed so the rename itself survives a crash.  On any
    failure, including ``KeyboardInterrupt``, the temporary file is removed
    and the previous file at ``path`` is left untouched.
    """
    filters: Dict[str, Any] = {}
    if checksum:
        filters["fletcher32"] = True
    if compression:
        filters["compression"] = compression
    with atomic_path(path, needed=payload_bytes(ckpt)) as tmp:
        with open(tmp, "w+b", buffering=0) as raw:
            sink = _StickyFile(raw)
            with h5py.File(sink, "w") as f:
                _write_file(f, ckpt, filters)
            sink.check()  # the first failed write, as an OSError


class _StickyFile:
    """The file object HDF5 writes a checkpoint through (h5py's ``fileobj``
    driver): every write goes to ``raw`` until one fails; from then on the
    writes stop reaching the disk but are reported as done, and
    :meth:`check` raises the first error once HDF5 has closed the file.

    Why: when the disk fills up, HDF5 (2.0, through h5py 3.16) reports many of
    the failed writes while h5py frees its objects, where they can only be
    printed, and then crashed the interpreter (measured on a full tmpfs, with
    and without chunked datasets).  Here HDF5 never sees a failure; the
    half-written temporary file is deleted by :func:`atomic_path`.

    HDF5 reads back a little of what it wrote (its metadata); after a failure
    the small writes (up to :attr:`KEEP` bytes each) are kept in memory and
    served to those reads, so HDF5 finishes on consistent metadata.  Every
    read fills its whole buffer, with zeros past the end as HDF5's own POSIX
    driver does: h5py's driver neither checks the count ``readinto`` returns
    nor clears the buffer, so a short read would hand HDF5 stale memory (seen:
    a failed write that failed differently from one run to the next).
    """

    KEEP = 1 << 16

    def __init__(self, raw):
        self.raw, self.pos, self.end, self.error = raw, 0, 0, None
        self.kept = []  # (offset, bytes) written after the failure, in order

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.end}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        if self.error is None:
            try:
                self.raw.seek(self.pos)
                done = 0
                while done < n:
                    done += self.raw.write(view[done:])
            except OSError as exc:
                self.error = exc
        if self.error is not None and n <= self.KEEP:
            self.kept.append((self.pos, bytes(view)))
        self.pos += n
        self.end = max(self.end, self.pos)
        return n

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        got = 0
        try:
            self.raw.seek(self.pos)
            got = self.raw.readinto(view) or 0
        except OSError as exc:
            self.error = self.error or exc
        view[got:] = bytes(n - got)
        for off, data in self.kept:  # what never reached the disk
            lo, hi = max(off, self.pos), min(off + len(data), self.pos + n)
            if lo < hi:
                view[lo - self.pos : hi - self.pos] = data[lo - off : hi - off]
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(n if n >= 0 else max(0, self.end - self.pos))
        self.readinto(buf)
        return bytes(buf)

    def truncate(self, size=None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                self.raw.truncate(size)
            except OSError as exc:
                self.error = exc
        self.end = size
        return size

    def flush(self) -> None:
        pass  # raw is unbuffered

    def check(self) -> None:
        if self.error is not None:
            raise self.error


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _open(path: str) -> h5py.File:
    """Open ``path`` read-only, turning every failure into a FormatError."""
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a directory, not a slimnp model file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        n = error_number(exc)
        if n is not None and n not in (errno.EINVAL, errno.ENOENT):  # EACCES, EIO, ...
            raise FormatError(f"{path}: cannot read it: {cause_of(exc, path, writing=False)[1]}") from exc
        raise FormatError(f"{path}: not an HDF5 file, or truncated") from exc


def _check_header(f: h5py.File, path: str) -> Tuple[dict, dict]:
    """Validate the root attributes; return ``(config, root_attrs)``."""
    try:
        attrs = {k: _from_attr(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise FormatError(f"{path}: unreadable root attributes ({_one_line(exc)})") from exc
    if attrs.get("format") != FORMAT:
        raise FormatError(f"{path}: not a slimnp model file (foreign HDF5)")
    version = attrs.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise FormatError(f"{path}: missing or invalid format_version attribute ({version!r})")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{path}: written by a newer slimnp (format version {version} > {FORMAT_VERSION}); upgrade slimnp")
    if version < 1:
        raise FormatError(f"{path}: unsupported format version {version}")
    text = attrs.get("config")
    if not isinstance(text, str):
        raise FormatError(f"{path}: missing config attribute")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise FormatError(f"{path}: config attribute is not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(config, dict):
        raise FormatError(f"{path}: config attribute is not a JSON object")
    root = {k: v for k, v in attrs.items() if k != "config"}
    return config, root


def _walk_datasets(group: h5py.Group, prefix: str = ""):
    """Yield ``(relative_name, dataset)`` for every dataset below ``group``."""
    for name, obj in group.items():
        if isinstance(obj, h5py.Dataset):
            yield prefix + name, obj
        elif isinstance(obj, h5py.Group):
            yield from _walk_datasets(obj, prefix + name + "/")


class _Damaged(Exception):
    """A dataset failed its checksum (or another filter) while being read."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _damaged(path: str, name: str) -> FormatError:
    return FormatError(f"{path}: dataset {name} is damaged (its checksum does not match): the file "
                       "was corrupted or not copied completely; use another copy or a checkpoint")


def _read_array(ds: h5py.Dataset) -> np.ndarray:
    # ds[()] reads everything into memory (never a lazy h5py handle); asarray
    # keeps 0-d datasets as arrays instead of NumPy scalars.
    try:
        return np.asarray(ds[()])
    except OSError as exc:
        if "filter" in str(exc) or "checksum" in str(exc):  # Fletcher-32 said no
            raise _Damaged(ds.name) from exc
        raise


def _quantized(ds: h5py.Dataset, path: str) -> bool:
    """Whether ``ds`` (a parameter) is stored as int8 rows, in a scheme this slimnp knows."""
    scheme = ds.attrs.get("quantization")
    if scheme is None:
        return False
    if _from_attr(scheme) != QUANTIZATION:
        raise FormatError(f"{path}: {ds.name} is quantized as {_from_attr(scheme)!r}, which this slimnp "
                          f"does not know (it knows {QUANTIZATION}); upgrade slimnp")
    return True


def _read_scale(f: h5py.File, name: str, ds: h5py.Dataset, path: str) -> np.ndarray:
    """The float32 scales of the int8 parameter ``ds`` (``/params/<name>``), checked against it."""
    key = "param_scales/" + name
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise FormatError(f"{path}: missing /{key}, the scales of the int8 parameter /params/{name}")
    sds = f[key]
    if ds.dtype != np.int8 or ds.ndim < 1 or sds.shape != ds.shape[:-1] or sds.dtype.kind != "f":
        raise FormatError(f"{path}: /params/{name} ({ds.dtype} {ds.shape}) and /{key} ({sds.dtype} "
                          f"{sds.shape}) do not fit: expected int8 and float scales of shape {ds.shape[:-1]}")
    return _read_array(sds).astype(np.float32, copy=False)


def _read_params(f: h5py.File, path: str, dequantize: bool) -> Tuple[dict, dict]:
    """``(params, scales)`` of an open file: int8 parameters as float32
    (``dequantize``) or as stored, with their scales."""
    params, scales = {}, {}
    for name, ds in _walk_datasets(f["params"]):
        arr = _read_array(ds)
        if _quantized(ds, path):
            scale = _read_scale(f, name, ds, path)
            if dequantize:
                arr = dequantize_rows(arr, scale)
            else:
                scales[name] = scale
        params[name] = arr
    return params, scales


def _read_attrs(group: h5py.Group, scalars_only: bool = False) -> dict:
    json_keys = set(json.loads(group.attrs[_JSON_KEYS_ATTR])) if _JSON_KEYS_ATTR in group.attrs else set()
    out = {}
    for key, value in group.attrs.items():
        if key in _RESERVED:
            continue
        if key in json_keys:
            if not scalars_only:
                out[key] = json.loads(value)
        else:
            out[key] = _from_attr(value)
    return out


def _read_tree(group: h5py.Group) -> dict:
    """Inverse of :func:`_write_tree`."""
    out = _read_attrs(group)

    def walk(g: h5py.Group, prefix: str) -> None:
        for name, obj in g.items():
            key = prefix + name
            if isinstance(obj, h5py.Dataset):
                out[key] = _read_array(obj)
            elif obj.attrs.get(_DICT_MARK_ATTR, False):
                out[key] = _read_tree(obj)
            else:
                walk(obj, key + "/")

    walk(group, "")
    return out


def _expected_shape_problems(expected: Mapping[str, Any], found: Mapping[str, Tuple[int, ...]]) -> List[str]:
    want = {k: tuple(int(n) for n in v) for k, v in expected.items()}
    missing = sorted(set(want) - set(found))
    unexpected = sorted(set(found) - set(want))
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(unexpected))
    for name in sorted(set(want) & set(found)):
        if want[name] != tuple(found[name]):
            problems.append(f"{name}: expected {want[name]}, found {tuple(found[name])}")
    return problems


_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, UnicodeDecodeError)


def load(path: PathLike, expected_shapes: Optional[ShapeSpec] = None, *, params: bool = True,
         optimizer: bool = True, train_state: bool = True, mapping: Optional[bool] = None,
         dequantize: bool = True) -> Checkpoint:
    """Read a slimnp model or checkpoint file.

    Parameters
    ----------
    path : str or os.PathLike
        File written by :func:`save`.
    expected_shapes : dict or callable, optional
        ``{"layer/name": shape}`` or a function ``config -> such a dict``.
        The file's parameter shapes (read from metadata only, so this works
        with ``params=False`` too) must match exactly; every mismatch is
        reported in one :class:`FormatError`.
    params : bool, default True
        Load ``/params``; ``False`` leaves ``Checkpoint.params`` empty.
    optimizer, train_state : bool, default True
        Load those groups; ``False`` leaves them empty.
    mapping : bool, optional
        Load the mapping tables; defaults to ``params`` since they are part of
        the model.  Mapping attributes are always read (they are tiny).
    dequantize : bool, default True
        Return int8 parameters (a quantized file, format version 2) as
        float32, ``float32(q) * scale`` per row; ``False`` returns them as
        stored, int8, with their scales in ``Checkpoint.scales`` (what
        :func:`save` needs to write them back unchanged).

    Returns
    -------
    Checkpoint
        In-memory NumPy arrays; parameters keep their stored dtype (int8
        ones are float32 unless ``dequantize=False``), mapping tables get
        their original dtype back.  ``attrs["quantization"]`` says whether
        the file was quantized.

    Raises
    ------
    FormatError
        Missing, non-HDF5, truncated, foreign or too-new file, bad config, or
        parameter shapes that do not match ``expected_shapes``.
    """
    path = os.fspath(path)
    load_mapping = params if mapping is None else mapping
    with _open(path) as f:
        config, root = _check_header(f, path)
        try:
            if "params" not in f or not isinstance(f["params"], h5py.Group):
                raise FormatError(f"{path}: missing /params group")
            shapes = {name: tuple(ds.shape) for name, ds in _walk_datasets(f["params"])}
        except FormatError:
            raise
        except _READ_ERRORS as exc:
            raise FormatError(f"{path}: corrupt or truncated file ({_one_line(exc)})") from exc

        if expected_shapes is not None:
            # Called outside the error wrapper: a bug in the caller's shape
            # function should surface as itself, not as a "corrupt file".
            expected = expected_shapes(config) if callable(expected_shapes) else expected_shapes
            problems = _expected_shape_problems(expected, shapes)
            if problems:
                raise FormatError(f"{path}: parameters do not match the model: " + "; ".join(problems))

        with _reading(path):
            if "vocab" not in f:
                raise FormatError(f"{path}: missing /vocab dataset")
            vocab = [str(w) for w in f["vocab"].asstr()[()].tolist()]
            counts = _read_array(f["vocab_counts"]) if "vocab_counts" in f else None
            param_arrays, scales = _read_params(f, path, dequantize) if params else ({}, {})
            tables: Dict[str, np.ndarray] = {}
            mapping_attrs: dict = {}
            if "mapping" in f:
                mapping_attrs = _read_attrs(f["mapping"])
                if load_mapping:
                    for name, ds in _walk_datasets(f["mapping"]):
                        arr = _read_array(ds)
                        orig = ds.attrs.get("orig_dtype")
                        tables[name] = arr.astype(np.dtype(_from_attr(orig))) if orig is not None else arr
            opt = _read_tree(f["optimizer"]) if optimizer and "optimizer" in f else {}
            state = _read_tree(f["train_state"]) if train_state and "train_state" in f else {}

    return Checkpoint(config=config, vocab=vocab, params=param_arrays, mapping=tables,
                      mapping_attrs=mapping_attrs, optimizer=opt, train_state=state,
                      vocab_counts=counts, attrs=root, scales=scales)


@contextlib.contextmanager
def _reading(path):
    """Read errors inside a file's body as one :class:`FormatError` naming
    ``path`` (a damaged dataset by name, anything else as corrupt or truncated)."""
    try:
        yield
    except FormatError:
        raise
    except _Damaged as exc:
        raise _damaged(path, exc.name) from None
    except _READ_ERRORS as exc:
        raise FormatError(f"{path}: corrupt or truncated file ({_one_line(exc)})") from exc


def load_params_into(path: PathLike, arrays: Mapping[str, Any]) -> None:
    """Read the parameters of a slimnp file straight into ``arrays``.

    ``arrays`` maps every ``"layer/name"`` of the file to an array of the
    same shape (a model's parameter views, NumPy or CuPy).  A C-contiguous
    NumPy array of the stored dtype is filled in place by HDF5 (no copy of
    the file's data in memory: reloading the best model for the final test
    costs no memory); others, and int8 parameters (dequantized as by
    :func:`load`), through one dataset-sized host array.

    Raises
    ------
    FormatError
        As :func:`load`; also when the names or shapes differ from ``arrays``.
    """
    path = os.fspath(path)
    with _open(path) as f:
        _check_header(f, path)
        with _reading(path):
            if "params" not in f or not isinstance(f["params"], h5py.Group):
                raise FormatError(f"{path}: missing /params group")
            found = dict(_walk_datasets(f["params"]))
            problems = _expected_shape_problems({k: a.shape for k, a in arrays.items()},
                                                {k: ds.shape for k, ds in found.items()})
            if problems:
                raise FormatError(f"{path}: parameters do not match the model: " + "; ".join(problems))
            for name, dest in arrays.items():
                ds = found[name]
                if _quantized(ds, path):
                    host = dequantize_rows(_read_array(ds), _read_scale(f, name, ds, path))
                    dest[...] = host.astype(dest.dtype, copy=False) if isinstance(dest, np.ndarray) \
                        else _to_module_of(dest, host)
                elif isinstance(dest, np.ndarray) and dest.flags.c_contiguous and dest.dtype == ds.dtype:
                    if dest.size:
                        try:
                            ds.read_direct(dest)
                        except OSError as exc:
                            if "filter" in str(exc) or "checksum" in str(exc):
                                raise _Damaged(ds.name) from exc
                            raise
                else:
                    dest[...] = _read_array(ds).astype(dest.dtype, copy=False) if isinstance(dest, np.ndarray) \
                        else _to_module_of(dest, _read_array(ds))


def _to_module_of(like, host: np.ndarray):
    """``host`` as an array of ``like``'s module and dtype (CuPy: on its device)."""
    from slimnp.backend import array_module

    return array_module(like).asarray(host, dtype=like.dtype)


def read_config(path: PathLike) -> dict:
    """Return the configuration of a slimnp file after checking its header.

    Only the root attributes are read, so this is cheap for any file size.

    Raises
    ------
    FormatError
        Same header checks as :func:`load`.
    """
    path = os.fspath(path)
    with _open(path) as f:
        config, _ = _check_header(f, path)
    return config


def describe(path: PathLike) -> dict:
    """Summarise a slimnp file from metadata only (no dataset contents read).

    Returns
    -------
    dict
        ``file``, ``file_size_bytes``, ``format_version``, ``slimnp_version``,
        ``created``, ``config``, ``vocab_size``, ``datasets`` (one dict per
        dataset in the file: ``name``, ``shape``, ``dtype``, ``size``,
        ``nbytes``; ``nbytes`` is size times item size, so for the
        variable-length vocabulary it counts references, not text),
        ``parameters`` (total elements under ``/params``), ``layers``
        (elements per first-level group under ``/params``),
        ``mapping_bytes``, ``parameter_bytes`` (the arrays of ``/params``
        and ``/param_scales``, uncompressed), ``quantization`` (None for a
        float file; else ``scheme``, ``int8`` (the int8 parameters' names),
        ``int8_bytes``, ``scale_bytes``, ``float_bytes`` (the parameters
        kept as floats: biases), ``float32_bytes`` (all parameters as
        float32)), and the scalar attributes of ``train_state``,
        ``optimizer`` and ``mapping_attrs``.

    Raises
    ------
    FormatError
        Same header checks as :func:`load`.
    """
    path = os.fspath(path)
    with _open(path) as f:
        config, root = _check_header(f, path)
        try:
            datasets = []
            for name, ds in _walk_datasets(f):
                dtype = "str" if h5py.check_string_dtype(ds.dtype) is not None else str(ds.dtype)
                size = int(ds.size)
                datasets.append({"name": "/" + name, "shape": [int(n) for n in ds.shape], "dtype": dtype,
                                 "size": size, "nbytes": size * int(ds.dtype.itemsize)})
            layers: Dict[str, int] = {}
            for d in datasets:
                if d["name"].startswith("/params/"):
                    layer = d["name"][len("/params/"):].split("/")[0]
                    layers[layer] = layers.get(layer, 0) + d["size"]
            params = [d for d in datasets if d["name"].startswith("/params/")]
            scale_bytes = sum(d["nbytes"] for d in datasets if d["name"].startswith("/param_scales/"))
            int8 = [d["name"][len("/params/"):] for d in params
                    if _quantized(f[d["name"]], path)]
            quantization = None if not int8 else {
                "scheme": QUANTIZATION, "int8": int8,
                "int8_bytes": sum(d["nbytes"] for d in params if d["name"][len("/params/"):] in int8),
                "scale_bytes": scale_bytes,
                "float_bytes": sum(d["nbytes"] for d in params if d["name"][len("/params/"):] not in int8),
                "float32_bytes": 4 * sum(d["size"] for d in params)}
            info = {
                "file": path,
                "file_size_bytes": os.path.getsize(path),
                "format_version": root.get("format_version"),
                "slimnp_version": root.get("slimnp_version"),
                "created": root.get("created"),
                "config": config,
                "vocab_size": int(f["vocab"].shape[0]) if "vocab" in f else 0,
                "datasets": datasets,
                "parameters": sum(layers.values()),
                "layers": layers,
                "mapping_bytes": sum(d["nbytes"] for d in datasets if d["name"].startswith("/mapping/")),
                "parameter_bytes": sum(d["nbytes"] for d in params) + scale_bytes,
                "quantization": quantization,
                "mapping_attrs": _read_attrs(f["mapping"], scalars_only=True) if "mapping" in f else {},
                "train_state": _read_attrs(f["train_state"], scalars_only=True) if "train_state" in f else {},
                "optimizer": _read_attrs(f["optimizer"], scalars_only=True) if "optimizer" in f else {},
            }
        except FormatError:
            raise
        except _READ_ERRORS as exc:
            raise FormatError(f"{path}: corrupt or truncated file ({_one_line(exc)})") from exc
    return info
