"""Word-level corpora: vocabulary, fast encoding, split discovery, batching.

Conventions (those of the usual PTB / WikiText language-model loaders):

* a token is a maximal run of non-whitespace characters (``str.split()``);
* an ``<eos>`` token ends every line, including blank lines and a last line
  without a trailing newline; a literal ``<eos>`` in the text is the same
  token;
* words not in the vocabulary map to ``<unk>``; a literal ``<unk>`` in the
  text (PTB has them) is an ordinary in-vocabulary token, not an OOV.

Dimensions: ``V`` vocabulary size, ``T`` tokens, ``B`` parallel streams,
``N`` positions per stream, ``t`` positions in one BPTT segment.

Speed: text is processed a chunk of whole lines at a time and every
per-token step runs at C level (``str.split``, ``Counter.update``,
``np.fromiter`` over ``map`` of a dict lookup), so Python-level work is per
chunk, never per token or per line.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from ._atomic import atomic_path

EOS = "<eos>"
UNK = "<unk>"

#: Bytes read per chunk.  4 MiB of text is ~0.8M tokens, i.e. a token list of
#: some 50 MB of str objects: large enough that per-chunk overhead vanishes,
#: small enough that a 100M-token file streams in bounded memory.
DEFAULT_CHUNK_BYTES = 4 << 20

PathLike = Union[str, "os.PathLike[str]"]


class CorpusError(ValueError):
    """A user-facing problem with a data file (missing, empty, not UTF-8...).

    The message names the file and says how to fix it.
    """


# --------------------------------------------------------------------------
# chunked reading


def _iter_text_chunks(path: PathLike, chunk_bytes: int) -> Iterator[str]:
    """Yield the decoded text of `path` in pieces of whole lines.

    Every piece ends with ``"\\n"`` (a final line without one gets one, so
    it also receives its ``<eos>``).  Raises CorpusError for a missing or
    unreadable file and for invalid UTF-8, giving the byte offset.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: file not found; check the path or fetch the data first")
    if path.is_dir():
        raise CorpusError(f"{path}: is a directory, expected a text file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CorpusError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        carry = b""
        offset = 0  # file offset of carry[0], for error messages
        first = True
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            buf = carry + block if carry else block
            # Cutting at a newline byte is safe for UTF-8: 0x0A never occurs
            # inside a multi-byte sequence.
            cut = buf.rfind(b"\n")
            if cut < 0:
                carry = buf  # a line longer than one chunk: keep reading
                continue
            piece, carry = buf[: cut + 1], buf[cut + 1 :]
            yield _decode(path, piece, offset, first)
            offset += len(piece)
            first = False
        if carry:
            yield _decode(path, carry + b"\n", offset, first)


def _decode(path: Path, piece: bytes, offset: int, first: bool) -> str:
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path}: not valid UTF-8 at byte offset {offset + e.start} "
            f"(byte 0x{piece[e.start]:02x}); re-encode the file as UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8`"
        ) from None
    if first and text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark is not part of the first word
    return text


def _tokens(text: str) -> list:
    """Whitespace tokens of `text` with ``<eos>`` in place of every newline."""
    return text.replace("\n", " " + EOS + " ").split()


def _empty_error(path: PathLike) -> CorpusError:
    return CorpusError(f"{path}: contains no words (empty or only whitespace); expected a text file with one sentence per line")


# --------------------------------------------------------------------------
# vocabulary


class _Lookup(dict):
    """word -> id mapping whose misses return the ``<unk>`` id and are counted.

    Its bound ``__getitem__`` is mapped over token lists at C speed; only
    OOV tokens reach the Python-level ``__missing__``.
    """

    __slots__ = ("unk_id", "misses")

    def __init__(self, index: dict, unk_id: int):
        super().__init__(index)
        self.unk_id = unk_id
        self.misses = 0

    def __missing__(self, key):
        self.misses += 1
        return self.unk_id


@dataclass
class Encoded:
    """A file encoded as word ids.

    Attributes
    ----------
    ids : np.ndarray, shape (T,), int32
        Token ids, ``<eos>`` included; in memory or a read-only memmap.
    n_oov : int
        Tokens that were not in the vocabulary (mapped to ``<unk>``).
    n_tokens : int
        ``T``, equal to ``len(ids)``.
    """

    ids: np.ndarray
    n_oov: int
    n_tokens: int

    @property
    def oov_rate(self) -> float:
        """Fraction of tokens that were out of vocabulary (0.0 for T = 0)."""
        return self.n_oov / self.n_tokens if self.n_tokens else 0.0


class Vocabulary:
    """Bijection between words and ids ``0..V-1``, with training counts.

    Attributes
    ----------
    words : list of str, length V
        id -> word.
    index : dict
        word -> id.
    counts : np.ndarray, shape (V,), int64, or None
        Training-set counts in the order of `words`; the ``<unk>`` count
        includes the counts of the words dropped from the vocabulary.
    eos_id, unk_id : int
        Ids of ``<eos>`` and ``<unk>`` (always present).
    """

    def __init__(self, words: Sequence[str], counts: Optional[np.ndarray] = None):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.counts = counts
        self.eos_id = self.index[EOS]
        self.unk_id = self.index[UNK]

    def __len__(self) -> int:
        return len(self.words)

    def __repr__(self) -> str:
        return f"Vocabulary(V={len(self)}, eos_id={self.eos_id}, unk_id={self.unk_id})"

    # -- construction --------------------------------------------------

    @classmethod
    def build(
        cls,
        path: PathLike,
        min_count: int = 1,
        max_vocab: Optional[int] = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> "Vocabulary":
        """Count the tokens of a training file and build its vocabulary.

        Parameters
        ----------
        path : path-like
            UTF-8 text, one sentence per line.
        min_count : int
            Words seen fewer times are dropped (they become ``<unk>``).
        max_vocab : int or None
            Upper bound on V, counting ``<eos>`` and ``<unk>``: the
            ``max_vocab - 2`` most frequent other words are kept.
        chunk_bytes : int
            Read size; only affects memory use and speed.

        Returns
        -------
        Vocabulary
            Ordered by count descending, ties by word string, so the result
            is deterministic.  ``<eos>`` and ``<unk>`` sit where their counts
            put them (``<unk>`` with count 0 goes last).
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_vocab is not None and max_vocab < 2:
            raise ValueError(f"max_vocab must be >= 2 (room for {EOS} and {UNK}) or None, got {max_vocab}")
        counter: Counter = Counter()
        has_words = False
        for text in _iter_text_chunks(path, chunk_bytes):
            toks = _tokens(text)
            # Every newline became exactly one <eos>; more tokens than
            # newlines means the chunk holds at least one word.
            has_words = has_words or len(toks) > text.count("\n")
            counter.update(toks)
        if not has_words:
            raise _empty_error(path)

        n_eos = counter.pop(EOS, 0)
        n_unk = counter.pop(UNK, 0)
        # Sorting is per type, not per token, so a Python key is fine.
        ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        keep = [kv for kv in ranked if kv[1] >= min_count]
        if max_vocab is not None:
            keep = keep[: max_vocab - 2]
        n_unk += sum(counter.values()) - sum(c for _, c in keep)
        keep.append((EOS, n_eos))
        keep.append((UNK, n_unk))
        keep.sort(key=lambda kv: (-kv[1], kv[0]))
        words = [w for w, _ in keep]
        counts = np.array([c for _, c in keep], dtype=np.int64)
        return cls(words, counts)

    @classmethod
    def from_words(cls, words: Sequence[str], counts=None) -> "Vocabulary":
        """Rebuild a vocabulary from its word list (e.g. read from HDF5).

        Parameters
        ----------
        words : sequence of str, length V
            id -> word; unique, non-empty, no whitespace, containing
            ``<eos>`` and ``<unk>``.
        counts : array-like, shape (V,), optional
            Non-negative training counts.
        """
        words = [w.decode("utf-8") if isinstance(w, bytes) else w for w in words]
        if not all(isinstance(w, str) for w in words):
            raise ValueError("vocabulary words must be str (or UTF-8 bytes)")
        if len(set(words)) != len(words):
            seen: set = set()
            dup = next(w for w in words if w in seen or seen.add(w))
            raise ValueError(f"vocabulary words must be unique; {dup!r} occurs more than once")
        for special in (EOS, UNK):
            if special not in words:
                raise ValueError(f"vocabulary must contain {special!r}; got {len(words)} words without it")
        bad = next((w for w in words if len(w.split()) != 1 or w.strip() != w), None)
        if bad is not None:
            raise ValueError(f"vocabulary word {bad!r} is empty or contains whitespace; it could never be a token")
        if counts is not None:
            counts = np.asarray(counts)
            if counts.shape != (len(words),):
                raise ValueError(f"counts must have shape ({len(words)},) to match the words, got {counts.shape}")
            if counts.size and (not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0):
                raise ValueError("counts must be non-negative integers")
            counts = counts.astype(np.int64)
        return cls(words, counts)

    @classmethod
    def read(cls, path: PathLike) -> "Vocabulary":
        """A fixed vocabulary from a file of one word per line (``vocab.txt``).

        ``<eos>`` and ``<unk>`` are added if the file lacks them; counts are
        left to the caller (:meth:`count`), since words of a fixed
        vocabulary need not occur in the training text at all (a
        793K-word vocabulary over a few million tokens).
        """
        try:
            with open(path, encoding="utf-8") as f:
                words = [w.strip() for w in f if w.strip()]
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not words:
            raise CorpusError(f"{path}: the vocabulary file is empty")
        for special in (EOS, UNK):
            if special not in words:
                words.append(special)
        try:
            return cls.from_words(words)
        except ValueError as exc:
            raise CorpusError(f"{path}: {exc}") from None

    def count(self, ids: np.ndarray) -> "Vocabulary":
        """Set ``counts`` from encoded training ids; returns self."""
        self.counts = np.bincount(np.asarray(ids), minlength=len(self)).astype(np.int64)
        return self

    # -- encoding --------------------------------------------------------

    def encode_file(
        self,
        path: PathLike,
        out: Optional[PathLike] = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> Encoded:
        """Encode a text file as int32 ids, one chunk of lines at a time.

        Parameters
        ----------
        path : path-like
            UTF-8 text, one sentence per line.
        out : path-like, optional
            Stream the ids to this file instead of memory: ``.npy`` format
            if the name ends in ``.npy``, else raw little-endian int32.  The
            file is written under a temporary name and renamed when done.
        chunk_bytes : int
            Read size; only affects memory use and speed.

        Returns
        -------
        Encoded
            ``ids`` of shape (T,) int32: an in-memory array, or with `out` a
            read-only memory map of the written file.
        """
        lookup = _Lookup(self.index, self.unk_id)
        get = lookup.__getitem__
        has_words = False
        if out is None:
            parts = []
            for text in _iter_text_chunks(path, chunk_bytes):
                toks = _tokens(text)
                has_words = has_words or len(toks) > text.count("\n")
                parts.append(np.fromiter(map(get, toks), dtype=np.int32, count=len(toks)))
            if not has_words:
                raise _empty_error(path)
            ids = np.concatenate(parts) if len(parts) > 1 else parts[0]
            return Encoded(ids, lookup.misses, int(ids.shape[0]))

        out = Path(out)
        npy = out.suffix == ".npy"
        total = 0
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            if npy:
                f.write(b"\0" * _NPY_HEADER_BYTES)  # real header written at the end
            for text in _iter_text_chunks(path, chunk_bytes):
                toks = _tokens(text)
                has_words = has_words or len(toks) > text.count("\n")
                arr = np.fromiter(map(get, toks), dtype="<i4", count=len(toks))
                f.write(arr.tobytes())
                total += arr.shape[0]
            if not has_words:
                raise _empty_error(path)
            if npy:
                f.seek(0)
                _write_npy_header(f, total)
        if npy:
            ids = np.load(out, mmap_mode="r")
        else:
            ids = np.memmap(out, dtype="<i4", mode="r", shape=(total,))
        return Encoded(ids, lookup.misses, total)

    def encode_lines(self, lines: Sequence[str]) -> np.ndarray:
        """Encode small in-memory text (e.g. sentences to score).

        Parameters
        ----------
        lines : sequence of str
            One sentence each; ``<eos>`` is appended after each (a newline
            inside a string also ends a sentence).

        Returns
        -------
        np.ndarray, shape (T,), int32
        """
        if isinstance(lines, str):
            raise ValueError("encode_lines expects a list of strings, got a single str; wrap it in a list")
        if not lines:
            return np.zeros(0, dtype=np.int32)
        toks = _tokens("\n".join(lines) + "\n")
        get = _Lookup(self.index, self.unk_id).__getitem__
        return np.fromiter(map(get, toks), dtype=np.int32, count=len(toks))

    def decode(self, ids) -> list:
        """Map ids (any int array-like, shape (T,)) back to words."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return []
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= len(self.words):
            raise ValueError(f"ids must lie in [0, {len(self.words) - 1}] for this vocabulary, got range [{lo}, {hi}]")
        return list(map(self.words.__getitem__, ids.ravel().tolist()))


# The .npy header for a 1-d '<i4' array is ~70 bytes plus the digits of T,
# which numpy pads to a multiple of 64: 128 bytes for any T below 10**40.
# Reserving it up front lets the data stream before T is known.
_NPY_HEADER_BYTES = 128


def _write_npy_header(f, n: int) -> None:
    header = {"descr": "<i4", "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(f, header)
    if f.tell() != _NPY_HEADER_BYTES:  # would corrupt the data; cannot happen for sane T
        raise RuntimeError(f"unexpected .npy header size {f.tell()}")


# --------------------------------------------------------------------------
# splits


VOCAB_FILE = "vocab.txt"  # one word per line: fixes the vocabulary (find_splits)

_SPLIT_NAMINGS = (
    ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
    ("train.txt", "valid.txt", "test.txt"),
    ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
)


def find_splits(data_dir: PathLike) -> dict:
    """Locate the train/valid/test files of a corpus directory.

    Accepts PTB naming (``ptb.train.txt``...), plain (``train.txt``...) and
    WikiText (``wiki.train.tokens``...); the first complete set wins.

    Returns
    -------
    dict
        ``{"train": Path, "valid": Path, "test": Path}``, plus ``"vocab"``
        if the directory holds a ``vocab.txt`` (one word per line), which
        then fixes the vocabulary instead of the training text's words.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise CorpusError(f"{d}: data directory not found; pass the folder holding train/valid/test files")
    for names in _SPLIT_NAMINGS:
        paths = [d / n for n in names]
        if all(p.is_file() for p in paths):
            found = dict(zip(("train", "valid", "test"), paths))
            if (d / VOCAB_FILE).is_file():  # a fixed vocabulary beside the splits
                found["vocab"] = d / VOCAB_FILE
            return found
    looked = "; ".join(", ".join(n) for n in _SPLIT_NAMINGS)
    partial = [str(d / n) for names in _SPLIT_NAMINGS for n in names if (d / n).is_file()]
    hint = f" (found only: {', '.join(partial)})" if partial else ""
    raise CorpusError(f"{d}: no complete train/valid/test set; looked for one of: {looked}{hint}")


# --------------------------------------------------------------------------
# batching


def batchify(ids: np.ndarray, B: int) -> np.ndarray:
    """Cut a token stream into B parallel streams.

    Stream ``b`` is the ``b``-th contiguous chunk of the corpus; the tail that
    does not fill all B streams is dropped.  Each stream of N positions gives
    N - 1 next-token predictions.

    Parameters
    ----------
    ids : np.ndarray, shape (T,)
    B : int
        Number of streams (batch size).

    Returns
    -------
    np.ndarray, shape (B, N), int32, C-contiguous, N = T // B
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-d (T,), got shape {ids.shape}")
    if B < 1:
        raise ValueError(f"B (batch size) must be >= 1, got {B}")
    n = ids.shape[0] // B
    if n < 2:
        raise ValueError(
            f"{ids.shape[0]} tokens are too few for {B} streams: each needs >= 2 positions; "
            f"use a batch size <= {ids.shape[0] // 2}"
        )
    return np.ascontiguousarray(ids[: B * n].reshape(B, n), dtype=np.int32)


def num_segments(n: int, bptt: int) -> int:
    """Number of BPTT segments covering a stream of `n` positions.

    The n positions give n - 1 predictions, cut into pieces of `bptt`
    (the last may be shorter): ``ceil((n - 1) / bptt)``.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be >= 1, got {bptt}")
    return max(n - 1, 0) // bptt + (1 if max(n - 1, 0) % bptt else 0)


def segment(streams: np.ndarray, i: int, bptt: int):
    """Inputs and targets of the i-th BPTT segment.

    Parameters
    ----------
    streams : np.ndarray, shape (B, N)
        From :func:`batchify`.
    i : int
        Segment index, ``0 <= i < num_segments(N, bptt)``.
    bptt : int
        Segment length; the last segment may be shorter.

    Returns
    -------
    x, y : np.ndarray, shape (B, t) each
        Views: ``x = streams[:, s:s+t]``, ``y = streams[:, s+1:s+1+t]`` with
        ``s = i * bptt`` (targets are inputs shifted by one position).
    """
    n = streams.shape[1]
    k = num_segments(n, bptt)
    if not 0 <= i < k:
        raise IndexError(f"segment index {i} out of range: {k} segments of bptt={bptt} in {n} positions")
    s = i * bptt
    t = min(bptt, n - 1 - s)
    return streams[:, s : s + t], streams[:, s + 1 : s + 1 + t]
