"""slimnp.describe: what ``slimnp inspect`` shows of a model file."""
import numpy as np

from slimnp import io
from slimnp.describe import describe, describe_text

from test_io import _make_ckpt


def test_describe_text_aligns_the_datasets(tmp_path):
    path = tmp_path / "big.h5"
    ckpt = _make_ckpt()
    ckpt.params["lstm0/Wx"] = np.zeros((200, 800), np.float32)
    io.save(path, ckpt)
    text = describe_text(io.describe(path))
    assert "160,000" in text
    assert "/params/lstm0/Wx" in text and "(200, 800)" in text and "float32" in text
    assert "MB" in text and "vocabulary:  6 words" in text
    assert "hidden" in text and "epoch" in text
    row = [line for line in text.splitlines() if "/params/lstm0/Wx" in line][0]
    header = [line for line in text.splitlines() if line.split()[:2] == ["dataset", "shape"]][0]
    assert row.index("(200, 800)") == header.index("shape")  # aligned columns


def test_slim_layers_are_reported(tmp_path):
    """A slim model's file: K, M, compression and its tables, in the dict and the text."""
    from slimnp.data import Vocabulary
    from slimnp.model import LanguageModel, ModelConfig
    from slimnp.modelfile import save_model

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(38)]
    mc = ModelConfig(vocab_size=40, hidden=8, layers=1, input="slim", input_k=2, input_m=20,
                     output="slim", output_k=2, output_m=10)
    model = LanguageModel(mc)
    save_model(tmp_path / "s.h5", model, Vocabulary.from_words(words, np.ones(40, np.int64)))
    info = describe(tmp_path / "s.h5")
    assert set(info["slim"]) == {"input", "output"}
    assert info["slim"]["input"]["K"] == 2 and info["slim"]["input"]["M"] == 20
    text = describe_text(info)
    assert "slim input: K=2 M=20" in text and "slim output: K=2 M=10" in text


def test_adaptive_layers_are_reported(tmp_path):
    """An adaptive model with slim tails: its bands, their sizes and pools."""
    from slimnp.data import Vocabulary
    from slimnp.model import LanguageModel, ModelConfig
    from slimnp.modelfile import save_model

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(98)]
    mc = ModelConfig(vocab_size=100, hidden=16, layers=1, input="adaptive", output="adaptive", tie=True,
                     cutoffs=(20, 60), div_value=2.0, output_k=2, tail_m=(20, 20))
    save_model(tmp_path / "a.h5", LanguageModel(mc), Vocabulary.from_words(words, np.ones(100, np.int64)))
    info = describe(tmp_path / "a.h5")
    a = info["adaptive"]
    assert a["input"] and a["output"] and a["tied"] and a["head_words"] == 20
    assert a["tails"] == [{"words": [20, 60], "size": 8, "K": 2, "M": 20},
                          {"words": [60, 100], "size": 4, "K": 2, "M": 20}]
    assert ("adaptive input and output, tied: head of 20 words, div 2; tails: words 20-59 in 8 "
            "(slim: K=2, M=20); words 60-99 in 4 (slim: K=2, M=20)") in describe_text(info)
