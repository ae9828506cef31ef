"""MERT: exact envelopes, BLEU that only goes up, recovery of a planted feature, determinism."""
import numpy as np
import pytest

from slimnp.mt.bleu import STATS_LEN, bleu_from_stats, bleu_stats_batch
from slimnp.mt.nbest import rescore
from slimnp.mt.tune import TuneResult, tune, upper_envelope


def brute_argmax(a, b, t):
    return int(np.argmax(a + t * b))  # first maximum, like the envelope


@pytest.mark.parametrize("kind", ["float", "int", "parallel"])
def test_envelope_matches_brute_force(rng, kind):
    for _ in range(200):
        n = int(rng.integers(1, 12))
        if kind == "float":
            a, b = rng.standard_normal(n), rng.standard_normal(n)
        elif kind == "int":
            # small integers: equal slopes, identical lines, several lines through one point
            a, b = rng.integers(-3, 4, n).astype(float), rng.integers(-2, 3, n).astype(float)
        else:
            a, b = rng.standard_normal(n), rng.integers(0, 2, n).astype(float)
        lines, bps = upper_envelope(a, b)
        assert lines.size == bps.size + 1
        assert np.all(np.diff(bps) > 0)
        # probe each piece in its middle, far out on both sides, and at random points
        probes = list((bps[:-1] + bps[1:]) / 2) if bps.size > 1 else []
        lo = bps[0] if bps.size else 0.0
        hi = bps[-1] if bps.size else 0.0
        probes += [lo - 1e3, hi + 1e3, *rng.uniform(lo - 5, hi + 5, 20)]
        for t in probes:
            if bps.size and np.min(np.abs(bps - t)) < 1e-9:
                continue  # exactly at a breakpoint both answers are right
            piece = int(np.searchsorted(bps, t))
            assert lines[piece] == brute_argmax(a, b, t), (a, b, t)


def test_envelope_piece_count_and_errors():
    # three lines, the middle one on top only at t = 0: left out
    lines, bps = upper_envelope([0.0, 0.0, 0.0], [-1.0, 0.0, 1.0])
    assert lines.tolist() == [0, 2] and bps.tolist() == [0.0]
    lines, bps = upper_envelope([1.0, 1.0], [2.0, 2.0])  # identical: the first wins
    assert lines.tolist() == [0] and bps.size == 0
    with pytest.raises(ValueError, match="as many intercepts as slopes"):
        upper_envelope([1.0], [1.0, 2.0])


# ------------------------------------------------------------------ synthetic MERT problems

def edit_distance(x, y):
    d = np.arange(len(y) + 1)
    for i, xi in enumerate(x, 1):
        prev, d[0] = d[0], i
        for j, yj in enumerate(y, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (xi != yj))
    return int(d[-1])


def planted_problem(rng, S=40, n=15, n_noise=3):
    """Feature 0 is minus the edit distance to the reference, the rest are noise."""
    vocab = [f"w{i}" for i in range(25)]
    features, stats = [], []
    for _ in range(S):
        ref = list(rng.choice(vocab, int(rng.integers(8, 15))))
        hyps = []
        for _ in range(n):
            h = list(ref)
            for _ in range(int(rng.integers(1, 7))):  # 1 to 6 random edits
                op, i = rng.integers(3), int(rng.integers(len(h) + 1))
                if op == 0 and i < len(h):
                    h[i] = str(rng.choice(vocab))
                elif op == 1 and i < len(h) and len(h) > 1:
                    del h[i]
                else:
                    h.insert(i, str(rng.choice(vocab)))
            hyps.append(h)
        X = np.empty((n, 1 + n_noise))
        X[:, 0] = [-edit_distance(h, ref) for h in hyps]
        X[:, 1:] = rng.standard_normal((n, n_noise)) * 3
        features.append(X)
        stats.append(bleu_stats_batch(hyps, [ref]))
    return features, stats


def bleu_of(features, stats, w):
    best = rescore(features, w)
    return bleu_from_stats(sum(st[j] for st, j in zip(stats, best)))


@pytest.fixture(scope="module")
def planted():
    return planted_problem(np.random.default_rng(7))


def test_recovers_planted_feature(planted):
    features, stats = planted
    init = np.array([0.0, 1.0, 1.0, 1.0])  # starts from the noise alone
    oracle = bleu_of(features, stats, [1.0, 0.0, 0.0, 0.0])
    res = tune(features, stats, init, restarts=1, seed=0)
    assert isinstance(res, TuneResult)
    assert res.init_bleu == pytest.approx(bleu_of(features, stats, init), abs=0)
    assert res.init_bleu < oracle - 10  # the problem is not trivially solved at the start
    assert res.bleu >= oracle - 1.0
    # the planted feature carries the largest weight
    assert np.argmax(np.abs(res.weights)) == 0 and res.weights[0] > 0


def test_bleu_never_drops_and_is_exact(rng, planted):
    features, stats = planted
    for seed in range(3):
        init = rng.standard_normal(4)
        res = tune(features, stats, init, restarts=1, random_directions=1, seed=seed,
                   iterations=5)
        assert res.bleu >= res.init_bleu
        # the reported BLEU is exactly what rescoring with the weights gives
        assert res.bleu == bleu_of(features, stats, res.weights)
        assert np.abs(res.weights).sum() == pytest.approx(1.0, rel=1e-12)
        # each start's history never goes down
        for start in {h.start for h in res.history}:
            seq = [h.bleu for h in res.history if h.start == start]
            assert seq == sorted(seq)


def test_ragged_nbest_lists(rng, planted):
    # n-best lists of different lengths (1 to 15) are padded inside; padding never wins
    features, stats = planted
    keep = [int(rng.integers(1, 16)) for _ in features]
    features = [X[:k] for X, k in zip(features, keep)]
    stats = [st[:k] for st, k in zip(stats, keep)]
    init = np.array([0.0, 1.0, 1.0, 1.0])
    res = tune(features, stats, init, restarts=1)
    assert res.init_bleu == bleu_of(features, stats, init)
    assert res.bleu == bleu_of(features, stats, res.weights) > res.init_bleu


def test_deterministic_with_seed(planted):
    features, stats = planted
    init = np.array([0.1, 1.0, -1.0, 0.5])
    r1 = tune(features, stats, init, restarts=2, random_directions=2, seed=3, iterations=4)
    r2 = tune(features, stats, init, restarts=2, random_directions=2, seed=3, iterations=4)
    np.testing.assert_array_equal(r1.weights, r2.weights)
    assert r1.bleu == r2.bleu and r1.history == r2.history


def test_fixed_weights_stay(planted):
    features, stats = planted
    init = np.array([0.0, 1.0, 1.0, -2.0])
    res = tune(features, stats, init, fixed=[3], restarts=1, iterations=5)
    assert res.weights[3] == -2.0  # held exactly: no normalisation either
    assert res.bleu >= res.init_bleu
    mask = tune(features, stats, init, fixed=np.array([False, True, True, True]),
                iterations=3)
    np.testing.assert_array_equal(mask.weights[1:], init[1:])


def test_ties_follow_rescore():
    # every hypothesis of a sentence has the same features: rescore keeps the first,
    # so the tuner can do nothing and must report that same first-hypothesis BLEU
    stats = [np.array([[1, 0, 0, 0, 2, 1, 0, 0, 2, 2], [2, 1, 0, 0, 2, 1, 0, 0, 2, 2]])] * 3
    feats = [np.ones((2, 2))] * 3
    res = tune(feats, stats, [1.0, -1.0], restarts=2)
    assert res.bleu == res.init_bleu == 0.0


def test_input_errors():
    X, st = np.zeros((2, 3)), np.zeros((2, STATS_LEN), dtype=np.int64)
    with pytest.raises(ValueError, match="at least one sentence"):
        tune([], [], np.zeros(3))
    with pytest.raises(ValueError, match="2 feature matrices but 1"):
        tune([X, X], [st], np.zeros(3))
    with pytest.raises(ValueError, match="sentence 1: 2 features, sentence 0 has 3"):
        tune([X, np.zeros((2, 2))], [st, st], np.zeros(3))
    with pytest.raises(ValueError, match="sentence 0: features must be finite"):
        tune([np.full((2, 3), -np.inf)], [st], np.zeros(3))
    with pytest.raises(ValueError, match=r"sentence 0: BLEU statistics must be integers of shape "
                                         r"\(2, 10\)"):
        tune([X], [np.zeros((2, 9))], np.zeros(3))
    with pytest.raises(ValueError, match="init must have shape"):
        tune([X], [st], np.zeros(2))
    with pytest.raises(ValueError, match="`fixed` indices"):
        tune([X], [st], np.zeros(3), fixed=[5])
