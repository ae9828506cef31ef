"""Synthetic machine-translation n-best lists, for testing reranking.

A real MT system's n-best list holds fluent and disfluent variants of a
translation, scored by features that only partly know which is best.  This
module makes such lists from plain reference sentences: each hypothesis is
the reference damaged by a few random edits (adjacent swaps, deletions,
substitutions by a frequency-drawn word, insertions), and its "translation
model" feature is minus the number of edits plus Gaussian noise -- informative
on average, wrong often enough that the 1-best by the features alone loses
BLEU.  A language model that knows the language's word order tells damaged
hypotheses from intact ones, so adding it as a feature must raise BLEU: the
property the rerank tests assert.

Lists are written in Moses format (``id ||| hypothesis ||| features |||
score``) with two features, ``TM0=`` (the noisy edit count) and
``WordPenalty0=`` (minus the length, as Moses writes it), and the score of
the default weights ``TM0=1 WordPenalty0=0``.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np

from .._atomic import atomic_path

EDITS = ("swap", "delete", "substitute", "insert")


def corrupt(words: List[str], edits: int, rng: np.random.Generator, pool: Sequence[str],
            pool_cdf: np.ndarray) -> List[str]:
    """``words`` after ``edits`` random edits (a new list).

    ``pool``/``pool_cdf``: words (and their cumulative probabilities) that
    substitutions and insertions draw from.
    """
    def draw():  # inverse CDF: O(log V) per word (rng.choice(p=...) is O(V))
        return pool[min(int(np.searchsorted(pool_cdf, rng.random(), "right")), len(pool) - 1)]

    w = list(words)
    for _ in range(edits):
        kind = EDITS[rng.integers(len(EDITS))]
        if kind == "swap" and len(w) >= 2:
            i = int(rng.integers(len(w) - 1))
            w[i], w[i + 1] = w[i + 1], w[i]
        elif kind == "delete" and len(w) >= 2:
            del w[int(rng.integers(len(w)))]
        elif kind == "substitute" and w:
            w[int(rng.integers(len(w)))] = draw()
        else:
            w.insert(int(rng.integers(len(w) + 1)), draw())
    return w


def make_nbest(refs: Sequence[str], n: int = 20, max_edits: int = 4, noise: float = 1.0,
               seed: int = 0, min_edits: int = 1) -> List[str]:
    """Moses n-best lines for each reference sentence (sentence ids 0, 1, ...).

    Parameters
    ----------
    refs : reference sentences (whitespace-tokenised)
    n : hypotheses per sentence, at most (duplicates are dropped, and a
        sentence too short to vary may have fewer)
    min_edits, max_edits : each hypothesis gets min_edits..max_edits
        edits, uniformly (with min_edits >= 1 the reference itself is rarely
        in the list, as in real decoder output)
    noise : standard deviation of the noise on the TM feature (0: the TM
        feature alone finds the least-damaged hypothesis)
    seed : everything is drawn from ``numpy.random.default_rng(seed)``

    Returns
    -------
    list of str, the lines of the n-best file (no line ends), each
    sentence's hypotheses sorted by score, best first, as decoders write them.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= min_edits <= max_edits:
        raise ValueError(f"need 0 <= min_edits <= max_edits, got {min_edits}, {max_edits}")
    rng = np.random.default_rng(seed)
    counts: dict = {}
    for r in refs:
        for t in r.split():
            counts[t] = counts.get(t, 0) + 1
    if not counts:
        raise ValueError("the references contain no words")
    pool = sorted(counts)
    cdf = np.cumsum([counts[t] for t in pool], dtype=np.float64)
    cdf /= cdf[-1]
    lines = []
    for sid, ref in enumerate(refs):
        words = ref.split()
        seen, hyps = set(), []
        for _ in range(4 * n):  # a few tries per slot: duplicates are skipped
            if len(hyps) == n:
                break
            e = int(rng.integers(min_edits, max_edits + 1))
            h = corrupt(words, e, rng, pool, cdf)
            key = " ".join(h)
            if not h or key in seen:
                continue
            seen.add(key)
            tm = -e + noise * float(rng.standard_normal())
            hyps.append((tm, key, len(h)))
        hyps.sort(key=lambda x: -x[0])
        for tm, key, length in hyps:
            lines.append(f"{sid} ||| {key} ||| TM0= {tm:.4f} WordPenalty0= {-length} ||| {tm:.4f}")
    return lines


def write_task(refs: Sequence[str], directory, name: str, n: int = 20, max_edits: int = 4,
               noise: float = 1.0, seed: int = 0, min_edits: int = 1) -> dict:
    """Write ``<name>.nbest`` and ``<name>.ref`` under ``directory``; returns their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    nbest, ref = d / f"{name}.nbest", d / f"{name}.ref"
    for path, lines in ((nbest, make_nbest(refs, n, max_edits, noise, seed, min_edits)),
                        (ref, [" ".join(r.split()) for r in refs])):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {"nbest": nbest, "ref": ref}
