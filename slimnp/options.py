"""Command-line settings to configs: option names (``hidden``,
``input_ratio``, ``lr_decay``, ...) on one side, :class:`~slimnp.model.ModelConfig`
and :class:`~slimnp.trainer.TrainConfig` on the other.

The CLI and the experiment runner describe a run by its options, a dict keyed
like ``slimnp train``'s flags; the library works on the two configs.  The
translation is here, once, and its errors name the options (``--input-k``),
since the options are what the user gave.
"""
from __future__ import annotations

from .model import ModelConfig
from .trainer import TrainConfig

__all__ = ["slim_settings", "model_config", "train_config", "configs"]


def slim_settings(hp: dict, V: int) -> dict:
    """Slim-embedding fields of :class:`ModelConfig` from CLI-style settings.

    ``input_ratio`` / ``output_ratio`` give the layer's size as a fraction of
    the dense ``V x H`` table (parameters ``M*H/K``, so ``M = ratio*K*V``;
    on the output side ``M/K = round(ratio*V)`` keeps M a multiple of K).
    """
    out = {}
    for side, kind_slim in (("input", "slim"), ("output", "slim")):
        kind = hp.get(side) or ("dense" if side == "input" else "full")
        out[side] = kind
        k, m, ratio = hp.get(f"{side}_k"), hp.get(f"{side}_m"), hp.get(f"{side}_ratio")
        if kind != kind_slim:
            if k or m or ratio:
                raise ValueError(f"--{side}-k/--{side}-m/--{side}-ratio need --{side} slim")
            continue
        if hp.get("tie") and side == "input":
            if k or m or ratio:
                raise ValueError("with --tie the input uses the output's pools: "
                                 "give --output-k/--output-m only")
            continue
        if not k:
            raise ValueError(f"--{side} slim needs --{side}-k (sub-vectors per word)")
        if (m is None) == (ratio is None):
            raise ValueError(f"--{side} slim needs exactly one of --{side}-m and --{side}-ratio")
        if ratio is not None:
            if not 0 < ratio <= 1:
                raise ValueError(f"--{side}-ratio must lie in (0, 1], got {ratio}")
            m = max(1, round(ratio * k * V)) if side == "input" else k * max(1, round(ratio * V))
        out[f"{side}_k"], out[f"{side}_m"] = int(k), int(m)
    if hp.get("tie") and out["input"] == "slim" and out["output"] == "slim":
        out["input_k"], out["input_m"] = out["output_k"], out["output_m"]
    out["mapping"] = hp.get("mapping") or "shuffle"
    out["mapping_seed"] = int(hp.get("mapping_seed") or 0)
    out["tie"] = bool(hp.get("tie"))
    return out


def model_config(hp: dict, V: int) -> ModelConfig:
    """The :class:`ModelConfig` of CLI-style settings ``hp`` for a vocabulary of ``V`` words."""
    return ModelConfig(vocab_size=V, hidden=hp["hidden"], layers=hp["layers"],
                       dropout=hp["dropout"], init_scale=hp["init_scale"],
                       input_dropout=hp.get("input_dropout"),
                       embedding_size=hp.get("embedding_size") or 0,
                       dtype=hp.get("dtype") or "float32", **slim_settings(hp, V))


def train_config(hp: dict, *, seed=0, loss_average="batch", eval_batch_size=10) -> TrainConfig:
    """The :class:`TrainConfig` of CLI-style settings ``hp``."""
    return TrainConfig(epochs=hp["epochs"], bptt=hp["bptt"], batch_size=hp["batch_size"], lr=hp["lr"],
                       optimizer=hp.get("optimizer") or "sgd", loss=hp.get("loss") or "softmax",
                       samples=hp.get("samples") or 4000, clip=hp["clip"], schedule=hp["schedule"],
                       lr_decay=hp["lr_decay"], decay_start=hp["decay_start"],
                       decay_threshold=hp["decay_threshold"], loss_average=loss_average, seed=seed,
                       eval_batch_size=eval_batch_size)


def configs(hp: dict, *, seed=0, loss_average="batch", eval_batch_size=10):
    """``(model, train)`` for :func:`slimnp.trainer.run_training` from
    CLI-style settings: ``model`` is a function of the vocabulary size (the
    vocabulary is built by the run, and ``input_ratio``/``output_ratio``
    need its size), ``train`` a :class:`TrainConfig`."""
    return ((lambda V: model_config(hp, V)),
            train_config(hp, seed=seed, loss_average=loss_average, eval_batch_size=eval_batch_size))
