"""The README's commands and library example stay true."""
import re
from pathlib import Path

from helpers import tiny_corpus

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.rst").read_text()


def test_ci_runs_exactly_the_readme_test_command():
    m = re.search(r"Install and run the tests::\n\n    (.+)\n", README)
    assert m, "README lost its test command"
    assert m.group(1) in (ROOT / ".ci" / "run").read_text().splitlines()


def literal_block(after: str) -> str:
    """The README's indented literal block that follows the text ``after``."""
    block = README.split(after + "\n\n")[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines)


def test_library_example_runs(tmp_path, monkeypatch):
    code = literal_block("``import slimnp`` gives the pieces as a small array library::")
    assert "evaluate_ids" in code
    # "train.txt" / "valid.txt" of the example: a small synthetic corpus
    tiny_corpus(tmp_path, tokens=3000)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.rst", "exec"), {})


def test_run_training_example_runs(tmp_path, monkeypatch):
    code = literal_block("vocabulary the run builds::")
    assert "run_training(files" in code
    tiny_corpus(tmp_path, tokens=3000)  # train.txt, valid.txt, test.txt
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.rst", "exec"), {"print": printed.append})
    assert (tmp_path / "model.h5").exists() and 1 < printed[0] < float("inf")


DOCS = ["README.rst", "BENCHMARKS.rst", "REPRODUCTION.rst", "bench/README.rst"]


def test_documents_are_valid_restructuredtext():
    """Every hand-written (and report.py-generated) page parses without a
    warning: a malformed table or section is shown as raw text otherwise."""
    import io

    import docutils.core

    for name in DOCS:
        err = io.StringIO()
        docutils.core.publish_doctree((ROOT / name).read_text(), source_path=name,
                                      settings_overrides={"warning_stream": err, "report_level": 2,
                                                          "halt_level": 5})
        assert not err.getvalue(), f"{name}:\n{err.getvalue()}"
