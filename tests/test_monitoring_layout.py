"""monitoring/ sits below the app: it imports nothing from ``app`` (the app hands it what it needs)."""

import ast
from pathlib import Path

import pytest

from support import ROOT

MODULES = sorted(Path(ROOT, "monitoring").glob("*.py"))


def runtime_imports(path: Path) -> set[str]:
    """Modules imported by a file, leaving out imports under ``if TYPE_CHECKING:`` (never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and ast.unparse(block.test).endswith("TYPE_CHECKING") for body in block.body
               for node in ast.walk(body)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_monitoring_never_imports_the_app(path):
    upward = sorted(m for m in runtime_imports(path) if m == "app" or m.startswith("app."))
    assert not upward, f"monitoring/{path.name} imports {upward}: pass it in from app/__init__.py instead"
