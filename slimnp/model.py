"""The recurrent language model: embedding -> L LSTM layers -> softmax.

Dropout (Zaremba et al. 2014) is applied on the non-recurrent connections
only: the embedding output (``input_dropout``, by default the same as
``dropout``), between LSTM layers, and before the softmax (``dropout``).

Word vectors have ``embedding_size`` E (default: the hidden size H).  With
E < H the model is the paper's PM baseline (Li et al. 2018, Figure 4): the
(V, E) word vectors go through a learned E x H projection into the first
LSTM layer, and the top layer's H outputs through an H x E projection into a
V x E softmax::

    ids -> embedding (T, B, E) -> @ proj_in/W (E, H) -> [mask 0] -> LSTMs
        -> [mask L] (T, B, H) -> @ proj_out/W (H, E) -> softmax over V

The output layer is the full softmax, the slim one (K pools, logits by
dynamic programming) or the adaptive softmax (:mod:`slimnp.adaptive`: a head
over the ``cutoffs[0]`` most frequent words and clusters of rarer ones, the
clusters' vectors dense or slim).  All three act on the E-sized vectors,
after the PM projection.  The input layer is a dense table, a slim one (K
sub-vectors from one pool) or the adaptive input (the same frequency bands,
smaller vectors for rarer words, projected to E).  Tying shares the output's
parameters with the input of the same kind: the ``V x E`` matrix (dense),
the pools (slim), or band by band (adaptive: the adaptive softmax has no
``V x E`` matrix).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import threaded_lstm
from .backend import get_xp, to_numpy
from .adaptive import DEFAULT_CUTOFFS, DEFAULT_DIV_VALUE, AdaptiveEmbedding, AdaptiveSoftmax, clusters
from .adaptive import config_problems as adaptive_problems
from .adaptive import tail_problems
from .buffers import ParamStore
from .layers import LSTM, Embedding, Projection, SlimEmbedding, SlimSoftmax, Softmax, dropout_mask
from .mapping import input_table, output_table


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # V: rows of the input and output embeddings
    hidden: int = 200  # H: LSTM state size; also the word-vector size
    layers: int = 2  # L: stacked LSTM layers
    dropout: float = 0.0  # drop probability on non-recurrent connections
    init_scale: float = 0.1  # every parameter starts uniform in +-init_scale
    dtype: str = "float32"  # parameter and activation dtype (float64 for checks)
    # slim embeddings (Li et al. 2018); see slimnp.mapping for the tables
    # 'dense': a (V, H) table; 'slim': K parts from one pool of M; 'adaptive':
    # the adaptive input (Baevski & Auli 2019) on the bands of cutoffs/div_value
    input: str = "dense"
    input_k: int = 1  # K on the input side (must divide hidden)
    input_m: int = 0  # M: pool size on the input side (<= K*V)
    # 'full' softmax, 'slim' (K disjoint pools, DP logits) or 'adaptive'
    # (Grave et al. 2017, as torch.nn.AdaptiveLogSoftmaxWithLoss; slimnp.adaptive)
    output: str = "full"
    output_k: int = 1  # K on the output side (must divide hidden)
    output_m: int = 0  # M: total of the K output pools (a multiple of K, M/K <= V)
    # 'shuffle' (the paper; tables stored), 'hash' (seed only) or 'learned'
    # (k-means tables made by slimnp.compress; stored)
    mapping: str = "shuffle"
    mapping_seed: int = 0  # seed of the assignment tables
    # input shares the output's parameters (same kind both sides: dense+full,
    # slim+slim, adaptive+adaptive band by band with the projections)
    tie: bool = False
    # dropout on the embedding -> LSTM connection alone; None: the same as
    # `dropout` (Tables 2-3 of the paper vary it with `dropout` fixed at 0.5)
    input_dropout: float | None = None
    # E: word-vector size; 0 means H (no projection); E != H adds the learned
    # E x H and H x E projections of the PM baseline
    embedding_size: int = 0
    # how learned tables were made (JSON: k-means settings, source model's
    # sha256); empty for shuffle and hash
    mapping_info: str = ""
    # adaptive softmax and adaptive input (one set of bands for both sides):
    # word ids < cutoffs[0] form the head (input band 0), [cutoffs[i],
    # cutoffs[i+1]) tail cluster i (input band i+1; the last ends at V);
    # cluster i's vectors have size E // div_value**(i+1); head_bias: a bias
    # on the head's logits (PyTorch's head_bias, default off there too)
    cutoffs: tuple = DEFAULT_CUTOFFS
    div_value: float = DEFAULT_DIV_VALUE
    head_bias: bool = False
    # slim tail clusters (output='adaptive'): M of each tail cluster, the
    # total of its K = output_k pools; empty: dense (V_i, d_i) tails
    tail_m: tuple = ()

    def __post_init__(self):
        # a JSON list (a stored config) or any sequence becomes a tuple: the
        # config stays hashable and equal to the one it was made from
        for name in ("cutoffs", "tail_m"):
            if isinstance(getattr(self, name), (list, range)):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def word_size(self) -> int:
        """E, the size of the input and output word vectors."""
        return self.embedding_size or self.hidden

    @property
    def p_input(self) -> float:
        """Dropout probability on the embedding -> LSTM connection."""
        return self.dropout if self.input_dropout is None else self.input_dropout

    def validate(self) -> None:
        problems = []
        V, H = self.vocab_size, self.word_size
        size = f"hidden={H}" if H == self.hidden else f"the word-vector size embedding_size={H}"
        if self.input not in ("dense", "slim", "adaptive"):
            problems.append(f"input must be 'dense', 'slim' or 'adaptive', got {self.input!r}")
        if self.output not in ("full", "slim", "adaptive"):
            problems.append(f"output must be 'full', 'slim' or 'adaptive', got {self.output!r}")
        if self.mapping not in ("shuffle", "hash", "learned"):
            problems.append(f"mapping must be 'shuffle', 'hash' or 'learned', got {self.mapping!r}")
        if self.input == "slim" and not self.tie:
            K, M = self.input_k, self.input_m
            if K < 1 or H % K:
                problems.append(f"input K={K} must divide {size}")
            if not 1 <= M <= K * V:
                problems.append(f"input M={M} must lie in [1, K*V={K * V}] (K={K}, V={V})")
        if self.output == "slim":
            K, M = self.output_k, self.output_m
            if K < 1 or H % K:
                problems.append(f"output K={K} must divide {size}")
            elif M < K or M % K:
                problems.append(f"output M={M} must be a positive multiple of K={K}")
            elif M // K > V:
                problems.append(f"output M/K={M // K} must be <= V={V} (each pool entry needs a word)")
        bands = []
        if "adaptive" in (self.input, self.output):
            bands = adaptive_problems(V, H, self.cutoffs, self.div_value)
            problems += bands
        if self.output == "adaptive":
            if not bands and (self.tail_m or self.output_k != 1):
                problems += tail_problems(V, H, self.cutoffs, self.div_value, self.output_k, self.tail_m)
            if self.tail_m and self.mapping == "learned":
                problems.append("slim tail clusters take mapping 'shuffle' or 'hash' (slimnp compress "
                                "makes no learned tables for them)")
            if self.output_m:
                problems.append(f"output M={self.output_m} sizes the slim output; the adaptive "
                                f"softmax's slim tails take tail_m (one M per tail cluster)")
            if self.tie and self.input != "adaptive":
                problems.append("tie needs a V x E output matrix to share; the adaptive softmax "
                                "has none (drop tie, use output 'full', or input 'adaptive' to "
                                "share its bands)")
        elif self.tail_m:
            problems.append(f"tail_m (slim tail clusters) needs output 'adaptive', got {self.output!r}")
        if self.input == "adaptive" and self.tie and self.output != "adaptive":
            problems.append("tie with input 'adaptive' needs output 'adaptive' (input band i shares "
                            "the output's head (i = 0) or tail cluster i-1)")
        elif self.output != "adaptive" and self.tie and (self.input == "slim") != (self.output == "slim"):
            problems.append("tie needs the same kind on both sides (dense+full or slim+slim)")
        if self.vocab_size < 2:
            problems.append(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.hidden < 1:
            problems.append(f"hidden must be >= 1, got {self.hidden}")
        if self.layers < 1:
            problems.append(f"layers must be >= 1, got {self.layers}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.input_dropout is not None and not 0.0 <= self.input_dropout < 1.0:
            problems.append(f"input_dropout must lie in [0, 1), got {self.input_dropout}")
        if self.embedding_size < 0:
            problems.append(f"embedding_size must be >= 1 (or 0 for the hidden size), "
                            f"got {self.embedding_size}")
        if not self.init_scale > 0:
            problems.append(f"init_scale must be > 0, got {self.init_scale}")
        if self.dtype not in ("float32", "float64"):
            problems.append(f"dtype must be float32 or float64, got {self.dtype!r}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("cutoffs", "tail_m"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])  # as JSON gives it back
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return config_from_dict(cls, d, "model")


def config_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass, refusing keys it does not have
    (``ValueError: unknown <what> config keys: ...``) rather than a TypeError
    naming one of them."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} config keys: {', '.join(unknown)}")
    return cls(**d)


def make_mapping(config: ModelConfig) -> dict:
    """The assignment tables a config implies: ``{"input/idx", "output/idx"}`` (V, K)."""
    V, seed = config.vocab_size, config.mapping_seed
    if config.mapping == "learned" and (config.input == "slim" or config.output == "slim"):
        raise ValueError("learned tables are not made from a seed: they come from a model file "
                         "(slimnp compress, then slimnp train --init-from)")
    tables = {}
    if config.output == "slim":
        K = config.output_k
        tables["output/idx"] = output_table(V, K, config.output_m // K, config.mapping, seed)
    if config.input == "slim" and not config.tie:
        tables["input/idx"] = input_table(V, config.input_k, config.input_m, config.mapping, seed)
    if config.output == "adaptive" and config.tail_m:  # slim tails: the clusters' own tables
        K = config.output_k
        for i, (lo, hi) in enumerate(clusters(V, config.cutoffs)):
            tables[f"output/tail{i}/idx"] = output_table(hi - lo, K, config.tail_m[i] // K,
                                                         config.mapping, seed)
    return tables


def table_shapes(config: ModelConfig) -> dict:
    """``{name: (rows, K, n)}``: the ``(rows, K)`` assignment tables a config
    implies (:func:`make_mapping`), entries in ``[0, n)``."""
    c, V = config, config.vocab_size
    need = {}
    if c.output == "slim":
        need["output/idx"] = (V, c.output_k, c.output_m // c.output_k)
    if c.input == "slim" and not c.tie:
        need["input/idx"] = (V, c.input_k, c.input_m)
    if c.output == "adaptive" and c.tail_m:
        for i, (lo, hi) in enumerate(clusters(V, c.cutoffs)):
            need[f"output/tail{i}/idx"] = (hi - lo, c.output_k, c.tail_m[i] // c.output_k)
    return need


def _declare(store: ParamStore, config: ModelConfig, mapping: dict | None):
    """Create the layers (declaring their parameter shapes in ``store``)."""
    V, H, L = config.vocab_size, config.word_size, config.layers
    if config.output == "slim":
        K, M = config.output_k, config.output_m
        output = SlimSoftmax(store, "output", V, H, K, M, mapping["output/idx"])
    elif config.output == "adaptive":
        tails = [mapping[f"output/tail{i}/idx"] for i in range(len(config.cutoffs))] \
            if config.tail_m else None
        output = AdaptiveSoftmax(store, "output", V, H, config.cutoffs, config.div_value,
                                 config.head_bias, config.output_k, config.tail_m, tails)
    else:
        output = Softmax(store, "output", V, H)
    if config.input == "adaptive":
        embedding = AdaptiveEmbedding(store, "embedding", V, H, config.cutoffs, config.div_value,
                                      tied=output if config.tie else None)
    elif config.input == "slim" and config.tie:
        # rows of the K output pools seen as one (M, d) pool
        K, Mk = config.output_k, config.output_m // config.output_k
        idx = mapping["output/idx"] + (np.arange(K) * Mk)[None, :]
        embedding = SlimEmbedding(store, "embedding", V, H, K, config.output_m, idx, param="output/A")
    elif config.input == "slim":
        embedding = SlimEmbedding(store, "embedding", V, H, config.input_k, config.input_m,
                                  mapping["input/idx"])
    else:
        embedding = Embedding(store, "embedding", V, H, param="output/W" if config.tie else None)
    Hl = config.hidden
    lstms = [LSTM(store, f"lstm{l}", Hl, Hl) for l in range(L)]
    if H != Hl:  # PM: word vectors of size E, projected to and from the LSTM's H
        proj = (Projection(store, "proj_in", H, Hl), Projection(store, "proj_out", Hl, H))
    else:
        proj = (None, None)
    return embedding, lstms, output, proj


def param_shapes(config: ModelConfig) -> dict:
    """``{"layer/name": shape}`` of a model with ``config``, allocating nothing."""
    config.validate()
    store = ParamStore()
    # shapes do not depend on the tables' contents: zeros stand in for them
    dummy = {k: np.zeros((config.vocab_size, 1), np.int32) for k in ("input/idx", "output/idx")}
    dummy.update({k: np.zeros((rows, K), np.int32) for k, (rows, K, _) in table_shapes(config).items()
                  if k not in dummy})
    _declare(store, config, dummy)
    return dict(store.shapes)


class LanguageModel:
    """An L-layer LSTM language model with all parameters in one flat buffer.

    State between BPTT segments is an explicit array ``(L, 2, B, H)``
    (``[l, 0]`` = h, ``[l, 1]`` = c); truncation is the trainer's job.
    """

    def __init__(self, config: ModelConfig, device: str = "cpu", mapping: dict | None = None):
        config.validate()
        self.config = config
        self.device = device
        self.xp = get_xp(device)
        self.dtype = np.dtype(config.dtype)
        self.mapping = self._check_mapping(mapping) if mapping else make_mapping(config)
        self.store = ParamStore(self.xp, self.dtype)
        self.embedding, self.lstms, self.output, (self.proj_in, self.proj_out) = \
            _declare(self.store, config, self.mapping)
        self.store.allocate()

    def _check_mapping(self, mapping: dict) -> dict:
        """Stored tables (from a model file) against what the config implies."""
        c = self.config
        want = make_mapping(c) if c.mapping == "hash" else None
        need = table_shapes(c)
        problems = []
        for name, (rows, K, n) in need.items():
            t = mapping.get(name)
            if t is None:
                problems.append(f"missing table {name}")
            elif t.shape != (rows, K):
                problems.append(f"{name}: expected shape ({rows}, {K}), found {t.shape}")
            elif t.size and (t.min() < 0 or t.max() >= n):
                problems.append(f"{name}: entries must lie in [0, {n})")
            elif want is not None and not np.array_equal(t, want[name]):
                problems.append(f"{name}: does not match the hash mapping of the stored seed")
        if problems:
            raise ValueError("invalid mapping tables: " + "; ".join(problems))
        return {k: np.ascontiguousarray(mapping[k], dtype=np.int32) for k in need}

    # -- parameters -----------------------------------------------------------
    def init_params(self, rng: np.random.Generator) -> None:
        """Uniform(-init_scale, init_scale) for every parameter, from ``rng``."""
        s = self.config.init_scale
        data = self.store.data
        # chunked, in the parameter dtype: no float64 copy of a large model
        # (an 800K-word dense layer would need 3x its size otherwise)
        step = 1 << 22
        for i in range(0, data.size, step):
            u = rng.random(min(step, data.size - i), dtype=self.dtype.type)  # [0, 1)
            u *= 2 * s
            u -= s
            data[i : i + u.size] = self.xp.asarray(u)

    def param_shapes(self) -> dict:
        return dict(self.store.shapes)

    def params_numpy(self) -> dict:
        return {k: to_numpy(v) for k, v in self.store.params.items()}

    def load_params(self, params: dict) -> None:
        for name, arr in params.items():
            self.store.params[name][...] = self.xp.asarray(arr, dtype=self.dtype)

    @property
    def num_parameters(self) -> int:
        return self.store.size

    def zero_state(self, B: int):
        c = self.config
        return self.xp.zeros((c.layers, 2, B, c.hidden), dtype=self.dtype)

    # -- forward / backward ---------------------------------------------------
    def _masks(self, rng, T, B):
        """Dropout masks for one segment: ``[0]`` the LSTM stack's input (None
        when ``input_dropout`` is 0), ``[l + 1]`` layer l's output (None when
        ``dropout`` is 0); None when there is no dropout at all.  Drawn in
        that order from ``rng`` (the order is part of reproducibility)."""
        c = self.config
        if rng is None or (c.dropout == 0.0 and c.p_input == 0.0):
            return None
        H, dt, xp = c.hidden, self.dtype.type, self.xp
        first = dropout_mask(rng, (T, B, H), c.p_input, dt, xp) if c.p_input > 0 else None
        rest = [dropout_mask(rng, (T, B, H), c.dropout, dt, xp) if c.dropout > 0 else None
                for _ in range(c.layers)]
        return [first] + rest

    @staticmethod
    def _layer_masks(masks):
        """The masks of the layer outputs (``masks[1:]`` all set), or None."""
        return masks if masks is not None and masks[1] is not None else None

    def _forward(self, x, state, masks=None):
        """Embedding and LSTM stack over a segment.

        Returns the top layer's (masked) outputs ``(T, B, H)``, the final
        state ``(L, 2, B, H)``, ``(word vectors (T, B, E), per-layer
        caches)`` and whether the stack ran as a pipeline over layers
        (:mod:`slimnp.threaded_lstm`).
        """
        e = self.embedding.forward(x)  # (T, B, E)
        a = e if self.proj_in is None else self.proj_in.forward(e)  # (T, B, H)
        if masks is not None and masks[0] is not None:
            a = a * masks[0]
        T, B = x.shape
        lm = self._layer_masks(masks)
        if threaded_lstm.enabled(self.xp, len(self.lstms), T, B, self.config.hidden):
            weights = [lstm.weights() for lstm in self.lstms]
            a, new_state, caches = threaded_lstm.forward(a, state, weights, lm)
            return a, new_state, (e, caches), True
        new_state = self.xp.empty_like(state)
        caches = []
        for l, lstm in enumerate(self.lstms):
            h_seq, (hT, cT), cache = lstm.forward(a, state[l, 0], state[l, 1])
            new_state[l, 0], new_state[l, 1] = hT, cT
            caches.append(cache)
            a = h_seq * lm[l + 1] if lm is not None else h_seq
        return a, new_state, (e, caches), False

    def _top(self, a):
        """The output layer's input from the top LSTM's (masked) output
        ``(T, B, H)``: itself, or its projection to ``(T, B, E)`` (PM)."""
        return a if self.proj_out is None else self.proj_out.forward(a)

    def forward_backward(self, x, y, state, scale=None, rng=None, masks=None, sampled=None):
        """Loss and gradients (accumulated into ``store.grad``) of one segment.

        Parameters
        ----------
        x, y : (T, B) int32 inputs and targets (time-major)
        state : (L, 2, B, H) incoming state (not modified)
        scale : gradient multiplier per token-loss; default ``1/B``
            (Zaremba: loss summed over time, averaged over the batch)
        rng : host generator for dropout masks (None: no dropout)
        masks : explicit dropout masks (overrides ``rng``; used by tests)
        sampled : a :class:`slimnp.sampled_losses.Sampled` objective (importance
            sampling or NCE) instead of the full softmax

        Returns
        -------
        nll_sum : float, total NLL over the T*B tokens (natural log); with
            ``sampled``, the total sampled loss instead
        new_state : (L, 2, B, H) final state (detached)
        dstate : (L, 2, B, H) gradient w.r.t. the incoming state
        """
        T, B = x.shape
        E = self.config.word_size
        if scale is None:
            scale = 1.0 / B
        if masks is None:
            masks = self._masks(rng, T, B)
        a, new_state, (e, caches), piped = self._forward(x, state, masks)
        top = self._top(a)  # (T, B, E)
        if sampled is None:
            nll, dh = self.output.loss(top.reshape(T * B, E), y.reshape(T * B), scale, True)
        else:
            nll, dh = self._sampled_loss(sampled, top.reshape(T * B, E), y.reshape(T * B), scale)
        da = dh.reshape(T, B, E)
        if self.proj_out is not None:
            da = self.proj_out.backward(a, da)  # (T, B, H)
        lm = self._layer_masks(masks)
        if piped:
            weights = [lstm.weights() for lstm in self.lstms]
            da, dGs, dstate = threaded_lstm.backward(da, caches, weights, lm)
            for lstm, cache, dG in zip(self.lstms, caches, dGs):
                lstm.weight_grads(cache, dG)
        else:
            dstate = self.xp.empty_like(state)
            for l in range(self.config.layers - 1, -1, -1):
                if lm is not None:
                    da = da * lm[l + 1]
                da, dstate[l, 0], dstate[l, 1] = self.lstms[l].backward(da, caches[l])
        if masks is not None and masks[0] is not None:
            da = da * masks[0]
        if self.proj_in is not None:
            da = self.proj_in.backward(e, da)  # (T, B, E)
        self.embedding.backward(x, da)
        self.store.settle_grad()  # zero what a lazy zero_grad left unwritten
        return float(nll.sum()), new_state, dstate

    def _sampled_loss(self, sampled, h, y, scale):
        """The sampled objective's loss per row and ``dh``; the output layer's
        gradients go to the candidates' rows only."""
        from .sampled_losses import sampled_loss

        xp = self.xp
        samples, logq_s = sampled.draw()  # host arrays: the sampler and its RNG live there
        samples = xp.asarray(samples)
        ids = xp.concatenate([y, samples])
        W, b = self.output.candidates(ids)
        N = y.shape[0]
        logq_t = xp.asarray(sampled.log_expected(to_numpy(y)))
        loss, (dh, dWT, dbT, dWS, dbS) = sampled_loss(
            sampled.kind, h, W[:N], b[:N], W[N:], b[N:], logq_t, xp.asarray(logq_s),
            y, samples, scale)
        self.output.candidate_grads(ids, self.xp.concatenate([dWT, dWS]),
                                    self.xp.concatenate([dbT, dbS]))
        return loss, dh

    def nll(self, x, y, state, masks=None):
        """Per-token NLL ``(T, B)`` and the final state; no gradients.

        Dropout is off unless explicit ``masks`` are given (gradient checks).
        """
        T, B = x.shape
        a, new_state, _, _ = self._forward(x, state, masks)
        a = self._top(a)
        nll, _ = self.output.loss(a.reshape(T * B, -1), y.reshape(T * B), compute_grad=False)
        return nll.reshape(T, B), new_state

    def logits(self, x, state):
        """Unnormalised scores ``(T, B, V)`` and the final state (tests, sampling)."""
        T, B = x.shape
        a, new_state, _, _ = self._forward(x, state)
        a = self._top(a)
        return self.output.logits(a.reshape(T * B, -1)).reshape(T, B, -1), new_state
