"""The package's layering rules, checked on the source (issue 16):

* CuPy is imported by ``slimnp/backend.py`` and the GPU kernels alone;
* Numba is imported inside ``slimnp/kernels/`` alone;
* no module imports the package root (``slimnp/__init__.py`` imports the
  modules, so a module importing it back depends on everything).

Imports are read from the syntax tree, so comments and strings that mention
a name do not count, and an import inside a function does.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slimnp"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def imports(path: Path):
    """``(line, absolute module name, imported names)`` of every import in ``path``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from (also for __init__)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            yield node.lineno, mod, [a.name for a in node.names]


def _top(mod: str) -> str:
    return mod.split(".")[0]


def test_the_walk_sees_modules_and_relative_imports():
    # a walk that found nothing would pass every rule below
    assert len(MODULES) > 30
    found = {(mod, tuple(names)) for _, mod, names in imports(PACKAGE / "model.py")}
    assert ("slimnp.buffers", ("ParamStore",)) in found


def test_cupy_only_behind_the_backend():
    allowed = {"slimnp/backend.py", "slimnp/kernels/gpu.py"}
    bad = [f"{_rel(p)}:{line} imports {mod}" for p in MODULES if _rel(p) not in allowed
           for line, mod, _ in imports(p) if _top(mod) == "cupy" or mod.startswith("cupyx")]
    assert not bad, bad


def test_numba_only_in_kernels():
    bad = [f"{_rel(p)}:{line} imports {mod}" for p in MODULES if not _rel(p).startswith("slimnp/kernels/")
           for line, mod, _ in imports(p) if _top(mod) == "numba"]
    assert not bad, bad


def _submodules(pkg: Path) -> set:
    return {p.stem for p in pkg.glob("*.py")} | {p.name for p in pkg.iterdir() if (p / "__init__.py").exists()}


@pytest.mark.parametrize("path", [p for p in MODULES if _rel(p) not in ("slimnp/__init__.py",
                                                                      "slimnp/__main__.py")], ids=_rel)
def test_no_module_imports_the_package_root(path):
    """``import slimnp`` / ``from slimnp import name`` where name is not a
    module (``from . import io`` names a module: allowed)."""
    bad = []
    for line, mod, names in imports(path):
        if mod == "slimnp" and not names:
            bad.append(f"line {line}: import slimnp")
        elif mod == "slimnp":
            bad += [f"line {line}: from slimnp import {n}" for n in names if n not in _submodules(PACKAGE)]
    assert not bad, bad
