"""Model files in, models out: what a stored config implies and how a
:class:`~slimnp.model.LanguageModel` is rebuilt from a file.

:mod:`slimnp.io` reads and writes the HDF5 file without knowing what a model
is; this module supplies the model's side: the parameter shapes a stored
config implies (checked by :func:`slimnp.io.load` before any array is read),
the slim tables a file stores, :func:`load_model`, the one way from a file
to a model ready to evaluate, and :func:`save_model`, the one way back.
"""
from __future__ import annotations

import json

from . import io as sio
from .data import Vocabulary
from .mapping import HASH_NAME
from .model import LanguageModel, ModelConfig, param_shapes

__all__ = ["load_model", "save_model", "model_checkpoint", "model_from_checkpoint", "expected_model",
           "expected_shapes", "mapping_fields"]


def mapping_fields(model: LanguageModel) -> dict:
    """What a model file stores of the slim tables: the tables themselves for
    ``shuffle``, only the seed and hash name for ``hash``."""
    c = model.config
    if c.mapping == "hash":
        return {"mapping": {}, "mapping_attrs": {"kind": "hash", "hash": HASH_NAME,
                                                 "seed": c.mapping_seed}}
    attrs = {"kind": c.mapping, "seed": c.mapping_seed}
    if c.mapping == "learned" and c.mapping_info:
        attrs.update({k: v for k, v in json.loads(c.mapping_info).items() if k != "kind"})
    return {"mapping": dict(model.mapping), "mapping_attrs": attrs}


def model_from_checkpoint(ck: sio.Checkpoint, path, device: str = "cpu") -> LanguageModel:
    """Build the model a checkpoint describes and load its parameters."""
    mc = ModelConfig.from_dict(ck.config["model"])
    if mc.mapping == "hash" and ck.mapping_attrs.get("hash", HASH_NAME) != HASH_NAME:
        raise sio.FormatError(f"{path}: mapping hash {ck.mapping_attrs.get('hash')!r} is unknown "
                              f"to this slimnp (knows {HASH_NAME})")
    try:
        model = LanguageModel(mc, device=device, mapping=ck.mapping or None)
    except ValueError as exc:
        raise sio.FormatError(f"{path}: {exc}") from None
    model.load_params(ck.params)
    return model


def load_model(path, device: str = "cpu"):
    """Load a model file for evaluation: ``(model, vocab, checkpoint)``.

    The file's format, version, every parameter name and shape are checked
    first (:func:`slimnp.io.load`); mismatches raise ``FormatError``.
    """
    ck = sio.load(path, expected_shapes=expected_shapes, optimizer=False)
    model = model_from_checkpoint(ck, path, device)
    vocab = Vocabulary.from_words(list(ck.vocab), ck.vocab_counts)
    return model, vocab, ck


def model_checkpoint(model: LanguageModel, vocab: Vocabulary, config: dict | None = None,
                     **fields) -> sio.Checkpoint:
    """What :func:`save_model` writes, as a :class:`slimnp.io.Checkpoint`.

    The stored config is ``{"model": model.config.to_dict(), **config}``:
    ``config`` adds sections beside the model's (a training run's ``train``
    and ``data``; a compressed model's ``compressed_from``).  ``fields``: more
    checkpoint fields (``optimizer``, ``train_state``: a resumable run's).
    The parameters are copied to host memory; the slim tables are stored as
    :func:`mapping_fields` says.
    """
    config = dict(config or {})
    if "model" in config:
        raise ValueError("config holds the sections beside 'model'; the model section is "
                         "always the model's own config")
    V = model.config.vocab_size
    if len(vocab) != V:
        raise ValueError(f"the vocabulary has {len(vocab)} words but the model's vocab_size is {V}")
    return sio.Checkpoint(config={"model": model.config.to_dict(), **config},
                          vocab=list(vocab.words), vocab_counts=vocab.counts,
                          params=model.params_numpy(), **mapping_fields(model), **fields)


def save_model(path, model: LanguageModel, vocab: Vocabulary, config: dict | None = None,
               **extra) -> None:
    """Write ``model`` and ``vocab`` to the model file ``path`` (atomically,
    :func:`slimnp.io.save`); :func:`load_model` reads it back.

    The stored config is ``{"model": model.config.to_dict(), **config,
    **extra}``: ``config`` and the keyword arguments add sections beside the
    model's, e.g. ``save_model(out, slim, vocab, compressed_from={...})``.
    Raises ``ValueError`` when the vocabulary's size is not the model's, and
    :class:`slimnp.errors.WriteError` when the file cannot be written.
    """
    sio.save(path, model_checkpoint(model, vocab, {**(config or {}), **extra}))


def expected_model(cfg: dict, path="model file") -> dict:
    """The ``model`` section of a stored config, checked to build a ModelConfig."""
    if not isinstance(cfg.get("model"), dict):
        raise sio.FormatError(f"{path}: config has no 'model' section")
    try:
        ModelConfig.from_dict(cfg["model"]).validate()
    except (TypeError, ValueError) as exc:
        raise sio.FormatError(f"{path}: model config is invalid: {exc}") from None
    return cfg["model"]


def expected_shapes(cfg: dict) -> dict:
    """Parameter shapes a stored config implies (for :func:`slimnp.io.load`)."""
    if not isinstance(cfg.get("model"), dict):
        raise sio.FormatError("model file config has no 'model' section")
    try:
        return param_shapes(ModelConfig.from_dict(cfg["model"]))
    except (TypeError, ValueError) as exc:
        raise sio.FormatError(f"model file config is invalid: {exc}") from None
