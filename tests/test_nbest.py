"""Moses n-best lists: exact round trip, edits that touch only what they must, clear errors."""
import math

import numpy as np
import pytest

from slimnp.mt import nbest
from slimnp.mt.nbest import (
    Hypothesis, NBestError, feature_matrix, feature_names, format_weights,
    hypothesis_scores, layout_columns, parse_nbest, parse_weights, read_nbest, rescore,
    weight_vector, with_feature, write_nbest, write_text,
)

MOSES = (
    "0 ||| das Haus ist klein  ||| LexicalReordering0= -1.5 0 Distortion0= 0 LM0= -40.2 "
    "WordPenalty0= -5 TranslationModel0= -2.1 -3.4 ||| -12.7 ||| 0-0 1-1\n"
    "0 ||| das Haus ist winzig ||| LexicalReordering0= -1 0 Distortion0= -2 LM0= -41 "
    "WordPenalty0= -5 TranslationModel0= -2 -3.9 ||| -13.25 ||| 0-0 1-1\n"
    "2 |||  ||| LexicalReordering0= 0 0 Distortion0= 0 LM0= -3 WordPenalty0= 0 "
    "TranslationModel0= 0 0 ||| -1e-05\n"
)


def write_bytes(tmp_path, data: bytes, name="n.best"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------- parsing

def test_parse_fields():
    groups = parse_nbest(MOSES)
    assert [len(g) for g in groups] == [2, 1]
    h = groups[0][0]
    assert (h.sent_id, h.text, h.score) == (0, "das Haus ist klein", -12.7)
    assert h.features == (("LexicalReordering0", (-1.5, 0.0)), ("Distortion0", (0.0,)),
                          ("LM0", (-40.2,)), ("WordPenalty0", (-5.0,)),
                          ("TranslationModel0", (-2.1, -3.4)))
    assert h.extra == ("0-0 1-1",)
    assert h.feature("LM0") == (-40.2,)
    with pytest.raises(KeyError):
        h.feature("nope")
    last = groups[1][0]
    assert (last.sent_id, last.text, last.score, last.extra) == (2, "", -1e-05, ())


def test_old_moses_colon_names():
    (g,) = parse_nbest("3 ||| a b ||| d: 0 -1 lm: -40 tm: -1 -2 -3 w: -2 ||| -7\n")
    assert g[0].features == (("d", (0.0, -1.0)), ("lm", (-40.0,)),
                             ("tm", (-1.0, -2.0, -3.0)), ("w", (-2.0,)))


@pytest.mark.parametrize("data", [
    MOSES.encode(),
    MOSES.replace("\n", "\r\n").encode(),  # Windows endings
    MOSES.rstrip("\n").encode(),  # no final newline
    MOSES.replace("-12.7 |||", "-12.7   |||").replace("\n", "  \n").encode(),  # odd spacing
    "0 ||| ça va ||| LM0= -1 |||  -2 ||| a ||| b ||| \n".encode(),  # non-ASCII, 6 fields
    b"0 ||| a\rb ||| LM0= -1 ||| -2\r\n1 ||| c ||| LM0= 0 ||| 0",  # a lone \r is text
])
def test_round_trip_is_byte_exact(tmp_path, data):
    src = write_bytes(tmp_path, data)
    groups = read_nbest(src)
    out = tmp_path / "out.best"
    write_nbest(out, groups)
    assert out.read_bytes() == data


def test_round_trip_from_bare_lines(tmp_path):
    # lines without endings (e.g. a Python list) are written one per line
    lines = MOSES.splitlines()
    out = tmp_path / "o"
    write_nbest(out, parse_nbest(lines))
    assert out.read_text() == MOSES.rstrip("\n")
    # lines read from a file opened with newline='' keep their endings
    (tmp_path / "crlf").write_bytes(MOSES.replace("\n", "\r\n").encode())
    with open(tmp_path / "crlf", encoding="utf-8", newline="") as f:
        groups = parse_nbest(f, source="crlf")
    write_nbest(out, groups)
    assert out.read_bytes() == MOSES.replace("\n", "\r\n").encode()


@pytest.mark.parametrize("text, lineno, needle", [
    ("0 ||| a ||| LM0= 1\n", 1, "found 3 '|||'-separated field(s)"),
    ("0 ||| a ||| LM0= 1 ||| 0\nx ||| a ||| LM0= 1 ||| 0\n", 2, "sentence id 'x'"),
    ("-1 ||| a ||| LM0= 1 ||| 0\n", 1, "not a non-negative integer"),
    ("\ufeff0 ||| a ||| LM0= 1 ||| 0\n", 1, "byte-order mark"),
    ("0 ||| a ||| -3 LM0= 1 ||| 0\n", 1, "value '-3' comes before any feature name"),
    ("0 ||| a ||| LM0= 1 TM0= x ||| 0\n", 1, "feature 'TM0' has a non-numeric value 'x'"),
    ("0 ||| a ||| LM0=-1 ||| 0\n", 1, "put a space between"),
    ("0 ||| a ||| LM0= 1 ||| high\n", 1, "total score 'high' is not a number"),
    ("0 ||| a ||| LM0= ||| 0\n", 1, "feature 'LM0' has no values"),
    ("0 ||| a ||| LM0= TM0= 1 ||| 0\n", 1, "feature 'LM0' has no values before 'TM0='"),
    ("0 ||| a ||| LM0= 1 LM0= 2 ||| 0\n", 1, "feature 'LM0' appears twice"),
    ("0 ||| a ||| = 1 ||| 0\n", 1, "feature name '=' is empty"),
    ("0 ||| a ||| LM0= 1 ||| 0\n\n1 ||| a ||| LM0= 1 ||| 0\n", 2, "empty line"),
    ("1 ||| a ||| LM0= 1 ||| 0\n1 ||| b ||| LM0= 1 ||| 0\n0 ||| a ||| LM0= 1 ||| 0\n",
     3, "ids go backwards"),
])
def test_errors_name_file_and_line(text, lineno, needle):
    with pytest.raises(NBestError) as e:
        parse_nbest(text, source="dev.best")
    msg = str(e.value)
    assert msg.startswith(f"dev.best:{lineno}: "), msg
    assert needle in msg
    assert (e.value.source, e.value.lineno) == ("dev.best", lineno)
    assert isinstance(e.value, ValueError)


def test_file_errors(tmp_path):
    p = write_bytes(tmp_path, b"0 ||| a ||| LM0= 1 ||| 0\n1 ||| caf\xe9 ||| LM0= 1 ||| 0\n")
    with pytest.raises(NBestError, match=r"n\.best:2: bytes b'\\xe9' are not valid UTF-8"):
        read_nbest(p)
    with pytest.raises(NBestError, match=r"empty\.best: empty n-best list"):
        read_nbest(write_bytes(tmp_path, b"", "empty.best"))
    with pytest.raises(NBestError, match="empty n-best list"):
        parse_nbest([])


def test_ids_may_skip_but_groups_follow_file_order():
    groups = parse_nbest("0 ||| a ||| f= 1 ||| 0\n0 ||| b ||| f= 2 ||| 0\n5 ||| c ||| f= 3 ||| 0\n")
    assert [[h.text for h in g] for g in groups] == [["a", "b"], ["c"]]
    assert [g[0].sent_id for g in groups] == [0, 5]


# ---------------------------------------------------------------- with_feature

def test_with_feature_appends_and_touches_nothing_else():
    h = parse_nbest(MOSES)[0][0]
    h2 = with_feature(h, "slimnp", -51.234567891)
    old_f, new_f = h.fields[2], h2.fields[2]
    # the new feature goes after the last one; the trailing space stays at the end
    assert new_f == old_f.rstrip() + " slimnp= -51.2346" + old_f[len(old_f.rstrip()):]
    assert h2.fields[:2] == h.fields[:2] and h2.fields[3:] == h.fields[3:]
    assert h2.ending == h.ending
    assert h2.features == h.features + (("slimnp", (-51.2346,)),)  # as written
    assert h2.score == h.score
    # what is held equals what a fresh parse of the written line gives
    assert parse_nbest(h2.line)[0][0] == h2


def test_with_feature_replaces_values_in_place():
    line = "0 ||| a ||| lm: -4 -5  d: 1 ||| -3 ||| x\r\n"
    h = parse_nbest(line)[0][0]
    h2 = with_feature(h, "lm", [1.5, 2, 1e-7])
    assert h2.line == "0 ||| a ||| lm: 1.5 2 1e-07  d: 1 ||| -3 ||| x\r\n"
    h3 = with_feature(h2, "d", 7, score=-2.5)
    assert h3.line == "0 ||| a ||| lm: 1.5 2 1e-07  d: 7 ||| -2.5 ||| x\r\n"
    assert h3.score == -2.5
    # replacing twice never duplicates a feature
    assert [n for n, _ in with_feature(h3, "d", 8).features] == ["lm", "d"]


def test_with_feature_score_keeps_spacing_and_empty_features():
    h = parse_nbest("0 ||| a |||  |||   -3.0   ")[0][0]
    h2 = with_feature(h, "slimnp", -2, score=-1.23456789)
    assert h2.line == "0 ||| a ||| slimnp= -2 |||   -1.23457   "
    assert h2.score == pytest.approx(-1.23457, abs=0)


def test_with_feature_rejects_bad_input():
    h = parse_nbest(MOSES)[0][0]
    for bad in ["", "a b", "lm=", "lm:", "a|||b"]:
        with pytest.raises(ValueError, match="feature name"):
            with_feature(h, bad, 1.0)
    with pytest.raises(ValueError, match="one or more values"):
        with_feature(h, "x", [])
    with pytest.raises(ValueError, match="NaN"):
        with_feature(h, "x", float("nan"))
    # -inf is a legal log-probability and reads back
    assert with_feature(h, "x", -math.inf).feature("x") == (-math.inf,)


def test_edited_list_reads_back(tmp_path):
    groups = parse_nbest(MOSES)
    edited = [[with_feature(h, "slimnp", -float(i)) for i, h in enumerate(g)] for g in groups]
    p = tmp_path / "e.best"
    write_nbest(p, edited)
    again = read_nbest(p)
    assert again == edited
    assert feature_names(again)[-1] == ("slimnp", 1)


# ---------------------------------------------------------------- matrices and weights

def test_feature_names_and_matrix():
    groups = parse_nbest(MOSES)
    layout = feature_names(groups)
    assert layout == [("LexicalReordering0", 2), ("Distortion0", 1), ("LM0", 1),
                      ("WordPenalty0", 1), ("TranslationModel0", 2)]
    assert layout_columns(layout)[:3] == ["LexicalReordering0[0]", "LexicalReordering0[1]",
                                          "Distortion0"]
    X = feature_matrix(groups[0], layout)
    assert X.dtype == np.float64 and X.shape == (2, 7)
    np.testing.assert_array_equal(X[1], [-1, 0, -2, -41, -5, -2, -3.9])
    # columns follow the layout, not the line order
    X2 = feature_matrix(groups[0], [("LM0", 1), ("Distortion0", 1)])
    np.testing.assert_array_equal(X2, [[-40.2, 0], [-41, -2]])


def test_missing_feature_names_sentence_and_line():
    groups = parse_nbest("0 ||| a ||| LM0= 1 ||| 0\n7 ||| b ||| LM0= 1 ||| 0\n"
                         "7 ||| c ||| TM0= 1 ||| 0\n", source="x.best")
    layout = feature_names(groups)
    with pytest.raises(NBestError, match=r"x\.best:2: sentence 7: hypothesis lacks feature 'TM0'"):
        feature_matrix(groups[1], layout)
    with pytest.raises(NBestError, match=r"x\.best:3: sentence 7: feature 'TM0' has 1 value\(s\), "
                                         "expected 2"):
        feature_matrix(groups[1][1:], [("TM0", 2)])
    bad = parse_nbest("0 ||| a ||| TM0= 1 ||| 0\n1 ||| b ||| TM0= 1 2 ||| 0\n")
    with pytest.raises(NBestError, match=":2: feature 'TM0' has 2 value"):
        feature_names(bad)


def test_parse_weights_forms():
    assert parse_weights("LM0=0.5 TranslationModel0=0.2,0.2,0.1 slimnp=0.1") == {
        "LM0": (0.5,), "TranslationModel0": (0.2, 0.2, 0.1), "slimnp": (0.1,)}
    assert parse_weights("LM0= 0.5\nTranslationModel0= 0.2 0.2 0.1\nlm: -1e-3") == {
        "LM0": (0.5,), "TranslationModel0": (0.2, 0.2, 0.1), "lm": (-0.001,)}
    assert parse_weights("a=1, 2 b=3") == {"a": (1.0, 2.0), "b": (3.0,)}


@pytest.mark.parametrize("text, needle", [
    ("0.5 LM0=1", "value '0.5' comes before any feature name"),
    ("LM0=x", "'x' is not a number"),
    ("LM0= TM0=1", "feature 'LM0' has no values"),
    ("LM0=1 TM0=", "feature 'TM0' has no values"),
    ("LM0=1 LM0=2", "given twice"),
    ("=1", "empty feature name"),
    ("   ", "none given"),
])
def test_parse_weights_errors(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_weights(text)


def test_weight_vector():
    layout = [("LM0", 1), ("TM0", 2), ("slimnp", 1)]
    w = weight_vector(parse_weights("TM0=0.2,0.3 slimnp=0.1 LM0=0.5"), layout)
    np.testing.assert_array_equal(w, [0.5, 0.2, 0.3, 0.1])
    assert parse_weights(format_weights(w, layout)) == {
        "LM0": (0.5,), "TM0": (0.2, 0.3), "slimnp": (0.1,)}
    with pytest.raises(ValueError) as e:
        weight_vector({"TM0": (1,), "typo": (1,)}, layout)
    msg = str(e.value)
    assert "no weight for LM0, slimnp" in msg  # every missing name at once
    assert "TM0 has 1 value(s), the n-best list has 2" in msg
    assert "not in the n-best list: typo" in msg
    w = weight_vector({"LM0": (1,), "TM0": (1, 2), "slimnp": (3,), "x": (4,)}, layout,
                      allow_extra=True)
    np.testing.assert_array_equal(w, [1, 1, 2, 3])


# ---------------------------------------------------------------- rescoring and writing

def test_rescore_ties_keep_moses_order():
    X1 = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    X2 = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # exact tie between rows 1 and 2
    assert rescore([X1, X2], [1.0, 1.0]) == [2, 1]
    assert rescore([X1, X2], [0.0, 0.0]) == [0, 0]
    assert rescore([X1], [0.0, 1.0]) == [1]
    # a zero weight ignores even an infinite feature; inf - inf counts as -inf
    X3 = np.array([[-np.inf, 1.0, 0.0], [-5.0, 0.0, 0.0], [-np.inf, 9.0, np.inf]])
    assert rescore([X3], [0.0, 1.0, 0.0]) == [2]
    assert rescore([X3], [1.0, 0.0, 0.0]) == [1]
    assert rescore([X3], [1.0, 1.0, 1.0]) == [1]
    with pytest.raises(ValueError, match="do not match"):
        rescore([X1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="no hypotheses"):
        rescore([np.zeros((0, 2))], [1.0, 1.0])


def test_hypothesis_scores_equal_rows_equal_scores(rng):
    X = rng.standard_normal((9, 13))
    X[5] = X[2]
    w = rng.standard_normal(13)
    s = hypothesis_scores(X, w)
    assert s[5] == s[2]
    np.testing.assert_allclose(s, X @ w, rtol=1e-12, atol=1e-12)


def test_write_text(tmp_path):
    p = tmp_path / "1best.txt"
    write_text(p, ["das Haus", "", "ça"])
    assert p.read_bytes() == "das Haus\n\nça\n".encode()
    write_text(p, ["a"], ending="\r\n")
    assert p.read_bytes() == b"a\r\n"
    with pytest.raises(ValueError, match="line 2 contains a line break"):
        write_text(p, ["a", "b\nc"])
    assert p.read_bytes() == b"a\r\n"  # the failed write left the old file alone
    assert not list(tmp_path.glob(".*tmp*"))


def test_hypothesis_is_frozen():
    h = parse_nbest(MOSES)[0][0]
    with pytest.raises(AttributeError):
        h.score = 1.0
    assert isinstance(h, Hypothesis)
    assert nbest.VALUE_FORMAT == ".6g"
