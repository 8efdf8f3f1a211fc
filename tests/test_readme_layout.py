"""The docs stay true to the tree: every room the Layout (docs/development.md) names exists and every
room is named there; every test the Reliability table (docs/reliability.md) names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def layout_section() -> str:
    text = (DOCS / "development.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("\n## ", 1)[0]


def named_rooms() -> set[str]:
    rows = [line for line in layout_section().splitlines() if line.startswith("| `")]
    return {path.rstrip("/") for row in rows for path in re.findall(r"`([\w./-]+)`", row.split("|")[1])}


def test_every_room_named_in_the_layout_exists():
    missing = sorted(p for p in named_rooms() if not (ROOT / p).exists())
    assert not missing, f"docs/development.md's Layout names rooms that do not exist: {missing}"


def test_every_module_and_package_is_in_the_layout():
    rooms = named_rooms()
    modules = [p.relative_to(ROOT).as_posix() for folder in ("app", "monitoring") for p in (ROOT / folder).iterdir()
               if (p.suffix == ".py" or (p.is_dir() and not p.name.startswith("__"))) and p.name != "__pycache__"]
    top = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()] + ["migrations"]

    def covered(path: str) -> bool:
        return path in rooms or any(path.startswith(room + "/") for room in rooms)

    def split_into_rooms(folder: str) -> bool:  # app/ itself is no room: its modules are
        return any(room.startswith(folder + "/") for room in rooms)

    unlisted = sorted([m for m in modules if not covered(m)] +
                      [t for t in top if not covered(t) and not split_into_rooms(t)])
    assert not unlisted, f"docs/development.md's Layout does not say where these live: {unlisted}"


def reliability_tests() -> list[tuple[str, str]]:
    """(file, test) for each test the Reliability table names; `::name` continues the row's last file."""
    section = (DOCS / "reliability.md").read_text(encoding="utf-8")
    named = []
    for row in (line for line in section.splitlines() if line.startswith("| ")):
        current = None
        for path, name in re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", row.split("|")[2]):
            current = path or current
            named.append((current, name))
    return named


def test_every_test_the_reliability_table_names_exists():
    named = reliability_tests()
    assert len(named) >= 20, named  # the table is parsed, not silently empty
    missing = [f"{path}::{name}" for path, name in named
               if path is None or not re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M)]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
