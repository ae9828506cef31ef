"""Corpus BLEU (Papineni et al., 2002) from per-sentence sufficient statistics.

Text is split at whitespace and nothing else: tokenize (and lowercase)
beforehand if you want to.  With ``N = MAX_ORDER = 4``::

    BLEU = 100 * BP * exp( (1/N) * sum_n log(m_n / t_n) )
    BP   = 1 if c > r else exp(1 - r / c)

where, summed over the corpus, ``m_n`` is the number of hypothesis n-grams
that match a reference (each n-gram's count clipped to its largest count in
any one reference of that sentence), ``t_n`` the number of hypothesis
n-grams, ``c`` the hypothesis length and ``r`` the reference length, taking
for each sentence the reference whose length is closest to the hypothesis
(ties: the shorter one).  Without smoothing, a corpus with no matching n-gram
of some order scores 0.  This is sacreBLEU's ``corpus_bleu(...,
tokenize="none", smooth_method="none")``.

Statistics layout
-----------------
The sufficient statistics of one sentence (or, summed, of a corpus) are an
``int64`` vector of length ``STATS_LEN = 2 * N + 2``::

    stats[MATCH]    = m_1 .. m_N     (MATCH = slice(0, N))
    stats[TOTAL]    = t_1 .. t_N     (TOTAL = slice(N, 2N))
    stats[HYP_LEN]  = c              (HYP_LEN = 2N)
    stats[REF_LEN]  = r              (REF_LEN = 2N + 1)

Statistics add, so the BLEU of any choice of one hypothesis per sentence is
``bleu_from_stats(sum of the chosen rows)`` -- what MERT (:mod:`slimnp.mt.tune`)
sweeps over.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

MAX_ORDER = 4  # N: longest n-gram counted
MATCH = slice(0, MAX_ORDER)  # clipped n-gram matches m_1..m_N
TOTAL = slice(MAX_ORDER, 2 * MAX_ORDER)  # hypothesis n-grams t_1..t_N
HYP_LEN = 2 * MAX_ORDER  # hypothesis length c
REF_LEN = 2 * MAX_ORDER + 1  # closest reference length r
STATS_LEN = 2 * MAX_ORDER + 2


def _ngrams(tokens: Sequence[str]) -> Counter:
    """Counts of all 1..N-grams of ``tokens`` (keys are tuples)."""
    counts: Counter = Counter()
    for n in range(1, MAX_ORDER + 1):
        counts.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return counts


def _check_refs(refs_tokens) -> list:
    refs = list(refs_tokens)
    if not refs:
        raise ValueError("need at least one reference per sentence")
    for r in refs:
        if isinstance(r, str):
            raise TypeError("refs_tokens must be a list of token lists, one per reference "
                            f"(got the string {r!r}); wrap a single reference as "
                            "[ref.split()]")
    return refs


class References:
    """The references of one sentence, counted once for many hypotheses.

    Parameters
    ----------
    refs_tokens : sequence of sequence of str
        One token list per reference (at least one).
    """

    def __init__(self, refs_tokens):
        refs = _check_refs(refs_tokens)
        self.lengths = sorted(len(r) for r in refs)  # sorted: ties go to the shorter
        self.max_counts: Counter = Counter()  # n-gram -> largest count in one reference
        for r in refs:
            self.max_counts |= _ngrams(list(r))  # | keeps the maximum of each count

    def closest_length(self, c: int) -> int:
        """Reference length closest to ``c``; ties go to the shorter."""
        return min(self.lengths, key=lambda r: abs(r - c))  # first of sorted = shorter

    def stats(self, hyp_tokens: Sequence[str]) -> np.ndarray:
        """Sufficient statistics of one hypothesis, shape ``(STATS_LEN,)`` int64."""
        hyp = list(hyp_tokens)
        c = len(hyp)
        out = [0] * STATS_LEN  # plain ints: much faster than numpy item writes
        get = self.max_counts.get
        for gram, count in _ngrams(hyp).items():
            out[len(gram) - 1] += min(count, get(gram, 0))  # clipped count
        for n in range(1, MAX_ORDER + 1):
            out[MAX_ORDER + n - 1] = max(0, c - n + 1)
        out[HYP_LEN] = c
        out[REF_LEN] = self.closest_length(c)
        return np.array(out, dtype=np.int64)


def bleu_stats(hyp_tokens: Sequence[str], refs_tokens) -> np.ndarray:
    """BLEU sufficient statistics of one hypothesis against its references.

    Parameters
    ----------
    hyp_tokens : sequence of str
    refs_tokens : sequence of sequence of str
        One token list per reference.

    Returns
    -------
    numpy.ndarray, shape (STATS_LEN,), int64
        Layout in the module docstring (``MATCH``, ``TOTAL``, ``HYP_LEN``,
        ``REF_LEN``).
    """
    return References(refs_tokens).stats(hyp_tokens)


def bleu_stats_batch(hyps_tokens, refs_tokens) -> np.ndarray:
    """Statistics of many hypotheses of one sentence (references counted once).

    Parameters
    ----------
    hyps_tokens : sequence of sequence of str
        ``n`` hypotheses, e.g. one n-best group.
    refs_tokens : sequence of sequence of str

    Returns
    -------
    numpy.ndarray, shape (n, STATS_LEN), int64
    """
    refs = References(refs_tokens)
    out = np.zeros((len(hyps_tokens), STATS_LEN), dtype=np.int64)
    for i, h in enumerate(hyps_tokens):
        out[i] = refs.stats(h)
    return out


def bleu_from_stats_batch(stats) -> np.ndarray:
    """BLEU of many statistics rows at once: ``(K, STATS_LEN) -> (K,)`` float64.

    Each row is scored as :func:`bleu_from_stats` does (same arithmetic, so
    the results are bit-identical).
    """
    s = np.asarray(stats, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != STATS_LEN:
        raise ValueError(f"expected BLEU statistics of shape (K, {STATS_LEN}), got {s.shape}")
    m, t = s[:, MATCH], s[:, TOTAL]
    c, r = s[:, HYP_LEN], s[:, REF_LEN]
    ok = (m > 0).all(axis=1) & (c > 0)  # otherwise some precision is 0 and so is BLEU
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = (np.log(m) - np.log(t)).mean(axis=1)
        log_bp = np.minimum(0.0, 1.0 - r / c)
        out = 100.0 * np.exp(log_bp + log_p)
    return np.where(ok, out, 0.0)


def bleu_from_stats(stats_sum) -> float:
    """Corpus BLEU in [0, 100] from summed statistics.

    Parameters
    ----------
    stats_sum : array_like, shape (STATS_LEN,)
        Statistics summed over the corpus (layout in the module docstring).

    Returns
    -------
    float
        ``100 * BP * exp(mean_n log(m_n / t_n))``; 0 when some order has no
        match (no smoothing) or the hypotheses are empty.
    """
    s = np.asarray(stats_sum)
    if s.shape != (STATS_LEN,):
        raise ValueError(f"expected BLEU statistics of shape ({STATS_LEN},), got {s.shape}")
    return float(bleu_from_stats_batch(s[None, :])[0])


def _refs_per_sentence(refs, n_hyps: int) -> list:
    """``refs`` as one list of reference strings per sentence."""
    refs = list(refs)
    if len(refs) != n_hyps:
        raise ValueError(f"{n_hyps} hypotheses but {len(refs)} reference entries "
                         "(refs holds one string, or one list of strings, per sentence)")
    out = []
    for i, r in enumerate(refs):
        r = [r] if isinstance(r, str) else list(r)
        if not r or not all(isinstance(x, str) for x in r):
            raise ValueError(f"sentence {i}: references must be a string or a non-empty "
                             f"list of strings, got {refs[i]!r}")
        out.append(r)
    return out


def corpus_stats(hyps: Sequence[str], refs) -> np.ndarray:
    """Summed statistics of a corpus; see :func:`corpus_bleu` for the arguments.

    Returns
    -------
    numpy.ndarray, shape (STATS_LEN,), int64
    """
    refs = _refs_per_sentence(refs, len(hyps))
    total = np.zeros(STATS_LEN, dtype=np.int64)
    for h, r in zip(hyps, refs):
        total += bleu_stats(h.split(), [x.split() for x in r])
    return total


def corpus_bleu(hyps: Sequence[str], refs) -> float:
    """Corpus BLEU of whitespace-tokenized hypotheses.

    Parameters
    ----------
    hyps : sequence of str
        One hypothesis per sentence.
    refs : sequence of (str or sequence of str)
        Per sentence, its reference or a list of references (the number may
        vary between sentences).

    Returns
    -------
    float
        BLEU in [0, 100].
    """
    return bleu_from_stats(corpus_stats(hyps, refs))


def sacrebleu_corpus_bleu(hyps: Sequence[str], refs, smooth_method: str = "none"
                          ) -> float | None:
    """The same corpus BLEU computed by sacreBLEU, or ``None`` without it.

    Runs ``sacrebleu.corpus_bleu(hyps, streams, tokenize="none", force=True,
    smooth_method=smooth_method)``; with the default ``"none"`` it equals
    :func:`corpus_bleu` (sacreBLEU's own default, ``"exp"``, differs only when
    some n-gram order has no match at all).  Sentences with fewer references
    are padded with ``None``, which sacreBLEU skips.

    Parameters
    ----------
    hyps, refs
        As for :func:`corpus_bleu`.
    smooth_method : str

    Returns
    -------
    float or None
        ``None`` when the optional ``sacrebleu`` package is not installed.
    """
    try:
        import sacrebleu  # optional; only needed for this cross-check
    except ImportError:
        return None
    per_sent = _refs_per_sentence(refs, len(hyps))
    k = max(len(r) for r in per_sent) if per_sent else 1
    # sacreBLEU wants reference *streams*: stream j holds every sentence's j-th reference
    streams = [[r[j] if j < len(r) else None for r in per_sent] for j in range(k)]
    return float(sacrebleu.corpus_bleu(list(hyps), streams, tokenize="none", force=True,
                                       smooth_method=smooth_method).score)
