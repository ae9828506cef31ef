"""A short run on a slice of the real Penn Treebank (skips without ../shared/data)."""
import numpy as np
import pytest

from slimnp.data import Vocabulary
from slimnp.evaluate import evaluate_ids
from slimnp.model import LanguageModel, ModelConfig
from slimnp.trainer import TrainConfig, Trainer

from helpers import shared_data


@pytest.mark.data
def test_ptb_slice_perplexity_drops(tmp_path):
    train = shared_data("ptb", "ptb.train.txt")
    valid = shared_data("ptb", "ptb.valid.txt")
    vocab = Vocabulary.build(train)
    assert len(vocab) == 10000
    tr = vocab.encode_file(train).ids[:60_000]
    va = vocab.encode_file(valid).ids[:5_000]
    model = LanguageModel(ModelConfig(vocab_size=len(vocab), hidden=64, layers=1))
    cfg = TrainConfig(epochs=1, bptt=20, batch_size=20, lr=1.0, schedule="constant", seed=1)
    t = Trainer(model, vocab, tr, va, cfg, tmp_path / "p.h5", log=lambda m: None, progress=False)
    t.init_params()
    before = evaluate_ids(model, va, vocab.eos_id, batch_size=10).perplexity
    assert before > 5000  # untrained: close to uniform over 10,000 words
    t.train()
    after = evaluate_ids(model, va, vocab.eos_id, batch_size=10).perplexity
    # one short pass over 60K tokens: from ~uniform (10,000) to below 1,000
    # (word frequencies learned; PTB's unigram perplexity is about 700)
    assert after < min(1000, before / 10), (before, after)
    assert np.isfinite(after)
