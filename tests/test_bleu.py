"""Corpus BLEU: hand-worked examples, the brevity penalty, and sacreBLEU parity."""
import math
import sys
from fractions import Fraction

import numpy as np
import pytest

from slimnp.mt.bleu import (
    HYP_LEN, MATCH, MAX_ORDER, REF_LEN, STATS_LEN, TOTAL, References, bleu_from_stats,
    bleu_from_stats_batch, bleu_stats, bleu_stats_batch, corpus_bleu, corpus_stats,
    sacrebleu_corpus_bleu,
)

# Sentence 1: "a b c d e" vs "a b c d f g"
#   1-grams a b c d match, e does not: 4/5; 2-grams ab bc cd: 3/4; 3-grams: 2/3; 4-grams: 1/2
#   c = 5, r = 6
# Sentence 2: "x y x y" vs {"x y z", "y x y x y"}
#   clipping uses the largest count in any one reference: x<=2, y<=3, xy<=2, yx<=2 ...
#   1-grams 4/4, 2-grams (xy yx xy) 3/3, 3-grams (xyx yxy) 2/2, 4-gram xyxy 1/1
#   c = 4; references of length 3 and 5 are equally close: the shorter, r = 3
HYPS = ["a b c d e", "x y x y"]
REFS = [["a b c d f g"], ["x y z", "y x y x y"]]


def test_stats_layout():
    assert STATS_LEN == 2 * MAX_ORDER + 2 == 10
    s = bleu_stats("a b c d e".split(), ["a b c d f g".split()])
    assert s.dtype == np.int64 and s.shape == (STATS_LEN,)
    assert s[MATCH].tolist() == [4, 3, 2, 1]
    assert s[TOTAL].tolist() == [5, 4, 3, 2]
    assert (s[HYP_LEN], s[REF_LEN]) == (5, 6)
    s2 = bleu_stats("x y x y".split(), ["x y z".split(), "y x y x y".split()])
    assert s2.tolist() == [4, 3, 2, 1, 4, 3, 2, 1, 4, 3]


def test_hand_computed_corpus_bleu():
    # totals: m = 8 6 4 2, t = 9 7 5 3, c = 9 = r, so BP = 1
    p = Fraction(8, 9) * Fraction(6, 7) * Fraction(4, 5) * Fraction(2, 3)
    assert p == Fraction(384, 945)
    assert corpus_bleu(HYPS, REFS) == pytest.approx(100 * float(p) ** 0.25, rel=1e-12)
    assert corpus_stats(HYPS, REFS).tolist() == [8, 6, 4, 2, 9, 7, 5, 3, 9, 9]


def test_brevity_penalty():
    # sentence 1 alone: c = 5 < r = 6, BP = exp(1 - 6/5); precisions 4/5 3/4 2/3 1/2 -> 1/5
    expect = 100 * math.exp(1 - Fraction(6, 5)) * float(Fraction(1, 5)) ** 0.25
    assert corpus_bleu(HYPS[:1], ["a b c d f g"]) == pytest.approx(expect, rel=1e-12)
    # longer than the reference: no penalty, only lower precision (4/6 3/5 2/4 1/3)
    expect = 100 * float(Fraction(4, 6) * Fraction(3, 5) * Fraction(2, 4) * Fraction(1, 3)) ** 0.25
    assert corpus_bleu(["a b c d e h"], ["a b c d f"]) == pytest.approx(expect, rel=1e-12)


def test_closest_reference_length():
    refs = References([["r"] * 7, ["r"] * 3, ["r"] * 5])
    assert [refs.closest_length(c) for c in (0, 4, 5, 6, 9)] == [3, 3, 5, 5, 7]


def test_perfect_zero_and_empty():
    refs = ["the cat sat on the mat", "a b c d"]
    assert corpus_bleu(refs, refs) == 100.0
    assert corpus_bleu(refs, [[r, "something else entirely"] for r in refs]) == 100.0
    # unigrams match but no 4-gram does: unsmoothed BLEU is 0
    assert corpus_bleu(["mat the on sat cat the"], ["the cat sat on the mat"]) == 0.0
    assert corpus_bleu([""], ["a b c d"]) == 0.0
    assert bleu_from_stats(np.zeros(STATS_LEN)) == 0.0


def test_stats_add_and_batch_agrees(rng):
    words = list("abcdef")
    refs = [" ".join(rng.choice(words, 9)) for _ in range(3)]
    hyps = [" ".join(rng.choice(words, int(rng.integers(0, 12)))) for _ in range(20)]
    batch = bleu_stats_batch([h.split() for h in hyps], [r.split() for r in refs])
    assert batch.shape == (20, STATS_LEN)
    for h, row in zip(hyps, batch):
        assert row.tolist() == bleu_stats(h.split(), [r.split() for r in refs]).tolist()
    total = corpus_stats(hyps, [refs] * len(hyps))
    assert total.tolist() == batch.sum(0).tolist()
    np.testing.assert_array_equal(bleu_from_stats_batch(batch)[:3],
                                  [bleu_from_stats(b) for b in batch[:3]])


def test_input_errors():
    with pytest.raises(TypeError, match="list of token lists"):
        bleu_stats(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one reference"):
        bleu_stats(["a"], [])
    with pytest.raises(ValueError, match="2 hypotheses but 1 reference"):
        corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="sentence 0: references must be"):
        corpus_bleu(["a"], [[]])
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        bleu_from_stats(np.zeros(8))


def _perturbed_corpus(rng, n_sent, n_refs):
    """Hypotheses that are noisy copies of the first reference, so every order matches."""
    vocab = [f"w{i}" for i in range(30)]
    hyps, refs = [], []
    for _ in range(n_sent):
        ref = list(rng.choice(vocab, int(rng.integers(3, 20))))
        hyp = [w if rng.random() > 0.25 else str(rng.choice(vocab)) for w in ref]
        if rng.random() < 0.5:  # drop up to two words: short hypotheses get a penalty
            i = int(rng.integers(len(hyp)))
            del hyp[i : i + 2]
        others = [" ".join(rng.choice(vocab, int(rng.integers(1, 20))))
                  for _ in range(int(rng.integers(0, n_refs)))]
        hyps.append(" ".join(hyp))
        refs.append([" ".join(ref)] + others)
    return hyps, refs


def test_sacrebleu_parity(rng):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = _perturbed_corpus(rng, 150, 1)
    single = [r[0] for r in refs]
    ours = corpus_bleu(hyps, single)
    assert 5 < ours < 95
    stats = corpus_stats(hyps, single)
    assert stats[HYP_LEN] < stats[REF_LEN]  # the brevity penalty is exercised too
    theirs = sacrebleu.corpus_bleu(hyps, [single], tokenize="none", force=True).score
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert sacrebleu_corpus_bleu(hyps, single) == pytest.approx(ours, abs=1e-6)
    # a varying number of references per sentence (1 to 3)
    hyps, refs = _perturbed_corpus(rng, 150, 3)
    assert len({len(r) for r in refs}) > 1
    assert sacrebleu_corpus_bleu(hyps, refs) == pytest.approx(corpus_bleu(hyps, refs), abs=1e-6)


def test_sacrebleu_missing_gives_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` fail
    assert sacrebleu_corpus_bleu(["a"], ["a"]) is None
