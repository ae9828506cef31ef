"""slimnp.mapping: the slim layers' assignment tables (shuffle and hash), the
inverted output table, and the report of their pool usage.

(The kernels reading the inverted table are tested in test_kernels.py.)
"""
import json

import numpy as np
import pytest

from slimnp.mapping import (hash_assignment, hash_index, input_table, inverse_table, output_table,
                            shuffle_assignment, shuffle_assignment_pools)

from helpers import run_cli, tiny_corpus


# -- shuffle tables -------------------------------------------------------------
@pytest.mark.parametrize("V,K,M", [(4, 2, 3), (1000, 10, 777), (50, 3, 150), (7, 1, 1)])
def test_shuffle_table_uses_pool_uniformly(V, K, M):
    t = shuffle_assignment(V, K, M, seed=1)
    assert t.shape == (V, K) and t.min() >= 0 and t.max() < M
    use = np.bincount(t.ravel(), minlength=M)
    assert use.min() == (K * V) // M and use.max() == -(-K * V // M)
    np.testing.assert_array_equal(t, shuffle_assignment(V, K, M, seed=1))
    if M > 1 and V * K > 4:
        assert not np.array_equal(t, shuffle_assignment(V, K, M, seed=2))


def test_output_table_columns_are_uniform_per_pool():
    V, K, Mk = 1000, 5, 128
    t = shuffle_assignment_pools(V, K, Mk, seed=0)
    for k in range(K):
        use = np.bincount(t[:, k], minlength=Mk)
        assert use.min() == V // Mk and use.max() == -(-V // Mk)
    assert not np.array_equal(t[:, 0], t[:, 1])


def test_table_errors():
    with pytest.raises(ValueError, match="K\\*V"):
        shuffle_assignment(10, 2, 21, 0)
    with pytest.raises(ValueError, match="V=10"):
        shuffle_assignment_pools(10, 2, 11, 0)


# -- hash tables ------------------------------------------------------------------
def test_hash_table_is_a_function_of_seed():
    a = hash_assignment(5000, 8, 300, seed=3, salt=0)
    np.testing.assert_array_equal(a, hash_assignment(5000, 8, 300, seed=3, salt=0))
    assert not np.array_equal(a, hash_assignment(5000, 8, 300, seed=4, salt=0))
    assert a.min() >= 0 and a.max() < 300
    use = np.bincount(a.ravel(), minlength=300)
    # hashing is uniform in expectation (mean 133.3), not exactly
    assert use.min() > 80 and use.max() < 190


def _splitmix64(seed: int, word: int, position: int, n: int) -> int:
    """The documented hash (``splitmix64-v1``) in Python integers, modulo 2**64."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + word * (1 << 20) + position) & mask
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & mask
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return x % n


def test_hash_index_is_the_documented_splitmix64():
    """A model file stores only the seed of a hash mapping: the vectorised
    uint64 arithmetic must be the documented formula, word by word (large
    seeds and ids included, where the products wrap)."""
    V, K, n = 300, 3, 97
    for seed in (0, 7, 2**40 + 3):
        for salt in (0, 1):
            got = hash_assignment(V, K, n, seed=seed, salt=salt)
            want = [[_splitmix64(seed * 2 + salt, w, k, n) for k in range(K)] for w in range(V)]
            np.testing.assert_array_equal(got, want)
    big = np.array([0, 1, 2**31 - 1, 10**12])
    np.testing.assert_array_equal(hash_index(big, 5, 2**63 - 1, 1000),
                                  [_splitmix64(2**63 - 1, int(w), 5, 1000) for w in big])


def test_hash_mapping_is_stable_across_processes():
    import hashlib
    import subprocess
    import sys

    code = ("import hashlib; from slimnp.mapping import hash_assignment; "
            "print(hashlib.sha256(hash_assignment(5000, 8, 300, 11, 1).tobytes()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    here = hashlib.sha256(hash_assignment(5000, 8, 300, 11, 1).tobytes()).hexdigest()
    assert outs == {here + "\n"}


# -- the tables a model builds ---------------------------------------------------
def test_input_and_output_tables_by_kind():
    """``input_table`` / ``output_table`` are the builders above under the
    mapping's name, the two sides of one seed drawn from distinct streams."""
    V, K, M, Mk = 60, 3, 40, 12
    np.testing.assert_array_equal(input_table(V, K, M, "shuffle", 5), shuffle_assignment(V, K, M, 5))
    np.testing.assert_array_equal(output_table(V, K, Mk, "shuffle", 5), shuffle_assignment_pools(V, K, Mk, 5))
    np.testing.assert_array_equal(input_table(V, K, M, "hash", 5), hash_assignment(V, K, M, 5, 0))
    np.testing.assert_array_equal(output_table(V, K, Mk, "hash", 5), hash_assignment(V, K, Mk, 5, 1))
    for kind in ("shuffle", "hash"):  # the same shape and range, other numbers
        assert not np.array_equal(input_table(V, K, Mk, kind, 5), output_table(V, K, Mk, kind, 5))
    for build in (input_table, output_table):
        with pytest.raises(ValueError, match="unknown mapping 'random'; expected 'shuffle' or 'hash'"):
            build(V, K, Mk, "random", 0)


# -- the inverted output table ----------------------------------------------------
def test_inverse_table():
    V, K, Mk = 60, 3, 12
    idx_kv = np.ascontiguousarray(shuffle_assignment_pools(V, K, Mk, 4).T)
    inv = inverse_table(idx_kv, Mk)
    assert inv.shape == (K, V // Mk, Mk)
    for k in range(K):
        for j in range(Mk):
            words = inv[k, :, j]
            assert np.all(np.diff(words) > 0)  # ascending
            assert np.array_equal(np.flatnonzero(idx_kv[k] == j), words)
    # uneven fan-out (hash mapping, or Mk not dividing V): no inverse
    assert inverse_table(np.ascontiguousarray(hash_assignment(V, K, Mk, 0, 1).T), Mk) is None
    assert inverse_table(idx_kv[:, :-1], Mk) is None


# -- the report (slimnp inspect) ---------------------------------------------------
def test_inspect_reports_slim_layers(tmp_path):
    tiny_corpus(tmp_path / "c", tokens=3000)
    args = ["train", "--data", str(tmp_path / "c"), "--layers", "1", "--hidden", "16", "--epochs", "1",
            "--input", "slim", "--input-k", "4", "--input-m", "50", "--output", "slim",
            "--output-k", "4", "--output-m", "40", "-q"]
    for mapping in ("shuffle", "hash"):
        out = str(tmp_path / f"{mapping}.h5")
        assert run_cli(*args, "--mapping", mapping, "--out", out).exit_code == 0
        info = json.loads(run_cli("inspect", out, "--json").output)
        V = info["vocab_size"]
        r_in, r_out = info["slim"]["input"], info["slim"]["output"]
        assert r_in["pool_parameters"] == 50 * 4 and r_in["dense_parameters"] == V * 16
        assert r_out["pool_parameters"] == 40 * 4
        assert r_in["compression"] == pytest.approx(200 / (V * 16))
        assert r_in["mapping"] == mapping
        if mapping == "shuffle":
            assert r_in["uses_min"] == (4 * V) // 50 and r_in["uses_max"] == -(-4 * V // 50)
            assert r_in["table_bytes"] > 0
        else:
            assert r_in["table_bytes"] == 0 and r_in["uses_max"] >= r_in["uses_min"]
        text = run_cli("inspect", out).output
        assert "slim input: K=4 M=50" in text
