"""Rewrite a generated section of a text file between <!-- NAME:start --> and <!-- NAME:end --> markers,
so the README shows generated tables and last-run figures and nothing typed by hand."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_section(text: str, name: str, body: str) -> str:
    """text with the lines between NAME's markers replaced by body; SystemExit when a marker is missing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"no {start} ... {end} markers to write the {name} section between")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{body.strip()}\n{end}{tail}"


def write_section(name: str, body: str, path: Path = README) -> None:
    """replace_section() applied to a file in place (the README by default)."""
    path.write_text(replace_section(path.read_text(encoding="utf-8"), name, body), encoding="utf-8")
