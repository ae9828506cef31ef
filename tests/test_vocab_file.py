"""A fixed vocabulary from ``vocab.txt`` beside the splits (large synthetic
vocabularies, where most words never occur in a few million tokens)."""
import numpy as np
import pytest

from slimnp.data import CorpusError, Vocabulary, find_splits
from slimnp.synthetic import HMMSpec, write_corpus
from slimnp.trainer import run_training
from slimnp.options import configs

from helpers import TINY_HP


def test_read_adds_specials_and_checks(tmp_path):
    f = tmp_path / "vocab.txt"
    f.write_text("a\nb\n\nc\n")
    v = Vocabulary.read(f)
    assert v.words[:3] == ["a", "b", "c"] and len(v) == 5 and v.counts is None
    v.count(np.array([0, 0, 2, v.eos_id], np.int32))
    assert v.counts.tolist() == [2, 0, 1, 1, 0]
    f.write_text("")
    with pytest.raises(CorpusError, match="empty"):
        Vocabulary.read(f)
    f.write_text("a\na\n")
    with pytest.raises(CorpusError, match="unique"):
        Vocabulary.read(f)
    f.write_bytes(b"a\n\xff\n")
    with pytest.raises(CorpusError, match="UTF-8"):
        Vocabulary.read(f)


def test_synthetic_corpus_fixes_the_whole_vocabulary(tmp_path):
    """4,000 words over 3,000 tokens: most never occur, all are in the model,
    and IS training (unseen words floored in the noise law) runs."""
    info = write_corpus(tmp_path, HMMSpec(vocab=4000, states=4, seed=0), 3000, 500, 500)
    files = find_splits(tmp_path)
    assert files["vocab"] == tmp_path / "vocab.txt"
    seen = len(Vocabulary.build(files["train"]))
    s = run_training(files, tmp_path / "m.h5", *configs({**TINY_HP, "epochs": 1, "loss": "is", "samples": 50}),
                     log=lambda m: None, progress=False)
    from slimnp.modelfile import load_model

    model, vocab, _ = load_model(tmp_path / "m.h5")
    assert len(vocab) == 4001 > seen  # 4,000 words + <unk>
    assert model.config.vocab_size == 4001 and vocab.counts.sum() == info["tokens"]["train"]
    assert np.isfinite(s["test_ppl"])
