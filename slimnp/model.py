"""The recurrent language model: embedding -> L LSTM layers -> softmax.

Dropout (Zaremba et al. 2014) is applied on the non-recurrent connections
only: the embedding output, between LSTM layers, and before the softmax.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .backend import FLOAT, get_xp
from .layers import LSTM, Embedding, ParamStore, Softmax, dropout_mask


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int  # V: rows of the input and output embeddings
    hidden: int = 200  # H: LSTM state size; also the word-vector size
    layers: int = 2  # L: stacked LSTM layers
    dropout: float = 0.0  # drop probability on non-recurrent connections
    init_scale: float = 0.1  # every parameter starts uniform in +-init_scale
    dtype: str = "float32"  # parameter and activation dtype (float64 for checks)

    def validate(self) -> None:
        problems = []
        if self.vocab_size < 2:
            problems.append(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.hidden < 1:
            problems.append(f"hidden must be >= 1, got {self.hidden}")
        if self.layers < 1:
            problems.append(f"layers must be >= 1, got {self.layers}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must lie in [0, 1), got {self.dropout}")
        if not self.init_scale > 0:
            problems.append(f"init_scale must be > 0, got {self.init_scale}")
        if self.dtype not in ("float32", "float64"):
            problems.append(f"dtype must be float32 or float64, got {self.dtype!r}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


def _declare(store: ParamStore, config: ModelConfig):
    """Create the layers (declaring their parameter shapes in ``store``)."""
    V, H, L = config.vocab_size, config.hidden, config.layers
    embedding = Embedding(store, "embedding", V, H)
    lstms = [LSTM(store, f"lstm{l}", H, H) for l in range(L)]
    output = Softmax(store, "output", V, H)
    return embedding, lstms, output


def param_shapes(config: ModelConfig) -> dict:
    """``{"layer/name": shape}`` of a model with ``config``, allocating nothing."""
    config.validate()
    store = ParamStore()
    _declare(store, config)
    return dict(store.shapes)


class LanguageModel:
    """An L-layer LSTM language model with all parameters in one flat buffer.

    State between BPTT segments is an explicit array ``(L, 2, B, H)``
    (``[l, 0]`` = h, ``[l, 1]`` = c); truncation is the trainer's job.
    """

    def __init__(self, config: ModelConfig, device: str = "cpu"):
        config.validate()
        self.config = config
        self.device = device
        self.xp = get_xp(device)
        self.dtype = np.dtype(config.dtype)
        self.store = ParamStore(self.xp, self.dtype)
        self.embedding, self.lstms, self.output = _declare(self.store, config)
        self.store.allocate()

    # -- parameters -----------------------------------------------------------
    def init_params(self, rng: np.random.Generator) -> None:
        """Uniform(-init_scale, init_scale) for every parameter, from ``rng``."""
        s = self.config.init_scale
        vals = rng.uniform(-s, s, size=self.store.size).astype(self.dtype)
        self.store.data[...] = self.xp.asarray(vals)

    def param_shapes(self) -> dict:
        return dict(self.store.shapes)

    def params_numpy(self) -> dict:
        from .backend import to_numpy

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
        """Dropout masks for one segment: embedding output + each layer output."""
        p = self.config.dropout
        if p == 0.0 or rng is None:
            return None
        H = self.config.hidden
        return [dropout_mask(rng, (T, B, H), p, self.dtype.type, self.xp)
                for _ in range(self.config.layers + 1)]

    def _forward(self, x, state, masks=None):
        """Embedding and LSTM stack over a segment.

        Returns the top layer's (masked) outputs ``(T, B, H)``, the final
        state ``(L, 2, B, H)`` and the per-layer caches.
        """
        new_state = self.xp.empty_like(state)
        caches = []
        a = self.embedding.forward(x)  # (T, B, H)
        if masks is not None:
            a = a * masks[0]
        for l, lstm in enumerate(self.lstms):
            h_seq, (hT, cT), cache = lstm.forward(a, state[l, 0], state[l, 1])
            new_state[l, 0], new_state[l, 1] = hT, cT
            caches.append(cache)
            a = h_seq * masks[l + 1] if masks is not None else h_seq
        return a, new_state, caches

    def forward_backward(self, x, y, state, scale=None, rng=None, masks=None):
        """Loss and gradients (accumulated into ``store.grad``) of one segment.

        Parameters
        ----------
        x, y : (T, B) int32 inputs and targets (time-major)
        state : (L, 2, B, H) incoming state (not modified)
        scale : gradient multiplier per token-loss; default ``1/B``
            (Zaremba: loss summed over time, averaged over the batch)
        rng : host generator for dropout masks (None: no dropout)
        masks : explicit dropout masks (overrides ``rng``; used by tests)

        Returns
        -------
        nll_sum : float, total NLL over the T*B tokens (natural log)
        new_state : (L, 2, B, H) final state (detached)
        dstate : (L, 2, B, H) gradient w.r.t. the incoming state
        """
        T, B = x.shape
        H = self.config.hidden
        if scale is None:
            scale = 1.0 / B
        if masks is None:
            masks = self._masks(rng, T, B)
        a, new_state, caches = self._forward(x, state, masks)
        nll, dh = self.output.loss(a.reshape(T * B, H), y.reshape(T * B), scale, True)
        da = dh.reshape(T, B, H)
        dstate = self.xp.empty_like(state)
        for l in range(self.config.layers - 1, -1, -1):
            if masks is not None:
                da = da * masks[l + 1]
            da, dstate[l, 0], dstate[l, 1] = self.lstms[l].backward(da, caches[l])
        if masks is not None:
            da = da * masks[0]
        self.embedding.backward(x, da)
        return float(nll.sum()), new_state, dstate

    def nll(self, x, y, state, masks=None):
        """Per-token NLL ``(T, B)`` and the final state; no gradients.

        Dropout is off unless explicit ``masks`` are given (gradient checks).
        """
        T, B = x.shape
        a, new_state, _ = self._forward(x, state, masks)
        nll, _ = self.output.loss(a.reshape(T * B, -1), y.reshape(T * B), compute_grad=False)
        return nll.reshape(T, B), new_state

    def logits(self, x, state):
        """Unnormalised scores ``(T, B, V)`` and the final state (tests, sampling)."""
        T, B = x.shape
        a, new_state, _ = self._forward(x, state)
        W, b = self.store.params["output/W"], self.store.params["output/b"]
        return (a.reshape(T * B, -1) @ W.T + b).reshape(T, B, -1), new_state
