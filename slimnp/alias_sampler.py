"""Seeded sampling of word ids from a fixed distribution (the noise or
proposal distribution q of sampled softmax and NCE).

:class:`AliasSampler` is Walker's alias method, with the table built by
Vose's O(V) algorithm (Vose 1991, "A linear algorithm for generating random
numbers with a given distribution"): every draw costs one uniform integer,
one uniform float and two table lookups whatever V is, so the S = 4,000
samples per minibatch the slim-embeddings paper draws from a 800,000-word
vocabulary take tens of microseconds (``numpy.random.Generator.choice`` with
``p=`` costs O(V) per call for its cumulative sum).  All randomness comes
from the ``numpy.random.Generator`` passed in (``slimnp.backend.make_rng``),
so a seed, or a checkpointed generator state, reproduces the samples.

:func:`unigram_noise` gives the usual proposal, the unigram distribution
raised to the power 0.75 (Mikolov et al. 2013; Jozefowicz et al. 2016).
"""
from __future__ import annotations

import math

import numpy as np

from . import kernels

__all__ = ["AliasSampler", "unigram_noise"]


def _check_weights(w, what: str) -> np.ndarray:
    """``w`` as a 1-d float64 array of finite, non-negative values with a
    positive sum; ValueError naming ``what`` otherwise."""
    try:
        w = np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be numbers: {exc}") from None
    if w.ndim != 1:
        raise ValueError(f"{what} must be a 1-d array, got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"{what} is empty: need at least one word")
    bad = ~np.isfinite(w)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what} must be finite: entry {i} is {w[i]} ({int(bad.sum())} such entries)")
    neg = w < 0
    if neg.any():
        i = int(np.argmax(neg))
        raise ValueError(f"{what} must be >= 0: entry {i} is {w[i]} ({int(neg.sum())} such entries)")
    if not w.sum() > 0:
        raise ValueError(f"{what} are all zero: nothing to sample")
    return w


class AliasSampler:
    """Draws word ids ``0..V-1`` with probabilities proportional to ``probs``.

    Parameters
    ----------
    probs : 1-d array of V non-negative finite numbers, not all zero
        Normalised here (divided by their sum), so counts or weights do as
        well as probabilities.  Words of probability zero are never drawn.

    Attributes
    ----------
    probs : float64 (V,), the normalised probabilities
    prob, alias : the alias table (float64 (V,), int32 (V,)): column i is
        word i with chance ``prob[i]``, word ``alias[i]`` otherwise.

    Raises
    ------
    ValueError
        Empty, not 1-d, negative, NaN/inf or all-zero input; more than
        2^31 - 1 words (ids are int32).
    """

    def __init__(self, probs):
        p = _check_weights(probs, "probabilities")
        if p.size > np.iinfo(np.int32).max:
            raise ValueError(f"{p.size} words do not fit int32 ids")
        p = p / p.sum()
        V = p.size
        prob = np.empty(V, np.float64)
        alias = np.empty(V, np.int32)
        kernels.alias_table(p * V, prob, alias)
        self.V = V
        self.probs = p
        self.prob, self.alias = prob, alias
        with np.errstate(divide="ignore"):
            self._logp = np.log(p)  # -inf for words of probability zero

    def __len__(self) -> int:
        return self.V

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` independent draws (int32 ids), using ``rng`` only.

        Two calls on generators in the same state give the same ids: the
        draws consume ``rng.integers(0, V, n)`` then ``rng.random(n)``.
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"number of samples must be >= 0, got {n}")
        cols = rng.integers(0, self.V, size=n, dtype=np.int32)
        keep = rng.random(n) < self.prob[cols]
        return np.where(keep, cols, self.alias[cols])

    def log_prob(self, ids) -> np.ndarray:
        """``log q(w)`` (float64) of word ids ``ids`` (any shape);
        ``-inf`` for words of probability zero."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"word ids must be integers, got {ids.dtype}")
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.V:
                raise ValueError(f"word ids must lie in [0, {self.V}), found range [{lo}, {hi}]")
        return self._logp[ids]

    def table_probs(self) -> np.ndarray:
        """The distribution the alias table actually samples (float64): the
        normalised ``probs`` up to rounding; tests compare the two."""
        q = self.prob.copy()
        np.add.at(q, self.alias, 1.0 - self.prob)
        return q / self.V


def unigram_noise(counts, power: float = 0.75, zero_count: float = 0.5) -> np.ndarray:
    """The smoothed unigram distribution ``q(w) ~ counts[w] ** power`` (float64, sums to 1).

    Words with count 0 (``<unk>`` or ``<eos>`` absent from the training text,
    words of a vocabulary built elsewhere) count as ``zero_count`` (default
    0.5: half as often as a word seen once).  Every word then has q > 0: it
    can be drawn, and its ``log q``, which NCE and importance sampling use
    for each target, is finite.  ``zero_count=0`` keeps them at q = 0 (such
    words must then never be targets).

    Raises
    ------
    ValueError
        Counts empty, not 1-d, negative, NaN/inf or all zero; ``power`` or
        ``zero_count`` negative or not finite.
    """
    if not (math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0, got {power}")
    if not (math.isfinite(zero_count) and zero_count >= 0):
        raise ValueError(f"zero_count must be a finite number >= 0, got {zero_count}")
    c = _check_weights(counts, "counts")
    c = np.where(c == 0, zero_count, c)
    w = c ** power
    w[c == 0] = 0.0  # 0 ** 0 is 1: with zero_count=0 an unseen word stays impossible
    return w / w.sum()
