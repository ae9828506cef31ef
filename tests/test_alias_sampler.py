"""Alias-method noise sampling: the distribution drawn, seeding, log q,
the smoothed unigram noise, bad input and the 800K-word scale."""
import math
import time

import numpy as np
import pytest

from slimnp.backend import make_rng
from slimnp.alias_sampler import AliasSampler, unigram_noise


def _skewed(V, seed=0):
    """Zipf-like weights with a few zero-probability words and one dominant word."""
    w = 1.0 / np.arange(1, V + 1) ** 1.1
    w[[3, 17]] = 0.0
    w[5] = 3.0
    return w / w.sum()


def test_frequencies_match_the_distribution():
    """V=50, 200,000 draws under seed 0.

    Tolerances: Pearson's chi-square over the 48 words of non-zero
    probability (47 degrees of freedom) must stay below 82.72, its 99.9%
    point (a correct sampler fails with probability 0.1%; the seed is fixed,
    so the outcome is deterministic); each word's count must lie within 5
    binomial standard deviations of n q(w); the two zero-probability words
    are never drawn.
    """
    V, n = 50, 200_000
    q = _skewed(V)
    ids = AliasSampler(q).sample(make_rng(0), n)
    assert ids.dtype == np.int32 and ids.shape == (n,)
    counts = np.bincount(ids, minlength=V)
    assert counts.shape == (V,)
    assert counts[3] == 0 and counts[17] == 0
    nz = q > 0
    expected = n * q[nz]
    chi2 = float(((counts[nz] - expected) ** 2 / expected).sum())
    assert chi2 < 82.72, chi2
    sd = np.sqrt(n * q * (1 - q))
    assert np.all(np.abs(counts - n * q) <= 5 * sd + 1e-9)


def test_alias_table_is_exact():
    """The table's implied distribution equals the input to rounding."""
    for V, seed in ((1, 0), (2, 1), (7, 2), (1000, 3)):
        w = np.random.default_rng(seed).random(V) ** 4  # very uneven
        s = AliasSampler(w)
        np.testing.assert_allclose(s.table_probs(), w / w.sum(), rtol=1e-12, atol=1e-16)
        assert s.alias.dtype == np.int32 and np.all((0 <= s.prob) & (s.prob <= 1))
    s = AliasSampler([0.0, 0.0, 5.0])  # one possible word
    assert set(s.sample(make_rng(0), 100).tolist()) == {2}


def test_same_seed_same_samples():
    s = AliasSampler(_skewed(1000))
    a = s.sample(make_rng(42), 5000)
    b = s.sample(make_rng(42), 5000)
    c = s.sample(make_rng(43), 5000)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # a generator restored from a saved state continues the same stream
    rng = make_rng(7)
    s.sample(rng, 10)
    state = rng.bit_generator.state
    x = s.sample(rng, 100)
    rng2 = make_rng(0)
    rng2.bit_generator.state = state
    assert np.array_equal(s.sample(rng2, 100), x)
    assert s.sample(rng, 0).shape == (0,)


def test_log_prob():
    q = _skewed(30)
    s = AliasSampler(q * 7.0)  # unnormalised weights are normalised
    ids = np.array([[0, 1], [29, 5]], np.int64)
    lp = s.log_prob(ids)
    assert lp.dtype == np.float64 and lp.shape == (2, 2)
    np.testing.assert_allclose(lp, np.log(q[ids]), rtol=1e-14)
    assert s.log_prob([3])[0] == -math.inf
    assert math.isclose(np.exp(s.log_prob(np.arange(30))).sum(), 1.0, rel_tol=1e-12)
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        s.log_prob([30])
    with pytest.raises(ValueError, match=r"\[0, 30\)"):
        s.log_prob([-1])
    with pytest.raises(ValueError, match="integers"):
        s.log_prob([1.0])


@pytest.mark.parametrize("bad, msg", [
    ([], "empty"),
    ([0.0, 0.0], "all zero"),
    ([0.5, -0.1, 0.6], "must be >= 0: entry 1 is -0.1"),
    ([0.5, float("nan")], "must be finite: entry 1 is nan"),
    ([1.0, float("inf")], "must be finite"),
    ([[0.5, 0.5]], "1-d"),
    (["a", "b"], "must be numbers"),
])
def test_invalid_probabilities(bad, msg):
    with pytest.raises(ValueError, match=msg):
        AliasSampler(bad)


def test_unigram_noise():
    counts = np.array([8, 1, 0, 27], np.int64)
    q = unigram_noise(counts)
    w = np.array([8 ** 0.75, 1.0, 0.5 ** 0.75, 27 ** 0.75])
    np.testing.assert_allclose(q, w / w.sum(), rtol=1e-14)
    assert q.dtype == np.float64 and math.isclose(q.sum(), 1.0, rel_tol=1e-14)
    # zero counts can be kept impossible
    q0 = unigram_noise(counts, zero_count=0.0)
    assert q0[2] == 0.0 and math.isclose(q0.sum(), 1.0)
    # power 1: the plain unigram; power 0 with the floor: uniform
    np.testing.assert_allclose(unigram_noise(counts, 1.0, 0.0), counts / counts.sum(), rtol=1e-14)
    np.testing.assert_allclose(unigram_noise(counts, 0.0), 0.25, rtol=1e-14)
    with pytest.raises(ValueError, match="all zero"):
        unigram_noise([0, 0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        unigram_noise([1, -2])
    with pytest.raises(ValueError, match="empty"):
        unigram_noise([])
    with pytest.raises(ValueError, match="power"):
        unigram_noise([1, 2], power=-1.0)
    with pytest.raises(ValueError, match="zero_count"):
        unigram_noise([1, 2], zero_count=float("nan"))


def test_large_vocabulary_runs(capsys):
    """V = 800,000 Zipf counts, 4,000 samples per call: prints the times (not
    asserted; about 30 ms to build and 0.1 ms per call on the 2-core dev box)."""
    V, S = 800_000, 4000
    counts = np.floor(1e8 / np.arange(1, V + 1)).astype(np.int64)
    t0 = time.perf_counter()
    s = AliasSampler(unigram_noise(counts))
    t1 = time.perf_counter()
    rng = make_rng(0)
    for _ in range(50):
        ids = s.sample(rng, S)
    t2 = time.perf_counter()
    assert ids.shape == (S,) and ids.min() >= 0 and ids.max() < V
    assert np.all(np.isfinite(s.log_prob(ids)))
    np.testing.assert_allclose(s.table_probs(), s.probs, rtol=1e-9)
    with capsys.disabled():
        print(f"\n  alias sampler V={V:,}: build {1e3 * (t1 - t0):.1f} ms (Numba compile included on a cold cache), "
              f"{1e6 * (t2 - t1) / 50:.0f} us per {S:,} samples")
