"""`flask --app app import FILE` (app/importer.py): JSON lines in, checked as POST /items checks a body;
bad lines named by number and the whole file refused (or skipped with --on-error skip); resumable after
a crash with nothing twice and nothing lost; one import of a file at a time."""

import json

import pytest

from app import importer
from app.db import ImportRun, Item, db


def write_lines(path, entries):
    path.write_bytes(b"".join((e if isinstance(e, bytes) else json.dumps(e, ensure_ascii=False).encode()) + b"\n"
                              for e in entries))
    return path


def good(n):
    return [{"title": f"ספר מספר {i}", "body": "סיפור לילדים על ים וחופשה", "tags": ["ספרים", f"#סדרה{i % 3}"]}
            for i in range(n)]


def titles(app):
    with app.app_context():
        return sorted(t for (t,) in db.session.query(Item.title))


def test_a_file_of_items_is_imported_and_found(app, tmp_path):
    before = len(titles(app))
    path = write_lines(tmp_path / "items.jsonl", good(7) + [b"   "])  # a blank line is not an item
    result = app.test_cli_runner().invoke(args=["import", str(path)])
    assert result.exit_code == 0, result.output
    assert "7 items imported" in result.output
    assert len(titles(app)) == before + 7
    found = app.test_client().get("/search", query_string={"q": "ספר מספר 3", "mode": "text"}).get_json()
    assert found["results"][0]["title"] == "ספר מספר 3"
    assert sorted(found["results"][0]["tags"]) == sorted(["ספרים", "סדרה0"])  # checked as POST /items: "#" goes
    again = app.test_cli_runner().invoke(args=["import", str(path)])
    assert again.exit_code == 0 and "already imported" in again.output
    assert len(titles(app)) == before + 7


BAD = [b"{not json", b'["a list"]', json.dumps({"title": "   "}).encode(), b"\xff\xfe",
       json.dumps({"title": "x", "colour": "red"}).encode()]


def test_bad_lines_are_named_and_the_whole_file_refused(app, tmp_path):
    before = titles(app)
    path = write_lines(tmp_path / "mixed.jsonl", good(2) + BAD + good(1))
    result = app.test_cli_runner().invoke(args=["import", str(path)])
    assert result.exit_code == 1
    for number, words in ((3, "is not JSON"), (4, "is not a JSON object"), (5, "title is required"),
                          (6, "is not UTF-8"), (7, "unknown field(s): 'colour'")):
        assert f"line {number}: " in result.output and words in result.output, (number, result.output)
    assert "5 bad line(s); nothing imported" in result.output and "Traceback" not in result.output
    assert titles(app) == before


def test_with_skip_the_good_lines_are_imported_and_the_bad_listed(app, tmp_path):
    before = len(titles(app))
    path = write_lines(tmp_path / "mixed.jsonl", good(2) + BAD + good(1))
    result = app.test_cli_runner().invoke(args=["import", str(path), "--on-error", "skip"])
    assert result.exit_code == 0, result.output
    assert "3 items imported" in result.output and "5 bad line(s) skipped" in result.output
    assert "line 3: is not JSON" in result.output
    assert len(titles(app)) == before + 3


def test_an_import_stopped_mid_file_continues_with_nothing_twice(app, tmp_path, monkeypatch):
    monkeypatch.setattr(importer, "BATCH", 4)
    path = write_lines(tmp_path / "big.jsonl", good(10))
    before = len(titles(app))
    stores = []
    real_store = importer._store

    def crashing_store(*args, **kwargs):
        stores.append(1)
        if len(stores) == 2:  # the second batch dies before its commit: the first stays, with its progress
            raise KeyboardInterrupt
        return real_store(*args, **kwargs)

    monkeypatch.setattr(importer, "_store", crashing_store)
    stopped = app.test_cli_runner().invoke(args=["import", str(path)])
    assert stopped.exit_code == 1 and "run the same command again" in stopped.output
    assert len(titles(app)) == before + 4
    monkeypatch.setattr(importer, "_store", real_store)
    resumed = app.test_cli_runner().invoke(args=["import", str(path)])
    assert resumed.exit_code == 0, resumed.output
    assert "6 items imported, continuing after line 4" in resumed.output
    mine = [t for t in titles(app) if t.startswith("ספר מספר")]
    assert sorted(mine) == sorted(f"ספר מספר {i}" for i in range(10))  # each once
    with app.app_context():
        (run,) = db.session.query(ImportRun).all()
        assert (run.lines_done, run.items) == (10, 10)


def test_one_import_of_a_file_at_a_time(app, tmp_path):
    path = write_lines(tmp_path / "items.jsonl", good(3))
    settings = app.extensions["memfit"].settings
    with app.app_context():
        with importer.exclusive(importer.digest(path), settings):
            result = app.test_cli_runner().invoke(args=["import", str(path)])
    assert result.exit_code == 1 and "another import of this file is running" in result.output
    assert not [t for t in titles(app) if t.startswith("ספר מספר")]


def test_a_missing_file_is_a_clear_error(app, tmp_path):
    result = app.test_cli_runner().invoke(args=["import", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and "does not exist" in result.output
