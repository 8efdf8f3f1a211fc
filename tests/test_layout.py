"""The import graphs, read from the source with ast (nothing is imported): app/ has no circle, and its CLI
reaches the semantic service and the database, never the API or the search internals (issue 9);
bench/ has no circle and never imports tests/; tests/ reach bench/ only for the script a test is about,
and share everything else with bench/ through devtools/, which imports neither. No file edits sys.path:
the project is installed (pyproject.toml) and pytest puts it first (pytest.ini's pythonpath)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def package_of(path: Path) -> str:
    """The package a module file belongs to (itself for an __init__.py), for its relative imports."""
    name, is_package = _module_name(path)
    return name if is_package else name.rpartition(".")[0]


def room_files(room: str) -> list[Path]:
    """The Python files of one top-level folder (app, bench, devtools, ...), sorted; not bench/work's
    scratch (a previous release's tree lives there during `make capacity`)."""
    work = ROOT / "bench" / "work"
    return sorted(p for p in (ROOT / room).rglob("*.py") if work not in p.parents)


def _typing_only(tree: ast.Module) -> set[int]:
    # Imports under `if TYPE_CHECKING:` never run, so they cannot close a circle.
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for n in ast.walk(node)}
    return skipped


# Every module of the project's packages, by dotted name: what an import statement's names are resolved against.
PROJECT_MODULES = {_module_name(p)[0] for room in ("app", "bench", "deploy", "devtools", "monitoring")
                   for p in room_files(room)}


def imports(path: Path, package: str = "") -> set[str]:
    """The modules a file imports, at module level or inside functions alike (not under TYPE_CHECKING):
    `from bench import readme` imports bench.readme, `from .db import Item` the module app.db; package
    is the file's own, for its relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _typing_only(tree)
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # `from . import x` names a module x; `from .db import Item` names the module .db.
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in PROJECT_MODULES]
            found.update(submodules if len(submodules) == len(node.names) else [target, *submodules])
    return found


def import_graph(room: str = "app") -> dict[str, set[str]]:
    """Module -> the modules of the same room (app, bench, ...) it imports."""
    files = {_module_name(p): p for p in room_files(room)}
    modules = {name for name, _ in files}
    graph: dict[str, set[str]] = {}
    for (name, _), path in files.items():
        graph[name] = {t for t in imports(path, package_of(path)) if t in modules and t != name}
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


# --- bench/, tests/ and the library they share (devtools/) -------------------------------------------

# The tests whose subject is a bench script, and that script: the one reason tests/ import from bench/.
# Everything else a test shares with the benchmarks (cgroups, samplers, servers, models) is in devtools/.
BENCH_SUBJECTS = {
    "test_bench_readme.py": {"bench.readme"},
    "test_e5.py": {"bench.e5"},
    "test_load.py": {"bench.load"},
    "test_relevance.py": {"bench.relevance.evaluate"},
    "test_relevance_meaning.py": {"bench.relevance.meaning", "bench.relevance.meaning.evaluate"},
}
TEST_FILES = room_files("tests")
# What `import support` and the like mean: tests/ is on sys.path, so its files are top-level modules.
TEST_MODULES = {"tests"} | {p.stem for p in TEST_FILES}


def test_bench_modules_import_each_other_without_a_circle():
    cycle = find_cycle(import_graph("bench"))
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("path", room_files("bench"), ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_never_imports_the_tests(path):
    reached = sorted(m for m in imports(path, package_of(path)) if m.split(".")[0] in TEST_MODULES)
    assert not reached, f"{path.relative_to(ROOT)} imports {reached}: shared code belongs in devtools/"


@pytest.mark.parametrize("path", room_files("devtools"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_shared_library_imports_neither_bench_nor_the_tests(path):
    reached = sorted(m for m in imports(path, package_of(path)) if m.split(".")[0] in TEST_MODULES | {"bench"})
    assert not reached, f"{path.relative_to(ROOT)} imports {reached}: devtools/ stands below both"


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_tests_import_from_bench_only_the_script_they_test(path):
    reached = {m for m in imports(path) if m == "bench" or m.startswith("bench.")}
    extra = sorted(reached - BENCH_SUBJECTS.get(path.name, set()))
    assert not extra, (f"{path.relative_to(ROOT)} imports {extra}: what tests share with the benchmarks "
                       f"belongs in devtools/ (BENCH_SUBJECTS lists the tests of bench scripts)")


# --- sys.path ------------------------------------------------------------------------------------------

SYS_PATH_EDIT = re.compile(r"\bsys\.path\.(insert|append|extend|remove)\s*\(|\bsys\.path\s*(\[[^\]]*\]\s*)?\+?=(?!=)")


def edited_lines(text: str) -> list[int]:
    """The numbers of the lines that edit sys.path, in code or in a script a test hands to a child."""
    return [number for number, line in enumerate(text.splitlines(), 1) if SYS_PATH_EDIT.search(line)]


def project_python_files() -> list[Path]:
    """The repository's Python files, tracked or new, without what .gitignore leaves out (the venvs,
    bench/work's copy of a previous release) and without this file (its probes below are edits)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "*.py"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / name for name in out.splitlines()]
    return [path for path in files if path.exists() and path.resolve() != Path(__file__).resolve()]


def test_no_file_edits_sys_path():
    edits = [f"{path.relative_to(ROOT)}:{number}" for path in project_python_files()
             for number in edited_lines(path.read_text(encoding="utf-8"))]
    assert not edits, ("sys.path edited; the project is installed, pytest.ini's pythonpath serves the tests, "
                       "and a child process gets cwd or PYTHONPATH instead: " + ", ".join(edits))


@pytest.mark.parametrize("line", ["sys.path.insert(0, str(ROOT))", "    sys.path.append(here)",
                                  "sys.path[:0] = [root]", "sys.path += ['x']", "sys.path = paths",
                                  'code = "import sys; sys.path.insert(0, r)"'])
def test_the_sys_path_check_sees_an_edit(line):
    assert edited_lines(f"import sys\n{line}\n") == [2]


@pytest.mark.parametrize("line", ["print(sys.path)", "if root not in sys.path:", "first = sys.path[0]",
                                  "assert sys.path == before", "paths = list(sys.path)"])
def test_the_sys_path_check_lets_a_reading_pass(line):
    assert edited_lines(line) == []
