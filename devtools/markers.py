"""Rewrite a generated section of a text file between <!-- NAME:start --> and <!-- NAME:end --> markers,
so the README and the pages under docs/ show generated tables and last-run figures and nothing typed by hand.

Each marker pair stands in exactly one of those files; the writers find it there, so a section moves
between pages with its markers and no writer changes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def doc_files(root: Path = ROOT) -> list[Path]:
    """The files that may hold marker sections: README.md, then every docs/*.md in name order."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def replace_section(text: str, name: str, body: str) -> str:
    """text with the lines between NAME's markers replaced by body; SystemExit when a marker is missing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"no {start} ... {end} markers to write the {name} section between")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{body.strip()}\n{end}{tail}"


def section_file(name: str, files: Iterable[Path] | None = None) -> Path | None:
    """The one file (of doc_files() by default) holding either of NAME's markers; None when no file does.
    SystemExit naming the marker and the files when several hold it: which one to write would be a guess."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    holders = [path for path in (doc_files() if files is None else files)
               if start in (text := path.read_text(encoding="utf-8")) or end in text]
    if len(holders) > 1:
        raise SystemExit(f"{start} ... {end} markers stand in {len(holders)} files, expected one: "
                         + ", ".join(_shown(path) for path in holders))
    return holders[0] if holders else None


def write_section(name: str, body: str, files: Iterable[Path] | None = None) -> Path:
    """replace_section() applied in place to the one file (of doc_files() by default) holding NAME's
    markers; returns that file. SystemExit naming the marker when no file, or more than one, holds it."""
    files = doc_files() if files is None else list(files)
    path = section_file(name, files)
    if path is None:
        raise SystemExit(f"no <!-- {name}:start --> ... <!-- {name}:end --> markers in any of "
                         + ", ".join(_shown(p) for p in files))
    path.write_text(replace_section(path.read_text(encoding="utf-8"), name, body), encoding="utf-8")
    return path


def _shown(path: Path) -> str:
    """A path as the repository names it where it lies inside it, else as given."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)
