"""Issue 23: the layers hold — no import cycle between ``node/`` subpackages, nor between modules
of a package, nor inside the plugin SDK (``algorithms/ainode_sdk``) and the plugins, lazy imports
(inside functions) included; only ``node/results`` imports highdicom and only ``node/network``
pynetdicom; the SDK and the plugins import no part of the node. The graph is built from the
source, so a test that cannot import a module still sees its imports."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"node": ROOT, "ainode_sdk": ROOT / "algorithms", "lung_ct_density": ROOT / "algorithms" / "lung-ct-density"}
"""Each import package and the folder it lives in."""


def _modules() -> dict[str, Path]:
    found = {}
    for top, base in PACKAGES.items():
        for path in (base / top).rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """Every module name ``module`` imports, at its top or inside functions."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def _graph(group: callable) -> dict[str, set[str]]:  # type: ignore[valid-type]
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for target in _imports(module, path):
            if target in modules and group(target) != group(module):
                graph[group(module)].add(group(target))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_subpackages():
    assert _cycles(_graph(_subpackage)) == []


def test_no_import_cycle_between_modules():
    assert _cycles(_graph(lambda module: module)) == []


def test_the_library_boundaries():
    for module, path in _modules().items():
        imported = {name.split(".")[0] for name in _imports(module, path)}
        if "highdicom" in imported:
            assert module.startswith("node.results"), f"{module} imports highdicom"
        if "pynetdicom" in imported:
            assert module.startswith("node.network"), f"{module} imports pynetdicom"
        if not module.startswith("node"):  # the SDK and the plugins: only the SDK, never the node
            assert not {n for n in _imports(module, path) if n.split(".")[0] == "node"}, f"{module} imports the node"
        if module.startswith("ainode_sdk"):
            assert "lung_ct_density" not in imported, f"{module} imports a plugin"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
