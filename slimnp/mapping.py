"""Sub-vector assignment tables of the slim embedding layers.

Li, Kang and Zhang (AAAI 2018), "Compressing Input Embedding Layer" and
"Compressing Output Embedding Layer".  The tables' meaning, written once:

* ``idx_in : (V, K)`` -- word w's input vector is the concatenation
  ``[A_in[idx_in[w, 0]], ..., A_in[idx_in[w, K-1]]]`` of rows of ONE shared
  pool ``A_in : (M, H/K)``; values in ``[0, M)``.
* ``idx_out : (V, K)`` -- word w's output vector is
  ``[A_out[0, idx_out[w, 0]], ..., A_out[K-1, idx_out[w, K-1]]]``: position
  k draws only from its own pool ``A_out[k] : (M/K, H/K)`` (the K pools are
  disjoint), values in ``[0, M/K)``.  That is what lets the logits be
  computed by dynamic programming (K GEMMs, then a K-term gather-sum).

Two ways to build them:

``shuffle`` (the paper): a list of K*V entries made of copies of ``0..M-1``
(as uniformly as possible: the sequence repeated and cut at K*V entries),
shuffled by Fisher--Yates under a seed and read row by row.  Every pool entry
is then used floor(KV/M) or ceil(KV/M) times.  The output side does the same
per position k with the V entries of column k and pool size M/K.  These
tables are stored in the model file.

``hash`` (the paper's remedy for large K; HashNet when K = H): entries are
computed on the fly from (word, position, seed) by :func:`hash_index`, so
nothing but the seed is stored.
"""
from __future__ import annotations

import numpy as np

# Distinct streams for the input and output tables of one seed.
_SALT_IN, _SALT_OUT = 0x5EED_1, 0x5EED_2
HASH_NAME = "splitmix64-v1"


def _table_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def shuffle_assignment(V: int, K: int, M: int, seed: int) -> np.ndarray:
    """The paper's input table ``(V, K)``: uniform usage of ``M`` entries, shuffled.

    Raises ``ValueError`` when ``M > K*V`` (some pool entries could never be used).
    """
    if not 1 <= M <= K * V:
        raise ValueError(f"input pool size M={M} must lie in [1, K*V={K * V}]")
    L = np.arange(K * V, dtype=np.int64) % M  # copies of 0..M-1, cut at K*V entries
    rng = np.random.Generator(np.random.PCG64([seed, _SALT_IN]))
    rng.shuffle(L)  # Fisher--Yates
    return L.reshape(V, K).astype(_table_dtype(M))


def shuffle_assignment_pools(V: int, K: int, Mk: int, seed: int) -> np.ndarray:
    """The output table ``(V, K)``: column k is a shuffled uniform use of ``0..Mk-1``."""
    if not 1 <= Mk <= V:
        raise ValueError(f"output pool size M/K={Mk} must lie in [1, V={V}]")
    rng = np.random.Generator(np.random.PCG64([seed, _SALT_OUT]))
    cols = []
    for _ in range(K):
        col = np.arange(V, dtype=np.int64) % Mk
        rng.shuffle(col)
        cols.append(col)
    return np.stack(cols, axis=1).astype(_table_dtype(Mk))


def hash_index(words, positions, seed: int, n: int) -> np.ndarray:
    """``splitmix64(seed * 0x9E3779B97F4A7C15 + word * 2**20 + position) mod n``.

    The documented hash of the ``hash`` mapping (name ``splitmix64-v1``):
    words and positions broadcast; arithmetic is modulo 2**64.  Stable across
    platforms and versions, so a model file needs only the seed.
    """
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
             + np.asarray(words, dtype=np.uint64) * np.uint64(1 << 20)
             + np.asarray(positions, dtype=np.uint64))
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(n)).astype(_table_dtype(n))


def hash_assignment(V: int, K: int, n: int, seed: int, salt: int) -> np.ndarray:
    """``(V, K)`` table of :func:`hash_index` values in ``[0, n)``."""
    w = np.arange(V, dtype=np.uint64)[:, None]
    k = np.arange(K, dtype=np.uint64)[None, :]
    return hash_index(w, k, seed * 2 + salt, n)


def input_table(V: int, K: int, M: int, kind: str, seed: int) -> np.ndarray:
    if kind == "shuffle":
        return shuffle_assignment(V, K, M, seed)
    if kind == "hash":
        return hash_assignment(V, K, M, seed, 0)
    raise ValueError(f"unknown mapping {kind!r}; expected 'shuffle' or 'hash'")


def output_table(V: int, K: int, Mk: int, kind: str, seed: int) -> np.ndarray:
    if kind == "shuffle":
        return shuffle_assignment_pools(V, K, Mk, seed)
    if kind == "hash":
        return hash_assignment(V, K, Mk, seed, 1)
    raise ValueError(f"unknown mapping {kind!r}; expected 'shuffle' or 'hash'")


def inverse_table(idx_kv: np.ndarray, Mk: int):
    """``idx_kv (K, V)`` inverted: ``inv (K, F, Mk)`` with ``inv[k, :, j]`` the
    F words whose k-th sub-vector is entry j, ascending; or None unless every
    entry of every pool has the same number F = V/Mk of words (a shuffle
    mapping with Mk dividing V does; a hash mapping generally does not).

    With it the output layer's backward gathers instead of scattering
    (``kernels.slim_segment_sum_t(..., inv=...)``).
    """
    idx_kv = np.asarray(idx_kv)
    K, V = idx_kv.shape
    if Mk <= 0 or V % Mk:
        return None
    F = V // Mk
    inv = np.empty((K, F, Mk), np.int32)
    for k in range(K):
        if not np.all(np.bincount(idx_kv[k], minlength=Mk) == F):
            return None
        order = np.argsort(idx_kv[k], kind="stable")  # by entry, words ascending
        inv[k] = order.reshape(Mk, F).T
    return inv


def slim_report(config: dict, tables: dict, table_bytes: dict | None = None) -> dict:
    """Per slim layer: K, M, compression, parameters vs dense, pool usage.

    ``config`` is a model config dict; ``tables`` the ``(V, K)`` tables
    (``"input/idx"``, ``"output/idx"``; computed from the seed for hash
    mappings); ``table_bytes`` what each table takes in the file.
    """
    V, H = config["vocab_size"], config["hidden"]
    report = {}
    sides = []
    if config.get("input") == "slim":
        sides.append("input")
    if config.get("output") == "slim":
        sides.append("output")
    for side in sides:
        tied = side == "input" and config.get("tie")
        src = "output" if tied else side
        K, M = config[f"{src}_k"], config[f"{src}_m"]
        d = H // K
        params = M * d  # the pool(s); the output bias is counted apart
        t = tables.get(f"{src}/idx")
        entry = {"K": K, "M": M, "sub_vector_size": d, "pool_parameters": params,
                 "dense_parameters": V * H, "compression": params / (V * H),
                 "mapping": config.get("mapping", "shuffle"), "mapping_seed": config.get("mapping_seed", 0),
                 "tied_to_output": bool(tied),
                 "table_bytes": int((table_bytes or {}).get(f"{src}/idx", 0))}
        if t is not None:
            t = np.asarray(t)
            if src == "output":  # K pools of M/K entries: usage per pool entry
                use = np.concatenate([np.bincount(t[:, k], minlength=M // K) for k in range(K)])
            else:
                use = np.bincount(t.ravel(), minlength=M)
            entry.update(uses_min=int(use.min()), uses_max=int(use.max()),
                         unused_entries=int((use == 0).sum()))
        report[side] = entry
    return report
