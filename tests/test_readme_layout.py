"""The README and docs/ stay true to the tree: every room the Layout (docs/development.md) names exists and
every room is named there; every test the Reliability table (docs/reliability.md) names exists; every
relative link points at a file. The README stays a front door: at most 200 lines, with `make run` and
the test command CI runs."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from devtools.markers import doc_files

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


README_MAX_LINES = 200
PAGES = [page.relative_to(ROOT).as_posix() for page in doc_files()]  # README.md and docs/*.md


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines, over {README_MAX_LINES}: move the detail into "
                                       "a docs/ page and link it from the README's Documentation list")


def quick_start_commands() -> list[str]:
    """The commands of the README's first code block under Quick start, without their comments."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_the_readme_quick_start_shows_make_run_and_make_test():
    assert quick_start_commands()[:2] == ["make run", "make test"], quick_start_commands()


def test_ci_runs_the_readme_test_command():
    test_command = next((c for c in quick_start_commands() if c.startswith("make test")), None)
    assert test_command, f"the README's Quick start shows no `make test` command: {quick_start_commands()}"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert test_command in ci, f".ci/run does not run the README's test command {test_command!r}"


def relative_links(text: str) -> list[str]:
    """Targets of the page's links and images that name a file of the repository: no URL with a scheme, no
    bare #anchor, nothing inside code; the #anchor or ?query of a target is dropped."""
    text = re.sub(r"^[ \t]*(```|~~~).*?^[ \t]*\1", "", text, flags=re.S | re.M)  # fenced code blocks
    text = re.sub(r"(`+).*?\1", "", text, flags=re.S)  # inline code
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*)?\)", text)  # [text](target "title"), ![alt](target)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)  # [ref]: target
    targets += re.findall(r"<(?:img|a)\b[^>]*?\b(?:src|href)=[\"']([^\"']+)", text)  # HTML
    paths = [re.split(r"[#?]", t, maxsplit=1)[0] for t in targets
             if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]
    return [p for p in paths if p]


def test_links_are_found_in_text_images_and_references_but_not_in_code():
    text = ("[a](docs/a.md#x) ![b](b.png \"title\") [c](https://x.org/c) [d](#d) `[e](e.md)`\n"
            "```sh\n[f](f.md)\n```\n- list:\n\n  ```sh\n  [i](i.md)\n  ```\n[g]: ../g.md\n<img src=\"h.png\">\n")
    assert relative_links(text) == ["docs/a.md", "b.png", "../g.md", "h.png"]


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_points_at_a_file_that_exists(page):
    path = ROOT / page
    broken = [target for target in relative_links(path.read_text(encoding="utf-8"))
              if not (ROOT / unquote(target).lstrip("/") if target.startswith("/")
                      else path.parent / unquote(target)).exists()]
    assert not broken, f"{page} links to files that do not exist (relative to {path.parent.relative_to(ROOT) or '.'}/): {broken}"
