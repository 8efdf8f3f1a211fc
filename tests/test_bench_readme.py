"""bench/readme.py: each result goes into the page that holds its section's markers, and a section no page
holds is printed rather than failing the run; every generated section stands once in one page."""

import json

import pytest

from bench import readme
from devtools.markers import doc_files, section_file

FUZZ = {"inputs_tried": 12, "by_suite": {"a": 12}, "server_errors": 0}
FAULTS = {"faults_injected": 1, "faults_survived": 1, "by_fault": {"body_cut_off": 1}, "requests_sent": 3,
          "items_acknowledged": 2, "data_lost": 0}


def test_each_result_is_written_into_the_page_holding_its_markers(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    for name, data in {"fuzz.json": FUZZ, "faults.json": FAULTS, "batching.json": {}}.items():
        (results / name).write_text(json.dumps(data))
    front, reliability = tmp_path / "README.md", tmp_path / "reliability.md"
    front.write_text("front\n<!-- fuzz-results:start -->\nold\n<!-- fuzz-results:end -->\n", encoding="utf-8")
    reliability.write_text("# R\n<!-- faults-results:start -->\nold\n<!-- faults-results:end -->\nend\n", encoding="utf-8")
    monkeypatch.setattr(readme, "RESULTS", results)
    monkeypatch.setattr(readme, "section_file", lambda name: section_file(name, [front, reliability]))
    monkeypatch.setitem(readme.SECTIONS, "batching-results", ("batching.json", lambda data: "batched"))

    assert readme.main() == 0

    assert front.read_text(encoding="utf-8") == (
        f"front\n<!-- fuzz-results:start -->\n{readme.fuzz_section(FUZZ)}\n<!-- fuzz-results:end -->\n")
    assert reliability.read_text(encoding="utf-8") == (
        f"# R\n<!-- faults-results:start -->\n{readme.faults_section(FAULTS)}\n<!-- faults-results:end -->\nend\n")
    assert "<!-- batching-results:start/end --> markers; the section would be:\nbatched" in capsys.readouterr().err


def generated_sections() -> list[str]:
    """Every marker section a writer fills: bench/readme.py's, the configuration table, bench/report.py's
    memory table and bench/vectors.py's table."""
    return sorted([*readme.SECTIONS, "config-table", "bench-results", "vector-results"])


@pytest.mark.parametrize("name", generated_sections())
def test_every_generated_section_stands_once_in_one_page(name):
    page = section_file(name)
    assert page is not None, f"no page of {[p.name for p in doc_files()]} holds the {name} markers"
    text = page.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert (text.count(start), text.count(end)) == (1, 1) and text.index(start) < text.index(end), \
        f"{page.name}: the {name} markers are not one start followed by one end"
