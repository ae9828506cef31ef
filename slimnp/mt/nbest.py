"""Moses n-best lists: read, add a feature, rescore, write back unchanged.

One line per hypothesis, fields separated by ``|||``::

    ID ||| HYPOTHESIS ||| FEATURES ||| TOTAL_SCORE [||| EXTRA ...]

    0 ||| the house is small ||| LM0= -40.2 WordPenalty0= -5 TM0= -2.1 -3.4 ||| -12.7
    0 ||| the house is little ||| LM0= -41.0 WordPenalty0= -5 TM0= -2.0 -3.9 ||| -13.1
    1 ||| ...

``FEATURES`` is a run of feature names, each followed by one or more numbers.
A name ends in ``=`` (Moses since 2013) or ``:`` (older Moses: ``d: 0 lm: -40``);
the ``=``/``:`` is not part of the name kept here, so ``LM0=`` is feature
``"LM0"``.  Fields after the fourth (word alignments, tree info, ...) are kept
but not interpreted.  Hypotheses of one sentence are on consecutive lines and
sentence ids never decrease.

Round trip
----------
Every :class:`Hypothesis` keeps the exact text of its line (fields, spacing,
line ending), so ``write_nbest(path, read_nbest(path))`` reproduces the file
byte for byte: ``\\r\\n`` endings, trailing spaces, extra fields and a missing
final newline included.  :func:`with_feature` edits only the features field
(and optionally the score field); every other byte of the line stays as it was.

Numbers written by this module use ``format(v, VALUE_FORMAT)`` with
``VALUE_FORMAT = ".6g"`` -- six significant digits, Moses' own default
precision (``-40.2365``, ``-5``, ``1e-07``).  A hypothesis made by
:func:`with_feature` holds the values *as written* (re-parsed from its new
line), so what is in memory always equals what a later :func:`read_nbest` of
the written file gives, and rescoring either gives the same 1-best.

Scoring
-------
A weight vector ``w: (F,)`` scores the feature matrix ``X: (n, F)`` of one
sentence (columns in the order of a *layout*, a list of ``(name, arity)``)
as ``score = X @ w``, summed feature by feature in column order so that equal
rows always get bit-identical scores; the hypothesis with the highest score
wins, ties going to the earliest (Moses' own order).
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .._atomic import atomic_path

SEP = "|||"  # field separator
N_FIELDS = 4  # ID, hypothesis, features, total score; more fields are kept verbatim
VALUE_FORMAT = ".6g"  # how new feature values and scores are written
NAME_ENDS = ("=", ":")  # "LM0=" (Moses) and "lm:" (old Moses) both start a feature

_TOKEN = re.compile(r"\S+")
_ID = re.compile(r"[0-9]+", re.ASCII)


class NBestError(ValueError):
    """A malformed n-best list; the message reads ``FILE:LINE: what is wrong``.

    Attributes
    ----------
    source : str
        The file name (or ``"<string>"``).
    lineno : int or None
        1-based line number, ``None`` for problems of the whole file.
    problem : str
        What is wrong, without the location.
    """

    def __init__(self, source: str, lineno: int | None, problem: str):
        self.source = str(source)
        self.lineno = lineno
        self.problem = problem
        where = self.source if lineno is None else f"{self.source}:{lineno}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class Hypothesis:
    """One line of an n-best list.

    Attributes
    ----------
    sent_id : int
        Sentence id (first field), 0-based in Moses output.
    text : str
        The hypothesis, stripped of the spaces around it.
    features : tuple of (str, tuple of float)
        Feature names (without the trailing ``=``/``:``) and their values, in
        line order.
    score : float
        The total score (fourth field) as written by the decoder.
    fields : tuple of str
        The raw ``|||``-separated fields, spaces included; at least four.
    ending : str
        The line ending: ``"\\n"``, ``"\\r\\n"`` or ``""`` (last line without one).
    source, lineno : str, int
        Where the line came from, for error messages; not compared.
    """

    sent_id: int
    text: str
    features: tuple
    score: float
    fields: tuple = field(repr=False)
    ending: str = field(default="\n", repr=False)
    source: str = field(default="<string>", repr=False, compare=False)
    lineno: int = field(default=0, repr=False, compare=False)

    @property
    def line(self) -> str:
        """The exact line, ending included."""
        return SEP.join(self.fields) + self.ending

    @property
    def extra(self) -> tuple:
        """Fields after the score (e.g. word alignments), stripped."""
        return tuple(f.strip() for f in self.fields[N_FIELDS:])

    def feature(self, name: str) -> tuple:
        """Values of feature ``name``; ``KeyError`` if the line lacks it."""
        for n, values in self.features:
            if n == name:
                return values
        raise KeyError(name)


# --------------------------------------------------------------------------
# parsing

def _glued_hint(tok: str) -> str:
    """Hint for "LM0=-40.2": a name glued to its value."""
    if "=" in tok or ":" in tok:
        return " (put a space between a feature name and its value: 'LM0= -40.2')"
    return ""


def _parse_features(text: str, source: str, lineno: int) -> tuple:
    """``"LM0= -4 TM0= 1 2"`` -> ``(("LM0", (-4.0,)), ("TM0", (1.0, 2.0)))``."""
    feats = []  # (name, [values]) in line order
    seen = set()
    values = None  # the current feature's list
    for tok in _TOKEN.findall(text):  # the same tokens with_feature edits
        if tok[-1] in "=:":  # NAME_ENDS; the hot loop avoids str.endswith
            name = tok[:-1]
            if not name:
                raise NBestError(source, lineno, f"feature name {tok!r} is empty")
            if values is not None and not values:
                raise NBestError(source, lineno,
                                 f"feature {feats[-1][0]!r} has no values before {tok!r}")
            if name in seen:
                raise NBestError(source, lineno, f"feature {name!r} appears twice")
            seen.add(name)
            values = []
            feats.append((name, values))
            continue
        if values is None:
            raise NBestError(source, lineno,
                             f"value {tok!r} comes before any feature name "
                             f"(names end in '=' or ':', e.g. 'LM0= -40.2'){_glued_hint(tok)}")
        try:
            values.append(float(tok))
        except ValueError:
            raise NBestError(source, lineno,
                             f"feature {feats[-1][0]!r} has a non-numeric value {tok!r}"
                             f"{_glued_hint(tok)}") from None
    if values is not None and not values:
        raise NBestError(source, lineno, f"feature {feats[-1][0]!r} has no values")
    return tuple([(name, tuple(v)) for name, v in feats])


def _parse_line(line: str, source: str, lineno: int) -> Hypothesis:
    """Parse one line (ending included, if any) into a :class:`Hypothesis`."""
    if line.endswith("\r\n"):
        body, ending = line[:-2], "\r\n"
    elif line.endswith("\n"):
        body, ending = line[:-1], "\n"
    else:
        body, ending = line, ""
    if "\n" in body:
        raise NBestError(source, lineno, "a line contains an embedded newline")
    if not body.strip():
        raise NBestError(source, lineno, "empty line (expected 'ID ||| HYPOTHESIS ||| "
                                         "FEATURES ||| SCORE')")
    fields = tuple(body.split(SEP))
    if len(fields) < N_FIELDS:
        raise NBestError(source, lineno,
                         f"found {len(fields)} '|||'-separated field(s), expected at least "
                         f"{N_FIELDS}: 'ID ||| HYPOTHESIS ||| FEATURES ||| SCORE'")
    sid = fields[0].strip()
    if not _ID.fullmatch(sid):
        why = (" (the file starts with a UTF-8 byte-order mark; remove it)"
               if sid.startswith("\ufeff") else "")
        raise NBestError(source, lineno,
                         f"sentence id {sid!r} is not a non-negative integer{why}")
    features = _parse_features(fields[2], source, lineno)
    try:
        score = float(fields[3])
    except ValueError:
        raise NBestError(source, lineno,
                         f"total score {fields[3].strip()!r} is not a number") from None
    return Hypothesis(sent_id=int(sid), text=fields[1].strip(), features=features,
                      score=score, fields=fields, ending=ending, source=source,
                      lineno=lineno)


def _split_lines(text: str) -> list:
    """Split at ``\\n`` only, keeping endings (a lone ``\\r`` is not a line break)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])  # last line without a final newline
    return lines


def parse_nbest(lines, source: str = "<string>") -> list:
    """Parse an n-best list given as text or as lines.

    Parameters
    ----------
    lines : str or iterable of str
        The whole text (split at ``\\n``, endings kept), or one string per line
        with or without its ending (a line without one is written back with
        ``"\\n"`` unless it is the last; see :func:`write_nbest`).
    source : str
        Name used in error messages.

    Returns
    -------
    list of list of Hypothesis
        One list per sentence, in file order; within it, the lines in order.

    Raises
    ------
    NBestError
        Empty input, a malformed line, or sentence ids that go backwards.
    """
    if isinstance(lines, str):
        lines = _split_lines(lines)
    groups: list = []
    for lineno, line in enumerate(lines, start=1):
        hyp = _parse_line(line, source, lineno)
        if groups and hyp.sent_id == groups[-1][-1].sent_id:
            groups[-1].append(hyp)
            continue
        if groups and hyp.sent_id < groups[-1][-1].sent_id:
            raise NBestError(source, lineno,
                             f"sentence id {hyp.sent_id} after {groups[-1][-1].sent_id}: "
                             "ids go backwards, so the list is not grouped by sentence "
                             "(sort it stably by id)")
        groups.append([hyp])
    if not groups:
        raise NBestError(source, None, "empty n-best list")
    return groups


def read_nbest(path) -> list:
    """Read a Moses n-best list file.

    Parameters
    ----------
    path : str or Path
        UTF-8 text; ``\\n`` or ``\\r\\n`` endings (kept as they are).

    Returns
    -------
    list of list of Hypothesis
        Grouped by sentence id, in file order.  ``write_nbest(path2, groups)``
        reproduces the file byte for byte.

    Raises
    ------
    NBestError
        Malformed content (see :func:`parse_nbest`) or bytes that are not
        UTF-8 (the message gives the line).
    OSError
        The file cannot be read.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")  # no newline translation: endings survive
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise NBestError(str(path), lineno,
                         f"bytes {data[e.start:e.end]!r} are not valid UTF-8") from None
    return parse_nbest(text, source=str(path))


# --------------------------------------------------------------------------
# editing

def _format_value(v: float) -> str:
    return format(float(v), VALUE_FORMAT)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or _TOKEN.fullmatch(name) is None \
            or name.endswith(NAME_ENDS) or SEP in name:
        raise ValueError(f"feature name {name!r} must be non-empty, without spaces or "
                         "'|||', and given without the trailing '=' (e.g. 'slimnp')")


def with_feature(hyp: Hypothesis, name: str, values, score: float | None = None
                 ) -> Hypothesis:
    """A copy of ``hyp`` carrying feature ``name`` with ``values``.

    A new feature is appended at the end of the features field as
    `` name= v1 v2``; an existing one keeps its name token and place and has
    only its values replaced.  Numbers are written with ``VALUE_FORMAT``
    (``.6g``) and the returned hypothesis holds them as written.  Every other
    byte of the line (other features, spacing, extra fields, ending) is kept.

    Parameters
    ----------
    hyp : Hypothesis
    name : str
        Feature name without the trailing ``=`` (e.g. ``"slimnp"``).
    values : float or sequence of float
        One or more finite or infinite numbers (NaN is refused).
    score : float, optional
        New total score; ``None`` keeps the old score field untouched.

    Returns
    -------
    Hypothesis
    """
    _check_name(name)
    vals = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if vals.ndim != 1 or vals.size == 0:
        raise ValueError(f"feature {name!r}: expected one or more values, got shape "
                         f"{np.shape(values)}")
    if np.isnan(vals).any():
        raise ValueError(f"feature {name!r}: values must not be NaN, got {vals.tolist()}")
    strings = [_format_value(v) for v in vals.tolist()]
    new_values = " ".join(strings)
    held = (name, tuple(float(x) for x in strings))  # as written, as a parse would give

    text = hyp.fields[2]
    features = list(hyp.features)
    names = [n for n, _ in features]
    if name in names:
        # keep the name token ("x=" or "x:") and replace the span of its values
        toks = list(_TOKEN.finditer(text))
        start = next(i for i, m in enumerate(toks)
                     if m.group()[-1] in "=:" and m.group()[:-1] == name)
        end = start + 1
        while end < len(toks) and toks[end].group()[-1] not in "=:":
            end += 1
        lo = toks[start + 1].start()  # a parsed feature always has >= 1 value
        hi = toks[end - 1].end()
        text = text[:lo] + new_values + text[hi:]
        features[names.index(name)] = held
    elif not text.strip():
        text = f" {name}= {new_values} "  # an empty field: Moses' own spacing
        features.append(held)
    else:
        body = text.rstrip()
        # " LM0= -4" + " name= v" + the original trailing spaces
        text = f"{body} {name}= {new_values}{text[len(body):]}"
        features.append(held)
    fields = list(hyp.fields)
    fields[2] = text
    new_score = hyp.score
    if score is not None:
        if math.isnan(float(score)):
            raise ValueError("the total score must not be NaN")
        old = fields[3]
        core = old.strip()
        lead = old[: len(old) - len(old.lstrip())]
        written = _format_value(score)
        fields[3] = lead + written + old[len(lead) + len(core):]
        new_score = float(written)
    return replace(hyp, features=tuple(features), score=new_score, fields=tuple(fields))


# --------------------------------------------------------------------------
# features as matrices, weights as vectors

def feature_names(groups: Iterable[Sequence[Hypothesis]]) -> list:
    """The feature layout of an n-best list.

    Parameters
    ----------
    groups : iterable of sequences of Hypothesis

    Returns
    -------
    list of (str, int)
        ``(name, arity)`` in first-seen order; ``F = sum(arity)``.

    Raises
    ------
    NBestError
        A feature appears with two different numbers of values.
    """
    arity: dict = {}
    for group in groups:
        for hyp in group:
            for name, values in hyp.features:
                k = arity.setdefault(name, len(values))
                if k != len(values):
                    raise NBestError(hyp.source, hyp.lineno,
                                     f"feature {name!r} has {len(values)} value(s) here "
                                     f"but {k} on earlier lines")
    return list(arity.items())


def layout_columns(layout: Sequence) -> list:
    """Column labels for a layout: ``[("TM0", 2)] -> ["TM0[0]", "TM0[1]"]``.

    A feature with one value is labelled by its bare name.
    """
    return [name if k == 1 else f"{name}[{i}]" for name, k in layout for i in range(k)]


def feature_matrix(group: Sequence[Hypothesis], layout: Sequence) -> np.ndarray:
    """Feature values of one sentence's hypotheses as a matrix.

    Parameters
    ----------
    group : sequence of Hypothesis
        The ``n`` hypotheses of one sentence.
    layout : sequence of (str, int)
        Features and arities, e.g. from :func:`feature_names`; features of a
        line that are not in the layout are ignored.

    Returns
    -------
    numpy.ndarray, shape (n, F), float64
        ``F = sum(arity)``; columns follow the layout.

    Raises
    ------
    NBestError
        A hypothesis lacks a layout feature or has a different arity (the
        message names the sentence id and line).
    """
    F = sum(k for _, k in layout)
    X = np.empty((len(group), F), dtype=np.float64)  # (n, F)
    for i, hyp in enumerate(group):
        have = dict(hyp.features)
        col = 0
        for name, k in layout:
            values = have.get(name)
            if values is None:
                raise NBestError(hyp.source, hyp.lineno,
                                 f"sentence {hyp.sent_id}: hypothesis lacks feature {name!r} "
                                 "(every line of an n-best list must carry every feature)")
            if len(values) != k:
                raise NBestError(hyp.source, hyp.lineno,
                                 f"sentence {hyp.sent_id}: feature {name!r} has "
                                 f"{len(values)} value(s), expected {k}")
            X[i, col : col + k] = values
            col += k
    return X


def parse_weights(text: str) -> dict:
    """Parse feature weights.

    Accepted forms, freely mixed and separated by whitespace (newlines too)::

        LM0=0.5 TranslationModel0=0.2,0.2,0.1 slimnp=0.1    # compact
        LM0= 0.5 TranslationModel0= 0.2 0.2 0.1             # Moses style
        lm: 0.5                                             # old Moses

    Parameters
    ----------
    text : str

    Returns
    -------
    dict of str to tuple of float
        In the order given.

    Raises
    ------
    ValueError
        A value before any name, a non-numeric value, a name without values,
        a name given twice, or no weights at all.
    """
    weights: dict = {}
    current = None

    def add(name, pieces):
        for p in pieces:
            if not p:
                continue  # "a=0.1," or "a=0.1, 0.2"
            try:
                weights[name].append(float(p))
            except ValueError:
                raise ValueError(f"weight of {name!r}: {p!r} is not a number") from None

    for tok in text.split():
        if tok.endswith(NAME_ENDS) or "=" in tok:
            name, _, rest = (tok[:-1], "", "") if tok.endswith(NAME_ENDS) \
                else tok.rpartition("=")
            if not name:
                raise ValueError(f"weights: {tok!r} has an empty feature name")
            if current is not None and not weights[current]:
                raise ValueError(f"weights: feature {current!r} has no values")
            if name in weights:
                raise ValueError(f"weights: feature {name!r} is given twice")
            weights[name] = []
            current = name
            add(name, rest.split(","))
        elif current is None:
            raise ValueError(f"weights: value {tok!r} comes before any feature name "
                             "(expected e.g. 'LM0=0.5 TM0=0.2,0.1')")
        else:
            add(current, tok.split(","))
    if current is not None and not weights[current]:
        raise ValueError(f"weights: feature {current!r} has no values")
    if not weights:
        raise ValueError("weights: none given (expected e.g. 'LM0=0.5 TM0=0.2,0.1')")
    return {name: tuple(v) for name, v in weights.items()}


def weight_vector(weights: Mapping, layout: Sequence, allow_extra: bool = False
                  ) -> np.ndarray:
    """Lay out named weights as a vector matching :func:`feature_matrix` columns.

    Parameters
    ----------
    weights : mapping of str to sequence of float
        E.g. from :func:`parse_weights`.
    layout : sequence of (str, int)
    allow_extra : bool
        Ignore weights of features not in the layout instead of refusing them
        (refused by default: usually a misspelt name).

    Returns
    -------
    numpy.ndarray, shape (F,), float64

    Raises
    ------
    ValueError
        Listing every missing feature, every arity mismatch and (unless
        ``allow_extra``) every unknown name at once.
    """
    problems = []
    missing = [name for name, _ in layout if name not in weights]
    if missing:
        problems.append("no weight for " + ", ".join(missing))
    bad = [f"{name} has {len(weights[name])} value(s), the n-best list has {k}"
           for name, k in layout if name in weights and len(weights[name]) != k]
    problems.extend(bad)
    known = {name for name, _ in layout}
    extra = [name for name in weights if name not in known]
    if extra and not allow_extra:
        problems.append("weights for features not in the n-best list: " + ", ".join(extra))
    if problems:
        raise ValueError("weights do not match the n-best features: " + "; ".join(problems)
                         + f" (features: {' '.join(f'{n}={k}' for n, k in layout)})")
    w = [float(v) for name, _ in layout for v in weights[name]]
    return np.asarray(w, dtype=np.float64).reshape(-1)


def format_weights(w, layout: Sequence) -> str:
    """``w: (F,)`` as ``"LM0=0.5 TM0=0.2,0.1"``, the form :func:`parse_weights` reads.

    Values use ``repr`` (shortest exact form) so they read back unchanged.
    """
    w = np.asarray(w, dtype=np.float64)
    F = sum(k for _, k in layout)
    if w.shape != (F,):
        raise ValueError(f"expected {F} weights for the layout, got shape {w.shape}")
    out, col = [], 0
    for name, k in layout:
        out.append(f"{name}=" + ",".join(repr(float(v)) for v in w[col : col + k]))
        col += k
    return " ".join(out)


def hypothesis_scores(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Linear scores ``X @ w`` summed in column order: ``(n, F), (F,) -> (n,)``.

    Not a BLAS call: ``x0*w0 + x1*w1 + ...`` element by element, so equal rows
    get bit-identical scores wherever they are (and :mod:`slimnp.mt.tune`, which
    sums the same way, agrees exactly with :func:`rescore`).  Features with a
    zero weight are skipped, so ``0 * -inf`` contributes 0, not NaN.
    """
    s = np.zeros(X.shape[:-1], dtype=np.float64)
    for k in range(X.shape[-1]):
        if w[k] != 0:  # a zero weight ignores its feature, even an infinite value
            s = s + X[..., k] * w[k]
    return s


def rescore(group_matrices: Sequence[np.ndarray], w) -> list:
    """Index of the best hypothesis of each sentence under weights ``w``.

    Parameters
    ----------
    group_matrices : sequence of numpy.ndarray, each (n_i, F)
        From :func:`feature_matrix`.
    w : array_like, shape (F,)

    Returns
    -------
    list of int
        ``argmax_j X_i[j] @ w`` per sentence (scored by
        :func:`hypothesis_scores`); ties go to the earliest hypothesis (Moses'
        order), and a NaN score (``inf - inf``) counts as ``-inf``.
    """
    w = np.asarray(w, dtype=np.float64)
    best = []
    for i, X in enumerate(group_matrices):
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != w.shape[0] or w.ndim != 1:
            raise ValueError(f"sentence {i}: features of shape {X.shape} do not match "
                             f"weights of shape {w.shape} (expected (n, {w.shape[0]}))")
        if X.shape[0] == 0:
            raise ValueError(f"sentence {i} has no hypotheses")
        with np.errstate(invalid="ignore"):
            s = hypothesis_scores(X, w)
        s[np.isnan(s)] = -np.inf  # e.g. inf - inf from two infinite features
        best.append(int(np.argmax(s)))  # first maximum: ties keep Moses' order
    return best


# --------------------------------------------------------------------------
# writing

def write_nbest(path, groups: Iterable[Sequence[Hypothesis]]) -> None:
    """Write hypotheses as an n-best list, atomically (temp file, then rename).

    Each line is written exactly as held (:attr:`Hypothesis.line`), so an
    unmodified list reproduces its input byte for byte.  A line without an
    ending that is not the last one gets ``"\\n"``, so lines never run together.
    """
    hyps = [h for group in groups for h in group]
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            for i, hyp in enumerate(hyps):
                f.write(hyp.line)
                if not hyp.ending and i + 1 < len(hyps):
                    f.write("\n")


def read_lines(path) -> list:
    """Lines of a UTF-8 text file (e.g. references; ``"-"``: stdin) without
    their line ends (``\n`` or ``\r\n``) and without a leading byte-order
    mark.  A decoding error is a :class:`ValueError` naming the line."""
    raw = sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline does not start another line
    out = []
    for i, b in enumerate(lines, 1):
        try:
            out.append(b.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid UTF-8 (byte 0x{b[e.start]:02x} at column "
                             f"{e.start + 1}); re-encode the file as UTF-8") from None
    if out and out[0].startswith("\ufeff"):
        out[0] = out[0][1:]
    return out


def write_text(path, lines: Iterable[str], ending: str = "\n") -> None:
    """Write one string per line (e.g. the 1-best translations), atomically.

    Parameters
    ----------
    path : str or Path
    lines : iterable of str
        Without their line endings.
    ending : str
        Written after every line, the last included (``"\\r\\n"`` to match a
        Windows-style n-best list).
    """
    lines = list(lines)
    for i, line in enumerate(lines):
        if "\n" in line or "\r" in line:
            raise ValueError(f"line {i + 1} contains a line break: {line!r}")
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            for line in lines:
                f.write(line + ending)
