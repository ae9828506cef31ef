"""CuPy kernels: the same contracts as ``kernels/reference.py``, on an NVIDIA GPU.

Every kernel of the dispatcher is written once below as CUDA C, templated on the float
type ``T`` (``float`` or ``double``), compiled by CuPy's ``RawModule`` (NVRTC)
the first time a kernel of that dtype runs -- one module per dtype, every
kernel of it named by a name expression (``lstm_fwd<float>``) -- and launched
only from the Python functions of this module, which take the arguments of
the reference functions and give the same results (to rounding: the GPU sums
in another order, and contracts ``a*b + c`` into one FMA).

Nothing here imports CuPy: arrays are allocated with the module of the
arrays passed in (:func:`slimnp.backend.array_module`) and the kernels come
from :func:`_kernel`, which asks :func:`slimnp.backend.get_xp` for CuPy.  The
tests swap :data:`_factory` for a CPU emulator of the CUDA C (fibers as
threads, ``__syncthreads`` as a switch), so this file's launch code and the
kernels' logic run on NumPy arrays on machines without a GPU.

Conventions of the CUDA C below:

* every integer scalar argument is ``long long`` (the Python side passes
  ``np.int64``; a Python ``int`` would be marshalled as whatever CuPy picks);
  flags are ``int`` (``np.int32``); float scalars are ``T`` or ``double``
  as declared;
* ids and index tables are ``int`` (int32; the wrappers convert);
* arrays are C-contiguous (the dispatcher routes only those here);
* elementwise kernels loop grid-stride over a flat index, so any grid size
  is correct and the launch caps the grid;
* reductions use one block of ``SX_BLOCK`` threads and a shared-memory tree,
  no warp shuffles and no reliance on warp-synchronous execution.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module

SX_BLOCK = 256  # threads per block; the reductions' shared arrays have this size
SX_COLS = 32  # columns per block of the word-major reductions (one warp wide)
_MAX_BLOCKS = 8192  # grid cap of the grid-stride kernels (H200: 132 SMs x 2048 threads = 1,056 blocks)
_TARGET_BLOCKS = 1024  # blocks the softmax reductions aim for, splitting long rows/columns into chunks

SOURCE = r"""
#define SX_BLOCK 256
#define SX_COLS 32
#define SX_ROWS (SX_BLOCK / SX_COLS)

/* ---------------------------------------------------------------------------
 * Scalar helpers, overloaded on float / double so that a template calls the
 * single-precision libdevice function for float (expf, not exp: the double
 * one would promote the whole expression).
 * ------------------------------------------------------------------------- */
__device__ __forceinline__ float sx_exp(float x) { return expf(x); }
__device__ __forceinline__ double sx_exp(double x) { return exp(x); }
__device__ __forceinline__ float sx_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double sx_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float sx_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double sx_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float sx_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double sx_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float sx_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double sx_abs(double x) { return fabs(x); }
__device__ __forceinline__ bool sx_finite(float x) { return isfinite(x); }
__device__ __forceinline__ bool sx_finite(double x) { return isfinite(x); }
__device__ __forceinline__ long long sx_min(long long a, long long b) { return a < b ? a : b; }

/* +infinity and NaN from their bits: no <math.h> under NVRTC, and a
 * constant 1/0 would draw a warning. */
template <typename T> __device__ __forceinline__ T sx_inf();
template <> __device__ __forceinline__ float sx_inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double sx_inf<double>() {
    return __longlong_as_double(0x7ff0000000000000LL);
}
__device__ __forceinline__ double sx_nan() { return __longlong_as_double(0x7ff8000000000000LL); }

/* sigmoid(x) = 1 / (1 + e^-x): for very negative x, e^-x overflows to inf
 * and 1 / inf = 0, the right limit. */
template <typename T> __device__ __forceinline__ T sx_sigmoid(T x) {
    return T(1) / (T(1) + sx_exp(-x));
}

/* Grid-stride loop over a flat index e in [0, n). */
#define SX_FOR(e, n) \
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < (n); \
         e += (long long)gridDim.x * blockDim.x)

/* ---------------------------------------------------------------------------
 * Online logsumexp: a partial (m, s) stands for s * exp(m), the sum of
 * exp(x) over the elements seen, m their max.  -inf elements add nothing
 * (exp(-inf) = 0) and are skipped, so that an all -inf start does not form
 * exp(-inf - -inf) = NaN; a NaN element makes s NaN (it fails x > m and is
 * not -inf), so NaN propagates to the result as in the reference.
 * ------------------------------------------------------------------------- */
template <typename T> __device__ __forceinline__ void lse_add(T& m, double& s, T x) {
    if (x > m) {
        s = s * (double)sx_exp(m - x) + 1.0;  /* rescale the old sum to the new max */
        m = x;
    } else if (!(x == -sx_inf<T>())) {
        s += (double)sx_exp(x - m);
    }
}

template <typename T> __device__ __forceinline__ void lse_merge(T& m, double& s, T m2, double s2) {
    if (m2 > m) {  /* keep the larger max in (m, s) */
        T mt = m; m = m2; m2 = mt;
        double st = s; s = s2; s2 = st;
    }
    if (!(m2 == -sx_inf<T>())) s += s2 * (double)sx_exp(m2 - m);
}

/* ===========================================================================
 * LSTM pointwise step.  Gate layout per row of (B, 4H): [ i | f | o | g ].
 * One thread per (b, j) handles the 4 gates of unit j: it reads the 4
 * pre-activations xg[b, q*H + j] + hg[b, q*H + j] and writes act at the
 * same 4 places.  act may alias xg (the LSTM computes its gates in place):
 * that is safe because no other thread touches those 4 elements and every
 * read comes before the writes.  So: no __restrict__ on xg / act.
 * ========================================================================= */
template <typename T>
__global__ void lstm_fwd(const T* xg, const T* hg, const T* c_prev, T* act, T* c, T* h, T* tc,
                         long long B, long long H) {
    SX_FOR(e, B * H) {
        const long long b = e / H, j = e - b * H;
        const long long r = b * 4 * H + j;  /* gate i of unit j; f, o, g follow at +H */
        const T i = sx_sigmoid(xg[r] + hg[r]);
        const T f = sx_sigmoid(xg[r + H] + hg[r + H]);
        const T o = sx_sigmoid(xg[r + 2 * H] + hg[r + 2 * H]);
        const T g = sx_tanh(xg[r + 3 * H] + hg[r + 3 * H]);
        act[r] = i;
        act[r + H] = f;
        act[r + 2 * H] = o;
        act[r + 3 * H] = g;
        const T cc = f * c_prev[e] + i * g;  /* c_t = f c_{t-1} + i g */
        const T t = sx_tanh(cc);
        c[e] = cc;
        tc[e] = t;
        h[e] = o * t;  /* h_t = o tanh(c_t) */
    }
}

/* Backward of lstm_fwd for one step; dc is updated in place from dc_t to
 * dc_{t-1}: thread (b, j) reads and writes only element (b, j) of it. */
template <typename T>
__global__ void lstm_bwd(const T* __restrict__ act, const T* __restrict__ c_prev,
                         const T* __restrict__ tc, const T* __restrict__ dh, T* dc,
                         T* __restrict__ dgates, long long B, long long H) {
    SX_FOR(e, B * H) {
        const long long b = e / H, j = e - b * H;
        const long long r = b * 4 * H + j;
        const T i = act[r], f = act[r + H], o = act[r + 2 * H], g = act[r + 3 * H];
        const T t = tc[e], dhe = dh[e];
        /* h = o tanh(c): dc_t gets dh o (1 - tanh^2) on top of what t+1 sent */
        const T dct = dc[e] + dhe * o * (T(1) - t * t);
        /* through the nonlinearities: sigmoid' = s (1 - s), tanh' = 1 - t^2 */
        dgates[r] = dct * g * i * (T(1) - i);
        dgates[r + H] = dct * c_prev[e] * f * (T(1) - f);
        dgates[r + 2 * H] = dhe * t * o * (T(1) - o);
        dgates[r + 3 * H] = dct * i * (T(1) - g * g);
        dc[e] = dct * f;  /* c_t = f c_{t-1} + ...: dc_{t-1} = dc_t f */
    }
}

/* dW[ids[n], d] += dX[n, d]: one thread per element of dX, atomics because
 * repeated ids send several rows of dX to one row of dW. */
template <typename T>
__global__ void scatter_add_rows(T* dW, const int* __restrict__ ids, const T* __restrict__ dX,
                                 long long N, long long D) {
    SX_FOR(e, N * D) {
        const long long n = e / D, d = e - n * D;
        atomicAdd(&dW[(long long)ids[n] * D + d], dX[e]);
    }
}

/* ===========================================================================
 * Softmax cross-entropy and log-softmax, in three launches so that a few long
 * rows (N = 20, V = 800K) and many short ones both fill the GPU:
 *
 *   1. *_partial: block (n, c) reduces chunk c of row n to a partial
 *      (max, sum of exp, non-finite flag) -> pm, ps, pbad : (N, nchunks);
 *   2. xent_finish: one thread per row merges its chunks in order (so the
 *      result does not depend on scheduling) into lse = m + log s, the NLL
 *      and the gradient's factors m and k = scale / s;
 *   3. xent_grad / log_softmax_apply: elementwise over the whole (N, V).
 *
 * Layouts: row-major z (N, V) (softmax_xent) or word-major zT (V, N)
 * (softmax_xent_t, log_softmax_t); the bias (V,) is added on the fly, never
 * written back (the contract leaves the logits unspecified without the
 * gradient and overwritten with it).
 * ========================================================================= */

/* Block-wide merge of (m, s, bad) over the SX_BLOCK threads of a 1-d block. */
template <typename T>
__device__ void block_lse(T& m, double& s, int& bad) {
    __shared__ T sm[SX_BLOCK];
    __shared__ double ss[SX_BLOCK];
    __shared__ int sb[SX_BLOCK];
    const int tid = threadIdx.x;
    sm[tid] = m; ss[tid] = s; sb[tid] = bad;
    __syncthreads();
    for (int half = SX_BLOCK / 2; half > 0; half /= 2) {
        if (tid < half) {
            T m1 = sm[tid];
            double s1 = ss[tid];
            lse_merge(m1, s1, sm[tid + half], ss[tid + half]);
            sm[tid] = m1; ss[tid] = s1; sb[tid] |= sb[tid + half];
        }
        __syncthreads();
    }
    m = sm[0]; s = ss[0]; bad = sb[0];
}

/* Row-major: grid (N, nchunks), block SX_BLOCK; consecutive threads read
 * consecutive words of row n (coalesced). */
template <typename T>
__global__ void xent_rows_partial(const T* __restrict__ z, const T* __restrict__ bias, int has_bias,
                                  long long N, long long V, long long chunk, long long nchunks,
                                  T* pm, double* ps, int* pbad) {
    const long long n = blockIdx.x, c = blockIdx.y;
    const long long v0 = c * chunk, v1 = sx_min(V, v0 + chunk);
    const T* row = z + n * V;
    T m = -sx_inf<T>();
    double s = 0.0;
    int bad = 0;
    for (long long v = v0 + threadIdx.x; v < v1; v += blockDim.x) {
        const T x = has_bias ? row[v] + bias[v] : row[v];
        bad |= !sx_finite(x);
        lse_add(m, s, x);
    }
    block_lse(m, s, bad);
    if (threadIdx.x == 0) {
        pm[n * nchunks + c] = m; ps[n * nchunks + c] = s; pbad[n * nchunks + c] = bad;
    }
}

/* Word-major zT (V, N): grid (ceil(N / SX_COLS), nchunks), block
 * (SX_COLS, SX_ROWS).  Thread (tx, ty) walks column n = SX_COLS*bx + tx down
 * the rows w = c*chunk + ty, + SX_ROWS, ...: the SX_COLS threads of a warp
 * read adjacent columns of one row (coalesced); the SX_ROWS partials of a
 * column are then merged in shared memory. */
template <typename T>
__global__ void xent_cols_partial(const T* __restrict__ zT, const T* __restrict__ bias, int has_bias,
                                  long long V, long long N, long long chunk, long long nchunks,
                                  T* pm, double* ps, int* pbad) {
    __shared__ T sm[SX_BLOCK];
    __shared__ double ss[SX_BLOCK];
    __shared__ int sb[SX_BLOCK];
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * SX_COLS + tx;
    const long long n = blockIdx.x * (long long)SX_COLS + tx, c = blockIdx.y;
    const long long w0 = c * chunk, w1 = sx_min(V, w0 + chunk);
    T m = -sx_inf<T>();
    double s = 0.0;
    int bad = 0;
    if (n < N) {  /* no early return: every thread must reach the barriers */
        for (long long w = w0 + ty; w < w1; w += SX_ROWS) {
            const T x = has_bias ? zT[w * N + n] + bias[w] : zT[w * N + n];
            bad |= !sx_finite(x);
            lse_add(m, s, x);
        }
    }
    sm[tid] = m; ss[tid] = s; sb[tid] = bad;
    __syncthreads();
    for (int half = SX_ROWS / 2; half > 0; half /= 2) {  /* merge over ty, per column */
        if (ty < half) {
            T m1 = sm[tid];
            double s1 = ss[tid];
            const int o = tid + half * SX_COLS;
            lse_merge(m1, s1, sm[o], ss[o]);
            sm[tid] = m1; ss[tid] = s1; sb[tid] |= sb[o];
        }
        __syncthreads();
    }
    if (ty == 0 && n < N) {
        pm[n * nchunks + c] = sm[tx]; ps[n * nchunks + c] = ss[tx]; pbad[n * nchunks + c] = sb[tx];
    }
}

/* One thread per row n: merge the chunks, then
 *   lse[n] = m + log s  (float64),
 *   nll[n] = lse - (z[n, t] + b[t])  (if has_targets; NaN for a row holding
 *            a NaN or an infinity, the contract of softmax_xent),
 *   mx[n] = m, kk[n] = scale / s  (the gradient's factors, in T).
 * Element (n, v) of z is at n*sn + v*sv (row-major: sn = V, sv = 1;
 * word-major: sn = 1, sv = N). */
template <typename T>
__global__ void xent_finish(const T* __restrict__ pm, const double* __restrict__ ps,
                            const int* __restrict__ pbad, long long nchunks, long long N,
                            const T* __restrict__ z, const T* __restrict__ bias, int has_bias,
                            const int* __restrict__ targets, int has_targets, long long sn, long long sv,
                            double scale, double* lse, T* mx, T* kk, double* nll) {
    SX_FOR(n, N) {
        T m = -sx_inf<T>();
        double s = 0.0;
        int bad = 0;
        for (long long c = 0; c < nchunks; ++c) {
            lse_merge(m, s, pm[n * nchunks + c], ps[n * nchunks + c]);
            bad |= pbad[n * nchunks + c];
        }
        const double l = (double)m + log(s);
        lse[n] = l;
        mx[n] = m;
        kk[n] = (T)(scale / s);
        if (has_targets) {
            const long long t = targets[n];
            const T zt = has_bias ? z[n * sn + t * sv] + bias[t] : z[n * sn + t * sv];
            nll[n] = bad ? sx_nan() : l - (double)zt;
        }
    }
}

/* z <- scale * softmax - scale * onehot(target), elementwise:
 * exp(x - m[n]) * (scale / s[n]), minus scale at the target. */
template <typename T>
__global__ void xent_grad(T* z, const T* __restrict__ bias, int has_bias, long long N, long long V,
                          int word_major, const T* __restrict__ mx, const T* __restrict__ kk,
                          const int* __restrict__ targets, double scale) {
    SX_FOR(e, N * V) {
        long long n, v;
        if (word_major) { v = e / N; n = e - v * N; } else { n = e / V; v = e - n * V; }
        const T x = has_bias ? z[e] + bias[v] : z[e];
        T g = sx_exp(x - mx[n]) * kk[n];
        if (v == targets[n]) g -= (T)scale;
        z[e] = g;
    }
}

/* zT (V, N) <- zT + b[w] - lse[n]: the word-major log-softmax in place. */
template <typename T>
__global__ void log_softmax_apply(T* zT, const T* __restrict__ bias, int has_bias, long long V,
                                  long long N, const double* __restrict__ lse) {
    SX_FOR(e, V * N) {
        const long long w = e / N, n = e - w * N;
        const T x = has_bias ? zT[e] + bias[w] : zT[e];
        zT[e] = x - (T)lse[n];
    }
}

/* ===========================================================================
 * NCE: one block per row n; its threads share the S noise words, a block
 * reduction sums the softplus terms (float64).  With d = ZS - logq_s,
 *   softplus(d) = max(d, 0) + log1p(e),  sigmoid(d) = d >= 0 ? r : e r,
 * where e = exp(-|d|) <= 1 never overflows and r = 1 / (1 + e).
 * ========================================================================= */
template <typename T>
__global__ void nce_rows(const T* __restrict__ zt, const T* __restrict__ logq_t, T* ZS,
                         const T* __restrict__ logq_s, long long N, long long S, double scale,
                         int compute_grad, double* nll, T* dzt) {
    __shared__ double sacc[SX_BLOCK];
    __shared__ int sbad[SX_BLOCK];
    const long long n = blockIdx.x;
    const int tid = threadIdx.x;
    const T sc = (T)scale;
    T* row = ZS + n * S;
    double acc = 0.0;
    int bad = 0;
    for (long long s = tid; s < S; s += blockDim.x) {
        const T d = row[s] - logq_s[s];
        bad |= !sx_finite(d);
        const T e = sx_exp(-sx_abs(d));
        const T r = T(1) / (T(1) + e);
        acc += (double)((d > T(0) ? d : T(0)) + sx_log1p(e));
        if (compute_grad) row[s] = (d >= T(0) ? r : e * r) * sc;  /* scale * sigmoid(d) */
    }
    sacc[tid] = acc; sbad[tid] = bad;
    __syncthreads();
    for (int half = SX_BLOCK / 2; half > 0; half /= 2) {
        if (tid < half) { sacc[tid] += sacc[tid + half]; sbad[tid] |= sbad[tid + half]; }
        __syncthreads();
    }
    if (tid == 0) {
        /* the target, labelled 1: -log sigmoid(dT) = softplus(-dT) */
        const T dT = zt[n] - logq_t[n];
        const T e = sx_exp(-sx_abs(dT));
        const T r = T(1) / (T(1) + e);
        const T sp = (-dT > T(0) ? -dT : T(0)) + sx_log1p(e);
        nll[n] = (sbad[0] || !sx_finite(dT)) ? sx_nan() : sacc[0] + (double)sp;
        /* sigmoid(dT) - 1 = -sigmoid(-dT) */
        if (compute_grad) dzt[n] = -((-dT >= T(0)) ? r : e * r) * sc;
    }
}

/* ===========================================================================
 * Slim output layer (Li et al. 2018, Algorithm 1), word-major, the notation
 * at the top of the slim output layer in slimnp/layers.py: PT (K, Mk, N)
 * partial products, idx (K, V) int in [0, Mk), zT (V, N) logits.  The gather
 * sums bias first, then k = 0 .. K-1, the reference's order (no
 * multiplications, so no FMA: the same float sums).
 * ========================================================================= */

/* zT[w, n] = b[w] + sum_k PT[k, idx[k, w], n]: one thread per (w, n), n
 * fastest: a warp reads a contiguous run of one pool entry's N partials. */
template <typename T>
__global__ void slim_gather_t(const T* __restrict__ PT, const int* __restrict__ idx,
                              const T* __restrict__ b, int has_bias, T* __restrict__ zT,
                              long long K, long long Mk, long long N, long long V) {
    SX_FOR(e, V * N) {
        const long long w = e / N, n = e - w * N;
        T acc = has_bias ? b[w] : T(0);
        for (long long k = 0; k < K; ++k) acc += PT[(k * Mk + idx[k * V + w]) * N + n];
        zT[e] = acc;
    }
}

/* GT[k, idx[k, w], n] += dzT[w, n] (GT zeroed by the caller), any table:
 * the adjoint of slim_gather_t.  Atomics: the words that share an entry add
 * into one place. */
template <typename T>
__global__ void slim_segment_t(const T* __restrict__ dzT, const int* __restrict__ idx, T* GT,
                               long long K, long long Mk, long long N, long long V) {
    SX_FOR(e, V * N) {
        const long long w = e / N, n = e - w * N;
        const T g = dzT[e];
        for (long long k = 0; k < K; ++k) atomicAdd(&GT[(k * Mk + idx[k * V + w]) * N + n], g);
    }
}

/* GT[k, j, n] = sum_r dzT[inv[k, r, j], n] with the inverted table inv
 * (K, F, Mk) (each entry's F words, ascending): a gather, no atomics, and
 * the reference's order of additions (words ascending). */
template <typename T>
__global__ void slim_segment_t_inv(const T* __restrict__ dzT, const int* __restrict__ inv,
                                   T* __restrict__ GT, long long K, long long F, long long Mk,
                                   long long N) {
    SX_FOR(e, K * Mk * N) {
        const long long kj = e / N, n = e - kj * N;
        const long long k = kj / Mk, j = kj - k * Mk;
        T acc = T(0);
        for (long long r = 0; r < F; ++r) acc += dzT[(long long)inv[(k * F + r) * Mk + j] * N + n];
        GT[e] = acc;
    }
}

/* ===========================================================================
 * Optimizer passes over flat buffers and over listed rows of a (R, D) view.
 * ========================================================================= */

/* The block's sum of each thread's acc, written to part[blockIdx.x] by thread
 * 0: a shared-memory tree over the SX_BLOCK threads of a 1-d block. */
__device__ void block_sum_to(double acc, double* part) {
    __shared__ double sacc[SX_BLOCK];
    const int tid = threadIdx.x;
    sacc[tid] = acc;
    __syncthreads();
    for (int half = SX_BLOCK / 2; half > 0; half /= 2) {
        if (tid < half) sacc[tid] += sacc[tid + half];
        __syncthreads();
    }
    if (tid == 0) part[blockIdx.x] = sacc[0];
}

/* part[block] = sum of x^2 over the block's share, in float64.  The caller
 * sums the (fixed number of) partials: the result does not depend on
 * scheduling. */
template <typename T>
__global__ void sumsq_partial(const T* __restrict__ x, long long n, double* part) {
    double acc = 0.0;
    SX_FOR(e, n) {
        const double v = (double)x[e];
        acc += v * v;
    }
    block_sum_to(acc, part);
}

/* sumsq_partial over rows rows[i] of x (R listed rows of D). */
template <typename T>
__global__ void sumsq_rows_partial(const T* __restrict__ x, const int* __restrict__ rows, long long R,
                                   long long D, double* part) {
    double acc = 0.0;
    SX_FOR(e, R * D) {
        const long long i = e / D, d = e - i * D;
        const double v = (double)x[(long long)rows[i] * D + d];
        acc += v * v;
    }
    block_sum_to(acc, part);
}

/* y += a x (the fused clip + SGD step: a = -lr * clip factor). */
template <typename T>
__global__ void axpy(T* __restrict__ y, T a, const T* __restrict__ x, long long n) {
    SX_FOR(e, n) y[e] += a * x[e];
}

template <typename T>
__global__ void axpy_rows(T* __restrict__ y, T a, const T* __restrict__ x, const int* __restrict__ rows,
                          long long R, long long D) {
    SX_FOR(e, R * D) {
        const long long i = e / D, d = e - i * D;
        const long long o = (long long)rows[i] * D + d;
        y[o] += a * x[o];
    }
}

/* Adagrad with the clip factor a applied on the fly (reference.adagrad_update):
 * acc += (a g)^2;  p -= lr (a g) / (sqrt(acc) + eps), in the order of the
 * NumPy form. */
template <typename T>
__device__ __forceinline__ void adagrad_one(T* p, T* acc, const T* g, long long o, T a, T lr, T eps) {
    const T gc = g[o] * a;
    const T s = acc[o] + gc * gc;
    acc[o] = s;
    p[o] -= lr * gc / (sx_sqrt(s) + eps);
}

template <typename T>
__global__ void adagrad(T* __restrict__ p, T* __restrict__ acc, const T* __restrict__ g, T a, T lr,
                        T eps, long long n) {
    SX_FOR(e, n) adagrad_one(p, acc, g, e, a, lr, eps);
}

template <typename T>
__global__ void adagrad_rows(T* __restrict__ p, T* __restrict__ acc, const T* __restrict__ g,
                             const int* __restrict__ rows, long long R, long long D, T a, T lr, T eps) {
    SX_FOR(e, R * D) {
        const long long i = e / D, d = e - i * D;
        adagrad_one(p, acc, g, (long long)rows[i] * D + d, a, lr, eps);
    }
}
"""

# Every kernel template of SOURCE; each is instantiated for float and double.
KERNELS = ("lstm_fwd", "lstm_bwd", "scatter_add_rows", "xent_rows_partial", "xent_cols_partial",
           "xent_finish", "xent_grad", "log_softmax_apply", "nce_rows", "slim_gather_t",
           "slim_segment_t", "slim_segment_t_inv", "sumsq_partial", "sumsq_rows_partial", "axpy",
           "axpy_rows", "adagrad", "adagrad_rows")

CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# NVRTC options: C++17 (NVRTC 11.0 and later accept it; 13.x defaults to it); the architecture is CuPy's choice
# (the device's own).
OPTIONS = ("-std=c++17",)


def name_expressions(dtype) -> list:
    """``["lstm_fwd<float>", ...]``: every kernel of ``SOURCE`` for ``dtype``."""
    ct = CTYPES[np.dtype(dtype)]
    return [f"{k}<{ct}>" for k in KERNELS]


_modules: dict = {}  # dtype -> compiled module (backend.compile_cuda: every kernel of the dtype)
_cache: dict = {}  # (name, dtype) -> launchable kernel


def _device_kernel(name: str, dtype):
    """The launchable kernel ``name<T>``, from this dtype's module (compiled
    by NVRTC on the first call, with every kernel of the dtype at once; CuPy
    caches the binary on disk)."""
    from ..backend import compile_cuda

    mod = _modules.get(dtype)
    if mod is None:
        mod = _modules[dtype] = compile_cuda(SOURCE, OPTIONS, name_expressions(dtype))
    return mod.get_function(f"{name}<{CTYPES[dtype]}>")


# (name, dtype) -> a callable ``k(grid, block, args)`` with CuPy RawKernel's
# calling convention.  None: CuPy.  The tests set a CPU emulator here.
_factory = None


def _kernel(name: str, dtype):
    key = (name, np.dtype(dtype))
    k = _cache.get(key)
    if k is None:
        k = _cache[key] = (_factory or _device_kernel)(name, key[1])
    return k


def compile_all() -> None:
    """Compile every kernel for float32 and float64 now (a check, and to pay
    NVRTC's time up front instead of on the first training step)."""
    for dt in CTYPES:
        for name in KERNELS:
            _kernel(name, dt)


def _i64(n) -> np.int64:
    return np.int64(n)


def _grid(n: int) -> tuple:
    """Blocks of SX_BLOCK for a grid-stride loop over n elements (at least 1)."""
    return (max(1, min(_MAX_BLOCKS, -(-int(n) // SX_BLOCK))),)


def _launch(name, dtype, n, args) -> None:
    """Launch a grid-stride kernel over ``n`` elements (nothing when n = 0)."""
    if n:
        _kernel(name, dtype)(_grid(n), (SX_BLOCK,), args)


def _int32(a):
    """``a`` as C-contiguous int32 (a no-copy view of int32 input); the
    dispatcher has checked that the values lie in a valid range."""
    xp = array_module(a)
    if a.dtype == np.int32 and a.flags.c_contiguous:
        return a
    if a.size and int(a.max()) >= 2**31:
        raise ValueError("GPU kernels index with int32; ids and tables must be below 2**31")
    return xp.ascontiguousarray(a, dtype=np.int32)


# ---------------------------------------------------------------------------
# The dispatcher's kernels (signatures, dtypes and in-place rules of reference.py)
# ---------------------------------------------------------------------------
def lstm_pointwise_forward(xg, hg, c_prev, act, c, h, tc):
    """:func:`reference.lstm_pointwise_forward`: one thread per (b, j); ``act``
    may be ``xg``."""
    B, H = c_prev.shape
    _launch("lstm_fwd", c_prev.dtype, B * H, (xg, hg, c_prev, act, c, h, tc, _i64(B), _i64(H)))


def lstm_pointwise_backward(act, c_prev, tc, dh, dc, dgates):
    """:func:`reference.lstm_pointwise_backward` (``dc`` updated in place)."""
    B, H = c_prev.shape
    _launch("lstm_bwd", c_prev.dtype, B * H, (act, c_prev, tc, dh, dc, dgates, _i64(B), _i64(H)))


def embedding_scatter_add(dW, ids, dX):
    """:func:`reference.embedding_scatter_add` with atomic adds (repeated ids
    accumulate in an unspecified order: equal to rounding)."""
    N, D = dX.shape
    _launch("scatter_add_rows", dW.dtype, N * D, (dW, _int32(ids), dX, _i64(N), _i64(D)))


def _row_stats(z, bias, word_major, targets, scale):
    """Launches 1 and 2 of the softmax (see SOURCE): per row ``(lse float64,
    m, k = scale / s, nll float64 or None)``."""
    xp, dt = array_module(z), z.dtype
    if word_major:
        V, N = z.shape
        ncol = -(-N // SX_COLS)
        nchunks = max(1, min(-(-V // 64), -(-_TARGET_BLOCKS // max(ncol, 1))))
    else:
        N, V = z.shape
        nchunks = max(1, min(-(-V // 1024), -(-_TARGET_BLOCKS // max(N, 1))))
    chunk = -(-V // nchunks)
    nchunks = -(-V // chunk)  # no empty chunk
    pm = xp.empty((N, nchunks), dt)
    ps = xp.empty((N, nchunks), np.float64)
    pbad = xp.empty((N, nchunks), np.int32)
    has_bias = np.int32(bias is not None)
    b = bias if bias is not None else z  # a pointer that is never read
    if word_major:
        _kernel("xent_cols_partial", dt)((ncol, nchunks), (SX_COLS, SX_BLOCK // SX_COLS),
                                         (z, b, has_bias, _i64(V), _i64(N), _i64(chunk),
                                          _i64(nchunks), pm, ps, pbad))
    else:
        _kernel("xent_rows_partial", dt)((N, nchunks), (SX_BLOCK,),
                                         (z, b, has_bias, _i64(N), _i64(V), _i64(chunk),
                                          _i64(nchunks), pm, ps, pbad))
    lse = xp.empty(N, np.float64)
    mx = xp.empty(N, dt)
    kk = xp.empty(N, dt)
    nll = xp.empty(N, np.float64) if targets is not None else None
    sn, sv = (1, N) if word_major else (V, 1)
    t = targets if targets is not None else pm  # never read without targets
    _launch("xent_finish", dt, N, (pm, ps, pbad, _i64(nchunks), _i64(N), z, b, has_bias, t,
                                   np.int32(targets is not None), _i64(sn), _i64(sv),
                                   np.float64(scale), lse, mx, kk, nll if nll is not None else lse))
    return lse, mx, kk, nll


def _softmax_xent(z, targets, scale, compute_grad, bias, word_major):
    V, N = z.shape if word_major else z.shape[::-1]
    if N == 0:
        return array_module(z).empty(0, np.float64)
    targets = _int32(targets)
    _, mx, kk, nll = _row_stats(z, bias, word_major, targets, scale)
    if compute_grad:
        b = bias if bias is not None else z
        _launch("xent_grad", z.dtype, N * V, (z, b, np.int32(bias is not None), _i64(N), _i64(V),
                                              np.int32(word_major), mx, kk, targets,
                                              np.float64(scale)))
    return nll


def softmax_xent(logits, targets, scale, compute_grad=True, bias=None):
    """:func:`reference.softmax_xent`: partial logsumexps per row chunk, one
    merge per row, one elementwise gradient pass; returns ``nll (N,)`` float64."""
    return _softmax_xent(logits, targets, scale, compute_grad, bias, False)


def softmax_xent_t(zT, targets, scale, compute_grad=True, bias=None):
    """:func:`reference.softmax_xent_t` for word-major ``zT (V, N)``."""
    return _softmax_xent(zT, targets, scale, compute_grad, bias, True)


def log_softmax_t(zT, bias=None):
    """:func:`reference.log_softmax_t`: ``zT (V, N)`` in place, returns the
    column logsumexps ``(N,)`` float64."""
    V, N = zT.shape
    if N == 0:
        return array_module(zT).empty(0, np.float64)
    lse, _, _, _ = _row_stats(zT, bias, True, None, 1.0)
    _launch("log_softmax_apply", zT.dtype, V * N,
            (zT, bias if bias is not None else zT, np.int32(bias is not None), _i64(V), _i64(N), lse))
    return lse


def nce_xent(zt, logq_t, ZS, logq_s, scale, compute_grad=True):
    """:func:`reference.nce_xent`: one block per row; returns ``(nll, dzt or None)``."""
    xp = array_module(ZS)
    N, S = ZS.shape
    nll = xp.empty(N, np.float64)
    dzt = xp.empty(N, ZS.dtype)
    if N:
        _kernel("nce_rows", ZS.dtype)((N,), (SX_BLOCK,),
                                      (zt, logq_t, ZS, logq_s, _i64(N), _i64(S), np.float64(scale),
                                       np.int32(bool(compute_grad)), nll, dzt))
    return nll, (dzt if compute_grad else None)


def slim_gather_sum_t(PT, idx_kv, b, zT):
    """:func:`reference.slim_gather_sum_t` (the same float sums, in the same order)."""
    K, Mk, N = PT.shape
    V = idx_kv.shape[1]
    _launch("slim_gather_t", PT.dtype, V * N, (PT, _int32(idx_kv), b if b is not None else PT,
                                                np.int32(b is not None), zT, _i64(K), _i64(Mk),
                                                _i64(N), _i64(V)))


def slim_segment_sum_t(dzT, idx_kv, GT, inv=None, db=None):
    """:func:`reference.slim_segment_sum_t`: a gather over the inverted table
    ``inv`` when given (no atomics, the reference's order), atomic adds
    otherwise; ``db`` by CuPy's row sum."""
    xp = array_module(dzT)
    K, Mk, N = GT.shape
    V = dzT.shape[0]
    if inv is not None:
        F = inv.shape[1]
        _launch("slim_segment_t_inv", GT.dtype, K * Mk * N,
                (dzT, _int32(inv), GT, _i64(K), _i64(F), _i64(Mk), _i64(N)))
    else:
        GT.fill(0)
        _launch("slim_segment_t", GT.dtype, V * N, (dzT, _int32(idx_kv), GT, _i64(K), _i64(Mk),
                                                     _i64(N), _i64(V)))
    if db is not None:
        xp.sum(dzT, axis=1, out=db)  # the library's reduction (cub on CuPy)


def _sum_partials(name, dtype, n, args) -> float:
    if n == 0:
        return 0.0
    grid = (max(1, min(1024, -(-int(n) // SX_BLOCK))),)
    xp = array_module(args[0])
    part = xp.empty(grid[0], np.float64)
    _kernel(name, dtype)(grid, (SX_BLOCK,), args + (part,))
    return float(part.sum())


def sumsq(x):
    """:func:`reference.sumsq`: float64 block partials, summed on the device."""
    return _sum_partials("sumsq_partial", x.dtype, x.shape[0], (x, _i64(x.shape[0])))


def axpy(y, a, x):
    """:func:`reference.axpy`: ``y += a x``."""
    _launch("axpy", y.dtype, y.shape[0], (y, y.dtype.type(a), x, _i64(y.shape[0])))


def sumsq_rows(x, rows):
    """:func:`reference.sumsq_rows`."""
    R, D = rows.shape[0], x.shape[1]
    return _sum_partials("sumsq_rows_partial", x.dtype, R * D, (x, _int32(rows), _i64(R), _i64(D)))


def axpy_rows(y, a, x, rows):
    """:func:`reference.axpy_rows`."""
    R, D = rows.shape[0], y.shape[1]
    _launch("axpy_rows", y.dtype, R * D, (y, y.dtype.type(a), x, _int32(rows), _i64(R), _i64(D)))


def adagrad_update(p, acc, g, a, lr, eps, rows=None):
    """:func:`reference.adagrad_update`: every element of C-contiguous ``p``,
    ``acc``, ``g``, or rows ``rows`` of the 2-d arrays."""
    t = p.dtype.type
    if rows is None:
        n = p.size
        _launch("adagrad", p.dtype, n, (p, acc, g, t(a), t(lr), t(eps), _i64(n)))
    else:
        R, D = rows.shape[0], p.shape[1]
        _launch("adagrad_rows", p.dtype, R * D, (p, acc, g, _int32(rows), _i64(R), _i64(D),
                                                  t(a), t(lr), t(eps)))

