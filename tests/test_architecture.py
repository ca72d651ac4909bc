"""The seams between packages: layers that only point down, and no import cycles.

The layer contracts live in pyproject.toml ([tool.importlinter]) and are checked by import-linter;
the cycle check walks grimp's import graph (every import, function-local ones included).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
grimp = pytest.importorskip("grimp")
pytest.importorskip("importlinter")


def test_the_layer_contracts_hold():
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    configure()  # what the lint-imports command does first: the readers of pyproject.toml and .importlinter
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True) is True


def test_every_top_level_module_sits_in_a_layer():
    """A module left out of the layers contract would be free to import anything: each of tightrope's
    top-level modules and packages is named in a layer, and every one but cli is barred from tightrope.cli."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = {name.strip() for c in contracts if c["type"] == "layers" for layer in c["layers"]
               for name in layer.replace("|", ":").split(":")}
    barred = {m for c in contracts if c["type"] == "forbidden" and "tightrope.cli" in c["forbidden_modules"]
              for m in c["source_modules"]}
    package = ROOT / "src" / "tightrope"
    top = {f"tightrope.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    top |= {f"tightrope.{p.parent.name}" for p in package.glob("*/__init__.py")}
    assert sorted(top - layered) == []
    assert sorted(top - barred) == ["tightrope.cli"]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of two or more modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return groups


def test_strongly_connected_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_tightrope_modules():
    graph = grimp.build_graph("tightrope", cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycles = strongly_connected(edges)
    assert not cycles, f"modules that import each other: {cycles}"


def test_function_local_imports_of_tightrope_state_their_reason():
    """A tightrope module imported inside a function (an optional dependency such as bitsandbytes, or a
    command that must start without torch) says why on the same line: ``# noqa: PLC0415 - reason``."""
    import ast

    silent = []
    for path in sorted((ROOT / "src" / "tightrope").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        top = {id(n) for node in tree.body for n in (ast.walk(node) if isinstance(node, (ast.Try, ast.If)) else [node])}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                line = lines[node.lineno - 1]
                if (module or "").startswith("tightrope") and " - " not in line.partition("#")[2]:
                    silent.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not silent, f"function-local imports without a reason: {silent}"


# Library modules that import an optional dependency at their top, so that the library imports them inside
# the functions that need them (the command line's modules import the library lazily so that it starts
# without torch, and predict / serve without anything but the serve extra).
OPTIONAL = {"tightrope.compress.bnb4": "bitsandbytes"}


def is_module(name: str) -> bool:
    path = ROOT / "src" / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_the_library_imports_itself_inside_functions_only_for_optional_dependencies():
    import ast

    hidden = []
    for path in sorted((ROOT / "src" / "tightrope").rglob("*.py")):
        if "cli" in path.relative_to(ROOT / "src" / "tightrope").parts:
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tightrope"):
                    targets = {f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module
                               for a in node.names}
                elif isinstance(node, ast.Import):
                    targets = {a.name for a in node.names if a.name.startswith("tightrope")}
                else:
                    continue
                if targets - set(OPTIONAL):
                    hidden.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(targets - set(OPTIONAL))}")
    assert not hidden, f"function-local imports of tightrope modules without an optional dependency: {hidden}"


def test_only_the_command_line_draws_progress_bars():
    """Library modules report progress through tightrope.progress callbacks; rich bars and consoles
    belong to tightrope.cli (report/ may still build rich tables for printing)."""
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "src" / "tightrope").rglob("*.py"))
                 if "cli" not in p.relative_to(ROOT / "src" / "tightrope").parts
                 and ("rich.progress" in p.read_text() or "rich.console" in p.read_text())]
    assert not offenders, f"library modules that draw on the terminal: {offenders}"
