"""Vocabulary, encoding, split discovery and batching."""
from pathlib import Path

import numpy as np
import pytest

from slimnp.data import (
    EOS,
    UNK,
    CorpusError,
    Vocabulary,
    batchify,
    find_splits,
    num_segments,
    segment,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(path, text):
    path = Path(path)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# real corpora


@pytest.mark.data
@pytest.mark.parametrize(
    "folder,names,types,tokens,valid_tokens,test_tokens",
    [
        ("ptb", ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"), 10_000, 929_589, 73_760, 82_430),
        ("wikitext-2", ("train.txt", "valid.txt", "test.txt"), 33_278, 2_088_628, 217_646, 245_569),
    ],
)
def test_standard_corpora(folder, names, types, tokens, valid_tokens, test_tokens):
    d = DATA / folder
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    splits = find_splits(d)
    assert [splits[k].name for k in ("train", "valid", "test")] == list(names)
    vocab = Vocabulary.build(splits["train"])
    assert len(vocab) == types
    assert vocab.counts.sum() == tokens
    train = vocab.encode_file(splits["train"])
    assert train.n_tokens == tokens and train.ids.shape == (tokens,) and train.ids.dtype == np.int32
    assert train.n_oov == 0
    # each line ends with exactly one <eos>, and the counts agree with the ids
    assert np.array_equal(np.bincount(train.ids, minlength=types), vocab.counts)
    for split, n in (("valid", valid_tokens), ("test", test_tokens)):
        enc = vocab.encode_file(splits[split])
        assert enc.n_tokens == n
        assert enc.n_oov == 0 and enc.oov_rate == 0.0


# --------------------------------------------------------------------------
# small hand-made corpora


def test_small_corpus_known_ids(tmp_path):
    p = _write(tmp_path / "t.txt", "a b a\nc a b\n")
    v = Vocabulary.build(p)
    # counts: a 3, <eos> 2, b 2, c 1, <unk> 0 -> count desc, ties by string
    assert v.words == ["a", EOS, "b", "c", UNK]
    assert v.counts.tolist() == [3, 2, 2, 1, 0]
    assert (v.eos_id, v.unk_id) == (1, 4)
    enc = v.encode_file(p)
    assert enc.ids.tolist() == [0, 2, 0, 1, 3, 0, 2, 1]
    assert v.decode(enc.ids) == "a b a <eos> c a b <eos>".split()
    assert v.encode_lines(["a c", "zz"]).tolist() == [0, 3, 1, 4, 1]


def test_min_count_and_max_vocab(tmp_path):
    p = _write(tmp_path / "t.txt", "a a a a b b b c c d\n")
    v = Vocabulary.build(p, min_count=2)
    assert v.words == ["a", "b", "c", EOS, UNK]
    assert v.counts.tolist() == [4, 3, 2, 1, 1]  # <unk> took d's count
    v = Vocabulary.build(p, max_vocab=4)  # a, b + <eos>, <unk>
    assert v.words == ["a", UNK, "b", EOS]  # <unk> (c + d = 3) ties with b, "<" sorts first
    assert v.counts.tolist() == [4, 3, 3, 1]
    assert v.counts.sum() == 11
    enc = v.encode_file(p)
    assert enc.n_oov == 3 and enc.n_tokens == 11
    assert enc.oov_rate == pytest.approx(3 / 11)
    with pytest.raises(ValueError, match="max_vocab"):
        Vocabulary.build(p, max_vocab=1)
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(p, min_count=0)


def test_literal_unk_is_not_oov(tmp_path):
    train = _write(tmp_path / "train.txt", "x <unk> y\n")
    v = Vocabulary.build(train)
    assert len(v) == 4  # x, y, <eos>, <unk> -- the text's <unk> is the same entry
    assert v.counts[v.unk_id] == 1
    enc = v.encode_file(_write(tmp_path / "test.txt", "x <unk> zz qq\n"))
    assert enc.n_oov == 2
    assert enc.ids.tolist() == [v.index["x"], v.unk_id, v.unk_id, v.unk_id, v.eos_id]


def test_blank_lines_and_missing_trailing_newline(tmp_path):
    p = _write(tmp_path / "t.txt", " a b \n\n   \nc")
    v = Vocabulary.build(p)
    enc = v.encode_file(p)
    # 3 words + 4 lines (two blank, last one unterminated) -> 4 <eos>
    assert enc.n_tokens == 7
    assert v.decode(enc.ids) == ["a", "b", EOS, EOS, EOS, "c", EOS]
    assert v.counts[v.eos_id] == 4


def test_crlf_and_bom(tmp_path):
    p = _write(tmp_path / "t.txt", "\ufeffa b\r\nc\r\n".encode("utf-8"))
    v = Vocabulary.build(p)
    assert v.decode(v.encode_file(p).ids) == ["a", "b", EOS, "c", EOS]


def test_errors(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt.*not found"):
        Vocabulary.build(tmp_path / "nope.txt")
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(CorpusError, match="empty.txt.*no words"):
        Vocabulary.build(empty)
    blank = _write(tmp_path / "blank.txt", "\n  \n\n")
    with pytest.raises(CorpusError, match="blank.txt.*no words"):
        Vocabulary.build(blank)
    bad = _write(tmp_path / "latin1.txt", "caf\xe9 ok\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1.txt.*UTF-8 at byte offset 3"):
        Vocabulary.build(bad)
    v = Vocabulary.from_words(["x", EOS, UNK])
    with pytest.raises(CorpusError, match="latin1.txt.*UTF-8"):
        v.encode_file(bad)
    with pytest.raises(CorpusError, match="empty.txt"):
        v.encode_file(empty, out=tmp_path / "e.npy")
    assert not (tmp_path / "e.npy").exists() and not (tmp_path / ".e.npy.part").exists()


def test_bad_utf8_offset_in_later_chunk(tmp_path):
    data = b"abc def\n" * 10 + b"x\xff\n"
    p = _write(tmp_path / "t.txt", data)
    with pytest.raises(CorpusError, match="byte offset 81"):
        Vocabulary.build(p, chunk_bytes=16)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_streaming_equals_in_memory(tmp_path, chunk_bytes, suffix):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    lines = [" ".join(rng.choice(words, size=rng.integers(0, 12))) for _ in range(300)]
    p = _write(tmp_path / "t.txt", "\n".join(lines))  # no trailing newline
    ref_vocab = Vocabulary.build(p)
    v = Vocabulary.build(p, chunk_bytes=chunk_bytes)
    assert v.words == ref_vocab.words and np.array_equal(v.counts, ref_vocab.counts)
    mem = v.encode_file(p)
    out = tmp_path / f"ids{suffix}"
    streamed = v.encode_file(p, out=out, chunk_bytes=chunk_bytes)
    assert isinstance(streamed.ids, np.memmap) or not streamed.ids.flags.writeable
    assert streamed.ids.dtype == np.int32 and streamed.n_tokens == mem.n_tokens
    assert np.array_equal(np.asarray(streamed.ids), mem.ids)
    assert np.array_equal(v.encode_file(p, chunk_bytes=chunk_bytes).ids, mem.ids)
    assert mem.n_tokens == sum(len(line.split()) for line in lines) + len(lines)
    if suffix == ".npy":
        assert np.array_equal(np.load(out), mem.ids)
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["t.txt", out.name])


def test_from_words_validation():
    v = Vocabulary.from_words(["a", UNK, EOS], counts=[3, 0, 1])
    assert (v.eos_id, v.unk_id, len(v)) == (2, 1, 3)
    assert v.counts.dtype == np.int64
    with pytest.raises(ValueError, match="unique.*'a'"):
        Vocabulary.from_words(["a", "a", EOS, UNK])
    with pytest.raises(ValueError, match="<unk>"):
        Vocabulary.from_words(["a", EOS])
    with pytest.raises(ValueError, match="<eos>"):
        Vocabulary.from_words(["a", UNK])
    with pytest.raises(ValueError, match="whitespace"):
        Vocabulary.from_words(["a b", EOS, UNK])
    with pytest.raises(ValueError, match="shape"):
        Vocabulary.from_words(["a", EOS, UNK], counts=[1, 2])
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        v.decode([0, 3])



def test_read_adds_specials_and_checks(tmp_path):
    """A fixed vocabulary from ``vocab.txt`` (large synthetic vocabularies, where
    most words never occur in a few million tokens)."""
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

def test_find_splits(tmp_path):
    for names in (
        ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
        ("train.txt", "valid.txt", "test.txt"),
        ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
    ):
        d = tmp_path / names[0]
        d.mkdir()
        for n in names:
            _write(d / n, "a\n")
        s = find_splits(d)
        assert [s[k] for k in ("train", "valid", "test")] == [d / n for n in names]
    d = tmp_path / "partial"
    d.mkdir()
    _write(d / "train.txt", "a\n")
    with pytest.raises(CorpusError, match=r"ptb.train.txt.*wiki.test.tokens.*found only.*train.txt"):
        find_splits(d)
    with pytest.raises(CorpusError, match="not found"):
        find_splits(tmp_path / "missing")


def test_batchify_and_segments():
    ids = np.arange(23, dtype=np.int32)
    s = batchify(ids, 4)
    assert s.shape == (4, 5) and s.dtype == np.int32 and s.flags.c_contiguous
    assert s[1].tolist() == [5, 6, 7, 8, 9]  # stream b is the b-th contiguous chunk; tail 20..22 dropped
    # 5 positions -> 4 predictions -> bptt 3 gives segments of 3 and 1
    assert num_segments(5, 3) == 2 and num_segments(5, 4) == 1 and num_segments(1, 3) == 0
    x, y = segment(s, 0, 3)
    assert x.shape == y.shape == (4, 3)
    assert np.array_equal(y, x + 1)
    assert x[0].tolist() == [0, 1, 2]
    x, y = segment(s, 1, 3)
    assert x.shape == (4, 1) and x[2].tolist() == [13] and y[2].tolist() == [14]
    with pytest.raises(IndexError):
        segment(s, 2, 3)
    # every target covered exactly once
    ys = np.concatenate([segment(s, i, 2)[1] for i in range(num_segments(5, 2))], axis=1)
    assert np.array_equal(ys, s[:, 1:])
    with pytest.raises(ValueError, match="batch size"):
        batchify(ids, 12)
    with pytest.raises(ValueError, match="1-d"):
        batchify(s, 2)
