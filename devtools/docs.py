"""The settings documentation, generated from app.settings.FIELDS (make docs): .env.example and the
configuration table (between the config-table markers, in whichever of README.md and docs/*.md holds them).
tests/test_settings.py fails when the committed copies drift.

    python -m devtools.docs env-example > .env.example
    python -m devtools.docs config-table
"""

from __future__ import annotations

import sys

from app.settings import FIELDS
from devtools.markers import write_section

SECTION = "config-table"


def env_example() -> str:
    """The text of .env.example: every variable with its meaning and default."""
    lines = ["# memfit configuration. Generated from app/settings.py by `make docs`; edit there.",
             "# Copy to .env (never committed) or set in the platform's environment.", ""]
    for field in FIELDS:
        lines.append(f"# {field.doc}")
        default = field.default if field.default is not None else ""
        # A variable without a fixed default (computed at start-up) is shown commented out.
        lines.append(f"{'# ' if field.default is None else ''}{field.env}={default}")
        lines.append("")
    return "\n".join(lines)


def markdown_table() -> str:
    """The configuration table: every variable, its default and its meaning."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for field in FIELDS:
        default = "(computed)" if field.default is None else (f"`{field.default}`" if field.default else "(empty)")
        rows.append(f"| `{field.env}` | {default} | {field.doc.replace('|', '/')} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    if argv == ["env-example"]:
        print(env_example())
    elif argv == ["config-table"]:
        write_section(SECTION, markdown_table())
    else:
        raise SystemExit("usage: python -m devtools.docs env-example|config-table")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
