"""The architecture as a test: layers, no import circles, small modules and functions.

``docs/ARCHITECTURE.md`` describes the layers; this file is their executable form. A module
may import its own layer or any layer below it, never one above; no two modules import each
other, directly or round a longer circle; project imports sit at module level (an import
inside a function is how circles used to be hidden), except lines marked ``# deferred:`` with
the reason (Django's app registry must be ready first, or the ASGI app is assembled only
after ``django.setup()``).

The checks read the source with :mod:`ast`; nothing is imported, so a circle fails here
rather than as an ``ImportError`` somewhere else.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "sessions_ctx7", "vx11site")

#: Lowest first. A module's layer is the entry with the longest matching prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("gateway.core", "vx11site.env", "vx11site.settings")),
    ("state", ("gateway.state",)),
    ("config", ("gateway.config", "gateway.models", "sessions_ctx7.models")),
    ("policies", ("gateway.policies",)),
    ("upstream", ("gateway.upstream",)),
    (
        "operations",
        (
            "gateway.operations",
            "sessions_ctx7.services",
            "sessions_ctx7.topics",
            "sessions_ctx7.writer",
            "sessions_ctx7.statements",
            "sessions_ctx7.cache",
            "sessions_ctx7.enrich",
            "sessions_ctx7.reading",
            "sessions_ctx7.warm",
            "sessions_ctx7.turns",
            "sessions_ctx7.checkpoint",
            "sessions_ctx7.onloop",
        ),
    ),
    ("edge", ("gateway.edge",)),
    (
        "interfaces",
        (
            "gateway.api",
            "gateway.console",
            "gateway.admin",
            "gateway.management",
            "gateway.checks",
            "gateway.apps",
            "gateway.signals",
            "gateway.demo",
            "sessions_ctx7.api",
            "sessions_ctx7.admin",
            "sessions_ctx7.serializers",
            "sessions_ctx7.urls",
            "sessions_ctx7.management",
            "sessions_ctx7.apps",
        ),
    ),
    (
        "root",
        ("gateway.startup", "gateway.management.commands.rundev", "vx11site.asgi", "vx11site.urls"),
    ),
)

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
#: Functions that are declarative tables (data laid out as code), allowed to be longer.
DECLARATIVE: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    nested: bool  # inside a function
    deferred: bool  # marked ``# deferred: <reason>``


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def _resolve(name: str) -> str | None:
    """The project module an imported dotted name lives in (``a.b.c`` → ``a.b`` if c is a name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            stem = ".".join([*base, *([node.module] if node.module else [])])
        else:
            stem = node.module or ""
        return [f"{stem}.{alias.name}" for alias in node.names] + [stem]

    def walk(body: list[ast.stmt], nested: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                seen: set[str] = set()
                for name in targets(node):
                    target = _resolve(name)
                    if target is None or target == module or target in seen:
                        continue
                    if isinstance(node, ast.ImportFrom) and name == (node.module or "") and seen:
                        continue  # ``from pkg import mod``: the module, not the package
                    seen.add(target)
                    text = "\n".join(lines[node.lineno - 1 : (node.end_lineno or node.lineno)])
                    found.append(Import(module, target, node.lineno, nested, "# deferred:" in text))
            nested_here = nested or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(node, field, None)
                if isinstance(sub, list):
                    walk(sub, nested_here)
            for handler in getattr(node, "handlers", []):
                walk(handler.body, nested_here)

    walk(tree.body, False)
    return found


ALL_IMPORTS = [imp for module, path in MODULES.items() for imp in imports_of(module, path)]


def test_every_module_has_a_layer() -> None:
    unplaced = [module for module in MODULES if layer_of(module) < 0 and "." in module]
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{imp.source}:{imp.line} imports {imp.target} "
        f"({LAYERS[layer_of(imp.source)][0]} → {LAYERS[layer_of(imp.target)][0]})"
        for imp in ALL_IMPORTS
        if not imp.deferred
        and layer_of(imp.target) >= 0
        and layer_of(imp.source) >= 0
        and layer_of(imp.target) > layer_of(imp.source)
    ]
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in ALL_IMPORTS:
        if not imp.deferred:
            graph[imp.source].add(imp.target)
    circles = _cycles(graph)
    assert not circles, "import circles:\n" + "\n".join(" → ".join(c) for c in circles)


def test_project_imports_sit_at_module_level() -> None:
    nested = [
        f"{imp.source}:{imp.line} imports {imp.target} inside a function"
        for imp in ALL_IMPORTS
        if imp.nested and not imp.deferred
    ]
    assert not nested, (
        "function-local project imports (move them up, or mark a real reason with "
        "'# deferred: <why>'):\n" + "\n".join(sorted(set(nested)))
    )


def test_modules_stay_small() -> None:
    big = [
        f"{module}: {n} lines"
        for module, path in MODULES.items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not big, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(big)


def test_functions_stay_short() -> None:
    long: list[str] = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                name = f"{module}.{node.name}"
                if length > MAX_FUNCTION_LINES and name not in DECLARATIVE:
                    long.append(f"{name}: {length} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.parametrize(
    ("graph", "circular"),
    [
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ],
)
def test_the_circle_finder_finds_circles(graph: dict[str, set[str]], circular: bool) -> None:
    assert bool(_cycles(graph)) is circular


def test_the_checks_see_a_planted_upward_import(tmp_path: Path) -> None:
    """The import reader resolves relative and ``from pkg import mod`` forms."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        "from gateway.edge import proxy\n"
        "def f():\n"
        "    from gateway.console import dashboard  # no reason given\n"
        "    from gateway.startup import x  # deferred: demo\n"
    )
    found = imports_of("gateway.core.planted", planted)
    assert [(i.target, i.nested, i.deferred) for i in found] == [
        ("gateway.edge.proxy", False, False),
        ("gateway.console.dashboard", True, False),
        ("gateway.startup", True, True),
    ]
    assert layer_of("gateway.core.planted") < layer_of("gateway.edge.proxy")
