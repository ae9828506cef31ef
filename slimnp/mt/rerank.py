"""N-best reranking with a language model (the paper's MT application).

A decoder's n-best list scores each hypothesis by a weighted sum of its
features.  Reranking adds one more feature -- the language model's natural-
log probability of the hypothesis as a sentence (its words, then ``<eos>``,
from a fresh state) -- and picks each sentence's best hypothesis under new
weights, either given or tuned on a development set for corpus BLEU
(:mod:`slimnp.mt.tune`).

The decoder's own weights are not in the n-best file, but its total scores
are: for a log-linear decoder ``score = features @ w``, so a least-squares
fit of the scores recovers ``w`` (exactly, up to the printed precision), and
tuning starts there with the LM's weight at 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

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
    ties keep the decoder's order, as :func:`slimnp.mt.nbest.rescore` breaks
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


# --------------------------------------------------------------------------
# The application: what `slimnp rerank` does, as one call
# --------------------------------------------------------------------------
@dataclass
class RerankResult:
    """What :func:`rerank_nbest` found and wrote.

    summary : dict
        The JSON summary: ``nbest``, ``sentences``, ``hypotheses``,
        ``feature``; ``weights`` (when reranked); with tuning
        ``init_weights``, ``weights_no_lm``, ``dev_bleu`` (and
        ``decoder_weights_fit_residual`` when the start was fitted); with test
        references ``test_bleu`` (``decoder``, ``tuned_no_lm``,
        ``tuned_lm`` or ``reranked``, ``sacrebleu_reranked``).
    best : list of str
        Each sentence's best hypothesis (the decoder's without weights).
    groups : list
        The n-best list with the LM feature added, best first when reranked.
    reranked : bool
        False when neither weights nor a tuning set were given: the feature
        was added and the decoder's order kept.
    """

    summary: dict
    best: List[str]
    groups: list
    reranked: bool

    def report(self) -> List[str]:
        """The human summary: the weights and the BLEU scores, one line each."""
        lines = []
        if "weights" in self.summary:
            lines.append(f"weights: {self.summary['weights']}")
        for key, label in (("dev_bleu", "dev"), ("test_bleu", "test")):
            if key in self.summary:
                parts = [f"{k.replace('_', ' ')} {v:.2f}" for k, v in self.summary[key].items()]
                lines.append(f"{label} BLEU: " + ", ".join(parts))
        return lines


def rerank_nbest(lm, nbest_file, *, weights: Optional[str] = None, dev_nbest=None, dev_refs=None,
                 test_refs=None, feature_name: str = DEFAULT_FEATURE, out=None, best=None,
                 restarts: int = 2, seed: int = 0, batch_size: int = 64,
                 quiet: bool = True) -> RerankResult:
    """Rerank the Moses n-best list ``nbest_file`` with ``lm`` as an extra feature.

    Every hypothesis gets the feature ``feature_name``: its natural-log
    probability under ``lm`` (a :class:`slimnp.inference.LM`; as a sentence,
    from a fresh state).  Weights come from ``weights`` (``"TM0=1
    SlimLM0=0.2"``, :func:`slimnp.mt.nbest.parse_weights`), or are tuned for
    corpus BLEU on the development list ``dev_nbest`` and its references
    ``dev_refs`` (MERT, :mod:`slimnp.mt.tune`, starting from ``weights`` or
    from the decoder's weights recovered from its scores, LM weight 0).
    Without either, the feature is added and nothing is reordered.

    Writes the reranked list to ``out`` and the 1-best translations to
    ``best`` (paths; None: not written); reports BLEU before and after
    reranking when ``test_refs`` (references of ``nbest_file``, one line per
    sentence id) are given.  ``quiet=False`` shows progress bars of the
    scoring on stderr.

    Raises
    ------
    ValueError
        ``dev_nbest`` without ``dev_refs`` (or the reverse), malformed lists
        or weights (:class:`slimnp.mt.nbest.NBestError`), lists whose
        features differ, references missing a sentence.
    """
    from ..progress import Progress

    if bool(dev_nbest) != bool(dev_refs):
        raise ValueError("dev_nbest and dev_refs go together: the development n-best list and "
                         "its references")
    groups = nbest.read_nbest(nbest_file)
    dev = nbest.read_nbest(dev_nbest) if dev_nbest else None

    def scored(gs, label):
        n = len({h.text for g in gs for h in g})
        prog = Progress(n, f"score {label}", enabled=not quiet)
        vals = lm_scores(lm, gs, batch_size, progress=lambda d: prog.update(d, f"{d:,}/{n:,} hypotheses"))
        prog.close()
        return vals

    test_lm = add_lm_feature(groups, scored(groups, Path(nbest_file).name), feature_name)
    layout = nbest.feature_names(test_lm)
    names = [n for n, _ in layout]
    lm_col = sum(k for n, k in layout[: names.index(feature_name)])
    summary = {"nbest": str(nbest_file), "sentences": len(groups),
               "hypotheses": sum(len(g) for g in groups), "feature": feature_name}
    w = None
    if weights:
        given = nbest.parse_weights(weights)
        if dev is not None:
            given.setdefault(feature_name, (0.0,))  # tuning may start without the LM
        w = nbest.weight_vector(given, layout)
    if dev is not None:
        dev_lm = add_lm_feature(dev, scored(dev, Path(dev_nbest).name), feature_name)
        dev_layout = nbest.feature_names(dev_lm)
        if dev_layout != layout:
            raise ValueError(f"the development list {dev_nbest} has features {dev_layout}, "
                             f"{nbest_file} has {layout}")
        if w is None:
            w0, resid = decoder_weights(dev, nbest.feature_names(dev))
            w = np.insert(w0, lm_col, 0.0)
            summary["decoder_weights_fit_residual"] = resid
        refs_tok = reference_tokens(dev, nbest.read_lines(dev_refs), where=str(dev_refs))
        rep = tune_weights(dev_lm, layout, refs_tok, w, lm_col, restarts=restarts, seed=seed)
        summary["init_weights"] = nbest.format_weights(rep.init, layout)
        summary["weights_no_lm"] = nbest.format_weights(rep.weights_no_lm, layout)
        summary["dev_bleu"] = rep.bleu
        w = rep.weights
    X = [nbest.feature_matrix(g, layout) for g in test_lm]
    if w is not None:
        summary["weights"] = nbest.format_weights(w, layout)
        out_groups, choice = rerank_groups(test_lm, X, w, feature_name)
    else:
        out_groups, choice = test_lm, [0] * len(groups)
    firsts = [g[0].text for g in out_groups]  # best first either way
    if test_refs:
        refs = nbest.read_lines(test_refs)
        refs_tok = reference_tokens(groups, refs, where=str(test_refs))
        test = {"decoder": corpus_bleu_of(groups, [0] * len(groups), refs_tok)}
        if dev is not None:
            test["tuned_no_lm"] = corpus_bleu_of(groups, nbest.rescore(X, rep.weights_no_lm), refs_tok)
        if w is not None:
            test["tuned_lm" if dev is not None else "reranked"] = corpus_bleu_of(groups, choice, refs_tok)
        sb = bleu.sacrebleu_corpus_bleu(firsts, [refs[g[0].sent_id] for g in groups])
        if sb is not None:
            test["sacrebleu_reranked"] = sb
        summary["test_bleu"] = test
    if out:
        nbest.write_nbest(out, out_groups)
    if best:
        nbest.write_text(best, firsts)
    return RerankResult(summary, firsts, out_groups, w is not None)
