"""The code layout (docs/layout.md) where a test can check it: the modules of corrsteer_pl import each other
without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "corrsteer_pl"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that one import statement of module `name` names (submodules where named)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the module's package, one level up per extra dot
            anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([base] if base else []))
        targets = [f"{base}.{alias.name}" for alias in node.names]  # a name, or a submodule, of `base`
    else:
        return set()
    found = set()
    for target in targets:
        parts = target.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None)
        if owner is not None and owner != name:
            found.add(owner)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere: at module level, under `if TYPE_CHECKING:` and inside
    functions (a deferred import is still a dependency between layers)."""
    files = {_module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set().union(*(_imported(node, name, is_package, modules) for node in ast.walk(tree)))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None for an acyclic graph."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_import_graph_of_corrsteer_pl_is_acyclic():
    graph = import_graph(PACKAGE)
    assert "corrsteer_pl.evaluation.report" in graph and graph["corrsteer_pl.api"], "the graph is read at all"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_holds_type_only_and_deferred_imports_and_the_finder_finds_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import B\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (package / "c.py").write_text("from . import a\n\n\ndef later():\n    from pkg import d\n")
    (package / "d.py").write_text("class D:\n    x = 1\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a", "pkg.d"}, "pkg.d": set()}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_the_top_level_of_corrsteer_pl_holds_at_most_three_modules():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 3, f"corrsteer_pl/ top level: {modules}; the pipeline's stages live in its packages"


def test_no_function_of_corrsteer_pl_or_callbacks_is_over_50_lines():
    long = []
    for root in (PACKAGE, PACKAGE.parent / "callbacks"):
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 50:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert long == [], "functions over 50 lines: " + ", ".join(long)
