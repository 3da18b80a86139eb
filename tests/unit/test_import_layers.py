"""The import graph of our top-level packages, read from the source with `ast` (nothing is imported).

Layers, lowest first: kernels <- data <- trainer <- cluster <- vlpt (the command line). A package
imports only packages before it, lazy imports inside functions included, so the package graph
has no cycle. Inside the packages, no two modules import each other, directly or through others:
at module level not at all, and not through lazy imports either (a lazy import is how such a
cycle usually hides: data.demo once imported data.demo_pixels inside a function, which imported
data.demo back). `if TYPE_CHECKING:` imports count for the layers but not for module cycles
(they never run).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("kernels", "data", "trainer", "cluster", "vlpt")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, dotted
    dst: str  # imported module (the most specific one of ours the statement names)
    where: str  # path:line
    lazy: bool  # inside a function
    type_only: bool  # under `if TYPE_CHECKING:`


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the layered packages."""
    out = {}
    for pkg in LAYERS:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_files()


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> str | None:
    """The longest prefix of `name` that is one of our modules."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in MODULES:
            return ".".join(parts[:k])
    return None


def _targets(module: str, is_pkg: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = _resolve(module, is_pkg, node)
        # `from pkg import sub` imports the submodule pkg.sub when there is one, else names from pkg.
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return [t for t in dict.fromkeys(_ours(n) for n in names) if t]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_edges(module: str, path: Path) -> list[Edge]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    rel = path.relative_to(REPO).as_posix()
    edges: list[Edge] = []

    def visit(node: ast.AST, lazy: bool, type_only: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            edges.extend(Edge(module, dst, f"{rel}:{node.lineno}", lazy, type_only)
                         for dst in _targets(module, is_pkg, node) if dst != module)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, type_only)
            return
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_only)

    visit(tree, False, False)
    return edges


EDGES = [e for module, path in MODULES.items() for e in module_edges(module, path)]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the DFS path, 2 = done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := dfs(start)):
            return found
    return None


def _graph(edges: list[Edge], key) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        a, b = key(e.src), key(e.dst)
        if a != b:
            graph.setdefault(a, set()).add(b)
    return graph


def _describe(cycle: list[str], edges: list[Edge], key) -> str:
    """The cycle and, per hop, the import statements that make it."""
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        sites = [f"{e.where}{' (lazy)' if e.lazy else ''}" for e in edges if key(e.src) == a and key(e.dst) == b]
        lines.append(f"  {a} -> {b}: {', '.join(sites[:5])}{' ...' if len(sites) > 5 else ''}")
    return "\n".join(lines)


def _top(name: str) -> str:
    return name.split(".")[0]


def _same(name: str) -> str:
    return name


# ---------------------------------------------------------------------- the walker itself

def test_the_walker_sees_every_package_and_lazy_imports():
    assert {_top(m) for m in MODULES} == set(LAYERS)
    # vlpt.cli imports cluster.launch inside cmd_launch: a lazy edge, resolved to the module.
    assert any(e.src == "vlpt.cli" and e.dst == "cluster.launch" and e.lazy for e in EDGES)
    # `from kernels import dispatch` names the submodule, not the package.
    assert any(e.src == "kernels" and e.dst == "kernels.dispatch" and not e.lazy for e in EDGES)


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y", "x"}}) in (["x", "y", "x"], ["y", "y"])


# ---------------------------------------------------------------------- packages

def test_no_cycle_between_packages():
    cycle = find_cycle(_graph(EDGES, _top))
    assert cycle is None, "import cycle between packages:\n" + _describe(cycle, EDGES, _top)


@pytest.mark.parametrize("pkg", LAYERS)
def test_package_imports_only_lower_layers(pkg):
    upward = [e for e in EDGES if _top(e.src) == pkg and LAYERS.index(_top(e.dst)) > LAYERS.index(pkg)]
    assert not upward, (f"{pkg} may import only {', '.join(LAYERS[:LAYERS.index(pkg)]) or 'none of ours'}:\n"
                        + "\n".join(f"  {e.where}: {e.src} imports {e.dst}{' (lazy)' if e.lazy else ''}"
                                    for e in upward))


# ---------------------------------------------------------------------- modules

def test_no_module_level_import_cycle():
    edges = [e for e in EDGES if not e.lazy and not e.type_only]
    cycle = find_cycle(_graph(edges, _same))
    assert cycle is None, "module-level import cycle:\n" + _describe(cycle, edges, _same)


def test_no_two_modules_import_each_other():
    """Every direct pair at once (the cycle tests below name one cycle each)."""
    edges = [e for e in EDGES if not e.type_only]
    pairs = {(e.src, e.dst) for e in edges}
    mutual = sorted((a, b) for a, b in pairs if a < b and (b, a) in pairs)
    assert not mutual, "modules that import each other:\n" + "\n".join(
        _describe([a, b, a], edges, _same) for a, b in mutual)


def test_no_import_cycle_through_lazy_imports():
    edges = [e for e in EDGES if not e.type_only]
    cycle = find_cycle(_graph(edges, _same))
    assert cycle is None, "import cycle (lazy imports included):\n" + _describe(cycle, edges, _same)


def test_the_demo_writers_share_the_scene_model_and_not_each_other():
    pairs = {(e.src, e.dst) for e in EDGES}
    assert ("data.demo", "data.demo_scenes") in pairs and ("data.demo_pixels", "data.demo_scenes") in pairs
    assert ("data.demo", "data.demo_pixels") not in pairs and ("data.demo_pixels", "data.demo") not in pairs
