"""The import graph of app/: no circle, and the CLI reaches the semantic service and the database,
never the API or the search internals (issue 9). Read from the source with ast, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _typing_only(tree: ast.Module) -> set[int]:
    # Imports under `if TYPE_CHECKING:` never run, so they cannot close a circle.
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> the app modules it imports, at module level or inside functions alike."""
    files = {_module_name(p): p for p in (ROOT / "app").rglob("*.py")}
    modules = {name for name, _ in files}
    graph: dict[str, set[str]] = {}
    for (name, is_package), path in files.items():
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _typing_only(tree)
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` names a module x; `from .db import Item` names the module .db.
                submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                targets = submodules if len(submodules) == len(node.names) else [target, *submodules]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_app_modules_import_each_other_without_a_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_cycle_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_cli_uses_the_service_and_the_database_not_api_or_search():
    reached = import_graph()["app.cli"]
    assert not {m for m in reached if m == "app.api" or m.startswith("app.search")}, sorted(reached)
    assert {"app.db", "app.state"} <= reached


def test_the_import_checks_items_as_the_api_does_without_importing_the_api():
    graph = import_graph()
    assert "app.items" in graph["app.importer"] and "app.items" in graph["app.api"]
    assert "app.api" not in graph["app.importer"] and "app.api" not in graph["app.cli"]
