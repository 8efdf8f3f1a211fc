"""devtools/: the marker-section writer and how it finds the page holding a section, the readiness wait, and the rule that the app never imports it."""

import subprocess
import sys

import pytest

from devtools.http import free_port, wait_http
from devtools.markers import replace_section, section_file, write_section
from support import ROOT
from test_layout import reached_modules


def test_section_between_markers_is_replaced_and_the_rest_kept():
    text = "head\n<!-- t:start -->\nold\n<!-- t:end -->\ntail\n"
    assert replace_section(text, "t", "\nnew\n") == "head\n<!-- t:start -->\nnew\n<!-- t:end -->\ntail\n"


def test_missing_markers_are_named():
    with pytest.raises(SystemExit, match="<!-- t:start -->"):
        replace_section("no markers here", "t", "body")


def pages(tmp_path, **texts):
    """Files named by the keywords (readme -> readme.md), holding the given texts."""
    paths = []
    for stem, text in texts.items():
        paths.append(tmp_path / f"{stem}.md")
        paths[-1].write_text(text, encoding="utf-8")
    return paths


def test_the_section_is_written_in_the_one_page_that_holds_its_markers(tmp_path):
    readme, deploy = pages(tmp_path, readme="front\n", deploy="a\n<!-- t:start -->\nold\n<!-- t:end -->\nb\n")
    assert write_section("t", "new", [readme, deploy]) == deploy
    assert deploy.read_text(encoding="utf-8") == "a\n<!-- t:start -->\nnew\n<!-- t:end -->\nb\n"
    assert readme.read_text(encoding="utf-8") == "front\n"


def test_a_section_no_page_holds_is_named(tmp_path):
    files = pages(tmp_path, readme="front\n", deploy="deploy\n")
    assert section_file("t", files) is None
    with pytest.raises(SystemExit, match=r"no <!-- t:start --> .* in any of .*readme\.md, .*deploy\.md"):
        write_section("t", "body", files)


def test_a_section_two_pages_hold_is_refused_and_neither_is_written(tmp_path):
    section = "<!-- t:start -->\nold\n<!-- t:end -->\n"
    files = pages(tmp_path, readme=section, deploy=section)
    with pytest.raises(SystemExit, match=r"<!-- t:start --> .* stand in 2 files, expected one: .*readme\.md, .*deploy\.md"):
        write_section("t", "new", files)
    assert [f.read_text(encoding="utf-8") for f in files] == [section, section]


def test_a_page_with_half_a_marker_pair_is_found_and_its_missing_marker_named(tmp_path):
    readme, deploy = pages(tmp_path, readme="front\n", deploy="<!-- t:start -->\nold\n")
    assert section_file("t", [readme, deploy]) == deploy
    with pytest.raises(SystemExit, match="<!-- t:end -->"):
        write_section("t", "new", [readme, deploy])


def test_wait_fails_as_soon_as_the_process_exits():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_http(f"http://127.0.0.1:{free_port()}/healthz", timeout=30, proc=proc)


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for room in ("app", "monitoring")
                                        for p in (ROOT / room).rglob("*.py")), ids=str)
def test_app_and_monitoring_never_import_devtools(path):
    assert not [m for m in reached_modules(ROOT / path) if m.split(".")[0] == "devtools"]


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "1", "yes", "on", "anything"])
def test_any_truthy_ci_value_counts_as_ci(value):
    from support import in_ci

    assert in_ci({"CI": value}), f"CI={value!r} would skip the service suites"


@pytest.mark.parametrize("env", [{}, {"CI": ""}, {"CI": "false"}, {"CI": "0"}, {"CI": "no"}])
def test_no_ci_value_means_a_developer_machine(env):
    from support import in_ci

    assert not in_ci(env)
