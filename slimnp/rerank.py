"""N-best reranking with a language model (the paper's MT application).

A decoder's n-best list scores each hypothesis by a weighted sum of its
features.  Reranking adds one more feature -- the language model's natural-
log probability of the hypothesis as a sentence (its words, then ``<eos>``,
from a fresh state) -- and picks each sentence's best hypothesis under new
weights, either given or tuned on a development set for corpus BLEU
(:mod:`slimnp.tune`).

The decoder's own weights are not in the n-best file, but its total scores
are: for a log-linear decoder ``score = features @ w``, so a least-squares
fit of the scores recovers ``w`` (exactly, up to the printed precision), and
tuning starts there with the LM's weight at 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np

from . import bleu, nbest
from .tune import tune

DEFAULT_FEATURE = "SlimLM0"


def lm_scores(lm, groups, batch_size: int = 64, progress=None) -> List[np.ndarray]:
    """LM log-probability (natural log) of every hypothesis, per sentence.

    Each distinct hypothesis text is scored once (n-best lists repeat
    hypotheses across sentences rarely, within one often).
    """
    texts = sorted({h.text for g in groups for h in g})
    scores = lm.score(texts, batch_size=batch_size, progress=progress)
    by_text = {t: s.logprob for t, s in zip(texts, scores)}
    return [np.array([by_text[h.text] for h in g], dtype=np.float64) for g in groups]


def add_lm_feature(groups, values, name: str = DEFAULT_FEATURE):
    """Copies of ``groups`` with feature ``name`` set to ``values`` (per sentence)."""
    return [[nbest.with_feature(h, name, [v]) for h, v in zip(g, vals)]
            for g, vals in zip(groups, values)]


def reference_tokens(groups, refs: Sequence[str], where: str = "references"):
    """Each group's reference token lists, looked up by its sentence id."""
    out = []
    for g in groups:
        sid = g[0].sent_id
        if sid >= len(refs):
            raise ValueError(f"{where}: n-best sentence id {sid} has no reference "
                             f"(the file has {len(refs)} lines)")
        out.append([refs[sid].split()])
    return out


def decoder_weights(groups, layout) -> tuple:
    """Least-squares weights reproducing the decoder's total scores:
    ``(w (F,), max abs residual)``."""
    X = np.concatenate([nbest.feature_matrix(g, layout) for g in groups])
    y = np.array([h.score for g in groups for h in g], dtype=np.float64)
    w, *_ = np.linalg.lstsq(X, y, rcond=None)
    return w, float(np.max(np.abs(X @ w - y))) if y.size else 0.0


def corpus_bleu_of(groups, choice, refs_tok) -> float:
    stats = sum(bleu.bleu_stats(g[i].text.split(), r) for g, i, r in zip(groups, choice, refs_tok))
    return bleu.bleu_from_stats(stats)


@dataclass
class TuneReport:
    weights: np.ndarray  # (F,) tuned with the LM feature
    weights_no_lm: np.ndarray  # (F,) tuned with the LM's weight held at 0
    init: np.ndarray  # (F,) where tuning started
    bleu: dict = field(default_factory=dict)  # "decoder", "tuned_no_lm", "tuned_lm"


def tune_weights(groups, layout, refs_tok, init, lm_col: int, restarts: int = 2,
                 seed: int = 0) -> TuneReport:
    """MERT on a development set, with and without the LM feature.

    Tuning without the LM (its weight fixed at 0) tells how much of the
    gain is the LM's rather than tuning's.
    """
    X = [nbest.feature_matrix(g, layout) for g in groups]
    st = [bleu.bleu_stats_batch([h.text.split() for h in g], r) for g, r in zip(groups, refs_tok)]
    no_lm_init = np.array(init, dtype=np.float64)
    no_lm_init[lm_col] = 0.0
    without = tune(X, st, no_lm_init, restarts=restarts, seed=seed, fixed=[lm_col])
    with_lm = tune(X, st, init, restarts=restarts, seed=seed)
    first = [0] * len(groups)
    rep = TuneReport(with_lm.weights, without.weights, np.asarray(init, dtype=np.float64))
    rep.bleu = {"decoder": corpus_bleu_of(groups, first, refs_tok),
                "tuned_no_lm": without.bleu, "tuned_lm": with_lm.bleu}
    return rep


def rerank_groups(groups_lm, matrices, w, name: str = DEFAULT_FEATURE) -> tuple:
    """Each sentence's hypotheses re-sorted by ``features @ w`` (best first;
    ties keep the decoder's order, as :func:`slimnp.nbest.rescore` breaks
    them) with their score fields set to the new totals; and the index (in
    the input order) of each sentence's best.

    ``groups_lm``: the n-best list with the LM feature ``name`` added
    (:func:`add_lm_feature`); ``matrices``: their feature matrices.
    """
    out, best = [], []
    for g, X in zip(groups_lm, matrices):
        s = nbest.hypothesis_scores(X, w)
        order = sorted(range(len(g)), key=lambda j: (-s[j], j))
        best.append(order[0])
        # re-setting the feature to its own (already written) values leaves
        # the line as it is but for the new score
        out.append([nbest.with_feature(g[j], name, list(g[j].feature(name)), score=float(s[j]))
                    for j in order])
    return out, best
