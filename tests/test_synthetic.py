"""Synthetic HMM corpus: determinism, exact oracle, written files."""
import itertools
import json
import math

import numpy as np
import pytest

from slimnp.data import EOS, UNK, Vocabulary
from slimnp.synthetic import (
    DEFAULT_SPEC,
    DEFAULT_TOKENS,
    HMM,
    HMMSpec,
    unigram_perplexity,
    write_corpus,
)

SMALL = HMMSpec(vocab=60, states=6, support=10, successors=2, seed=3)


def _tiny_hmm():
    rng = np.random.default_rng(7)
    S, V = 3, 5
    transition = rng.dirichlet(np.ones(S), size=S)
    transition[0, 2] = 0.0  # a structural zero exercises the sparse transition path
    transition /= transition.sum(1, keepdims=True)
    emission = rng.dirichlet(np.ones(V), size=S)
    initial = rng.dirichlet(np.ones(S))
    return HMM.from_dense(transition, emission, initial), transition, emission, initial


def _brute_force_log_prob(ids, transition, emission, initial):
    S = len(initial)
    total = 0.0
    for path in itertools.product(range(S), repeat=len(ids)):
        p = initial[path[0]] * emission[path[0], ids[0]]
        for t in range(1, len(ids)):
            p *= transition[path[t - 1], path[t]] * emission[path[t], ids[t]]
        total += p
    return math.log(total)


def test_log_prob_matches_brute_force():
    hmm, A, Em, pi0 = _tiny_hmm()
    assert np.allclose(hmm.emission, Em)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = rng.integers(0, 5, size=6)
        assert abs(hmm.log_prob(ids) - _brute_force_log_prob(ids, A, Em, pi0)) < 1e-10
    # and on a sampled (therefore typical) sequence
    ids = hmm.sample(6, np.random.default_rng(1))
    assert abs(hmm.log_prob(ids) - _brute_force_log_prob(ids, A, Em, pi0)) < 1e-10


def test_log_prob_sparse_representation_matches_dense():
    hmm = HMM.from_spec(SMALL)
    dense = HMM.from_dense(hmm.transition, hmm.emission, hmm.initial, words=hmm.words, eos=hmm.eos)
    ids = hmm.sample(2000, np.random.default_rng(5))
    assert hmm.log_prob(ids) == pytest.approx(dense.log_prob(ids), rel=1e-12)
    # probabilities over all length-2 sequences sum to 1 (tiny vocab)
    tiny = HMM.from_spec(HMMSpec(vocab=6, states=3, support=2, successors=2))
    tot = sum(math.exp(tiny.log_prob([a, b])) for a in range(6) for b in range(6))
    assert tot == pytest.approx(1.0, abs=1e-12)


def test_determinism():
    a = HMM.from_spec(SMALL)
    b = HMM.from_spec(SMALL)
    assert np.array_equal(a.transition, b.transition) and np.array_equal(a.support, b.support)
    x = a.sample(5000, np.random.default_rng(11))
    y = b.sample(5000, np.random.default_rng(11))
    assert x.dtype == np.int32 and x.shape == (5000,)
    assert np.array_equal(x, y)
    assert not np.array_equal(x, a.sample(5000, np.random.default_rng(12)))
    c = HMM.from_spec(HMMSpec(**{**SMALL.__dict__, "seed": 4}))
    assert not np.array_equal(a.transition, c.transition)
    assert not np.array_equal(x, c.sample(5000, np.random.default_rng(11)))


def test_structure_of_default_spec():
    hmm = HMM.from_spec(DEFAULT_SPEC)
    assert hmm.words[hmm.eos] == EOS and UNK not in hmm.words
    assert len(set(hmm.words)) == hmm.V == DEFAULT_SPEC.vocab
    assert ((hmm.transition > 0).sum(1) == DEFAULT_SPEC.successors).all()
    assert (hmm.unigram() > 0).all()  # every word can appear
    assert hmm.unigram().sum() == pytest.approx(1.0)


def test_oracle_beats_unigram_on_default_spec():
    hmm = HMM.from_spec(DEFAULT_SPEC)
    train = hmm.sample(300_000, np.random.default_rng(1))
    test = hmm.sample(30_000, np.random.default_rng(2))
    oracle = hmm.oracle_perplexity(test)
    uni = unigram_perplexity(train, test, hmm.V)
    assert 20 < oracle < 150
    assert uni > 2 * oracle
    # sentences of ~15-30 tokens
    assert 15 <= len(test) / np.count_nonzero(test == hmm.eos) <= 30


def test_empirical_frequencies_match_stationary_mix():
    hmm = HMM.from_spec(SMALL)
    ids = hmm.sample(400_000, np.random.default_rng(0))
    freq = np.bincount(ids, minlength=hmm.V) / len(ids)
    expected = hmm.unigram()
    assert np.allclose(expected, hmm.stationary() @ hmm.emission)
    assert 0.5 * np.abs(freq - expected).sum() < 0.01  # total variation


def test_sample_end_with_eos():
    hmm = HMM.from_spec(SMALL)
    ids = hmm.sample(1000, np.random.default_rng(0), end_with_eos=True)
    assert len(ids) >= 1000 and ids[-1] == hmm.eos
    assert hmm.eos not in ids[1000:-1]
    assert np.array_equal(ids[:1000], hmm.sample(1000, np.random.default_rng(0)))


def test_unigram_perplexity():
    # add-one: counts [2+1, 0+1, 1+1] / 6
    assert unigram_perplexity([0, 0, 2], [1], 3) == pytest.approx(6.0)
    assert unigram_perplexity([0, 0, 2], [0, 2], 3) == pytest.approx(math.sqrt(6 / 3 * 6 / 2))
    with pytest.raises(ValueError, match="V=3"):
        unigram_perplexity([0, 3], [0], 3)


def test_spec_validation():
    with pytest.raises(ValueError, match="support"):
        HMMSpec(vocab=10, support=10)
    with pytest.raises(ValueError, match="successors"):
        HMMSpec(states=4, successors=5)


def test_write_corpus(tmp_path):
    info = write_corpus(tmp_path / "a", SMALL, 3000, 500, 400)
    files = {s: tmp_path / "a" / f"{s}.txt" for s in ("train", "valid", "test")}
    on_disk = json.loads((tmp_path / "a" / "corpus.json").read_text())
    assert on_disk == info
    assert on_disk["spec"]["seed"] == SMALL.seed and on_disk["spec"]["vocab"] == SMALL.vocab
    assert set(on_disk["oracle_perplexity"]) >= {"valid", "test"}
    assert on_disk["unigram_perplexity"]["test"] > on_disk["oracle_perplexity"]["test"]
    text = files["train"].read_text()
    assert EOS not in text and UNK not in text
    assert text.endswith("\n") and " \n" not in text and not text.startswith(" ")

    # reading a file back gives exactly the sampled stream, so the oracle
    # perplexity in corpus.json is exactly comparable with an LM's
    hmm = HMM.from_spec(SMALL)
    vocab = Vocabulary.from_words(hmm.words + [UNK])
    for split, n in (("train", 3000), ("valid", 500), ("test", 400)):
        enc = vocab.encode_file(files[split])
        assert enc.n_oov == 0 and enc.n_tokens == info["tokens"][split] >= n
        assert enc.n_tokens - n < 200  # only the end of the last sentence was added
        assert info["sentences"][split] == files[split].read_text().count("\n")
        assert hmm.oracle_perplexity(enc.ids) == pytest.approx(info["oracle_perplexity"][split], rel=1e-12)
    train = vocab.encode_file(files["train"]).ids
    test = vocab.encode_file(files["test"]).ids
    assert unigram_perplexity(train, test, hmm.V) == pytest.approx(info["unigram_perplexity"]["test"])

    # byte-identical on a rerun; different seed gives different text
    write_corpus(tmp_path / "b", SMALL, 3000, 500, 400)
    for name in ("train.txt", "valid.txt", "test.txt", "corpus.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    write_corpus(tmp_path / "c", HMMSpec(**{**SMALL.__dict__, "seed": 9}), 3000, 500, 400)
    assert (tmp_path / "c" / "train.txt").read_bytes() != files["train"].read_bytes()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]



def test_synthetic_corpus_fixes_the_whole_vocabulary(tmp_path):
    """``vocab.txt`` beside the splits: 4,000 words over 3,000 tokens, most never
    occur, all are in the model, and IS training (unseen words floored in the
    noise law) runs."""
    from slimnp.data import find_splits
    from slimnp.modelfile import load_model
    from slimnp.options import configs
    from slimnp.trainer import run_training

    from helpers import TINY_HP

    info = write_corpus(tmp_path, HMMSpec(vocab=4000, states=4, seed=0), 3000, 500, 500)
    files = find_splits(tmp_path)
    assert files["vocab"] == tmp_path / "vocab.txt"
    seen = len(Vocabulary.build(files["train"]))
    s = run_training(files, tmp_path / "m.h5", *configs({**TINY_HP, "epochs": 1, "loss": "is", "samples": 50}),
                     log=lambda m: None, progress=False)
    model, vocab, _ = load_model(tmp_path / "m.h5")
    assert len(vocab) == 4001 > seen  # 4,000 words + <unk>
    assert model.config.vocab_size == 4001 and vocab.counts.sum() == info["tokens"]["train"]
    assert np.isfinite(s["test_ppl"])

def test_defaults_are_sane():
    train, valid, test = DEFAULT_TOKENS
    assert 500_000 <= train <= 2_000_000 and 50_000 <= valid <= 100_000 and 50_000 <= test <= 100_000
