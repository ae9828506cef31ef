"""Synthetic corpus from a hidden Markov model with an exact oracle.

A seeded HMM generates a word stream whose per-token log-probability is
computable exactly by the forward algorithm, so a language model's test
perplexity can be printed beside the corpus's *oracle* perplexity (the best
any model can achieve in expectation).

Dimensions: ``S`` hidden states, ``V`` words (``<eos>`` included), ``E``
words in one state's own emission support, ``T`` tokens.

Emission representation (exact, memory ``O(S*E + V)`` rather than
``O(S*V)``, so V can be ~800K)::

    emission[s, w] = bg_weight[s] * background[w]
                     + sum_e support_prob[s, e] * (support[s, e] == w)

The generated HMMs put ``<eos>`` and each state's Zipf-ranked words in the
sparse support, and mix in a small global Zipf background over all other
words so every word has non-zero probability (the union of supports covers
the vocabulary).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import kernels
from ._atomic import atomic_path
from .data import EOS, UNK

#: Tokens sampled per kernels.hmm_sample call; bounds the uniform buffer to 24 MB.
_SAMPLE_CHUNK = 1 << 20


@dataclass(frozen=True)
class HMMSpec:
    """Parameters of a generated HMM language.

    The defaults give an oracle perplexity of ~50 and a unigram perplexity
    of ~214 on the default splits, with sentences of ~19 tokens; a 1x128
    LSTM comes within 10% of the oracle in two epochs (`slimnp train`).
    """

    vocab: int = 1000  # V, words including <eos>; generated words are w0001.. (never <unk>)
    states: int = 16  # S hidden states (16 keeps the built-in run learnable to ~5% of the oracle in 2 epochs)
    seed: int = 0  # seeds the structure and, per split, the samples
    zipf: float = 1.1  # exponent of the Zipf law inside each state's support and of the background
    support: int = 40  # E, words in each state's own support: small -> states identifiable from words
    successors: int = 3  # nonzero transitions per state: sparse -> predictable state sequence
    background: float = 0.02  # weight of the global background law in every state: covers the vocab
    background_zipf: float = 0.0  # Zipf exponent of the background law; 0 = uniform, so every word shows up in train
    mean_sentence: float = 20.0  # mean tokens per sentence (<eos> included); per-state eos prob ~ 1/this

    def __post_init__(self):
        if self.vocab < 2:
            raise ValueError(f"HMMSpec.vocab must be >= 2 (<eos> plus one word), got {self.vocab}")
        if self.states < 1:
            raise ValueError(f"HMMSpec.states must be >= 1, got {self.states}")
        if not 1 <= self.support <= self.vocab - 1:
            raise ValueError(
                f"HMMSpec.support must be in [1, vocab-1] = [1, {self.vocab - 1}], got {self.support}; "
                f"lower support or raise vocab"
            )
        if not 1 <= self.successors <= self.states:
            raise ValueError(f"HMMSpec.successors must be in [1, states] = [1, {self.states}], got {self.successors}")
        if not 0.0 <= self.background < 1.0:
            raise ValueError(f"HMMSpec.background must be in [0, 1), got {self.background}")
        if not self.mean_sentence > 2.0:
            raise ValueError(f"HMMSpec.mean_sentence must be > 2 (eos prob up to 1.5/mean_sentence), got {self.mean_sentence}")
        if self.zipf < 0 or self.background_zipf < 0:
            raise ValueError(f"HMMSpec.zipf and background_zipf must be >= 0, got {self.zipf}, {self.background_zipf}")


DEFAULT_SPEC = HMMSpec()
#: (train, valid, test) token counts for the built-in corpus.
DEFAULT_TOKENS = (1_000_000, 80_000, 80_000)


def _rngs(seed: int, n: int):
    # Independent, reproducible streams: [0] structure, then one per split.
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _zipf(n: int, a: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** a
    return w / w.sum()


# --------------------------------------------------------------------------
# the model


class HMM:
    """Hidden Markov model over words, with sparse emissions.

    Parameters
    ----------
    transition : np.ndarray, shape (S, S), float64
        Row-stochastic: ``transition[i, j] = P(state_{t+1}=j | state_t=i)``.
    initial : np.ndarray, shape (S,), float64
        Distribution of the first state.
    support : np.ndarray, shape (S, E), int
        Word ids of each state's own emission entries.
    support_prob : np.ndarray, shape (S, E), float64
        Their probabilities.
    background : np.ndarray, shape (V,), float64
        A word distribution shared by all states.
    bg_weight : np.ndarray, shape (S,), float64
        Weight of `background` in each state; each row of the emission,
        ``bg_weight[s] + support_prob[s].sum()``, must be 1.
    words : list of str, length V
        Word strings; ``words[eos] == "<eos>"``.
    eos : int
        Id of ``<eos>``.

    Each token is emitted by the current state, then the state moves.
    """

    def __init__(self, transition, initial, support, support_prob, background, bg_weight, words, eos):
        self.transition = np.ascontiguousarray(transition, dtype=np.float64)
        self.initial = np.ascontiguousarray(initial, dtype=np.float64)
        self.support = np.ascontiguousarray(support, dtype=np.int32)
        self.support_prob = np.ascontiguousarray(support_prob, dtype=np.float64)
        self.background = np.ascontiguousarray(background, dtype=np.float64)
        self.bg_weight = np.ascontiguousarray(bg_weight, dtype=np.float64)
        self.words = list(words)
        self.eos = int(eos)
        S, V = self.transition.shape[0], self.background.shape[0]
        checks = [
            (self.transition.shape == (S, S), f"transition must be square (S, S), got {self.transition.shape}"),
            (self.initial.shape == (S,), f"initial must have shape ({S},), got {self.initial.shape}"),
            (self.support.ndim == 2 and self.support.shape[0] == S, f"support must be (S={S}, E), got {self.support.shape}"),
            (self.support_prob.shape == self.support.shape, f"support_prob must match support {self.support.shape}, got {self.support_prob.shape}"),
            (self.bg_weight.shape == (S,), f"bg_weight must have shape ({S},), got {self.bg_weight.shape}"),
            (len(self.words) == V, f"words must have V={V} entries (len(background)), got {len(self.words)}"),
            (0 <= self.eos < V and self.words[self.eos] == EOS, f"words[eos] must be {EOS!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.support.size and (self.support.min() < 0 or self.support.max() >= V):
            raise ValueError(f"support ids must lie in [0, {V - 1}]")
        for name, arr in (("transition", self.transition), ("initial", self.initial), ("support_prob", self.support_prob),
                          ("background", self.background), ("bg_weight", self.bg_weight)):
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"{name} must be finite and non-negative")
        for name, tot in (("transition rows", self.transition.sum(1)), ("initial", self.initial.sum()),
                          ("background", self.background.sum()),
                          ("emission rows (bg_weight + support_prob)", self.bg_weight + self.support_prob.sum(1))):
            if not np.allclose(tot, 1.0, atol=1e-9):
                raise ValueError(f"{name} must sum to 1, got sums in [{np.min(tot)}, {np.max(tot)}]")
        self._prepare()

    def _prepare(self):
        # sampling tables
        self._trans_cdf = np.cumsum(self.transition, axis=1)
        self._bg_cdf = np.cumsum(self.background)
        self._sup_cdf = np.cumsum(self.support_prob, axis=1)
        # transition in CSR form: the forward pass costs O(nnz) per token
        rows, cols = np.nonzero(self.transition)
        self._t_ptr = np.searchsorted(rows, np.arange(self.S + 1)).astype(np.int64)
        self._t_col = cols.astype(np.int64)
        self._t_val = self.transition[rows, cols]
        # emission support inverted to word -> (state, prob) CSR, for log_prob
        flat = self.support.ravel()
        order = np.argsort(flat, kind="stable")
        self._w_ptr = np.searchsorted(flat[order], np.arange(self.V + 1)).astype(np.int64)
        self._w_state = (order // self.support.shape[1]).astype(np.int64)
        self._w_prob = self.support_prob.ravel()[order]

    @property
    def S(self) -> int:
        return self.transition.shape[0]

    @property
    def V(self) -> int:
        return self.background.shape[0]

    @property
    def emission(self) -> np.ndarray:
        """Dense emission matrix, shape (S, V) float64 (materialised on demand: S*V*8 bytes)."""
        em = self.bg_weight[:, None] * self.background[None, :]
        np.add.at(em, (np.repeat(np.arange(self.S), self.support.shape[1]), self.support.ravel()), self.support_prob.ravel())
        return em

    @classmethod
    def from_dense(cls, transition, emission, initial, words=None, eos=0) -> "HMM":
        """HMM from a dense emission matrix (S, V); words default to ``<eos>``, w1, w2..."""
        emission = np.asarray(emission, dtype=np.float64)
        S, V = emission.shape
        if words is None:
            words = [f"w{i}" for i in range(V)]
            words[eos] = EOS
        return cls(transition, initial, np.tile(np.arange(V), (S, 1)), emission,
                   np.full(V, 1.0 / V), np.zeros(S), words, eos)

    @classmethod
    def from_spec(cls, spec: HMMSpec = DEFAULT_SPEC) -> "HMM":
        """Generate the HMM described by `spec` (deterministic in ``spec.seed``)."""
        rng = _rngs(spec.seed, 4)[0]
        S, V, E, K = spec.states, spec.vocab, spec.support, spec.successors
        eos = 0
        width = max(4, len(str(V - 1)))
        words = [EOS] + [f"w{i:0{width}d}" for i in range(1, V)]

        # Transitions: K successors per state; a random cycle through all
        # states is always among them so the chain is irreducible.
        cycle = rng.permutation(S)
        nxt_on_cycle = np.empty(S, dtype=np.int64)
        nxt_on_cycle[cycle] = np.roll(cycle, -1)
        transition = np.zeros((S, S))
        for s in range(S):  # per state: S is small
            others = np.delete(np.arange(S), nxt_on_cycle[s])
            succ = np.concatenate(([nxt_on_cycle[s]], rng.choice(others, K - 1, replace=False)))
            transition[s, succ] = rng.dirichlet(np.ones(K))

        # Emissions: <eos> with a state-dependent probability, else
        # (1 - background) from the state's own Zipf-ranked support (a random
        # subset of the words in random rank order) and background from a
        # global Zipf law (uniform by default) over all words but <eos>.
        eos_p = rng.uniform(0.5, 1.5, size=S) / spec.mean_sentence
        local = _zipf(E, spec.zipf)
        support = np.empty((S, E + 1), dtype=np.int64)
        support_prob = np.empty((S, E + 1))
        support[:, 0] = eos
        support_prob[:, 0] = eos_p
        for s in range(S):
            support[s, 1:] = 1 + rng.choice(V - 1, size=E, replace=False)
            support_prob[s, 1:] = (1.0 - eos_p[s]) * (1.0 - spec.background) * local
        background = np.zeros(V)
        background[1 + rng.permutation(V - 1)] = _zipf(V - 1, spec.background_zipf)
        bg_weight = (1.0 - eos_p) * spec.background
        hmm = cls(transition, np.full(S, 1.0 / S), support, support_prob, background, bg_weight, words, eos)
        # Start each split in the stationary regime, so the first sentences
        # look like the rest.
        hmm.initial = hmm.stationary()
        return hmm

    # -- analysis -------------------------------------------------------

    def stationary(self) -> np.ndarray:
        """Stationary state distribution pi, shape (S,): pi @ transition = pi."""
        S = self.S
        # pi (A - I) = 0 with one equation replaced by sum(pi) = 1
        a = (self.transition - np.eye(S)).T
        a[-1, :] = 1.0
        rhs = np.zeros(S)
        rhs[-1] = 1.0
        pi = np.linalg.lstsq(a, rhs, rcond=None)[0]
        pi = np.clip(pi, 0.0, None)
        return pi / pi.sum()

    def unigram(self) -> np.ndarray:
        """Stationary word distribution, shape (V,): pi @ emission."""
        pi = self.stationary()
        p = (pi @ self.bg_weight) * self.background
        np.add.at(p, self.support.ravel(), (pi[:, None] * self.support_prob).ravel())
        return p

    # -- sampling and scoring ---------------------------------------------

    def sample(self, n_tokens: int, rng: np.random.Generator, end_with_eos: bool = False) -> np.ndarray:
        """Sample a token stream starting from `initial`.

        Parameters
        ----------
        n_tokens : int
            Tokens to draw.
        rng : np.random.Generator
            Source of randomness (the only one: same state -> same ids).
        end_with_eos : bool
            Keep drawing past `n_tokens` until an ``<eos>``, so the stream
            is whole sentences and round-trips through a text file exactly.

        Returns
        -------
        np.ndarray, shape (T,), int32
        """
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        state = int(kernels.cdf_search(np.cumsum(self.initial), self.S, rng.random()))
        parts = []
        todo = n_tokens
        while todo > 0 or (end_with_eos and (not parts or parts[-1][-1] != self.eos)):
            n = min(todo, _SAMPLE_CHUNK) if todo > 0 else 256
            out = np.empty(n, dtype=np.int32)
            state = kernels.hmm_sample(state, rng.random((n, 3)), out, self._trans_cdf, self.bg_weight,
                                       self._bg_cdf, self._sup_cdf, self.support)
            if todo > 0:
                todo -= n
            else:  # past n_tokens: keep only up to the first <eos>
                hit = np.flatnonzero(out == self.eos)
                if hit.size:
                    out = out[: hit[0] + 1]
            parts.append(out)
        if not parts:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate(parts)

    def log_prob(self, ids) -> float:
        """Exact natural-log probability of `ids` (shape (T,)) from `initial`."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-d (T,), got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.V):
            raise ValueError(f"ids must lie in [0, {self.V - 1}], got range [{ids.min()}, {ids.max()}]")
        return float(kernels.hmm_log_prob(ids, self.initial, self._t_ptr, self._t_col, self._t_val,
                                          self.bg_weight, self.background, self._w_ptr, self._w_state, self._w_prob))

    def oracle_perplexity(self, ids) -> float:
        """``exp(-log_prob(ids) / T)``: the best achievable perplexity on `ids`."""
        n = len(ids)
        if n == 0:
            raise ValueError("oracle_perplexity needs at least one token, got 0")
        return math.exp(-self.log_prob(ids) / n)


def unigram_perplexity(train_ids, test_ids, V: int) -> float:
    """Perplexity of `test_ids` under add-one smoothed unigram counts of `train_ids`.

    Parameters
    ----------
    train_ids, test_ids : array-like of int, shapes (T_train,), (T_test,)
    V : int
        Vocabulary size (ids in ``[0, V)``).
    """
    train_ids = np.asarray(train_ids)
    test_ids = np.asarray(test_ids)
    if test_ids.size == 0:
        raise ValueError("unigram_perplexity needs at least one test token, got 0")
    for name, a in (("train_ids", train_ids), ("test_ids", test_ids)):
        if a.size and (a.min() < 0 or a.max() >= V):
            raise ValueError(f"{name} must lie in [0, {V - 1}] for V={V}, got range [{a.min()}, {a.max()}]")
    counts = np.bincount(train_ids, minlength=V).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[test_ids].mean()))


# --------------------------------------------------------------------------
# writing a corpus


def _write_atomic(path: Path, chunks) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)


def _sentence_chunks(ids: np.ndarray, eos: int, target: int = 1 << 20):
    # Pieces of ~target tokens that end right after an <eos>, so a text
    # piece never starts with a line end.
    ends = np.flatnonzero(ids == eos) + 1
    start = 0
    while start < len(ids):
        k = np.searchsorted(ends, start + target)
        stop = int(ends[k]) if k < len(ends) else len(ids)
        yield ids[start:stop]
        start = stop


def _encode_text(hmm: HMM, ids: np.ndarray):
    """Yield UTF-8 text for `ids`, one sentence per line, chunk by chunk."""
    # Each word carries its trailing space and <eos> becomes "\n"; the join
    # is C-level, then " \n" -> "\n" drops the space before each line end.
    table = np.array([w + " " for w in hmm.words], dtype=object)
    table[hmm.eos] = "\n"
    for part in _sentence_chunks(ids, hmm.eos):
        yield "".join(table[part].tolist()).replace(" \n", "\n").encode("utf-8")


def write_corpus(out_dir, spec: HMMSpec = DEFAULT_SPEC, train_tokens: int = DEFAULT_TOKENS[0],
                 valid_tokens: int = DEFAULT_TOKENS[1], test_tokens: int = DEFAULT_TOKENS[2]) -> dict:
    """Sample train/valid/test splits and write them as a text corpus.

    Writes ``train.txt``, ``valid.txt``, ``test.txt`` (one sentence per
    line: ``<eos>`` tokens become newlines) and ``corpus.json``.  Each split
    is sampled independently from the HMM's initial distribution, and runs
    to the end of a sentence, so reading a file back with the usual loader
    (``<eos>`` at each line end) gives exactly the sampled ids.  Same spec
    and sizes give byte-identical files.

    Returns
    -------
    dict
        The contents of ``corpus.json``: spec, token counts (``<eos>``
        included), oracle perplexities of every split, and the unigram
        perplexity of valid/test under add-one smoothed train counts.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, n in (("train_tokens", train_tokens), ("valid_tokens", valid_tokens), ("test_tokens", test_tokens)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    hmm = HMM.from_spec(spec)
    rngs = _rngs(spec.seed, 4)[1:]
    splits = {}
    for (split, n), rng in zip((("train", train_tokens), ("valid", valid_tokens), ("test", test_tokens)), rngs):
        ids = hmm.sample(n, rng, end_with_eos=True)
        splits[split] = ids
        _write_atomic(out_dir / f"{split}.txt", _encode_text(hmm, ids))
    info = {
        "format": "slimnp-synthetic-hmm",
        "version": 1,
        "spec": asdict(spec),
        "files": {s: f"{s}.txt" for s in splits},
        "tokens": {s: int(len(ids)) for s, ids in splits.items()},
        "sentences": {s: int(np.count_nonzero(ids == hmm.eos)) for s, ids in splits.items()},
        "oracle_perplexity": {s: hmm.oracle_perplexity(ids) for s, ids in splits.items()},
        "unigram_perplexity": {s: unigram_perplexity(splits["train"], splits[s], hmm.V) for s in ("valid", "test")},
    }
    # every word of the model, seen in train or not: fixes the vocabulary
    # (a large Zipf vocabulary leaves most words out of a few million tokens)
    words = list(hmm.words) + ([] if UNK in hmm.words else [UNK])
    _write_atomic(out_dir / "vocab.txt", [("\n".join(words) + "\n").encode("utf-8")])
    _write_atomic(out_dir / "corpus.json", [(json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")])
    return info


# ---------------------------------------------------------------------------
# the built-in corpus: `slimnp train` with no data
# ---------------------------------------------------------------------------
def builtin_corpus_dir():
    """Where the built-in corpus lives: ``$SLIMNP_CACHE`` (default
    ``~/.cache/slimnp``), in a folder named by the spec and the sizes, so a
    retuned spec never reuses a stale corpus."""
    import hashlib
    import os
    from pathlib import Path

    root = Path(os.environ.get("SLIMNP_CACHE", Path.home() / ".cache" / "slimnp"))
    blob = json.dumps([asdict(DEFAULT_SPEC), list(DEFAULT_TOKENS)], sort_keys=True)
    return root / f"builtin-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def builtin_corpus(log=print):
    """``(folder, corpus.json)`` of the built-in synthetic corpus, generated
    once into :func:`builtin_corpus_dir`."""
    d = builtin_corpus_dir()
    meta = d / "corpus.json"
    if meta.exists():
        try:
            return d, json.loads(meta.read_text())
        except ValueError:
            pass  # damaged: regenerate
    log(f"generating the built-in synthetic corpus in {d} ...")
    info = write_corpus(d, DEFAULT_SPEC, *DEFAULT_TOKENS)
    return d, info


def write_synthetic(directory, vocab: int = 1000, tokens: int = 1_000_000, eval_tokens=None,
                    states=None, seed: int = 0) -> dict:
    """``slimnp data synthetic``: a corpus of ``vocab`` words from the
    built-in spec's HMM with another seed (and ``states``), ``tokens``
    training tokens and ``eval_tokens`` (default tokens/12, at least 1000)
    in valid and test each; returns :func:`write_corpus`'s info."""
    import dataclasses

    if vocab < 3:
        raise ValueError(f"--vocab must be >= 3, got {vocab}")
    spec = dataclasses.replace(DEFAULT_SPEC, vocab=vocab, seed=seed,
                               support=min(DEFAULT_SPEC.support, vocab - 1),
                               **({"states": states} if states else {}))
    ev = eval_tokens or max(1000, tokens // 12)
    return write_corpus(directory, spec, tokens, ev, ev)
