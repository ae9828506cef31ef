"""The reference manual (docs/) builds without a single warning, and it
documents what it claims to: every command click knows and the public API.

CI installs '.[test]', which brings sphinx and sphinx-click, so a docstring
or a command's help that breaks the manual fails the test suite."""
import subprocess
import sys
from pathlib import Path

import click
import pytest

pytest.importorskip("sphinx")
pytest.importorskip("sphinx_click")

ROOT = Path(__file__).resolve().parents[1]

# one object a page: the brief's public API, from the installed package
API = {
    "inference": ["slimnp.inference.load", "slimnp.inference.LM"],
    "model": ["slimnp.model.LanguageModel", "slimnp.model.ModelConfig"],
    "trainer": ["slimnp.trainer.TrainConfig", "slimnp.trainer.run_training",
                "slimnp.trainer.resume_training"],
    "runs": ["slimnp.runs.train"],
    "options": ["slimnp.options.TRAIN_OPTIONS", "slimnp.options.configs"],
    "layers": ["slimnp.layers.lstm_forward", "slimnp.layers.SlimSoftmax"],
    "adaptive": ["slimnp.adaptive.AdaptiveSoftmax"],
    "kernels": ["slimnp.kernels.slim_gather_sum_t"],
    "modelfile": ["slimnp.modelfile.save_model", "slimnp.modelfile.load_model"],
    "export": ["slimnp.export.export_onnx"],
    "compress": ["slimnp.compress.compress_model"],
    "experiment": ["slimnp.experiment.load_plan"],
    "results": ["slimnp.results.read"],
}


def commands(group, path):
    """``[["slimnp"], ["slimnp", "train"], ...]``: every command click shows."""
    out = [path]
    if isinstance(group, click.Group):
        for name in group.list_commands(click.Context(group)):
            cmd = group.get_command(click.Context(group), name)
            if not cmd.hidden:
                out += commands(cmd, path + [name])
    return out


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "html"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(ROOT / "docs"), str(out)], capture_output=True, text=True,
                          cwd=out.parent)  # not the checkout: document the installed package
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.mark.slow
def test_manual_builds_without_warnings(html):
    for page in ["index", "guide", "cli", "api/index"] + [f"api/{p}" for p in API]:
        assert (html / f"{page}.html").exists(), page


@pytest.mark.slow
def test_every_command_has_its_section(html):
    from slimnp.cli import main

    page = (html / "cli.html").read_text()
    for path in commands(main, ["slimnp"]):
        assert f'<section id="{"-".join(path)}"' in page, f"{' '.join(path)} is missing from the CLI page"


@pytest.mark.slow
def test_public_api_is_documented(html):
    for page, names in API.items():
        text = (html / "api" / f"{page}.html").read_text()
        for name in names:
            assert f'id="{name}"' in text, f"{name} is missing from api/{page}.html"


@pytest.mark.slow
def test_guide_is_the_readme(html):
    """The guide includes README.rst instead of copying it."""
    assert "include:: ../README.rst" in (ROOT / "docs" / "guide.rst").read_text()
    page = (html / "guide.html").read_text()
    for title in ["Two commands on a fresh machine", "HDF5 layout (format version 1)"]:
        assert title in page, title
