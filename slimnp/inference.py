"""Using a trained model: score sentences, generate text, expand to dense.

Everything here runs on the model as stored: a slim model scores and
generates in compressed form (pool lookups for the input, the K partial
products and the gather-sum for the output), so memory stays close to the
model file's size and the dense ``V x H`` matrices are never built -- except
by :func:`expand_dense`, which exists to check exactly that equivalence.

Sentences are scored as training saw them: each line's words, then
``<eos>``; the first word is predicted from the ``<eos>`` prime and a zero
state.  By default every sentence starts afresh (what n-best reranking
needs: a hypothesis's score must not depend on its neighbours); with
``continuous=True`` the state carries from one sentence to the next, which
is exactly what ``slimnp evaluate --batch-size 1`` computes on a file.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from . import kernels
from .backend import to_numpy
from .data import EOS, Vocabulary
from .evaluate import stream_nll

LOG10_E = 1.0 / math.log(10.0)


@dataclass
class SentenceScore:
    """Log-probabilities of one sentence's tokens (its words, then ``<eos>``).

    Attributes
    ----------
    words : list of str
        The tokens scored, as they appear in the text, ``<eos>`` last.
    logprobs : (n,) float64
        Natural-log probability of each token given the ones before it.
    oov : int
        Words outside the model's vocabulary (scored as ``<unk>``).
    """

    words: List[str]
    logprobs: np.ndarray
    oov: int

    @property
    def logprob(self) -> float:
        """Total natural-log probability."""
        return float(self.logprobs.sum())

    @property
    def log10prob(self) -> float:
        return self.logprob * LOG10_E

    @property
    def tokens(self) -> int:
        return int(self.logprobs.shape[0])

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprob / self.tokens)

    def to_dict(self, words: bool = False) -> dict:
        out = {"logprob": self.logprob, "log10prob": self.log10prob, "tokens": self.tokens,
               "oov": self.oov, "perplexity": self.perplexity}
        if words:
            out["words"] = [{"word": w, "logprob": float(lp), "log10prob": float(lp) * LOG10_E}
                            for w, lp in zip(self.words, self.logprobs)]
        return out


    def text_lines(self, sentence: str, words: bool = False) -> list:
        """``slimnp score``'s text: a tab-separated line (natural-log and
        log10 probability, tokens, OOV words, perplexity, the sentence), then
        with ``words`` one indented line per token."""
        out = [f"{self.logprob:.4f}\t{self.log10prob:.4f}\t{self.tokens}\t{self.oov}\t"
               f"{self.perplexity:.2f}\t{sentence}"]
        if words:
            out += [f"\t{w}\t{lp:.4f}\t{lp * LOG10_E:.4f}" for w, lp in zip(self.words, self.logprobs)]
        return out


def score_totals(scores, seconds: float, continuous: bool = False) -> dict:
    """The totals ``slimnp score`` reports over its :class:`SentenceScore` list."""
    tokens = sum(s.tokens for s in scores)
    total = sum(s.logprob for s in scores)
    return {"sentences": len(scores), "tokens": tokens, "oov": sum(s.oov for s in scores),
            "logprob": total, "log10prob": total * LOG10_E,
            "perplexity": float(np.exp(-total / tokens)) if tokens else float("nan"),
            "continuous": continuous, "seconds": seconds,
            "sentences_per_s": len(scores) / max(seconds, 1e-9)}


def _check_sentences(sentences) -> list:
    if isinstance(sentences, str):
        raise ValueError("expected a list of sentences, got a single str; wrap it in a list")
    out = list(sentences)
    for i, s in enumerate(out):
        if not isinstance(s, str):
            raise TypeError(f"sentence {i}: expected str, got {type(s).__name__}")
        if "\n" in s.rstrip("\n"):
            raise ValueError(f"sentence {i}: contains a newline; pass one sentence per string")
    return out


def score_ids(model, seqs: Sequence[np.ndarray], eos_id: int, batch_size: int = 64,
              max_tokens: int = 2048, bptt: int = 100, progress=None) -> List[np.ndarray]:
    """Natural-log probabilities of each token of independent sequences.

    Parameters
    ----------
    model : LanguageModel
    seqs : sequence of (n_i,) int arrays, each ending with ``eos_id``
    batch_size, max_tokens : at most this many sequences, and this many
        padded tokens, per forward pass (2048 tokens keep a 10K-word
        model's logits at 80 MB; larger vocabularies are chunked by the
        output layer)
    bptt : sequences longer than this run in segments with the state carried
        (exact; bounds the activations kept)
    progress : optional callable receiving the number of sequences done

    Returns
    -------
    list of (n_i,) float64, in the order of ``seqs``.  Each sequence starts
    from a zero state and the ``<eos>`` prime, as :func:`evaluate_ids` does.

    Sequences are sorted by length so that each batch pads little; padded
    positions are computed and ignored.
    """
    n = len(seqs)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    if n and lens.min() < 1:
        raise ValueError("every sequence needs at least one token (its <eos>)")
    order = np.argsort(-lens, kind="stable")
    out: List[Optional[np.ndarray]] = [None] * n
    i = done = 0
    while i < n:
        T = int(lens[order[i]])  # the longest in this batch (sorted descending)
        b = max(1, min(batch_size, max_tokens // T, n - i))
        rows = order[i : i + b]
        x = np.full((T, b), eos_id, dtype=np.int32)  # (T, b) time-major
        y = np.full((T, b), eos_id, dtype=np.int32)
        for j, r in enumerate(rows):
            s = np.asarray(seqs[r], dtype=np.int32)
            y[: len(s), j] = s
            x[1 : len(s), j] = s[:-1]
        nll = np.empty((T, b), dtype=np.float64)
        stream_nll(model, x, y, model.zero_state(b), bptt, out=nll)
        for j, r in enumerate(rows):
            out[r] = -nll[: lens[r], j]
        i += b
        done += b
        if progress is not None:
            progress(done)
    return out  # type: ignore[return-value]


def score_sentences(model, vocab: Vocabulary, sentences, batch_size: int = 64,
                    continuous: bool = False, progress=None) -> List[SentenceScore]:
    """Score plain-text sentences (one per string) under ``model``.

    Words outside ``vocab`` are scored as ``<unk>`` and counted.  With
    ``continuous`` the sentences are one stream (state carried across them,
    sequentially), which equals ``evaluate_ids`` with ``batch_size=1`` on
    the same text; otherwise each starts afresh and batches run in parallel.
    """
    sentences = _check_sentences(sentences)
    index, unk = vocab.index, vocab.unk_id
    words, seqs, oovs = [], [], []
    for s in sentences:
        w = s.split() + [EOS]
        ids = np.array([index.get(t, unk) for t in w], dtype=np.int32)
        oovs.append(sum(1 for t in w if t not in index))
        words.append(w)
        seqs.append(ids)
    if continuous:
        logprobs = _score_stream(model, seqs, vocab.eos_id, progress)
    else:
        logprobs = score_ids(model, seqs, vocab.eos_id, batch_size=batch_size, progress=progress)
    return [SentenceScore(w, lp, o) for w, lp, o in zip(words, logprobs, oovs)]


def _score_stream(model, seqs, eos_id, progress=None, bptt: int = 100):
    """One stream through all sequences, the state carried (batch 1)."""
    if not seqs:
        return []
    ids = np.concatenate(seqs)
    x = np.empty_like(ids)
    x[0] = eos_id
    x[1:] = ids[:-1]
    ends = np.cumsum([len(s) for s in seqs])  # where each sequence ends in the stream
    nll = np.empty((ids.shape[0], 1), dtype=np.float64)
    # progress: the sequences completed so far
    report = None if progress is None else (lambda t: progress(int(np.searchsorted(ends, t, "right"))))
    stream_nll(model, x[:, None], ids[:, None], model.zero_state(1), bptt, out=nll, progress=report)
    return np.split(-nll[:, 0], ends[:-1])


def generate(model, vocab: Vocabulary, prompt: str = "", length: int = 50,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, count: int = 1,
             stop_at_eos: bool = True) -> List[str]:
    """Sample ``count`` continuations of ``prompt`` (the same seed gives the
    same text).

    Each stream starts from the ``<eos>`` prime and a zero state, reads the
    prompt's words, then draws up to ``length`` words from the model's
    distribution divided by ``temperature`` (0 < T; small T approaches
    greedy decoding), restricted to the ``top_k`` most likely words when
    ``top_k > 0``.  With ``stop_at_eos`` a stream ends at its first
    ``<eos>`` (not included); otherwise ``<eos>`` becomes a line break.
    Returns one string per stream, the prompt included.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    xp = model.xp
    V = model.config.vocab_size
    prompt_words = prompt.split()
    ids = [vocab.eos_id] + [vocab.index.get(w, vocab.unk_id) for w in prompt_words]
    x = np.tile(np.asarray(ids, dtype=np.int32)[:, None], (1, count))  # (P, C)
    state = model.zero_state(count)
    # the prompt but its last word only moves the state
    if x.shape[0] > 1:
        _, state = model.nll(xp.asarray(x[:-1]), xp.asarray(x[1:]), state)
    cur = x[-1]  # (C,)
    out = np.zeros((length, count), dtype=np.int32)
    alive = np.ones(count, dtype=bool)
    ended = np.full(count, length)
    for t in range(length):
        z, state = model.logits(xp.asarray(cur[None, :]), state)  # (1, C, V)
        # word-major, column j for stream j: the slim layer's logits are a
        # transposed view of its (V, C) array, so this is their own layout
        logp = np.array(to_numpy(z)[0].T, dtype=np.float64, order="C")  # (V, C)
        logp /= temperature
        if 0 < top_k < V:
            kth = np.partition(logp, V - top_k, axis=0)[V - top_k]  # (C,)
            logp = np.where(logp >= kth, logp, -np.inf)
        kernels.log_softmax_t(logp)
        p = np.exp(logp)
        # inverse-CDF draw per stream: one uniform each, reproducible
        u = rng.random(count)
        c = np.cumsum(p, axis=0)
        nxt = np.minimum((c < u * c[-1]).sum(axis=0), V - 1).astype(np.int32)
        out[t] = nxt
        cur = nxt
        if stop_at_eos:
            hit = alive & (nxt == vocab.eos_id)
            ended[hit] = t
            alive &= ~hit
            if not alive.any():
                break
    texts = []
    for j in range(count):
        toks = vocab.decode(out[: ended[j], j])
        if not stop_at_eos:  # <eos> ends a line of the generated text
            toks = ["\n" if w == EOS else w for w in toks]
        texts.append(" ".join(prompt_words + toks).replace(" \n ", "\n").replace(" \n", "\n"))
    return texts


def expand_dense(model):
    """The same model with its slim layers written out as dense matrices.

    The input table becomes ``W[v] = concat_k A[idx[v, k]]`` and the output
    layer ``W[v] = concat_k A_k[idx[v, k]]`` with the same bias, so logits,
    scores and generations are equal up to float rounding.  This builds the
    ``V x H`` matrices slim layers avoid: a check and a conversion, not a
    way to serve the model.
    """
    from .layers import slim_matrix
    from .model import LanguageModel

    c = model.config
    if "adaptive" in (c.input, c.output):
        raise ValueError("an adaptive softmax or adaptive input layer has no dense equivalent "
                         "(its clusters score in lower dimensions); expand_dense takes dense and "
                         "slim layers")
    cfg = dataclasses.replace(c, input="dense", input_k=1, input_m=0, output="full",
                              output_k=1, output_m=0, tie=False)
    dense = LanguageModel(cfg, device=model.device)
    src, dst = model.store.params, dense.store.params
    for name in dst:
        if name.startswith(("lstm", "proj_")):
            dst[name][...] = src[name]
    # output layer
    if c.output == "slim":
        dst["output/W"][...] = slim_matrix(src["output/A"], model.output.idx_kv.T)  # (K, Mk, d) pools
    else:
        dst["output/W"][...] = src["output/W"]
    dst["output/b"][...] = src["output/b"]
    # input layer
    emb = model.embedding
    if c.input == "slim":
        dst["embedding/W"][...] = slim_matrix(emb._pool(), emb.idx)  # one (M, d) pool
    else:
        dst["embedding/W"][...] = src[emb.param]
    return dense


class LM:
    """A loaded model with its vocabulary: the library face of the
    ``score`` and ``generate`` commands.

    >>> lm = slimnp.load("ptb.h5")                          # doctest: +SKIP
    >>> [s.logprob for s in lm.score(["the cat sat", "sat the cat"])]  # doctest: +SKIP
    """

    def __init__(self, model, vocab: Vocabulary, path: Optional[str] = None):
        self.model, self.vocab, self.path = model, vocab, path

    @classmethod
    def load(cls, path, device: str = "cpu") -> "LM":
        from .modelfile import load_model

        model, vocab, _ = load_model(path, device)
        return cls(model, vocab, str(path))

    def score(self, sentences, batch_size: int = 64, continuous: bool = False,
              progress=None) -> List[SentenceScore]:
        """See :func:`score_sentences`."""
        return score_sentences(self.model, self.vocab, sentences, batch_size, continuous, progress)

    def generate(self, prompt: str = "", **kw) -> List[str]:
        """See :func:`generate`."""
        return generate(self.model, self.vocab, prompt, **kw)

    def perplexity(self, sentences, continuous: bool = True) -> float:
        """Perplexity over all tokens of ``sentences`` (``<eos>`` included)."""
        scores = self.score(sentences, continuous=continuous)
        n = sum(s.tokens for s in scores)
        return math.exp(-sum(s.logprob for s in scores) / n)

    def dense(self) -> "LM":
        """This model with dense layers (see :func:`expand_dense`)."""
        return LM(expand_dense(self.model), self.vocab, self.path)


def load(path, device: str = "cpu") -> LM:
    """Load a model file for scoring and generation (:class:`LM`)."""
    return LM.load(path, device)
