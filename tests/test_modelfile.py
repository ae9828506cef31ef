"""Model files: :func:`save_model` writes what :func:`load_model` reads back,
for every kind of model, and it is the hand-written writers' call."""
import numpy as np
import pytest

from slimnp import io as sio
from slimnp.backend import make_rng
from slimnp.compress import compress_model
from slimnp.data import Vocabulary
from slimnp.model import LanguageModel, ModelConfig
from slimnp.modelfile import load_model, mapping_fields, save_model

V, H = 30, 8
SLIM = dict(input="slim", input_k=4, input_m=40, output="slim", output_k=4, output_m=20)
KINDS = {
    "dense": {},
    "shuffle": SLIM,
    "hash": dict(SLIM, mapping="hash", mapping_seed=7),
    "tied": dict(SLIM, input_m=20, tie=True),
    "pm": dict(embedding_size=4),
}


def _vocab():
    return Vocabulary(["<eos>", "<unk>"] + [f"w{i}" for i in range(V - 2)],
                      np.arange(V, 0, -1, dtype=np.int64))


def _model(kind):
    """A model of ``kind`` with random weights, and the config sections beside its own."""
    if kind == "learned":  # k-means tables from a dense model, as `slimnp compress` makes them
        slim, rep = compress_model(_model("dense")[0], _vocab().counts, input_k=4, input_ratio=0.25,
                                   output_k=4, output_ratio=0.25, frequent=2, seed=0)
        return slim, {"compressed_from": {"file": "dense.h5", **rep}}
    m = LanguageModel(ModelConfig(vocab_size=V, hidden=H, layers=1, **KINDS[kind]))
    m.init_params(make_rng(1))
    return m, {}


@pytest.mark.parametrize("kind", [*KINDS, "learned"])
def test_save_model_then_load_model_gives_the_same_model(tmp_path, kind):
    m, extra = _model(kind)
    vocab = _vocab()
    save_model(tmp_path / "m.h5", m, vocab, **extra)
    m2, vocab2, ck = load_model(tmp_path / "m.h5")
    assert m2.config == m.config
    assert set(ck.config) == {"model", *extra}
    assert all(ck.config[k] == v for k, v in extra.items())
    assert vocab2.words == vocab.words
    np.testing.assert_array_equal(vocab2.counts, vocab.counts)
    want = m.params_numpy()
    got = m2.params_numpy()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert m2.mapping.keys() == m.mapping.keys()
    for k in m.mapping:  # integer tables come back with their dtype
        assert m2.mapping[k].dtype == m.mapping[k].dtype, k
        np.testing.assert_array_equal(m2.mapping[k], m.mapping[k], err_msg=k)
    assert ck.mapping_attrs == mapping_fields(m)["mapping_attrs"]
    assert not ck.optimizer and not ck.train_state  # a model file, not a checkpoint
    x = np.arange(8, dtype=np.int32).reshape(4, 2) % V
    np.testing.assert_array_equal(m.logits(x, m.zero_state(2))[0], m2.logits(x, m2.zero_state(2))[0])


@pytest.mark.parametrize("kind", ["dense", "learned"])
def test_save_model_stores_what_the_hand_written_writers_stored(tmp_path, kind):
    """The call `slimnp compress` and the experiment runner wrote by hand
    (``sio.save(out, sio.Checkpoint(config=..., vocab=..., vocab_counts=...,
    params=..., **mapping_fields(...)))``) and save_model store the same."""
    m, extra = _model(kind)
    vocab = _vocab()
    sio.save(tmp_path / "old.h5", sio.Checkpoint(
        config={"model": m.config.to_dict(), **extra}, vocab=list(vocab.words),
        vocab_counts=vocab.counts, params=m.params_numpy(), **mapping_fields(m)))
    save_model(tmp_path / "new.h5", m, vocab, **extra)
    old, new = sio.load(tmp_path / "old.h5"), sio.load(tmp_path / "new.h5")
    for field in ("config", "vocab", "mapping_attrs", "optimizer", "train_state"):
        assert getattr(new, field) == getattr(old, field), field
    np.testing.assert_array_equal(new.vocab_counts, old.vocab_counts)
    for tree in ("params", "mapping"):
        a, b = getattr(old, tree), getattr(new, tree)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_save_model_config_sections_and_errors(tmp_path):
    m, _ = _model("dense")
    save_model(tmp_path / "m.h5", m, _vocab(), {"a": 1, "b": [2]}, c={"d": 3})
    assert sio.read_config(tmp_path / "m.h5") == {"model": m.config.to_dict(), "a": 1, "b": [2],
                                                  "c": {"d": 3}}
    with pytest.raises(ValueError, match="always the model's own config"):
        save_model(tmp_path / "x.h5", m, _vocab(), {"model": {}})
    short = Vocabulary(["<eos>", "<unk>", "a"])
    with pytest.raises(ValueError, match=f"the vocabulary has 3 words but the model's vocab_size is {V}"):
        save_model(tmp_path / "x.h5", m, short)
    assert not (tmp_path / "x.h5").exists()
