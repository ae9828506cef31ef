"""Numba loops of the host-side tools: the synthetic corpus's HMM
(:mod:`slimnp.synthetic`) and the alias sampler's table
(:mod:`slimnp.alias_sampler`).

They live here, with the other compiled code, but have no reference or GPU
twin: no layer calls them, they run on host NumPy arrays once per corpus or
sampler, and their tests check them against exact results (the HMM's
brute-force probabilities, the alias table's distribution).  The dispatcher
(:mod:`slimnp.kernels`) imports this module on first use, so importing
:mod:`slimnp.synthetic` or :mod:`slimnp.alias_sampler` does not import Numba.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

# The options these loops were always compiled with: the HMM's with Numba's
# defaults otherwise, Vose's with IEEE division (no ZeroDivisionError check).
_JIT_HMM = dict(nogil=True, cache=True)
_JIT = dict(nogil=True, cache=True, error_model="numpy")


# ---------------------------------------------------------------------------
# The synthetic corpus's hidden Markov model (slimnp.synthetic.HMM)
# ---------------------------------------------------------------------------
@nb.njit(**_JIT_HMM)
def hmm_sample(state, uni, out, trans_cdf, bg_weight, bg_cdf, sup_cdf, support):
    """Emit len(out) tokens from `state`; uni: (n, 3) uniforms. Returns the next state."""
    S = trans_cdf.shape[0]
    E = sup_cdf.shape[1]
    V = bg_cdf.shape[0]
    for t in range(out.shape[0]):
        u = uni[t, 0]
        if u < bg_weight[state]:
            out[t] = cdf_search(bg_cdf, V, uni[t, 1])
        else:
            out[t] = support[state, cdf_search(sup_cdf[state], E, uni[t, 1])]
        state = cdf_search(trans_cdf[state], S, uni[t, 2])
    return state


@nb.njit(**_JIT_HMM)
def cdf_search(cdf, n, u):
    # first k with cdf[k] > u * cdf[n-1]; scaling by the total makes rows that
    # sum to 1 - bg (the sparse supports) sample exactly their conditional law
    u = u * cdf[n - 1]
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cdf[mid] > u:
            hi = mid
        else:
            lo = mid + 1
    return lo


@nb.njit(**_JIT_HMM)
def hmm_log_prob(ids, initial, t_ptr, t_col, t_val, bg_weight, background, w_ptr, w_state, w_prob):
    """Scaled forward algorithm: natural-log P(ids) starting from `initial`."""
    S = initial.shape[0]
    alpha = initial.copy()  # P(state_t | ids[:t])
    b = np.empty(S)
    nxt = np.empty(S)
    logp = 0.0
    for t in range(ids.shape[0]):
        w = ids[t]
        g = background[w]
        for s in range(S):
            b[s] = bg_weight[s] * g
        for k in range(w_ptr[w], w_ptr[w + 1]):
            b[w_state[k]] += w_prob[k]
        c = 0.0
        for s in range(S):
            alpha[s] *= b[s]
            c += alpha[s]
        if c <= 0.0:
            return -np.inf
        logp += math.log(c)
        for s in range(S):
            nxt[s] = 0.0
        for i in range(S):
            a = alpha[i] / c
            if a != 0.0:
                for k in range(t_ptr[i], t_ptr[i + 1]):
                    nxt[t_col[k]] += a * t_val[k]
        alpha, nxt = nxt, alpha
    return logp


# ---------------------------------------------------------------------------
# Walker's alias table by Vose's O(V) construction (slimnp.alias_sampler)
# ---------------------------------------------------------------------------
@nb.njit(**_JIT)
def alias_table(scaled, prob, alias):
    """Vose's construction.  ``scaled = V p`` (float64, consumed as scratch);
    fills ``prob`` (the chance of keeping column i) and ``alias`` (the word
    column i gives away the rest of its mass to).

    Columns below 1 ("small") are topped up from columns above 1 ("large"),
    each pairing finishing one small column; a large column that sinks below
    1 becomes small.  Columns left at the end hold 1 up to rounding.
    """
    V = scaled.shape[0]
    small = np.empty(V, np.int64)  # two stacks in one array: small from the
    ns = 0  # front, large from the back
    nl = 0
    for i in range(V):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            nl += 1
            small[V - nl] = i
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        l = small[V - nl]
        prob[s] = scaled[s]
        alias[s] = l
        scaled[l] = (scaled[l] + scaled[s]) - 1.0
        if scaled[l] < 1.0:
            nl -= 1
            small[ns] = l
            ns += 1
    while nl > 0:
        nl -= 1
        l = small[V - 1 - nl]
        prob[l] = 1.0
        alias[l] = l
    while ns > 0:  # only through rounding: these columns hold 1 - O(V eps)
        ns -= 1
        s = small[ns]
        prob[s] = 1.0
        alias[s] = s
