"""MERT: tune linear rescoring weights for corpus BLEU (Och, 2003).

Notation (one tuning run)::

    S           sentences; sentence s has n_s hypotheses, n = max n_s
    F           features; X_s: (n_s, F) feature values of sentence s
    D           BLEU statistics per hypothesis (slimnp.mt.bleu.STATS_LEN = 10)
    w: (F,)     weights; hypothesis j of s scores X_s[j] @ w
    best_s(w)   argmax_j X_s[j] @ w, ties to the smallest j (= nbest.rescore)
    BLEU(w)     bleu_from_stats( sum_s stats_s[best_s(w)] )

BLEU(w) is piecewise constant, so it is maximised by *exact line searches*
rather than gradients.  Along a direction ``d`` every score is a line in t::

    score_sj(t) = X_s[j] @ (w + t d) = a_sj + t * b_sj,   a = X w,  b = X d

and best_s(w + t d) is the line on top: the *upper envelope* of n_s lines,
which changes hypothesis only at a few breakpoints.  Merging all sentences'
breakpoints and sweeping t from -inf to +inf, updating the summed statistics
by ``stats[new] - stats[old]`` at each breakpoint, gives BLEU on every
interval at once; we move to the middle of the best one (or 1 past the last
breakpoint when it is unbounded).  Coordinate ascent repeats line searches
along each free feature axis (and optionally random directions) until a sweep
no longer improves BLEU; random restarts, drawn from ``seed``, guard against
poor local optima.

Exactness
---------
Scores are summed feature by feature in column order exactly as
:func:`slimnp.mt.nbest.hypothesis_scores` does, so ``TuneResult.bleu`` is the
BLEU of ``nbest.rescore(features, result.weights)`` bit for bit, ties
included.  Every accepted move is re-scored that way after normalising, so
the weights returned are exactly the ones that were measured.

Typical use (references looked up by the n-best sentence id)::

    groups = nbest.read_nbest("dev.nbest")
    layout = nbest.feature_names(groups)
    X = [nbest.feature_matrix(g, layout) for g in groups]
    st = [bleu.bleu_stats_batch([h.text.split() for h in g],
                                [r.split() for r in refs[g[0].sent_id]])
          for g in groups]
    result = tune(X, st, nbest.weight_vector(weights, layout))
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bleu import STATS_LEN, bleu_from_stats_batch


@dataclass(frozen=True)
class TuneStep:
    start: int  # 0: from ``init``; 1..restarts: random restarts
    sweep: int  # 1-based sweep within that start
    bleu: float  # BLEU after the sweep


@dataclass(frozen=True)
class TuneResult:
    weights: np.ndarray  # (F,) best weights; L1 norm 1 unless some are fixed
    bleu: float  # BLEU of the 1-best under ``weights``, in [0, 100]
    init_bleu: float  # BLEU under ``init`` as given
    history: tuple  # TuneStep per sweep of every start, in order


# --------------------------------------------------------------------------
# upper envelopes, many sentences at once

def _envelopes(a: np.ndarray, b: np.ndarray):
    """Upper envelopes of the lines ``a[s, j] + t * b[s, j]`` of every sentence.

    A gift-wrapping walk, vectorised over sentences: start from the line on
    top at t = -inf, then repeatedly jump to the line that overtakes the
    current one first.  Each jump strictly increases the slope, so a sentence
    needs at most (distinct slopes - 1) jumps, typically a handful.

    Parameters
    ----------
    a, b : numpy.ndarray, shape (S, n), float64
        Intercepts and slopes.

    Returns
    -------
    start : numpy.ndarray, shape (S,), int64
        Line on top as t -> -inf.
    x, sent, old, new : numpy.ndarray, shape (E,)
        Events: at t = x[e], sentence sent[e] switches from line old[e] to
        line new[e].  Events of one sentence are listed in increasing x.
    """
    S, n = a.shape
    # on top at t = -inf: smallest slope, then largest intercept, then first index
    cand = b == b.min(axis=1, keepdims=True)  # (S, n)
    amax = np.where(cand, a, -np.inf).max(axis=1, keepdims=True)
    start = (cand & (a == amax)).argmax(axis=1)  # (S,)

    cur = start.copy()
    t_prev = np.full(S, -np.inf)
    active = np.arange(S)
    xs, sents, olds, news = [], [], [], []
    while active.size:
        A, B = a[active], b[active]  # (r, n)
        r = np.arange(active.size)
        ac = A[r, cur[active]][:, None]  # (r, 1) current line
        bc = B[r, cur[active]][:, None]
        db = B - bc  # (r, n)
        steeper = db > 0  # only a steeper line can overtake the current one
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            x = np.where(steeper, (ac - A) / db, np.inf)  # where line j overtakes
        xmin = x.min(axis=1)  # (r,)
        more = xmin < np.inf
        if not more.any():
            break
        active, A, B, x, xmin = active[more], A[more], B[more], x[more], xmin[more]
        # several lines through the same point: the steepest is on top after it
        # (then the first index, for identical lines)
        hit = x == xmin[:, None]
        bmax = np.where(hit, B, -np.inf).max(axis=1, keepdims=True)
        nxt = (hit & (B == bmax)).argmax(axis=1)
        # rounding can put a breakpoint a hair before the previous one; keep
        # each sentence's events in order so the sweep never mixes them up
        x_event = np.maximum(xmin, t_prev[active])
        xs.append(x_event)
        sents.append(active)
        olds.append(cur[active].copy())
        news.append(nxt)
        cur[active] = nxt
        t_prev[active] = x_event
    if xs:
        return start, np.concatenate(xs), np.concatenate(sents), \
            np.concatenate(olds), np.concatenate(news)
    empty = np.zeros(0, dtype=np.int64)
    return start, np.zeros(0), empty, empty, empty


def upper_envelope(intercepts, slopes):
    """Upper envelope of the lines ``intercepts[j] + t * slopes[j]``.

    Parameters
    ----------
    intercepts, slopes : array_like, shape (n,)

    Returns
    -------
    lines : numpy.ndarray, shape (k,), int64
        The lines on top from t = -inf to +inf.  Where lines coincide the
        first index wins, as in ``np.argmax``.
    breakpoints : numpy.ndarray, shape (k - 1,), float64
        ``lines[i]`` is on top for t in ``(breakpoints[i-1], breakpoints[i])``;
        increasing strictly (a line on top at a single point is left out).
    """
    a = np.asarray(intercepts, dtype=np.float64).reshape(1, -1)
    b = np.asarray(slopes, dtype=np.float64).reshape(1, -1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need as many intercepts as slopes, at least one: got "
                         f"{a.size} and {b.size}")
    start, x, _, _, new = _envelopes(a, b)
    lines, bps = [int(start[0])], []
    for xe, j in zip(x, new):  # x never decreases
        if bps and xe <= bps[-1]:
            lines[-1] = int(j)  # the previous line was on top at a single point only
        else:
            lines.append(int(j))
            bps.append(float(xe))
    return np.asarray(lines, dtype=np.int64), np.asarray(bps, dtype=np.float64)


# --------------------------------------------------------------------------
# the tuning problem

class _Problem:
    """Features and statistics padded into dense arrays.

    Sentence s is padded to n hypotheses with copies of its hypothesis 0:
    a copy has exactly the same line as the original and a larger index, so
    neither argmax nor the envelope ever picks it and no mask is needed.
    """

    def __init__(self, features, stats):
        if len(features) == 0:
            raise ValueError("need at least one sentence to tune on")
        if len(features) != len(stats):
            raise ValueError(f"{len(features)} feature matrices but {len(stats)} "
                             "statistics arrays (one of each per sentence)")
        Xs, Ss = [], []
        F = None
        for s, (X, st) in enumerate(zip(features, stats)):
            X = np.asarray(X, dtype=np.float64)
            if X.ndim != 2 or X.shape[0] == 0:
                raise ValueError(f"sentence {s}: features must be (n_hyp, F) with n_hyp >= 1, "
                                 f"got shape {X.shape}")
            if F is None:
                F = X.shape[1]
            if X.shape[1] != F:
                raise ValueError(f"sentence {s}: {X.shape[1]} features, sentence 0 has {F}")
            if not np.isfinite(X).all():
                raise ValueError(f"sentence {s}: features must be finite (got inf or NaN; "
                                 "clip log-probabilities of -inf first)")
            st_in = np.asarray(st)
            st = st_in.astype(np.int64)
            if st.shape != (X.shape[0], STATS_LEN) or not np.array_equal(st, st_in):
                raise ValueError(f"sentence {s}: BLEU statistics must be integers of shape "
                                 f"({X.shape[0]}, {STATS_LEN}), got {st_in.dtype} "
                                 f"{st_in.shape}")
            Xs.append(X)
            Ss.append(st)
        self.S, self.F = len(Xs), F
        self.n = max(X.shape[0] for X in Xs)
        self.X = np.empty((F, self.S, self.n))  # (F, S, n): X[k] contiguous per feature
        self.stats = np.empty((self.S, self.n, STATS_LEN), dtype=np.int64)  # (S, n, D)
        for s, (X, st) in enumerate(zip(Xs, Ss)):
            m = X.shape[0]
            self.X[:, s, :m] = X.T
            self.X[:, s, m:] = X[0][:, None]  # padding: copies of hypothesis 0
            self.stats[s, :m] = st
            self.stats[s, m:] = st[0]
        self.rows = np.arange(self.S)

    def scores(self, w) -> np.ndarray:
        """``(S, n)`` scores, summed in column order like nbest.hypothesis_scores."""
        out = np.zeros((self.S, self.n))
        for k in range(self.F):
            if w[k] != 0:  # same rule as hypothesis_scores
                out = out + self.X[k] * w[k]
        return out

    def bleu(self, scores) -> float:
        best = scores.argmax(axis=1)  # first maximum, as nbest.rescore
        total = self.stats[self.rows, best].sum(axis=0)
        return float(bleu_from_stats_batch(total[None])[0])

    def line_search(self, a, b):
        """Best t along slopes ``b`` from intercepts ``a``: (t, predicted BLEU) or None."""
        start, x, sent, old, new = _envelopes(a, b)
        if x.size == 0:
            return None  # the 1-best never changes along this direction
        base = self.stats[self.rows, start].sum(axis=0)  # (D,) stats at t = -inf
        order = np.argsort(x, kind="stable")
        x, sent, old, new = x[order], sent[order], old[order], new[order]
        delta = self.stats[sent, new] - self.stats[sent, old]  # (E, D)
        after = base + np.cumsum(delta, axis=0)  # (E, D): stats just after event e
        # only the last event at a given x ends a real (non-empty) interval
        last = np.append(x[1:] != x[:-1], True)
        u = x[last]  # (m,) distinct breakpoints
        cand = np.vstack([base[None], after[last]])  # (m+1, D): intervals (-inf,u0),(u0,u1),..
        bleus = bleu_from_stats_batch(cand)
        k = int(np.argmax(bleus))
        if k == 0:
            t = u[0] - 1.0
        elif k == u.size:
            t = u[-1] + 1.0
        else:
            t = 0.5 * (u[k - 1] + u[k])
        return float(t), float(bleus[k])


def _check_init(init, F, fixed):
    w = np.asarray(init, dtype=np.float64)
    if w.shape != (F,):
        raise ValueError(f"init must have shape ({F},) to match the features, got {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"init weights must be finite, got {w.tolist()}")
    free = np.ones(F, dtype=bool)
    if fixed is not None:
        fx = np.asarray(fixed)
        if fx.dtype == bool:
            if fx.shape != (F,):
                raise ValueError(f"a boolean `fixed` mask needs shape ({F},), got {fx.shape}")
            free = ~fx
        else:
            fx = fx.astype(np.int64).reshape(-1)
            if ((fx < -F) | (fx >= F)).any():
                raise ValueError(f"`fixed` indices must lie in [0, {F}), got {fx.tolist()}")
            free[fx] = False
    return w, free


def tune(features, stats, init, *, iterations: int = 20, restarts: int = 2,
         random_directions: int = 0, seed: int = 0, fixed=None, tol: float = 1e-9
         ) -> TuneResult:
    """Find weights maximising corpus BLEU of the 1-best (MERT, Och 2003).

    Parameters
    ----------
    features : sequence of numpy.ndarray, each (n_s, F), float64
        Feature matrices, one per sentence (e.g. ``nbest.feature_matrix``).
        Must be finite.
    stats : sequence of numpy.ndarray, each (n_s, STATS_LEN), integer
        BLEU statistics of every hypothesis (``bleu.bleu_stats_batch``).
    init : array_like, shape (F,)
        Starting weights (e.g. the decoder's), the first start.
    iterations : int
        Most sweeps per start; a sweep line-searches every free coordinate
        (then ``random_directions`` random ones) and the start ends early
        when a sweep gains no more than ``tol`` BLEU.
    restarts : int
        Extra starts from weights drawn uniformly in [-1, 1] (fixed ones kept).
    random_directions : int
        Random (Gaussian) directions searched at the end of every sweep.
    seed : int
        Seeds restarts and random directions: same inputs and seed give the
        same weights.
    fixed : sequence of int or bool mask of shape (F,), optional
        Features whose weights stay exactly at ``init``.  Since those anchor
        the scale, weights are then not normalised.
    tol : float
        Smallest BLEU gain that counts as an improvement.

    Returns
    -------
    TuneResult
        ``weights`` (F,), scaled to L1 norm 1 when nothing is fixed (and the
        scaling leaves every 1-best unchanged); ``bleu`` equals the BLEU of
        ``nbest.rescore(features, weights)``, and is never below ``init_bleu``.

    Notes
    -----
    Memory is one dense ``(F, S, n)`` float64 copy of the features plus
    ``(S, n, STATS_LEN)`` int64 statistics, ``n`` the longest n-best list.
    Time: a line search costs a few passes over ``(S, n)`` per envelope
    step; 2,000 sentences x 100 hypotheses x 15 features take about 1.5 s
    per start (so ~4 s with the default two restarts) on one core.
    """
    prob = _Problem(features, stats)
    F = prob.F
    w0, free = _check_init(init, F, fixed)
    normalise = bool(free.all())
    rng = np.random.default_rng(seed)
    init_bleu = prob.bleu(prob.scores(w0))

    def scaled(w):
        l1 = np.abs(w).sum()
        return w / l1 if normalise and l1 > 0 else w

    def climb(start, w, a, bleu, history):
        """Coordinate ascent from ``w`` (exact scores ``a``, BLEU ``bleu``)."""
        for sweep in range(1, iterations + 1):
            before = bleu
            dirs = [(k, None) for k in np.flatnonzero(free)]
            for _ in range(random_directions):
                d = rng.standard_normal(F) * free
                dirs.append((None, d / max(np.abs(d).sum(), 1e-300)))
            for k, d in dirs:
                if k is not None:
                    slope = prob.X[k]  # (S, n): moving w[k] moves scores by X[k]
                    d = np.zeros(F)
                    d[k] = 1.0
                else:
                    slope = prob.scores(d)
                found = prob.line_search(a, slope)
                if found is None or found[1] <= bleu + tol:
                    continue
                w_try = scaled(w + found[0] * d)
                a_try = prob.scores(w_try)
                bleu_try = prob.bleu(a_try)  # exact, as rescore will see it
                if bleu_try > bleu + tol:
                    w, a, bleu = w_try, a_try, bleu_try
            history.append(TuneStep(start, sweep, bleu))
            if bleu <= before + tol:
                break
        return w, bleu

    history: list = []
    best_w, best_bleu = climb(0, w0, prob.scores(w0), init_bleu, history)
    for r in range(1, restarts + 1):
        w = np.where(free, rng.uniform(-1.0, 1.0, F), w0)
        w = scaled(w)
        a = prob.scores(w)
        w, bleu = climb(r, w, a, prob.bleu(a), history)
        if bleu > best_bleu + tol:
            best_w, best_bleu = w, bleu

    # accepted moves are already normalised; ``init`` itself may not be
    w_final = scaled(best_w)
    if w_final is not best_w:
        bleu_final = prob.bleu(prob.scores(w_final))
        if bleu_final >= best_bleu:
            best_bleu = bleu_final
        else:
            w_final = best_w  # rounding broke a tie differently: keep what was measured
    return TuneResult(weights=np.array(w_final, dtype=np.float64), bleu=best_bleu,
                      init_bleu=init_bleu, history=tuple(history))
