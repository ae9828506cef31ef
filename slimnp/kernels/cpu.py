"""Numba CPU kernels.  Same contracts as ``kernels/reference.py``.

Explicit loops with scalar accumulators; the outer loop over rows is a
``prange`` where rows are independent (no two iterations write the same
memory), so the parallel variants are race-free.  Compiled lazily on first
call and cached on disk (``cache=True``).
"""
from __future__ import annotations

import math
import platform
import types

import numba as nb
import numpy as np
from numba import types as nbtypes
from numba.core import cgutils
from llvmlite import ir as llvm_ir
from numba.extending import intrinsic, overload

# Numba's parallel loops run on its "workqueue" thread pool unless the user
# chose a layer: with the default OpenMP layer, GNU OpenMP's workers keep
# spinning after each parallel kernel and steal the cores from the BLAS
# threads of the GEMM that follows (measured: the dlogits @ W GEMM right
# after the softmax kernel took 10.1 ms instead of 6.2 ms).  The layer is
# fixed at the first parallel launch, so this runs at import.
if nb.config.THREADING_LAYER == "default":
    nb.config.THREADING_LAYER = "workqueue"

# error_model="numpy": float division follows IEEE (inf/nan), without the
# Python ZeroDivisionError check that costs ~20 ns per division in a loop.
_JIT = dict(nogil=True, cache=True, fastmath=False, error_model="numpy")

# Work (inner-loop iterations) above which a kernel runs its ``parallel=True``
# variant; below it waking the thread pool costs more than it saves.  Measured
# serially: ~1.5-2 ns per gathered term, ~0.3-0.4 ns per scattered element, so
# 10^6 terms is 0.3-2 ms of work; a parallel launch costs tens of microseconds
# on an idle machine and up to a scheduler slice (~8-24 ms seen) when the
# cores are already busy.  Module globals, read at each call: tests and
# benchmarks may override them.
PARALLEL_MIN_GATHER = 1_000_000  # N * V * K for the slim gather / segment sums
PARALLEL_MIN_SCATTER = 1_000_000  # N * D for embedding_scatter_add
# ... and D: for short rows the parallel kernel's counting sort costs more
# than the additions it spreads (2M entries into 250K rows, 2 threads: D = 1
# 7.7 ms serial vs 169 parallel, D = 5 3.2 vs 15.8: the slim output layer's
# dense strategy scattering HashNet's one-number sub-vectors)
PARALLEL_MIN_SCATTER_ROW = 16


def set_threads(n: int) -> None:
    """Threads of Numba's pool (after the threading layer above is chosen)."""
    nb.set_num_threads(min(n, nb.config.NUMBA_NUM_THREADS))


def _serial_and_parallel(impl, jit=_JIT):
    """Compile one plain function twice: ``(serial, parallel)`` dispatchers.

    Each copy gets its own ``__qualname__``: Numba's on-disk cache names its
    files by qualname and line and keys entries by signature and bytecode, not
    by compile flags, so two dispatchers of one function object would load
    each other's cached machine code (a serial kernel served as the parallel
    one, or the reverse).
    """
    out = []
    for suffix, extra in (("_serial", {}), ("_parallel", {"parallel": True})):
        fn = types.FunctionType(impl.__code__, impl.__globals__, impl.__name__ + suffix,
                                impl.__defaults__, impl.__closure__)
        fn.__qualname__ = impl.__qualname__ + suffix
        fn.__doc__ = impl.__doc__
        out.append(nb.njit(**extra, **jit)(fn))
    return tuple(out)


_F32 = np.float32


_FLOAT_OF_BITS = {nbtypes.int32: (nbtypes.float32, llvm_ir.FloatType()),
                  nbtypes.int64: (nbtypes.float64, llvm_ir.DoubleType())}
_BITS_OF_FLOAT = {nbtypes.float32: (nbtypes.int32, llvm_ir.IntType(32)),
                  nbtypes.float64: (nbtypes.int64, llvm_ir.IntType(64))}


def _bitcast(table, doc):
    """An intrinsic reinterpreting a scalar's bits as the type ``table`` maps
    its type to (no conversion: LLVM's bitcast)."""

    def typer(typingctx, x):
        if x not in table:
            return None
        ty, llty = table[x]

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llty)

        return ty(x), codegen

    typer.__doc__ = doc
    return intrinsic(typer)


_from_bits = _bitcast(_FLOAT_OF_BITS, "The float (float32 for int32, float64 for int64) with these bits.")
_to_bits = _bitcast(_BITS_OF_FLOAT, "The bits of a float32 (as int32) or float64 (as int64).")


# Software prefetch of one row of a 2-D C-contiguous array: the cache lines
# of row ``a[i]`` (at most _PREFETCH_LINES of them, plus the one a misaligned
# row spills into; the hardware prefetcher follows a longer row by itself).
# A prefetch never faults and changes no value: it only asks the memory
# system for the lines early, so several random rows are in flight at once
# instead of one DRAM round trip after another (issue 15: ~65-100 ns per
# random row on a 32 MB-L3 EPYC, where the gathers' working sets leave L3).
_PREFETCH_LINES = 4


@intrinsic
def _prefetch_row(typingctx, a, i):
    if not (isinstance(a, nbtypes.Array) and a.ndim == 2 and isinstance(i, nbtypes.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aty, ity = signature.args
        ary = context.make_array(aty)(context, builder, args[0])
        row = context.cast(builder, args[1], ity, nbtypes.intp)
        zero = context.get_constant(nbtypes.intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [row, zero], wraparound=False)
        i8p = llvm_ir.IntType(8).as_pointer()
        i32 = llvm_ir.IntType(32)
        fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        base = builder.bitcast(ptr, i8p)
        intp = lambda v: context.get_constant(nbtypes.intp, v)  # noqa: E731
        nbytes = builder.mul(builder.extract_value(ary.shape, 1), intp(aty.dtype.bitwidth // 8))
        lines = builder.add(builder.udiv(builder.add(nbytes, intp(63)), intp(64)), intp(1))
        cap = intp(_PREFETCH_LINES + 1)
        lines = builder.select(builder.icmp_unsigned("<", lines, cap), lines, cap)
        with cgutils.for_range(builder, lines) as loop:
            addr = builder.gep(base, [builder.mul(loop.index, intp(64))])
            # read, high temporal locality (into all cache levels), data cache
            builder.call(fn, [addr, llvm_ir.Constant(i32, 0), llvm_ir.Constant(i32, 3),
                              llvm_ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return nbtypes.void(a, i), codegen


def _order_key(i):  # pragma: no cover - jitted code uses the overload below
    """Map float bits to an integer whose signed order is the floats' order.

    Non-negative floats keep their bits; negative ones get their magnitude
    bits flipped (an involution, so it also maps keys back to bits).  An
    integer max reduction vectorises where a float one does not.
    """
    raise NotImplementedError


@overload(_order_key)
def _order_key_overload(i):
    for ty, width in ((nbtypes.int32, 32), (nbtypes.int64, 64)):
        if i == ty:
            shift, mag = ty(width - 1), ty((1 << (width - 1)) - 1)
            # i >> shift is 0 or -1; the cast keeps the width (int32 ^ int32
            # would otherwise widen to int64 and reinterpret as a float64)
            return lambda i: ty(i ^ ((i >> shift) & mag))
    return None


def _finite(x):  # pragma: no cover - jitted code uses the overload below
    """``math.isfinite`` read from the exponent bits.  Under the reassociating
    fast-math flags of the reduction kernels LLVM folds ``isfinite(a - b)``
    to True (it rewrites the check as ``(a - b) - (a - b) == 0``), so the
    kernels test the bits instead: all-ones exponent = inf or NaN."""
    return math.isfinite(x)


@overload(_finite)
def _finite_overload(x):
    for ty, mask in ((nbtypes.float32, 0x7F800000), (nbtypes.float64, 0x7FF0000000000000)):
        if x == ty:
            ity = _BITS_OF_FLOAT[ty][0]
            m = ity(mask)
            return lambda x: (_to_bits(x) & m) != m
    return None


@nb.njit(inline="always", fastmath={"contract", "afn"}, error_model="numpy")
def _exp32(x):
    """exp(x) in float32 without a libm call, so loops over it vectorise.

    Cephes-style: x = n ln2 + r with |r| <= ln2/2 (ln2 split in a high part
    exact in float32 and a low correction), a degree-7 polynomial for e^r,
    then the exact scale 2^n built from its exponent bits.  Relative error
    about 1e-6 (a few float32 ulps).  Every step stays in float32: n comes
    from np.floor (a float), not math.floor (a Python int, which would
    promote the whole polynomial to float64 and stop the vectoriser).

    Arguments are clamped to [-86, 80], so neither the result nor 1/(1 + it)
    (the sigmoid and tanh built on it) is ever subnormal: subnormal
    arithmetic is ~100x slower on x86.  The kernels only need exp(x) <= 1
    (softmax) or its effect next to 1 (sigmoid, tanh), where exp(-86) = 4e-38
    stands in for 0 and exp(80) = 6e34 for infinity.
    """
    x = min(max(x, _F32(-86.0)), _F32(80.0))
    n = np.floor(x * _F32(1.4426950408889634) + _F32(0.5))
    r = x - n * _F32(0.693359375) - n * _F32(-2.12194440e-4)
    p = _F32(1.9875691500e-4)
    p = p * r + _F32(1.3981999507e-3)
    p = p * r + _F32(8.3334519073e-3)
    p = p * r + _F32(4.1665795894e-2)
    p = p * r + _F32(1.6666665459e-1)
    p = p * r + _F32(5.0000001201e-1)
    p = p * r * r + r + _F32(1.0)
    return p * _from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))


def _by_dtype(fast32, libm):
    """A function for jitted code: float32 arguments go to ``fast32`` (no libm
    call, so loops over it vectorise), float64 ones to ``libm`` (correctly
    rounded, for the float64 gradient checks)."""

    def stub(x):  # pragma: no cover - jitted code uses the overload below
        return libm(x)

    @overload(stub, jit_options={"error_model": "numpy"})
    def _overload(x):
        if x == nbtypes.float32:
            return lambda x: fast32(x)
        return lambda x: libm(x)

    return stub


_exp = _by_dtype(_exp32, math.exp)


def _sig(x):  # pragma: no cover - jitted code uses the overload below
    return 1.0 / (1.0 + math.exp(-x))


def _tanh(x):  # pragma: no cover - jitted code uses the overload below
    return 2.0 / (1.0 + math.exp(-2.0 * x)) - 1.0


# Typed by the argument: float32 kernels get the vectorisable exp and float32
# constants (a float64 or integer literal would promote the whole expression
# to float64); float64 (gradient checks) keeps libm's correctly rounded exp.
@overload(_sig, jit_options={"error_model": "numpy"})
def _sig_overload(x):
    if x == nbtypes.float32:
        # for very negative x, e^-x saturates and 1/(1+huge) -> 0
        return lambda x: _F32(1.0) / (_F32(1.0) + _exp32(-x))
    return lambda x: 1.0 / (1.0 + math.exp(-x))


@overload(_tanh, jit_options={"error_model": "numpy"})
def _tanh_overload(x):
    # tanh(x) = 2 / (1 + e^-2x) - 1: an exp instead of libm's slow tanh;
    # absolute error at the dtype's epsilon, limits -1 and +1.
    if x == nbtypes.float32:
        return lambda x: _F32(2.0) / (_F32(1.0) + _exp32(_F32(-2.0) * x)) - _F32(1.0)
    return lambda x: 2.0 / (1.0 + math.exp(-2.0 * x)) - 1.0


@nb.njit(**_JIT)
def lstm_pointwise_forward(xg, hg, c_prev, act, c, h, tc):
    # Per row, every loop is zero-based over a contiguous view: the form the
    # vectoriser handles (a loop from a moving start, range(3H, 4H), is not).
    # act may be xg itself (the LSTM computes the gates in place); the sum
    # goes through a private row first, because with act and xg overlapping
    # the compiler's alias check sends the gate loop down its scalar path
    # (measured 6x slower).
    B, H = c_prev.shape
    pre = np.empty(4 * H, xg.dtype)  # fresh allocation: provably unaliased
    for b in range(B):
        xb, hb, ab = xg[b], hg[b], act[b]
        for j in range(4 * H):
            pre[j] = xb[j] + hb[j]
        for j in range(3 * H):  # i, f, o: sigmoid
            ab[j] = _sig(pre[j])
        pg, ag = pre[3 * H :], ab[3 * H :]
        for j in range(H):  # g: tanh
            ag[j] = _tanh(pg[j])
        ai, af, ao = ab[:H], ab[H : 2 * H], ab[2 * H : 3 * H]
        cp, cb, hb2, tb = c_prev[b], c[b], h[b], tc[b]
        for j in range(H):
            cc = af[j] * cp[j] + ai[j] * ag[j]
            cb[j] = cc
            t = _tanh(cc)
            tb[j] = t
            hb2[j] = ao[j] * t


@nb.njit(**_JIT)
def lstm_pointwise_backward(act, c_prev, tc, dh, dc, dgates):
    B, H = c_prev.shape
    one = act.dtype.type(1)  # an integer 1 would promote float32 math to float64
    for b in range(B):
        ab, db_ = act[b], dgates[b]
        ai, af, ao, ag = ab[:H], ab[H : 2 * H], ab[2 * H : 3 * H], ab[3 * H :]
        di, df, do, dg = db_[:H], db_[H : 2 * H], db_[2 * H : 3 * H], db_[3 * H :]
        cp, tb, dhb, dcb = c_prev[b], tc[b], dh[b], dc[b]
        for j in range(H):
            i, f, o, g, t = ai[j], af[j], ao[j], ag[j], tb[j]
            dhj = dhb[j]
            dct = dcb[j] + dhj * o * (one - t * t)
            di[j] = dct * g * i * (one - i)
            df[j] = dct * cp[j] * f * (one - f)
            do[j] = dhj * t * o * (one - o)
            dg[j] = dct * i * (one - g * g)
            dcb[j] = dct * f


@nb.njit(**_JIT)
def _embedding_scatter_add_serial(dW, ids, dX):
    # Serial over n: repeated ids accumulate in input order, exactly like
    # the reference's np.add.at.  D is the contiguous inner loop.
    N, D = dX.shape
    for n in range(N):
        r = ids[n]
        for d in range(D):
            dW[r, d] += dX[n, d]


@nb.njit(parallel=True, **_JIT)
def _embedding_scatter_add_parallel(dW, ids, dX):
    # Race-free parallel scatter: group the N entries by target row with a
    # stable counting sort (CSR layout), then give each distinct row to one
    # thread.  Within a row the entries are summed in input order, so every
    # element of dW sees exactly the additions of the serial kernel in the
    # same order: the two paths agree bit for bit.
    N, D = dX.shape
    V = dW.shape[0]
    # offsets[r] .. offsets[r+1]: the slice of `order` holding row r's entries
    offsets = np.zeros(V + 1, np.int64)  # (V+1,)
    for n in range(N):
        offsets[ids[n] + 1] += 1
    n_rows = 0  # distinct rows touched
    for r in range(V):
        if offsets[r + 1] > 0:
            n_rows += 1
        offsets[r + 1] += offsets[r]
    order = np.empty(N, np.int64)  # (N,) entry numbers grouped by row
    fill = offsets[:V].copy()  # (V,) next free slot of each row
    for n in range(N):  # ascending n: stable, keeps input order per row
        r = ids[n]
        order[fill[r]] = n
        fill[r] += 1
    rows = np.empty(n_rows, np.int64)  # (n_rows,) the distinct rows, ascending
    i = 0
    for r in range(V):
        if offsets[r + 1] > offsets[r]:
            rows[i] = r
            i += 1
    # each iteration owns row rows[i] of dW: no two threads write one row
    for i in nb.prange(n_rows):
        r = rows[i]
        for e in range(offsets[r], offsets[r + 1]):
            n = order[e]
            for d in range(D):
                dW[r, d] += dX[n, d]


def embedding_scatter_add(dW, ids, dX):
    N, D = dX.shape
    if N * D > PARALLEL_MIN_SCATTER and D >= PARALLEL_MIN_SCATTER_ROW:
        _embedding_scatter_add_parallel(dW, ids, dX)
    else:
        _embedding_scatter_add_serial(dW, ids, dX)


# Fast-math subset for reductions: reassociation lets the compiler split a
# sum or max over vector lanes.  No "nnan"/"ninf": NaN and inf still
# propagate, so a diverged model shows up as a NaN loss.
_JIT_REDUCE = dict(_JIT, fastmath={"contract", "afn", "reassoc", "nsz", "arcp"})
_BLOCK = 1024  # elements summed in the input dtype before a float64 add


@nb.njit(inline="always", **_JIT_REDUCE)
def _bias_max_row(row, b, has_bias):
    """``(max(row + b), finite)`` in one read-only pass (b only if has_bias).

    The max runs on order-preserving integer keys of the bits (a float max
    reduction does not vectorise; an integer one does).  ``finite`` is False
    if the row holds a NaN or an infinity: their sum is then not finite.
    """
    kmax = _order_key(_to_bits(row.dtype.type(-np.inf)))
    tot = row.dtype.type(0)
    if has_bias:
        for v in range(row.shape[0]):
            x = row[v] + b[v]
            k = _order_key(_to_bits(x))
            kmax = k if k > kmax else kmax
            tot += x
    else:
        for v in range(row.shape[0]):
            x = row[v]
            k = _order_key(_to_bits(x))
            kmax = k if k > kmax else kmax
            tot += x
    return _from_bits(_order_key(kmax)), _finite(tot)


@nb.njit(inline="always", **_JIT_REDUCE)
def _exp_shift_sum(row, b, has_bias, m, store):
    """``sum(exp(row + b - m))`` in float64 (blocks summed in the row's
    dtype); with ``store`` the exponentials overwrite ``row``.  The bias is
    added on the fly: no pass writes ``row + b`` back."""
    V = row.shape[0]
    s = 0.0
    for v0 in range(0, V, _BLOCK):
        blk = row[v0 : v0 + _BLOCK]  # zero-based loops over a view vectorise;
        sb = row.dtype.type(0)  # range(v0, v1) with a moving start does not
        if has_bias:
            bb = b[v0 : v0 + _BLOCK]
            if store:
                for j in range(blk.shape[0]):
                    e = _exp(blk[j] + bb[j] - m)
                    blk[j] = e
                    sb += e
            else:
                for j in range(blk.shape[0]):
                    sb += _exp(blk[j] + bb[j] - m)
        elif store:
            for j in range(blk.shape[0]):
                e = _exp(blk[j] - m)
                blk[j] = e
                sb += e
        else:
            for j in range(blk.shape[0]):
                sb += _exp(blk[j] - m)
        s += sb
    return s


def _softmax_xent_rows_impl(logits, b, has_bias, targets, scale, compute_grad, nll):
    # Rows are independent: prange over n is race-free.  Per row, passes over
    # V floats that stay in L1/L2: max (read only), exp + sum (written only
    # with the gradient), scale.
    N, V = logits.shape
    one = logits.dtype.type(scale)
    tiny = np.finfo(logits.dtype).tiny  # smallest normal number
    zero = logits.dtype.type(0)
    for n in nb.prange(N):
        row = logits[n]
        m, finite = _bias_max_row(row, b, has_bias)
        t = targets[n]
        zt = row[t] + b[t] if has_bias else row[t]
        s = _exp_shift_sum(row, b, has_bias, m, compute_grad)
        nll[n] = math.log(s) + m - zt if finite else np.nan
        if compute_grad:
            k = row.dtype.type(scale / s)
            for v in range(V):  # flush would-be subnormals: they would slow
                r = row[v] * k  # the GEMMs that read dlogits ~100x per use
                row[v] = r if r >= tiny else zero
            row[t] -= one


_softmax_xent_rows_serial, _softmax_xent_rows = _serial_and_parallel(
    _softmax_xent_rows_impl, _JIT_REDUCE)


def softmax_xent(logits, targets, scale, compute_grad=True, bias=None):
    nll = np.empty(logits.shape[0], dtype=np.float64)
    N, V = logits.shape
    has_bias = bias is not None
    b = bias if has_bias else np.empty(0, logits.dtype)  # one signature; never read
    # small calls (evaluation with B=1, tests) do not wake the thread pool
    kernel = _softmax_xent_rows if N * V >= PARALLEL_MIN_GATHER else _softmax_xent_rows_serial
    kernel(logits, b, has_bias, targets, float(scale), bool(compute_grad), nll)
    return nll



@nb.njit(inline="always", fastmath={"contract", "afn"}, error_model="numpy")
def _log1p01_32(u):
    """log(1 + u) for u in [0, 1], float32, without a libm call (so loops over
    it vectorise): with t = u / (2 + u) in [0, 1/3], log(1 + u) = 2 atanh(t)
    = 2 (t + t^3/3 + t^5/5 + ...); seven terms leave a relative error below
    2e-8, and t is formed without cancellation for small u."""
    t = u / (_F32(2.0) + u)
    t2 = t * t
    p = _F32(1.0 / 13.0)
    p = p * t2 + _F32(1.0 / 11.0)
    p = p * t2 + _F32(1.0 / 9.0)
    p = p * t2 + _F32(1.0 / 7.0)
    p = p * t2 + _F32(1.0 / 5.0)
    p = p * t2 + _F32(1.0 / 3.0)
    p = p * t2 + _F32(1.0)
    return _F32(2.0) * t * p


_log1p01 = _by_dtype(_log1p01_32, math.log1p)  # log(1 + u), u in [0, 1]


@nb.njit(inline="always", **_JIT_REDUCE)
def _softplus_sig(d, zero, one):
    """``(softplus(d), sigmoid(d))`` from one exponential of ``-|d|`` (never
    overflows; the clamp in _exp32 keeps it normal).  ``zero`` and ``one``
    carry d's dtype (a literal would promote float32 math to float64)."""
    e = _exp(-abs(d))
    r = one / (one + e)
    sp = (d if d > zero else zero) + _log1p01(e)
    return sp, (r if d >= 0 else e * r)


def _nce_xent_impl(zt, logq_t, ZS, logq_s, scale, compute_grad, nll, dzt):
    # Rows are independent (prange over n is race-free); per row one pass
    # over the S noise scores, in blocks summed in the row's dtype.
    N, S = ZS.shape
    tiny = np.finfo(ZS.dtype).tiny
    zero = ZS.dtype.type(0)
    one = ZS.dtype.type(1)
    sc = ZS.dtype.type(scale)
    for n in nb.prange(N):
        row = ZS[n]
        acc = 0.0
        tot = zero
        for s0 in range(0, S, _BLOCK):
            blk = row[s0 : s0 + _BLOCK]  # zero-based loops over views vectorise
            lq = logq_s[s0 : s0 + _BLOCK]
            sb = zero
            if compute_grad:
                for j in range(blk.shape[0]):
                    d = blk[j] - lq[j]
                    tot += d
                    sp, sg = _softplus_sig(d, zero, one)
                    sb += sp
                    g = sg * sc  # flush would-be subnormals (slow GEMMs)
                    blk[j] = g if g >= tiny else zero
            else:
                for j in range(blk.shape[0]):
                    d = blk[j] - lq[j]
                    tot += d
                    sp, sg = _softplus_sig(d, zero, one)
                    sb += sp
            acc += sb
        dT = zt[n] - logq_t[n]
        sp, sg = _softplus_sig(-dT, zero, one)  # -log sigma(dT) = softplus(-dT)
        nll[n] = acc + sp if _finite(tot) and _finite(dT) else np.nan
        if compute_grad:
            dzt[n] = -sg * sc  # sigma(dT) - 1 = -sigma(-dT)


_nce_xent_serial, _nce_xent_parallel = _serial_and_parallel(_nce_xent_impl, _JIT_REDUCE)


def nce_xent(zt, logq_t, ZS, logq_s, scale, compute_grad=True):
    N, S = ZS.shape
    nll = np.empty(N, dtype=np.float64)
    dzt = np.empty(N if compute_grad else 0, dtype=ZS.dtype)
    kernel = _nce_xent_parallel if N * S >= PARALLEL_MIN_GATHER // 4 else _nce_xent_serial
    kernel(zt, logq_t, ZS, logq_s, float(scale), bool(compute_grad), nll, dzt)
    return nll, (dzt if compute_grad else None)

# ---------------------------------------------------------------------------
# Slim output layer, Algorithm 1 of Li et al. 2018, word-major: the notation
# (PT, idx_kv, zT) is at the top of the slim output layer in slimnp/layers.py.
# ---------------------------------------------------------------------------


_PREFETCH_WORDS = 8  # gather-sum: prefetch distance in words (K rows each)
_PREFETCH_ITEMS = 2  # inverse-table segment sum: prefetch distance in entries (F rows each)


def _unsigned(idx):
    """The (validated, non-negative) index table as uint32, a free view for
    int32.  Numba wraps negative indices (a compare and add per lookup); an
    unsigned index skips that, measured 0.68 -> 0.36 ns per gathered term."""
    return idx.view(np.uint32) if idx.dtype == np.int32 else idx.astype(np.uint32)


def _slim_gather_sum_t_impl(PT, idx_kv, b, has_bias, zT):
    # PT (K, Mk, N), zT (V, N).  For each word and pool, the N partials
    # PT[k, j, :] are contiguous (one or two cache lines), so a V*K walk
    # touches V*K lines instead of the N*V*K scattered floats of a row-major
    # (K, N, Mk) layout, and the inner loop over n vectorises.  Words are independent: prange over w is race-free.
    # The rows of word w + _PREFETCH_WORDS are prefetched while word w is
    # summed: with random tables over partial products larger than the cache,
    # this keeps tens of rows in flight (measured at Table 7 on a quiet
    # 2-core EPYC: 256 -> 136 ms).
    K, Mk, N = PT.shape
    V = idx_kv.shape[1]
    for w in nb.prange(V):
        wp = w + _PREFETCH_WORDS
        if wp < V:
            for k in range(K):
                _prefetch_row(PT[k], idx_kv[k, wp])
        zw = zT[w]  # (N,)
        if has_bias:
            for n in range(N):
                zw[n] = b[w]
        else:
            for n in range(N):
                zw[n] = 0.0
        for k in range(K):
            p = PT[k, idx_kv[k, w]]  # (N,)
            for n in range(N):
                zw[n] += p[n]


_slim_gather_sum_t_serial, _slim_gather_sum_t_parallel = _serial_and_parallel(_slim_gather_sum_t_impl)


def slim_gather_sum_t(PT, idx_kv, b, zT):
    idx_kv = _unsigned(idx_kv)
    K, _, N = PT.shape
    V = idx_kv.shape[1]
    has_bias = b is not None
    if not has_bias:
        b = np.empty(0, PT.dtype)
    kernel = _slim_gather_sum_t_parallel if N * V * K > PARALLEL_MIN_GATHER else _slim_gather_sum_t_serial
    kernel(PT, idx_kv, b, has_bias, zT)


# ---------------------------------------------------------------------------
# Word-major (transposed) output layer: zT (V, N), one column per row of h.
# Every loop below runs over a contiguous run of N (or of a 16-column
# block), so nothing needs a hardware gather or a horizontal reduction.
# ---------------------------------------------------------------------------
def _softmax_xent_cols_impl(zT, b, has_bias, targets, scale, compute_grad, cw, nll):
    # Column blocks of width cw (one per thread, a multiple of 16) are
    # independent: prange over blocks is race-free.  Per block, three passes
    # down the V rows, each reading the block's contiguous run of every row
    # and updating per-column state (max, sum, ... : cw floats, in L1):
    # bias + max (+ finite check), exp + sum, scale (+ flush).
    V, N = zT.shape
    dt = zT.dtype.type
    tiny = np.finfo(zT.dtype).tiny
    nblk = (N + cw - 1) // cw
    for blk in nb.prange(nblk):
        n0 = blk * cw
        nn = min(cw, N - n0)
        m = np.full(nn, -np.inf, zT.dtype)
        tot = np.zeros(nn, zT.dtype)
        for w in range(V):
            row = zT[w, n0 : n0 + nn]
            if has_bias:
                bw = b[w]
                for j in range(nn):
                    row[j] += bw
            for j in range(nn):
                x = row[j]
                m[j] = x if x > m[j] else m[j]
                tot[j] += x
        zt = np.empty(nn, np.float64)
        for j in range(nn):
            zt[j] = zT[targets[n0 + j], n0 + j]
        s = np.zeros(nn, np.float64)
        part = np.zeros(nn, zT.dtype)
        for w0 in range(0, V, _BLOCK):
            for j in range(nn):
                part[j] = 0
            for w in range(w0, min(V, w0 + _BLOCK)):
                row = zT[w, n0 : n0 + nn]
                if compute_grad:
                    for j in range(nn):
                        e = _exp(row[j] - m[j])
                        row[j] = e
                        part[j] += e
                else:
                    for j in range(nn):
                        part[j] += _exp(row[j] - m[j])
            for j in range(nn):
                s[j] += part[j]
        for j in range(nn):
            ok = _finite(tot[j]) and _finite(m[j])
            nll[n0 + j] = math.log(s[j]) + m[j] - zt[j] if ok else np.nan
        if compute_grad:
            k = np.empty(nn, zT.dtype)
            for j in range(nn):
                k[j] = dt(scale / s[j])
            for w in range(V):
                row = zT[w, n0 : n0 + nn]
                for j in range(nn):
                    r = row[j] * k[j]
                    row[j] = r if r >= tiny else dt(0)
            for j in range(nn):
                zT[targets[n0 + j], n0 + j] -= dt(scale)


_softmax_xent_cols_serial, _softmax_xent_cols_parallel = _serial_and_parallel(
    _softmax_xent_cols_impl, _JIT_REDUCE)


def softmax_xent_t(zT, targets, scale, compute_grad=True, bias=None):
    V, N = zT.shape
    nll = np.empty(N, dtype=np.float64)
    has_bias = bias is not None
    b = bias if has_bias else np.empty(0, zT.dtype)
    threads = nb.get_num_threads() if N * V >= PARALLEL_MIN_GATHER else 1
    cw = -(-N // threads)  # columns per block: one block per thread,
    cw = max(16, -(-cw // 16) * 16)  # in whole cache lines
    kernel = _softmax_xent_cols_parallel if threads > 1 and N > cw else _softmax_xent_cols_serial
    kernel(zT, b, has_bias, targets, float(scale), bool(compute_grad), cw, nll)
    return nll


_VCHUNK = 4096  # rows per work item of the row-parallel column log-softmax


@nb.njit(parallel=True, **_JIT_REDUCE)
def _log_softmax_cols(zT, b, has_bias, lse):
    # Row-parallel (any N, including the few columns of generation): work
    # items are chunks of _VCHUNK rows; each keeps per-column partials (max,
    # then sum of exp) over its rows, which a serial step combines.  Three
    # parallel passes: bias + max, exp-sum, subtract.
    V, N = zT.shape
    nch = (V + _VCHUNK - 1) // _VCHUNK
    pmax = np.empty((nch, N), zT.dtype)
    for c in nb.prange(nch):
        pm = pmax[c]
        for n in range(N):
            pm[n] = -np.inf
        for w in range(c * _VCHUNK, min(V, (c + 1) * _VCHUNK)):
            row = zT[w]
            if has_bias:
                bw = b[w]
                for n in range(N):
                    row[n] += bw
            for n in range(N):
                x = row[n]
                # NaN propagates: it compares false both ways, so take it
                pm[n] = x if (x > pm[n] or x != x) else pm[n]
    m = np.empty(N, zT.dtype)
    for n in range(N):
        m[n] = pmax[0, n]
        for c in range(1, nch):
            x = pmax[c, n]
            m[n] = x if (x > m[n] or x != x) else m[n]
    psum = np.zeros((nch, N), np.float64)
    for c in nb.prange(nch):
        part = np.zeros(N, zT.dtype)
        for w in range(c * _VCHUNK, min(V, (c + 1) * _VCHUNK)):
            row = zT[w]
            for n in range(N):
                part[n] += _exp(row[n] - m[n])
        for n in range(N):
            psum[c, n] = part[n]
    for n in range(N):
        t = 0.0
        for c in range(nch):
            t += psum[c, n]
        lse[n] = math.log(t) + m[n]
    sub = lse.astype(zT.dtype)
    for c in nb.prange(nch):
        for w in range(c * _VCHUNK, min(V, (c + 1) * _VCHUNK)):
            row = zT[w]
            for n in range(N):
                row[n] -= sub[n]


def log_softmax_t(zT, bias=None):
    V, N = zT.shape
    lse = np.empty(N, np.float64)
    has_bias = bias is not None
    _log_softmax_cols(zT, bias if has_bias else np.empty(0, zT.dtype), has_bias, lse)
    return lse


def _slim_segment_sum_t_inv_impl(dzT, inv, GT, db, want_db):
    # GT[k, j, :] = sum of the rows dzT[w, :] of entry j's words (inv), in
    # ascending w: the reference's order.  Items (k, j) write disjoint rows of
    # GT, so prange over them is race-free; with want_db, the items of pool
    # 0, which between them visit every word exactly once, also write
    # db[w] = sum(dzT[w, :]).
    K, F, Mk = inv.shape
    N = dzT.shape[1]
    for item in nb.prange(K * Mk):
        ip = item + _PREFETCH_ITEMS  # its F random rows of dzT, requested early
        if ip < K * Mk:
            for r in range(F):
                _prefetch_row(dzT, inv[ip // Mk, r, ip % Mk])
        k = item // Mk
        j = item % Mk
        g = GT[k, j]  # (N,)
        r0 = dzT[inv[k, 0, j]]
        for n in range(N):
            g[n] = r0[n]
        for r in range(1, F):
            rr = dzT[inv[k, r, j]]
            for n in range(N):
                g[n] += rr[n]
        if want_db and k == 0:
            for r in range(F):
                w = inv[0, r, j]
                rw = dzT[w]
                sb = dzT.dtype.type(0)
                for n in range(N):
                    sb += rw[n]
                db[w] = sb


def _slim_segment_sum_t_scatter_impl(dzT, idx_kv, GT, db, want_db):
    # Any table: pool k's rows GT[k] are written only by iteration k of the
    # prange (race-free); words ascending, as in the reference.
    K, Mk, N = GT.shape
    V = dzT.shape[0]
    for k in nb.prange(K):
        Gk = GT[k]
        for j in range(Mk):
            for n in range(N):
                Gk[j, n] = 0
        ik = idx_kv[k]
        for w in range(V):
            if w + _PREFETCH_WORDS < V:
                _prefetch_row(Gk, ik[w + _PREFETCH_WORDS])
            g = Gk[ik[w]]
            rw = dzT[w]
            for n in range(N):
                g[n] += rw[n]
        if want_db and k == 0:
            for w in range(V):
                rw = dzT[w]
                sb = dzT.dtype.type(0)
                for n in range(N):
                    sb += rw[n]
                db[w] = sb


_slim_segment_sum_t_inv = nb.njit(parallel=True, **_JIT_REDUCE)(_slim_segment_sum_t_inv_impl)
_slim_segment_sum_t_scatter = nb.njit(parallel=True, **_JIT_REDUCE)(_slim_segment_sum_t_scatter_impl)


def slim_segment_sum_t(dzT, idx_kv, GT, inv=None, db=None):
    want_db = db is not None
    dbv = db if want_db else np.empty(0, dzT.dtype)
    if inv is not None:
        _slim_segment_sum_t_inv(dzT, _unsigned(inv), GT, dbv, want_db)
    else:
        _slim_segment_sum_t_scatter(dzT, _unsigned(idx_kv), GT, dbv, want_db)


# ---------------------------------------------------------------------------
# Optimizer passes over the flat buffers: memory-bound, so each is one
# parallel pass (numpy's "grad *= c; params += grad" is three).
# ---------------------------------------------------------------------------
_SPAN = 1 << 14  # elements per parallel work item (64 kB of float32)


@nb.njit(parallel=True, **_JIT_REDUCE)
def _sumsq(x):
    n = x.shape[0]
    nb_ = (n + _SPAN - 1) // _SPAN
    part = np.zeros(nb_, np.float64)  # per-span sums: a fixed association order
    for i in nb.prange(nb_):
        blk = x[i * _SPAN : min(n, (i + 1) * _SPAN)]
        for j0 in range(0, blk.shape[0], _BLOCK):
            sub = blk[j0 : j0 + _BLOCK]
            s = x.dtype.type(0)
            for j in range(sub.shape[0]):
                s += sub[j] * sub[j]
            part[i] += s
    return part.sum()


@nb.njit(parallel=True, **_JIT)
def _axpy(y, a, x):
    n = y.shape[0]
    nb_ = (n + _SPAN - 1) // _SPAN
    av = y.dtype.type(a)
    for i in nb.prange(nb_):
        yb = y[i * _SPAN : min(n, (i + 1) * _SPAN)]
        xb = x[i * _SPAN : min(n, (i + 1) * _SPAN)]
        for j in range(yb.shape[0]):
            yb[j] += av * xb[j]


@nb.njit(**_JIT_REDUCE)
def sumsq_rows(x, rows):
    s = 0.0
    for r in rows:
        xr = x[r]
        sr = x.dtype.type(0)
        for j in range(xr.shape[0]):
            sr += xr[j] * xr[j]
        s += sr
    return s


@nb.njit(**_JIT)
def axpy_rows(y, a, x, rows):
    av = y.dtype.type(a)
    for r in rows:
        yr, xr = y[r], x[r]
        for j in range(yr.shape[0]):
            yr[j] += av * xr[j]


def sumsq(x):
    return float(_sumsq(x))


def axpy(y, a, x):
    _axpy(y, float(a), x)


# ---------------------------------------------------------------------------
# Adagrad (Duchi et al. 2011): one fused pass, the clip factor applied to the
# gradient on the fly.  Every operation is in the arrays' dtype and in the
# order of reference.adagrad_update, so the two give identical bits.
# ---------------------------------------------------------------------------
# Elements updated by one call above which the parallel variant runs.  Below
# it, waking Numba's pool costs more than it saves (2-core box, float32: 400
# rows x 200 took 38 us serially and 147 us in parallel; 2,600 x 200, 370 and
# 390 us; 4,000 x 512, 1.33 and 0.88 ms).  Read at each call.
PARALLEL_MIN_ADAGRAD = 1 << 19


@nb.njit(inline="always", **_JIT)
def _adagrad_span(p, acc, g, av, lrv, epsv):
    """The update on 1-d ``p``, ``acc``, ``g``; ``av``, ``lrv``, ``epsv`` in their dtype."""
    for j in range(p.shape[0]):
        gj = g[j] * av
        s = acc[j] + gj * gj
        acc[j] = s
        p[j] -= lrv * gj / (np.sqrt(s) + epsv)


def _adagrad_dense_impl(p, acc, g, a, lr, eps):
    # Flat p, acc, g: spans of _SPAN elements are independent, so prange
    # over them is race-free.
    n = p.shape[0]
    nspans = (n + _SPAN - 1) // _SPAN
    av, lrv, epsv = p.dtype.type(a), p.dtype.type(lr), p.dtype.type(eps)
    for i in nb.prange(nspans):
        # slices, not index ranges: only this form of the loop vectorises
        lo, hi = i * _SPAN, min(n, (i + 1) * _SPAN)
        _adagrad_span(p[lo:hi], acc[lo:hi], g[lo:hi], av, lrv, epsv)


def _adagrad_rows_impl(p, acc, g, rows, a, lr, eps):
    # rows (R,) distinct rows of the 2-d p, acc, g: each iteration owns one
    # row, so prange over them is race-free.
    av, lrv, epsv = p.dtype.type(a), p.dtype.type(lr), p.dtype.type(eps)
    for k in nb.prange(rows.shape[0]):
        r = rows[k]
        _adagrad_span(p[r], acc[r], g[r], av, lrv, epsv)


_adagrad_dense_serial, _adagrad_dense_parallel = _serial_and_parallel(_adagrad_dense_impl)
_adagrad_rows_serial, _adagrad_rows_parallel = _serial_and_parallel(_adagrad_rows_impl)


def adagrad_update(p, acc, g, a, lr, eps, rows=None):
    if rows is None:
        big = p.size >= PARALLEL_MIN_ADAGRAD
        kernel = _adagrad_dense_parallel if big else _adagrad_dense_serial
        kernel(p.reshape(-1), acc.reshape(-1), g.reshape(-1), float(a), float(lr), float(eps))
    else:
        big = rows.shape[0] * p.shape[1] >= PARALLEL_MIN_ADAGRAD
        kernel = _adagrad_rows_parallel if big else _adagrad_rows_serial
        kernel(p, acc, g, rows, float(a), float(lr), float(eps))


# ---------------------------------------------------------------------------
# k-means: the nearest centroid of each row (slimnp.compress)
# ---------------------------------------------------------------------------
def _nearest_centroid_impl(scores, c_sq, labels, d2):
    b, k = scores.shape
    for i in nb.prange(b):
        # float64 accumulation: the argmin is taken on the exact same values
        # as the reference, so the two agree on every row (ties: first j)
        best = np.inf
        arg = 0
        for j in range(k):
            t = np.float64(c_sq[j]) - 2.0 * np.float64(scores[i, j])
            if t < best:
                best = t
                arg = j
        labels[i] = arg
        d2[i] = best


_nearest_centroid_serial, _nearest_centroid_parallel = _serial_and_parallel(_nearest_centroid_impl)


def nearest_centroid(scores, c_sq, labels, d2):
    b, k = scores.shape
    fn = _nearest_centroid_parallel if b * k >= 1 << 16 else _nearest_centroid_serial
    fn(scores, c_sq, labels, d2)


def _cluster_sums_impl(X, order, bounds, sums):
    # order: the rows sorted by label (stable: ascending within a cluster),
    # cluster c's rows are order[bounds[c]:bounds[c + 1]].  Iteration c
    # writes only sums[c]: prange over clusters is race-free, and each sum is
    # one float64 run in ascending row order, the reference's.
    k, d = sums.shape
    for c in nb.prange(k):
        s = sums[c]
        for j in range(d):
            s[j] = 0.0
        for r in range(bounds[c], bounds[c + 1]):
            x = X[order[r]]
            for j in range(d):
                s[j] += x[j]


_cluster_sums_serial, _cluster_sums_parallel = _serial_and_parallel(_cluster_sums_impl)


def cluster_sums(X, labels, sums):
    k = sums.shape[0]
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1)).astype(np.int64)
    fn = _cluster_sums_parallel if X.size >= 1 << 16 else _cluster_sums_serial
    fn(X, order, bounds, sums)


def _nearest_lists_impl(scores, q_sq, out):
    b, L = scores.shape
    n = out.shape[1]
    for i in nb.prange(b):
        # insertion into a sorted run of the n best so far: n is small (the
        # probes of an inverted file); strict < keeps the lower j on ties
        best = np.full(n, np.inf)
        arg = np.zeros(n, np.int32)
        for j in range(L):
            t = np.float64(q_sq[j]) - 2.0 * np.float64(scores[i, j])
            if t < best[n - 1]:
                p = n - 1
                while p > 0 and t < best[p - 1]:
                    best[p] = best[p - 1]
                    arg[p] = arg[p - 1]
                    p -= 1
                best[p] = t
                arg[p] = j
        for p in range(n):
            out[i, p] = arg[p]


_nearest_lists_serial, _nearest_lists_parallel = _serial_and_parallel(_nearest_lists_impl)


def nearest_lists(scores, q_sq, out):
    b, L = scores.shape
    fn = _nearest_lists_parallel if b * L >= 1 << 16 else _nearest_lists_serial
    fn(scores, q_sq, out)


# ---------------------------------------------------------------------------
# Denormals.  x86's SSE/AVX unit takes microcode assists on denormal (below
# ~1.2e-38 in float32) operands and results, ~100 cycles each instead of
# one: enough to make a trained LSTM's backward GEMMs several times slower
# (BENCHMARKS.rst: Denormals).  Two bits of the
# per-thread MXCSR register turn them into zeros: FTZ (bit 15) flushes
# denormal results, DAZ (bit 6) reads denormal operands as zero.  Each thread
# has its own MXCSR, so the calling thread and every thread of Numba's pool
# are set (OpenBLAS's workers: slimnp/threads.py).  On other machines there
# is nothing to set: the functions below return 0 and change nothing.
# ---------------------------------------------------------------------------
MXCSR_FTZ_DAZ = 0x8040
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _mxcsr_codegen(name, store_arg):
    """Codegen calling ``void @llvm.x86.sse.<name>(i8*)`` on a 32-bit stack slot.

    stmxcsr writes MXCSR into the slot (returned as int32); ldmxcsr loads
    MXCSR from it (``store_arg``: the slot first gets the call's argument).
    """

    def codegen(context, builder, signature, args):
        i32 = llvm_ir.IntType(32)
        i8p = llvm_ir.IntType(8).as_pointer()
        slot = cgutils.alloca_once(builder, i32)
        if store_arg:
            builder.store(context.cast(builder, args[0], signature.args[0], nbtypes.int32), slot)
        fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [i8p])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.x86.sse.{name}")
        builder.call(fn, [builder.bitcast(slot, i8p)])
        return context.get_dummy_value() if store_arg else builder.load(slot)

    return codegen


@intrinsic
def _get_mxcsr(typingctx):
    """The calling thread's MXCSR (int32); x86-64 only."""
    return nbtypes.int32(), _mxcsr_codegen("stmxcsr", False)


@intrinsic
def _set_mxcsr(typingctx, value):
    """Load ``value`` (an integer, its low 32 bits) into the calling thread's MXCSR."""
    if not isinstance(value, nbtypes.Integer):
        return None
    return nbtypes.void(value), _mxcsr_codegen("ldmxcsr", True)


@nb.njit(nogil=True, cache=True)
def _read_mxcsr():
    return np.int64(_get_mxcsr())


@nb.njit(nogil=True, cache=True)
def _swap_ftz_daz(bits):
    """Set the calling thread's FTZ and DAZ bits to those of ``bits`` (the
    rest of MXCSR unchanged); returns the previous MXCSR."""
    old = np.int64(_get_mxcsr())
    new = (old & ~MXCSR_FTZ_DAZ) | (bits & MXCSR_FTZ_DAZ)
    if new != old:
        _set_mxcsr(new)
    return old


@nb.njit(parallel=True, nogil=True, cache=True)
def _swap_ftz_daz_pool(bits_t, old_t):
    # One iteration per pool thread (Numba hands each of the n threads one
    # chunk of range(n)); indexed by thread id, not by iteration, so that a
    # thread given two iterations keeps the MXCSR it had before the first.
    for i in nb.prange(bits_t.shape[0]):
        t = nb.get_thread_id()
        old = _swap_ftz_daz(bits_t[t])
        if old_t[t] < 0:
            old_t[t] = old


def mxcsr() -> int:
    """The calling thread's MXCSR register (0 where the machine has none)."""
    return int(_read_mxcsr()) if X86_64 else 0


def set_ftz_daz(bits: int) -> int:
    """Set the calling thread's FTZ and DAZ bits to those of ``bits``
    (``MXCSR_FTZ_DAZ``: flush, 0: keep denormals, an earlier MXCSR: as it
    was); returns the previous MXCSR (0, and nothing changes, where the
    machine is not x86-64)."""
    return int(_swap_ftz_daz(int(bits))) if X86_64 else 0


def set_ftz_daz_pool(bits) -> np.ndarray:
    """:func:`set_ftz_daz` on every thread of Numba's pool: ``bits`` one
    value for all of them or one per thread id (as this function returns);
    returns each thread's previous MXCSR by thread id (empty where the
    machine is not x86-64).

    The pool's thread count is raised to ``NUMBA_NUM_THREADS`` for the one
    launch, so that the threads ``set_threads`` leaves idle are set too, then
    put back.
    """
    n = nb.config.NUMBA_NUM_THREADS
    if not X86_64:
        return np.zeros(0, np.int64)
    bits_t = np.broadcast_to(np.asarray(bits, np.int64), (n,)).copy()
    old_t = np.full(n, -1, np.int64)
    active = nb.get_num_threads()
    nb.set_num_threads(n)
    try:
        _swap_ftz_daz_pool(bits_t, old_t)
    finally:
        nb.set_num_threads(active)
    if (old_t < 0).any():  # Numba's scheduling changed: the contract above no longer holds
        raise RuntimeError(f"threads {np.flatnonzero(old_t < 0).tolist()} of Numba's pool "
                           "did not run the MXCSR update")
    return old_t
