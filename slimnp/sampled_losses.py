"""Sampled training objectives for large vocabularies: importance sampling
(sampled softmax) and noise-contrastive estimation.

Both replace the full softmax's ``N x V`` logits by the logits of a few
candidate words: each row's target and S words drawn once per minibatch from
a proposal (noise) distribution q, shared by every row (Jozefowicz et al.
2016; the slim-embeddings paper uses S = 4,000).  The output layer supplies
the candidates' vectors -- rows of ``W`` for the full layer, concatenated
pool rows for the slim one -- and takes their gradients back as a
scatter-add (:meth:`candidates` / :meth:`candidate_grads` of the output
layers), so training never touches a ``V``-sized array per row.

* ``is``: the target's logit ``z_t`` and the samples' ``z_s - log(S q(s))``
  with every sample equal to the row's target ("accidental hit") removed,
  then softmax cross-entropy with the target as the label.  The normaliser
  ``e^{z_t} + sum_{s != t} e^{z_s} / (S q(s))`` is an unbiased importance
  sampling estimate of the partition function ``Z`` (the sum over the other
  words is what the samples estimate), so the loss tends to the true
  ``-log p(t)`` as S grows, and so does its gradient.
* ``nce``: ``Delta(w) = z_w - log(S q(w))``, the target labelled 1 and the
  S noise words labelled 0 under a logistic loss, scores self-normalised
  (``z_w`` stands for ``log p(w)``, no partition function).  Mnih & Teh 2012.

Evaluation is always exact (the full softmax or the slim DP): the sampled
losses are never reported as perplexities.
"""
from __future__ import annotations

import math

import numpy as np

from . import kernels
from .backend import array_module

KINDS = ("softmax", "is", "nce")


class Sampled:
    """A sampled objective: ``kind`` ('is' or 'nce'), ``S`` proposals per
    minibatch drawn by ``sampler`` (``slimnp.alias_sampler.AliasSampler``-like:
    ``sample(rng, n)`` and ``log_prob(ids)``) with the host generator ``rng``.
    """

    def __init__(self, kind: str, S: int, sampler, rng):
        if kind not in ("is", "nce"):
            raise ValueError(f"unknown sampled loss {kind!r}; expected 'is' or 'nce'")
        if S < 1:
            raise ValueError(f"the number of samples must be >= 1, got {S}")
        self.kind, self.S, self.sampler, self.rng = kind, int(S), sampler, rng

    def draw(self):
        """``(samples (S,) int32, log(S q) of them)`` for one minibatch."""
        s = np.asarray(self.sampler.sample(self.rng, self.S), dtype=np.int32)
        return s, math.log(self.S) + np.asarray(self.sampler.log_prob(s), np.float64)

    def log_expected(self, ids):
        """``log(S q(w))`` of given words (the targets)."""
        return math.log(self.S) + np.asarray(self.sampler.log_prob(ids), np.float64)


def prepare_model(model, kind: str) -> None:
    """Initialise a fresh model for ``kind``: NCE treats the scores as
    normalised log-probabilities, so its output bias starts at ``-log V``
    (every word at 1/V; from a zero bias, the unnormalised scores start V
    times too large and NCE spends its first steps correcting that: in a
    40-word test, 30 steps raised the exact NLL from 3.70 to 4.10 instead of
    lowering it to 3.37)."""
    if kind == "nce":
        model.store.params["output/b"][...] = -math.log(model.config.vocab_size)


def sampled_loss(kind, h, WT, bT, WS, bS, logq_t, logq_s, targets, samples, scale,
                 compute_grad=True):
    """The sampled loss of rows ``h (N, H)`` and its gradients.

    ``WT (N, H)``, ``bT (N,)``: each row's target vector and bias;
    ``WS (S, H)``, ``bS (S,)``: the samples'; ``logq_t (N,)``, ``logq_s (S,)``:
    ``log(S q)`` of targets (used by NCE) and samples; ``targets (N,)``,
    ``samples (S,)`` the word ids (to find accidental hits).

    Returns ``loss (N,)`` float64 and, with ``compute_grad``, ``(dh (N, H),
    dWT (N, H), dbT (N,), dWS (S, H), dbS (S,))`` (gradients of ``scale *
    sum(loss)``).
    """
    xp = array_module(h)
    dt = h.dtype
    zt = xp.einsum("nh,nh->n", h, WT) + bT  # (N,) target logits
    ZS = h @ WS.T  # (N, S)
    ZS += bS
    N, S = ZS.shape
    if kind == "is":
        L = xp.empty((N, S + 1), dtype=dt)
        L[:, 0] = zt  # counted exactly, not estimated
        L[:, 1:] = ZS - logq_s.astype(dt)
        # accidental hits: a very negative finite logit (an infinite one
        # would read as a diverged model to the softmax kernel's check)
        L[:, 1:][samples[None, :] == targets[:, None]] = -1e30
        loss = kernels.softmax_xent(L, xp.zeros(N, dtype=np.int32), scale, compute_grad)
        if not compute_grad:
            return loss, None
        dzt, dZS = L[:, 0].copy(), L[:, 1:]
    elif kind == "nce":
        # one fused pass: logistic losses of the Deltas and, in place of ZS,
        # their gradients (-log sigma(d) = softplus(-d) for the target,
        # -log(1 - sigma(d)) = softplus(d) for each noise word)
        loss, dzt = kernels.nce_xent(xp.ascontiguousarray(zt), logq_t.astype(dt),
                                     ZS, logq_s.astype(dt), scale, compute_grad)
        if not compute_grad:
            return loss, None
        dZS = ZS
    else:
        raise ValueError(f"unknown sampled loss {kind!r}")
    dh = dzt[:, None] * WT + dZS @ WS
    dWT = dzt[:, None] * h
    dWS = dZS.T @ h
    return loss, (dh, dWT, dzt, dWS, dZS.sum(axis=0))

