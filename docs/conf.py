"""Sphinx configuration of the slimnp reference manual.

Build: ``pip install '.[docs]' && sphinx-build -b html docs docs/_build/html``
(``-W --keep-going`` as tests/test_docs.py does, to fail on any warning).
The API pages are autodoc of the installed package, the CLI page is
sphinx-click reading the click commands themselves, and the guide is
README.rst included as it is, so nothing here repeats their text.
"""
import re

import slimnp

project = "slimnp"
author = "slimnp authors"
copyright = "slimnp authors"
release = slimnp.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx_click",
]

root_doc = "index"
exclude_patterns = ["_build"]
# `x` in a docstring or a command's help always means code, never a title
default_role = "literal"

autodoc_member_order = "bysource"
autodoc_preserve_defaults = True  # `xp=np`, not numpy's repr with this machine's path
autodoc_default_options = {"members": True, "show-inheritance": True}
# every optional dependency (onnx, matplotlib, mpi4py, CuPy) is imported
# inside the functions that need it, so the modules import without them and
# nothing is mocked (a mocked cupy would look like a usable GPU backend)

html_theme = "alabaster"
html_title = f"slimnp {release} reference manual"


# sphinx-click reads a command's help as reStructuredText, but click's help is
# terminal text: ``slimnp plot --help`` shows ``runs/*.metrics.jsonl``, which
# reST would take for the start of an emphasis.  Escape the characters that
# open inline markup in plain text (a lone ``*``, ``|``, a ``_`` ending a
# word) so the page shows what the terminal shows.  sphinx-click's own markup
# stays: its directives and fields (``.. option::``, ``:default:``), the
# ``| `` that starts a \b line, ``**Required**`` and ``literals``.
_MARKUP = re.compile(r"(?<!\*)\*(?!\*)|\||(?<=\w)_(?!\w)")


def _terminal_text(app, ctx, lines):
    for i, line in enumerate(lines):
        body = line.lstrip()
        if body.startswith((".. ", ":")):
            continue
        lead = line[: len(line) - len(body)]
        if body.startswith("| "):  # a \b line
            lead, body = lead + "| ", body[2:]
        parts = body.split("``")
        parts[::2] = [_MARKUP.sub(lambda m: "\\" + m.group(0), p) for p in parts[::2]]
        lines[i] = lead + "``".join(parts)


# The docstrings' numpydoc sections ("Parameters" over a line of dashes) are
# written two ways: numpydoc proper (``path : str`` then the description
# indented below it) and a compact form, one entry a line (``x, y : (T, B)
# int32 inputs and targets``, continued indented mid-sentence), with plain
# prose under "Returns" too.  sphinx.ext.napoleon reads the compact form's
# description as a type and splits the prose into one return value a line,
# so the sections are rendered here: a rubric, then one bullet per entry.
_SECTIONS = {"Parameters", "Other Parameters", "Returns", "Yields", "Raises", "Warns",
             "Attributes", "Notes", "Examples", "See Also", "References", "Warnings"}
_FIELDS = {"Parameters", "Other Parameters", "Returns", "Yields", "Raises", "Warns", "Attributes"}
_NAMES = re.compile(r"\*{0,2}[\w.]+(, *\*{0,2}[\w.]+)*$")  # x | x, y | *args | slimnp.io.FormatError


def _is_type(text):
    """``str or os.PathLike``, ``(n,) float64``: short, no article, no clause, closed."""
    words = text.split()
    return (len(words) <= 6 and not {"a", "an", "the"} & set(words) and ";" not in text
            and text.count("(") == text.count(")"))


def _entry(head, more):
    """One bullet: ``name : rest`` (or a bare head) and its indented lines."""
    name, sep, rest = head.partition(" : ")
    if sep and _NAMES.match(name):
        head, joined = f"``{name}`` : {rest}", not _is_type(rest)
    else:
        head, joined = (f"``{head}``" if _NAMES.match(head) else head), False
    out = [f"* {head}"]
    if more:
        # a compact entry runs on mid-sentence; otherwise the description follows a dash
        if not (joined and not more[0].lstrip()[:1].isupper()):
            out[0] += " --"
        indent = min(len(x) - len(x.lstrip()) for x in more if x.strip())
        out += [("  " + x[indent:]) if x.strip() else "" for x in more]
    return out + [""]


def _fields(body):
    out, i = [], 0
    while i < len(body):
        line = body[i]
        nxt = body[i + 1] if i + 1 < len(body) else ""
        if not line.strip():
            out.append("")
            i += 1
        elif " : " in line or nxt[:1].isspace() and nxt.strip():
            j = i + 1
            while j < len(body) and (not body[j].strip() or body[j][:1].isspace()):
                j += 1
            more = body[i + 1:j]
            while more and not more[-1].strip():
                more.pop()
            if out and out[-1]:
                out.append("")
            out += _entry(line, more)
            i = j
        else:  # prose
            if out and out[-1].startswith(("* ", "  ")):
                out.append("")
            out.append(line)
            i += 1
    return out


def _numpydoc_sections(app, what, name, obj, options, lines):
    if what in ("data", "attribute") and lines and obj.__doc__ == type(obj).__doc__:
        lines[:] = []  # a table without a #: comment: not the docstring of dict or tuple
        return
    out, i = [], 0
    header = lambda k: (k + 1 < len(lines) and lines[k].strip() in _SECTIONS and not lines[k][:1].isspace()
                        and set(lines[k + 1].strip()) == {"-"})
    while i < len(lines):
        if not header(i):
            out.append(lines[i])
            i += 1
            continue
        title, j = lines[i].strip(), i + 2
        while j < len(lines) and not header(j):
            j += 1
        body = lines[i + 2:j]
        if out and out[-1].strip():
            out.append("")
        out += [f".. rubric:: {title}", ""] + (_fields(body) if title in _FIELDS else body) + [""]
        i = j
    lines[:] = out


def setup(app):
    app.connect("autodoc-process-docstring", _numpydoc_sections)
    for what in ("description", "options", "arguments", "epilog"):
        app.connect(f"sphinx-click-process-{what}", _terminal_text)
