"""The package's layering rules, checked on the source (issue 16):

* CuPy is imported by ``slimnp/backend.py`` and the GPU kernels alone;
* Numba is imported inside ``slimnp/kernels/`` alone;
* no module imports the package root (``slimnp/__init__.py`` imports the
  modules, so a module importing it back depends on everything);
* no import cycle, and no module below ``slimnp/cli.py`` imports it (issue 26:
  at 29b58ed the CLI and the experiment runner imported each other).

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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(modules=MODULES) -> dict:
    """``module -> {package modules it imports}``, imports inside functions
    included (``from . import io`` and ``from .io import load`` both name
    ``slimnp.io``)."""
    names = {_module_name(p): p for p in modules}
    graph = {}
    for name, path in names.items():
        deps = set()
        for _, mod, imported in imports(path):
            if mod and _top(mod) == "slimnp":
                for n in imported or [None]:
                    sub = f"{mod}.{n}" if n else mod
                    deps.add(sub if sub in names else mod)
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def cycles(graph: dict) -> list:
    """The import cycles of ``graph``: its strongly connected components of
    more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    """Layers, not a web: no chain of imports leads a module back to itself
    (the CLI and the experiment runner used to import each other)."""
    graph = import_graph()
    assert "slimnp.runs" in graph["slimnp.cli"]  # the walk sees the edges
    assert cycles(graph) == []


def test_no_module_below_the_cli_imports_it():
    """The CLI is the top floor: the library never imports it."""
    users = sorted(m for m, deps in import_graph().items()
                   if "slimnp.cli" in deps and m not in ("slimnp.__main__",))
    assert users == []
