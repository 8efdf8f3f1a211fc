"""The import graphs, read from the source with ast (nothing is imported). app/ and monitoring/: no circle,
no arrow running back up (monitoring is the lower layer: the app imports it, never the reverse), and the
CLI reaches the semantic service and the database, never the API or the search internals. bench/ has no
circle and never imports tests/; tests/ reach bench/ only for the script a test is about, and share
everything else with bench/ through devtools/, which imports neither. No file edits sys.path: the project
is installed (pyproject.toml) and pytest puts it first (pytest.ini's pythonpath)."""

from __future__ import annotations

import ast
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "monitoring")
# A package -> the packages it must never import, in any form: at module level or inside a function,
# under TYPE_CHECKING, relatively, or by name through importlib.
NEVER_IMPORTS = {"monitoring": ("app",)}


@dataclass(frozen=True)
class Import:
    """One import as written: the module it names (relative ones resolved), the names taken from it
    (``from m import a, b``; empty for ``import m``), and whether it sits under ``if TYPE_CHECKING:``."""

    module: str
    names: tuple[str, ...]
    typing_only: bool
    line: int

    def candidates(self) -> list[str]:
        """Every module this import may load: the one named, and each name taken as a submodule."""
        return ([self.module] if self.module else []) + [".".join(filter(None, (self.module, n))) for n in self.names]


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def package_files(package: str) -> list[Path]:
    """The Python files of one top-level folder (app, bench, devtools, tests, ...), sorted; not bench/work's
    scratch (a previous release's tree lives there during `make capacity`)."""
    work = ROOT / "bench" / "work"
    return sorted(p for p in (ROOT / package).rglob("*.py") if work not in p.parents)


def _typing_only(tree: ast.Module) -> set[int]:
    # The body of `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`) never runs; its else branch does.
    return {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for statement in node.body for n in ast.walk(statement)}


def _by_name(node: ast.Call) -> str | None:
    """The literal module name of importlib.import_module("x") or __import__("x"), else None."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def imports_in(source: str, name: str, is_package: bool) -> list[Import]:
    """Every import of the module name (whose source is given), wherever it is in the file."""
    tree = ast.parse(source)
    typing_only = _typing_only(tree)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        under_typing = id(node) in typing_only
        if isinstance(node, ast.Import):
            found += [Import(alias.name, (), under_typing, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1] if node.level <= len(parts) else []
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(Import(module, tuple(a.name for a in node.names), under_typing, node.lineno))
        elif isinstance(node, ast.Call) and (target := _by_name(node)):
            found.append(Import(target, (), under_typing, node.lineno))
    return found


def imports_of(path: Path) -> list[Import]:
    return imports_in(path.read_text(encoding="utf-8"), *_module_name(path))


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports when it runs, at module level or inside functions alike.

    Imports under TYPE_CHECKING never run, so they cannot close a circle: they are left out here (the
    direction test below counts them)."""
    files = {_module_name(p): p for package in packages for p in package_files(package)}
    modules = {name for name, _ in files}
    graph: dict[str, set[str]] = {}
    for (name, _), path in files.items():
        edges = set()
        for imp in imports_of(path):
            if imp.typing_only:
                continue
            # `from . import x` names a module x; `from .db import Item` names the module .db.
            submodules = [c for c in imp.candidates()[1:] if c in modules] if imp.names else []
            targets = submodules if imp.names and len(submodules) == len(imp.names) else [imp.module, *submodules]
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


def upward_imports(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    """The imports of the file at path that reach a package in forbidden, as "line N: module"."""
    return [f"line {imp.line}: {imp.module or ', '.join(imp.names)}" + (" (under TYPE_CHECKING)" if imp.typing_only
                                                                         else "")
            for imp in imports_of(path) if any(t.split(".")[0] in forbidden for t in imp.candidates())]


def test_the_project_modules_import_each_other_without_a_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_cycle_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("path", [p for package in NEVER_IMPORTS for p in package_files(package)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_runs_back_up(path):
    forbidden = NEVER_IMPORTS[path.relative_to(ROOT).parts[0]]
    upward = upward_imports(path, forbidden)
    assert not upward, (f"{path.relative_to(ROOT)} imports {', '.join(forbidden)}: {upward}; monitoring is the "
                        "lower layer: the app hands it what it needs (monitoring/config.py, init_app's arguments)")


def test_the_direction_check_sees_every_form_of_import():
    source = """
from typing import TYPE_CHECKING
import importlib
if TYPE_CHECKING:
    from app.settings import Settings
else:
    import app.state
def later():
    from app import db
    from .. import app
    return importlib.import_module("app.search")
from . import metrics
"""
    found = sorted(t for imp in imports_in(source, "monitoring.hooks", False) for t in imp.candidates()
                   if t.split(".")[0] == "app")
    assert found == ["app", "app", "app.db", "app.search", "app.settings", "app.settings.Settings", "app.state"]
    typing = [imp.module for imp in imports_in(source, "monitoring.hooks", False) if imp.typing_only]
    assert typing == ["app.settings"]


def test_cli_uses_the_service_and_the_database_not_api_or_search():
    reached = import_graph()["app.cli"]
    assert not {m for m in reached if m == "app.api" or m.startswith("app.search")}, sorted(reached)
    assert {"app.db", "app.state"} <= reached


def test_the_import_checks_items_as_the_api_does_without_importing_the_api():
    graph = import_graph()
    assert "app.items" in graph["app.importer"] and "app.items" in graph["app.api"]
    assert "app.api" not in graph["app.importer"] and "app.api" not in graph["app.cli"]


# --- bench/, tests/ and the library they share (devtools/) -------------------------------------------

# Every module of the project's packages, by dotted name: which names an import takes are modules.
PROJECT_MODULES = {_module_name(p)[0] for package in ("app", "bench", "deploy", "devtools", "monitoring")
                   for p in package_files(package)}


def reached_modules(path: Path) -> set[str]:
    """The modules a file imports, in any form: `from bench import readme` reaches bench.readme, `from
    bench.e5 import SENTENCES` bench.e5, `import support` the tests' support module."""
    reached = set()
    for imp in imports_of(path):
        submodules = [c for c in imp.candidates()[1:] if c in PROJECT_MODULES]
        reached.update(submodules if imp.names and len(submodules) == len(imp.names) else [imp.module, *submodules])
    return reached


# The tests whose subject is a bench script, and that script: the one reason tests/ import from bench/.
# Everything else a test shares with the benchmarks (cgroups, samplers, servers, models) is in devtools/.
BENCH_SUBJECTS = {
    "test_bench_readme.py": {"bench.readme"},
    "test_capacity_report.py": {"bench.capacity"},
    "test_e5.py": {"bench.e5"},
    "test_load.py": {"bench.load"},
    "test_relevance.py": {"bench.relevance.evaluate"},
    "test_relevance_meaning.py": {"bench.relevance.meaning", "bench.relevance.meaning.evaluate",
                                  "bench.relevance.meaning.variants"},
}
TEST_FILES = package_files("tests")
# What `import support` and the like mean: tests/ is on sys.path, so its files are top-level modules.
TEST_MODULES = {"tests"} | {p.stem for p in TEST_FILES}


def test_bench_modules_import_each_other_without_a_circle():
    cycle = find_cycle(import_graph(("bench",)))
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("path", package_files("bench"), ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_never_imports_the_tests(path):
    reached = sorted(m for m in reached_modules(path) if m.split(".")[0] in TEST_MODULES)
    assert not reached, f"{path.relative_to(ROOT)} imports {reached}: shared code belongs in devtools/"


@pytest.mark.parametrize("path", package_files("devtools"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_shared_library_imports_neither_bench_nor_the_tests(path):
    reached = sorted(m for m in reached_modules(path) if m.split(".")[0] in TEST_MODULES | {"bench"})
    assert not reached, f"{path.relative_to(ROOT)} imports {reached}: devtools/ stands below both"


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_tests_import_from_bench_only_the_script_they_test(path):
    reached = {m for m in reached_modules(path) if m == "bench" or m.startswith("bench.")}
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


# --- words with nothing to look up ------------------------------------------------------------------------

ISSUE_CITATION = re.compile(r"\bissues? #?\d+", re.I)


def test_no_file_cites_an_issue_number():
    """The issues live outside the repository: a comment, docstring or page says what and why instead,
    and a change's history is in its commit message. bench/results holds measurements, not prose."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    cited = []
    for rel in out.splitlines():
        path = ROOT / rel
        if rel.startswith("bench/results/") or not path.is_file() or path.resolve() == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        cited += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if ISSUE_CITATION.search(line)]
    assert cited == [], "issue numbers cited: " + ", ".join(cited)
