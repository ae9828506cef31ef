"""Kernel dispatcher: the only entry point layers use.

Each public function validates its arguments once (dtype, shape, index range)
and then runs one implementation:

* ``cpu``       -- Numba kernels (``kernels/cpu.py``) for NumPy arrays;
* ``gpu``       -- CUDA C compiled by CuPy (``kernels/gpu.py``) for CuPy arrays;
* ``reference`` -- the NumPy/``xp`` specification (``kernels/reference.py``),
  used for anything the fast paths do not cover (non-contiguous arrays, on
  either device), and selectable for testing with ``use("reference")`` or
  ``SLIMNP_KERNELS=reference``.

The host-side tools' loops (the synthetic corpus's HMM, the alias sampler's
table: ``kernels/host.py``) are Numba only, in every mode; and
:func:`set_cpu_threads` sizes Numba's pool; :func:`float_control` gives
:func:`slimnp.threads.flush_denormals` the registers it sets.  Numba is
imported here, and nowhere else in slimnp, the first time a CPU kernel runs.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from ..backend import array_module
from . import reference

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_mode = os.environ.get("SLIMNP_KERNELS", "auto")
_MODES = ("auto", "cpu", "gpu", "reference")
_cpu = None
_gpu = None
_host = None


def _cpu_module():
    global _cpu
    if _cpu is None:
        from . import cpu  # imports numba: paid only when a kernel first runs

        _cpu = cpu
    return _cpu


def _gpu_module():
    global _gpu
    if _gpu is None:
        from . import gpu  # CUDA C sources; CuPy compiles them on first launch

        _gpu = gpu
    return _gpu


def _host_module():
    global _host
    if _host is None:
        from . import host  # Numba loops of the host-side tools

        _host = host
    return _host


def use(mode: str) -> None:
    """Select kernels: 'auto' (Numba for NumPy arrays, CUDA for CuPy arrays),
    'cpu', 'gpu' or 'reference'.

    'cpu' and 'gpu' insist on their fast path (an error for arrays it does
    not take); 'gpu' sends C-contiguous arrays of either module to
    ``kernels/gpu.py`` (the tests run it on NumPy arrays through a CPU
    emulator of its CUDA C).
    """
    global _mode
    if mode not in _MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; expected {', '.join(_MODES)}")
    _mode = mode


@contextlib.contextmanager
def using(mode: str):
    """Context manager form of :func:`use` (restores the previous mode)."""
    old = _mode
    use(mode)
    try:
        yield
    finally:
        use(old)


def _impl(*arrays):
    if _mode == "reference":
        return reference
    if _mode == "gpu":
        if not all(a.flags.c_contiguous for a in arrays):
            raise ValueError("kernel mode 'gpu' needs C-contiguous arrays")
        return _gpu_module()
    if all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays):
        return _cpu_module()
    if _mode == "cpu":
        raise ValueError("kernel mode 'cpu' needs C-contiguous NumPy arrays")
    xp = array_module(arrays[0])
    if xp is not np and all(array_module(a) is xp and a.flags.c_contiguous for a in arrays):
        return _gpu_module()
    return reference


def implementation(*arrays) -> str:
    """Which kernels ``arrays`` would run on: 'cpu', 'gpu' or 'reference'."""
    impl = _impl(*arrays)
    return "reference" if impl is reference else ("gpu" if impl is _gpu else "cpu")


def _check_float(name, a, dtype=None):
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected float32 or float64, got {a.dtype}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{name}: dtype {a.dtype} does not match {dtype}")


def _check_shape(name, a, shape):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")


def _check_ids(name, ids, n, upper):
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer ids, got {ids.dtype}")
    _check_shape(name, ids, (n,))
    if n:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= upper:
            raise IndexError(f"{name}: ids must lie in [0, {upper}), found range [{lo}, {hi}]")


def lstm_pointwise_forward(xg, hg, c_prev, act, c, h, tc):
    """One LSTM step's gate math; see :func:`reference.lstm_pointwise_forward`."""
    B, H = c_prev.shape
    for name, a, shape in (("xg", xg, (B, 4 * H)), ("hg", hg, (B, 4 * H)),
                           ("act", act, (B, 4 * H)), ("c", c, (B, H)),
                           ("h", h, (B, H)), ("tc", tc, (B, H))):
        _check_float(name, a, c_prev.dtype)
        _check_shape(name, a, shape)
    _impl(xg, hg, c_prev, act, c, h, tc).lstm_pointwise_forward(xg, hg, c_prev, act, c, h, tc)


def lstm_pointwise_backward(act, c_prev, tc, dh, dc, dgates):
    """One LSTM step's gate backward; see :func:`reference.lstm_pointwise_backward`."""
    B, H = c_prev.shape
    for name, a, shape in (("act", act, (B, 4 * H)), ("tc", tc, (B, H)),
                           ("dh", dh, (B, H)), ("dc", dc, (B, H)),
                           ("dgates", dgates, (B, 4 * H))):
        _check_float(name, a, c_prev.dtype)
        _check_shape(name, a, shape)
    _impl(act, c_prev, tc, dh, dc, dgates).lstm_pointwise_backward(act, c_prev, tc, dh, dc, dgates)


def lstm_segment_kernels(gates, cs):
    """The two LSTM step kernels, validated once for a whole segment.

    ``gates : (T, B, 4H)`` and ``cs : (T+1, B, H)`` cell states (and every
    other per-step buffer of the same dtype and layout).  Returns the
    implementation's ``(lstm_pointwise_forward, lstm_pointwise_backward)``
    without per-call checks: the time loop calls them T times on slices of
    these validated buffers, where the checks would cost as much as the
    kernel itself at small B.
    """
    _check_float("gates", gates, cs.dtype)
    _check_ndim("gates", gates, 3, "(T, B, 4H)")
    T, B, H4 = gates.shape
    _check_shape("cs", cs, (T + 1, B, H4 // 4))
    impl = _impl(gates, cs)
    return impl.lstm_pointwise_forward, impl.lstm_pointwise_backward


def embedding_scatter_add(dW, ids, dX):
    """``dW[ids[n]] += dX[n]``; see :func:`reference.embedding_scatter_add`."""
    V, D = dW.shape
    _check_float("dW", dW)
    _check_float("dX", dX, dW.dtype)
    _check_shape("dX", dX, (ids.shape[0], D))
    _check_ids("ids", ids, dX.shape[0], V)
    _impl(dW, ids, dX).embedding_scatter_add(dW, ids, dX)


def softmax_xent(logits, targets, scale=1.0, compute_grad=True, bias=None):
    """Fused (bias +) log-softmax cross-entropy; see :func:`reference.softmax_xent`."""
    N, V = logits.shape
    _check_float("logits", logits)
    _check_ids("targets", targets, N, V)
    arrays = (logits, targets)
    if bias is not None:
        _check_float("bias", bias, logits.dtype)
        _check_shape("bias", bias, (V,))
        arrays += (bias,)
    return _impl(*arrays).softmax_xent(logits, targets, scale, compute_grad, bias)



def nce_xent(zt, logq_t, ZS, logq_s, scale=1.0, compute_grad=True):
    """NCE logistic loss of targets and noise words; see :func:`reference.nce_xent`."""
    N, S = ZS.shape
    _check_float("ZS", ZS)
    for name, a, n in (("zt", zt, N), ("logq_t", logq_t, N), ("logq_s", logq_s, S)):
        _check_float(name, a, ZS.dtype)
        _check_shape(name, a, (n,))
    return _impl(zt, logq_t, ZS, logq_s).nce_xent(zt, logq_t, ZS, logq_s, scale, compute_grad)

def _check_ndim(name, a, ndim, axes):
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array {axes}, got shape {tuple(a.shape)}")


def _check_index_table(name, idx, K, upper):
    """``idx : (K, V)`` integer table with every entry in ``[0, upper)``."""
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer table (int32), got {idx.dtype}")
    _check_ndim(name, idx, 2, "(K, V)")
    if idx.shape[0] != K:
        raise ValueError(f"{name}: expected shape (K, V) with K = {K} (from the partial "
                         f"products), got {tuple(idx.shape)}; pass the k-major (K, V) table")
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= upper:
            raise IndexError(f"{name}: entries must lie in [0, {upper}) (the pool size Mk), "
                             f"found range [{lo}, {hi}]")


def slim_gather_sum_t(PT, idx_kv, b, zT):
    """Slim output logits ``zT[w, n] = b[w] + sum_k PT[k, idx_kv[k, w], n]``.

    Step 2 of Algorithm 1 in Li et al., AAAI 2018 (the notation is at the top
    of the slim output layer in :mod:`slimnp.layers`); see
    :func:`reference.slim_gather_sum_t`.  ``PT : (K, Mk, N)``, ``idx_kv : (K,
    V)`` int in ``[0, Mk)``, ``b : (V,)`` or None, ``zT : (V, N)`` overwritten.
    """
    _check_float("PT", PT)
    _check_ndim("PT", PT, 3, "(K, Mk, N)")
    K, Mk, N = PT.shape
    _check_index_table("idx_kv", idx_kv, K, Mk)
    V = idx_kv.shape[1]
    if b is not None:
        _check_float("b", b, PT.dtype)
        _check_shape("b", b, (V,))
    _check_float("zT", zT, PT.dtype)
    _check_shape("zT", zT, (V, N))
    arrays = (PT, idx_kv, zT) if b is None else (PT, idx_kv, b, zT)
    _impl(*arrays).slim_gather_sum_t(PT, idx_kv, b, zT)


def softmax_xent_t(zT, targets, scale=1.0, compute_grad=True, bias=None):
    """:func:`softmax_xent` for word-major logits ``zT (V, N)``; see
    :func:`reference.softmax_xent_t`."""
    _check_float("zT", zT)
    _check_ndim("zT", zT, 2, "(V, N)")
    V, N = zT.shape
    _check_ids("targets", targets, N, V)
    arrays = (zT, targets)
    if bias is not None:
        _check_float("bias", bias, zT.dtype)
        _check_shape("bias", bias, (V,))
        arrays += (bias,)
    return _impl(*arrays).softmax_xent_t(zT, targets, scale, compute_grad, bias)


def log_softmax_t(zT, bias=None):
    """Column log-softmax of word-major logits ``zT (V, N)`` in place (+
    ``bias``); returns the logsumexp of each column; see
    :func:`reference.log_softmax_t`."""
    _check_float("zT", zT)
    _check_ndim("zT", zT, 2, "(V, N)")
    arrays = (zT,)
    if bias is not None:
        _check_float("bias", bias, zT.dtype)
        _check_shape("bias", bias, (zT.shape[0],))
        arrays += (bias,)
    return _impl(*arrays).log_softmax_t(zT, bias)


def _check_inv(inv, K, V, Mk):
    if inv.dtype.kind not in "iu" or inv.ndim != 3 or inv.shape[0] != K or inv.shape[2] != Mk \
            or inv.shape[1] * Mk != V:
        raise ValueError(f"inv: expected an integer (K, V/Mk, Mk) = ({K}, {V // max(Mk, 1)}, {Mk}) "
                         f"table from mapping.inverse_table, got {inv.dtype} {tuple(inv.shape)}")
    if inv.size and (int(inv.min()) < 0 or int(inv.max()) >= V):
        raise IndexError(f"inv: entries must lie in [0, {V})")


def slim_segment_sum_t(dzT, idx_kv, GT, inv=None, db=None):
    """``GT[k, j, n] = sum of dzT[w, n] over the words w with idx_kv[k, w] == j``.

    The backward of :func:`slim_gather_sum_t` w.r.t. ``PT``; see
    :func:`reference.slim_segment_sum_t`.  ``dzT : (V, N)``, ``idx_kv : (K,
    V)`` int in ``[0, Mk)``, ``GT : (K, Mk, N)`` overwritten, ``inv`` the
    inverted table or None, ``db (V,)`` (optional) overwritten with
    ``dzT.sum(axis=1)``.
    """
    _check_float("GT", GT)
    _check_ndim("GT", GT, 3, "(K, Mk, N)")
    K, Mk, N = GT.shape
    _check_index_table("idx_kv", idx_kv, K, Mk)
    V = idx_kv.shape[1]
    _check_float("dzT", dzT, GT.dtype)
    _check_shape("dzT", dzT, (V, N))
    arrays = (dzT, idx_kv, GT)
    if inv is not None:
        _check_inv(inv, K, V, Mk)
        arrays += (inv,)
    if db is not None:
        _check_float("db", db, GT.dtype)
        _check_shape("db", db, (V,))
        arrays += (db,)
    _impl(*arrays).slim_segment_sum_t(dzT, idx_kv, GT, inv, db)


def _check_pair(y, x):
    _check_float("y", y)
    _check_float("x", x, y.dtype)
    _check_shape("x", x, y.shape)


def sumsq(x):
    """``sum(x**2)`` of a 1-d array, accumulated in float64 (a Python float)."""
    _check_float("x", x)
    _check_ndim("x", x, 1, "(n,)")
    return _impl(x).sumsq(x)


def axpy(y, a, x):
    """``y += a * x`` in place, 1-d ``y`` and ``x``, scalar ``a`` (one pass)."""
    _check_pair(y, x)
    _check_ndim("y", y, 1, "(n,)")
    _impl(y, x).axpy(y, a, x)


def _check_rows(rows, n):
    _check_ndim("rows", rows, 1, "(R,)")
    _check_ids("rows", rows, rows.shape[0], n)


def sumsq_rows(x, rows):
    """:func:`sumsq` over rows ``rows`` (distinct int64) of the 2-d ``x``."""
    _check_float("x", x)
    _check_ndim("x", x, 2, "(V, D)")
    _check_rows(rows, x.shape[0])
    return float(_impl(x, rows).sumsq_rows(x, rows))


def axpy_rows(y, a, x, rows):
    """``y[rows] += a * x[rows]`` for distinct ``rows`` of 2-d ``y`` and ``x``."""
    _check_pair(y, x)
    _check_ndim("y", y, 2, "(V, D)")
    _check_rows(rows, y.shape[0])
    _impl(y, x, rows).axpy_rows(y, a, x, rows)


def adagrad_update(p, acc, g, a, lr, eps, rows=None):
    """``acc += (a g)^2; p -= lr (a g) / (sqrt(acc) + eps)`` in place; see
    :func:`reference.adagrad_update`.

    ``p``, ``acc``, ``g``: arrays of one float dtype and shape; every element
    is updated (``rows`` None), or, for 2-d arrays, the rows ``rows``
    (distinct integers) only: the other rows of ``p`` and ``acc`` are left as
    they are.  Numba and the reference give identical bits, the GPU the same
    to rounding (it fuses multiply-adds).
    """
    if p.dtype not in _FLOATS:
        raise TypeError(f"adagrad_update: expected float32 or float64 parameters, got {p.dtype}")
    for name, x in (("acc", acc), ("g", g)):
        if x.dtype != p.dtype or x.shape != p.shape:
            raise ValueError(f"adagrad_update: {name} is {x.dtype}{tuple(x.shape)}, "
                             f"params {p.dtype}{tuple(p.shape)}")
    arrays = (p, acc, g)
    if rows is not None:
        if p.ndim != 2 or rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ValueError(f"adagrad_update: rows needs 2-d arrays and 1-d integer rows, got "
                             f"arrays of shape {tuple(p.shape)} and rows {rows.dtype}{tuple(rows.shape)}")
        if not rows.shape[0]:
            return
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= p.shape[0]:  # the kernels do not check their indices
            raise IndexError(f"adagrad_update: rows must lie in [0, {p.shape[0]}), found [{lo}, {hi}]")
        arrays += (rows,)
    _impl(*arrays).adagrad_update(p, acc, g, a, lr, eps, rows)


def nearest_centroid(scores, c_sq, labels, d2):
    """k-means assignment of a block of rows: ``labels[i] = argmin_j (c_sq[j]
    - 2 scores[i, j])``, ``d2[i]`` its value (see
    :func:`reference.nearest_centroid`).  scores (b, k) and c_sq (k,) of one
    float dtype; labels (b,) int32 and d2 (b,) float64 are written."""
    _check_float("scores", scores)
    _check_float("c_sq", c_sq, scores.dtype)
    b, k = scores.shape
    _check_shape("c_sq", c_sq, (k,))
    _check_shape("labels", labels, (b,))
    _check_shape("d2", d2, (b,))
    if labels.dtype != np.int32 or d2.dtype != np.float64:
        raise TypeError(f"labels must be int32 and d2 float64, got {labels.dtype} and {d2.dtype}")
    impl = _impl(scores, c_sq, labels, d2)
    (reference if impl is _gpu else impl).nearest_centroid(scores, c_sq, labels, d2)


def cluster_sums(X, labels, sums):
    """k-means' update: ``sums[c]`` (k, d) float64 = the sum of the rows of
    ``X (n, d)`` labelled c, in ascending row order (see
    :func:`reference.cluster_sums`).  labels (n,) int in ``[0, k)``."""
    _check_float("X", X)
    _check_ndim("X", X, 2, "(n, d)")
    n, d = X.shape
    if sums.dtype != np.float64 or sums.ndim != 2 or sums.shape[1] != d:
        raise ValueError(f"sums must be float64 (k, {d}), got {sums.dtype} {tuple(sums.shape)}")
    _check_ids("labels", labels, n, sums.shape[0])
    impl = _impl(X, labels, sums)
    (reference if impl is _gpu else impl).cluster_sums(X, labels, sums)


def nearest_lists(scores, q_sq, out):
    """The ``n = out.shape[1]`` nearest coarse centres of each row of a block,
    nearest first (see :func:`reference.nearest_lists`).  scores (b, L) and
    q_sq (L,) of one float dtype; out (b, n) int32, ``1 <= n <= L``, is written."""
    _check_float("scores", scores)
    _check_float("q_sq", q_sq, scores.dtype)
    b, L = scores.shape
    _check_shape("q_sq", q_sq, (L,))
    if out.ndim != 2 or out.shape[0] != b or not 1 <= out.shape[1] <= L:
        raise ValueError(f"out must have shape ({b}, n) with 1 <= n <= {L}, got {out.shape}")
    if out.dtype != np.int32:
        raise TypeError(f"out must be int32, got {out.dtype}")
    impl = _impl(scores, q_sq, out)
    (reference if impl is _gpu else impl).nearest_lists(scores, q_sq, out)


# ---------------------------------------------------------------------------
# Numba's thread pool, and the host-side tools' loops (kernels/host.py: Numba
# in every mode; they take host NumPy arrays and have no layer-facing twin)
# ---------------------------------------------------------------------------
def set_cpu_threads(n: int) -> None:
    """Run the Numba kernels on ``n`` threads (at most ``NUMBA_NUM_THREADS``)."""
    _cpu_module().set_threads(n)


def float_control():
    """The CPU backend's floating-point control, for
    :func:`slimnp.threads.flush_denormals`: ``X86_64``, ``MXCSR_FTZ_DAZ`` (the
    FTZ and DAZ bits of the x86 MXCSR register), ``mxcsr()`` (the calling
    thread's register), ``set_ftz_daz(bits)`` (those bits of the calling
    thread; returns its old register) and ``set_ftz_daz_pool(bits)`` (of
    every thread of Numba's pool; returns their old registers)."""
    return _cpu_module()


def cdf_search(cdf, n: int, u: float) -> int:
    """The first ``k < n`` with ``cdf[k] > u * cdf[n-1]`` (binary search)."""
    return _host_module().cdf_search(cdf, n, u)


def hmm_sample(state, uni, out, trans_cdf, bg_weight, bg_cdf, sup_cdf, support) -> int:
    """Emit ``len(out)`` tokens of the HMM from ``state`` (``uni : (n, 3)``
    uniforms); returns the next state.  See :class:`slimnp.synthetic.HMM`."""
    return _host_module().hmm_sample(state, uni, out, trans_cdf, bg_weight, bg_cdf, sup_cdf, support)


def hmm_log_prob(ids, initial, t_ptr, t_col, t_val, bg_weight, background, w_ptr, w_state,
                 w_prob) -> float:
    """Natural-log probability of ``ids`` under the HMM (scaled forward algorithm)."""
    return _host_module().hmm_log_prob(ids, initial, t_ptr, t_col, t_val, bg_weight, background,
                                       w_ptr, w_state, w_prob)


def alias_table(scaled, prob, alias) -> None:
    """Vose's alias table of ``scaled = V p`` (float64, consumed): fills
    ``prob (V,)`` float64 and ``alias (V,)`` int32.  See
    :class:`slimnp.alias_sampler.AliasSampler`."""
    _host_module().alias_table(scaled, prob, alias)
