"""slimnp.evaluate: the exact likelihood of a token stream, in one stream or
cut into B pieces, and ``slimnp evaluate`` on a model file.

(The ranks' shards adding up to evaluate_ids are in test_distributed.py.)
"""
import math

import numpy as np
import pytest

from slimnp.backend import make_rng
from slimnp.data import Vocabulary
from slimnp.evaluate import EvalResult, evaluate_file, evaluate_ids, pieces_nll, primed_pieces, stream_nll
from slimnp.model import LanguageModel, ModelConfig

V, EOS = 23, 0


def _model(layers=2, dtype="float64"):
    m = LanguageModel(ModelConfig(vocab_size=V, hidden=8, layers=layers, init_scale=0.5, dtype=dtype))
    m.init_params(make_rng(3))
    return m


def _ids(n, seed=0):
    return np.random.default_rng(seed).integers(0, V, n).astype(np.int32)


def _step_by_step(model, inputs, targets, state):
    """NLL of ``targets`` one token at a time from ``model.logits`` with the
    state carried: the definition, in float64."""
    total = 0.0
    for x, y in zip(inputs, targets):
        z, state = model.logits(np.array([[x]], np.int32), state)
        z = z[0, 0].astype(np.float64)
        total += float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[y])
    return total, state


def test_one_stream_is_the_exact_sequential_likelihood():
    """B = 1: every token from the whole history (the first from ``<eos>`` and
    the zero state), whatever the segment length that bounds the activations."""
    model, ids = _model(), _ids(61)
    inputs = np.concatenate([[EOS], ids[:-1]])
    want, _ = _step_by_step(model, inputs, ids, model.zero_state(1))
    for bptt in (1, 7, 61, 100):
        res = evaluate_ids(model, ids, EOS, batch_size=1, bptt=bptt)
        assert res.tokens == 61
        assert res.nll == pytest.approx(want, rel=1e-12)
    assert res.perplexity == pytest.approx(math.exp(want / 61), rel=1e-12)


@pytest.mark.parametrize("n,B", [(60, 4), (63, 4), (7, 3), (5, 9)])
def test_pieces_are_the_streams_they_cut(n, B):
    """Batched evaluation: the sum over B contiguous pieces, each scored alone
    from the zero state with the token before it as its first input; the
    ``n - B m`` tokens left over continue the last piece from its state;
    B larger than the stream is capped at one token per piece."""
    model, ids = _model(), _ids(n, seed=n)
    inputs = np.concatenate([[EOS], ids[:-1]])
    Bc, m = min(B, n), n // min(B, n)
    want = 0.0
    for j in range(Bc):
        end = n if j == Bc - 1 else (j + 1) * m  # the last piece takes the tail
        want += _step_by_step(model, inputs[j * m : end], ids[j * m : end], model.zero_state(1))[0]
    for bptt in (3, 100):
        assert pieces_nll(model, ids, EOS, B, bptt) == pytest.approx(want, rel=1e-12)
    assert evaluate_ids(model, ids, EOS, batch_size=B, bptt=5).nll == pytest.approx(want, rel=1e-12)
    # ranges of pieces add up to the whole
    halves = pieces_nll(model, ids, EOS, B, 5, 0, Bc // 2) + pieces_nll(model, ids, EOS, B, 5, Bc // 2, Bc)
    assert halves == pytest.approx(want, rel=1e-12)
    assert pieces_nll(model, ids, EOS, B, 5, 2, 2) == 0.0


def test_pieces_approximate_the_one_stream_result():
    """What batching costs: only the first tokens of each piece lose their
    history, so on a long stream the perplexity moves by a fraction of a
    percent (here 8 pieces of 500 tokens)."""
    model, ids = _model(dtype="float32"), _ids(4000, seed=5)
    one = evaluate_ids(model, ids, EOS, batch_size=1).perplexity
    eight = evaluate_ids(model, ids, EOS, batch_size=8).perplexity
    assert eight == pytest.approx(one, rel=5e-3)


def test_stream_nll_per_token_and_progress():
    model = _model(layers=1)
    x, y = _ids(22, 1).reshape(11, 2), _ids(22, 2).reshape(11, 2)  # (n, B) time-major
    out, done = np.full((11, 2), np.nan), []
    total, state = stream_nll(model, x, y, model.zero_state(2), bptt=4, out=out, progress=done.append)
    assert done == [4, 8, 11]
    assert total == pytest.approx(out.sum(), rel=1e-13)
    want, want_state = model.nll(x, y, model.zero_state(2))
    np.testing.assert_allclose(out, want, rtol=1e-12)
    np.testing.assert_allclose(state, want_state, rtol=1e-12, atol=1e-14)


def test_empty_streams_and_results():
    with pytest.raises(ValueError, match="cannot evaluate an empty token stream"):
        primed_pieces([], EOS, 4)
    ids, inputs, B, m = primed_pieces([5, 6, 7], EOS, 10)
    assert ids.dtype == inputs.dtype == np.int32 and list(inputs) == [EOS, 5, 6] and (B, m) == (3, 1)
    none = EvalResult(nll=0.0, tokens=0)
    assert none.loss == 0.0 and math.isnan(none.perplexity)


def test_evaluate_file_scores_the_encoded_text(tmp_path):
    """``slimnp evaluate``: the perplexity of the file's ids under the saved
    model, its OOV count and rate, and the tokens counted once."""
    from slimnp.modelfile import save_model

    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(V - 2)]
    model = _model(dtype="float32")
    save_model(tmp_path / "m.h5", model, Vocabulary.from_words(words, np.ones(V, np.int64)))
    (tmp_path / "t.txt").write_text("w1 w2 w3 zzz\nw4 w4 qqq w20\n")
    got = evaluate_file(tmp_path / "m.h5", tmp_path / "t.txt", batch_size=1, progress=False)
    ids = np.array([3, 4, 5, 1, 0, 6, 6, 1, 22, 0], np.int32)  # w_i is id i + 2; <unk> 1, <eos> 0
    want = evaluate_ids(model, ids, EOS, batch_size=1)
    assert got["tokens"] == 10 and got["oov"] == 2 and got["oov_rate"] == pytest.approx(0.2)
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert got["loss"] == pytest.approx(want.loss, rel=1e-6) and got["batch_size"] == 1
