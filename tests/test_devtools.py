"""devtools/: the marker-section writer, the readiness wait, and the rule that the app never imports it."""

import ast
import subprocess
import sys

import pytest

from devtools.http import free_port, wait_http
from devtools.markers import replace_section
from support import ROOT


def test_section_between_markers_is_replaced_and_the_rest_kept():
    text = "head\n<!-- t:start -->\nold\n<!-- t:end -->\ntail\n"
    assert replace_section(text, "t", "\nnew\n") == "head\n<!-- t:start -->\nnew\n<!-- t:end -->\ntail\n"


def test_missing_markers_are_named():
    with pytest.raises(SystemExit, match="<!-- t:start -->"):
        replace_section("no markers here", "t", "body")


def test_wait_fails_as_soon_as_the_process_exits():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_http(f"http://127.0.0.1:{free_port()}/healthz", timeout=30, proc=proc)


def imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for room in ("app", "monitoring")
                                        for p in (ROOT / room).rglob("*.py")), ids=str)
def test_app_and_monitoring_never_import_devtools(path):
    assert not [m for m in imported_modules(ROOT / path) if m.split(".")[0] == "devtools"]


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "1", "yes", "on", "anything"])
def test_any_truthy_ci_value_counts_as_ci(value):
    from support import in_ci

    assert in_ci({"CI": value}), f"CI={value!r} would skip the service suites"


@pytest.mark.parametrize("env", [{}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}, {"CI": "no"}])
def test_no_ci_value_means_a_developer_machine(env):
    from support import in_ci

    assert not in_ci(env)
