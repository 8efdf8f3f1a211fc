"""app/web.py without a browser: the page offers the API's modes, as the semantic state allows, and keeps
its strict CSP (no inline script, style or handler). The browser tests are in test_web.py."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from app import search, web

sqlite_only = pytest.mark.parametrize("backend", ["sqlite"])


class Page(HTMLParser):
    """The page's tags and attributes, as a list of (tag, {attribute: value})."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.script_text = ""
        self._in_script = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data

    def radios(self) -> dict[str, dict]:
        return {a["value"]: a for t, a in self.tags if t == "input" and a.get("type") == "radio"}


def page(app) -> Page:
    response = app.test_client().get("/")
    assert response.status_code == 200
    return Page(response.get_data(as_text=True))


@sqlite_only
def test_the_page_offers_the_api_modes_in_order(app):
    assert list(page(app).radios()) == list(search.MODES)


@sqlite_only
def test_semantic_is_drawn_disabled_with_its_reason_when_off(make_app):
    parsed = page(make_app(ENABLE_SEMANTIC_SEARCH="false"))
    radios = parsed.radios()
    assert "disabled" in radios["semantic"] and "disabled" not in radios["text"]
    assert radios["semantic"]["aria-describedby"] == "note-semantic"
    note = next(a for t, a in parsed.tags if a.get("id") == "note-semantic")
    assert "hidden" not in note


@sqlite_only
def test_semantic_is_offered_until_the_model_is_known_to_fail(app):
    radios = page(app).radios()  # the model is not loaded yet: the first semantic search loads it
    assert "disabled" not in radios["semantic"]


@sqlite_only
def test_hybrid_is_offered_with_a_note_when_semantic_is_off(make_app):
    """hybrid falls back to text without the model: offered, with a note, when semantic is off."""
    parsed = page(make_app(ENABLE_SEMANTIC_SEARCH="false"))
    hybrid = parsed.radios()["hybrid"]
    assert "disabled" not in hybrid and hybrid["data-semantic"] == "optional"
    assert next(a for t, a in parsed.tags if a.get("id") == "note-hybrid").get("hidden") is None


def test_a_mode_the_page_does_not_know_still_shows(monkeypatch):
    monkeypatch.setattr(web, "MODES", ("text", "fuzzy"))
    assert [(m.value, m.label) for m in web.page_modes()] == [("text", "טקסט"), ("fuzzy", "fuzzy")]


@sqlite_only
def test_no_inline_script_style_or_handler(app):
    parsed = page(app)
    assert not parsed.script_text.strip()
    scripts = [a for t, a in parsed.tags if t == "script"]
    assert scripts and all(a.get("src", "").startswith("/static/") for a in scripts)
    inline = [(t, name) for t, a in parsed.tags for name in a if name == "style" or name.startswith("on")]
    assert not inline and all(t != "style" for t, _ in parsed.tags)


@sqlite_only
def test_the_page_carries_the_server_rules_the_script_mirrors(app):
    from app import hebrew
    from app.search import LIMIT_DEFAULT, LIMIT_MAX

    body = next(a for t, a in page(app).tags if t == "body")
    assert body["data-prefix-letters"] == hebrew.PREFIX_LETTERS
    assert (int(body["data-max-prefixes"]), int(body["data-min-stem"])) == (hebrew.MAX_PREFIXES, hebrew.MIN_STEM)
    assert (body["data-hebrew-letters"], body["data-final-forms"]) == (hebrew.HEBREW_LETTERS, hebrew.FINAL_FORMS)
    assert (int(body["data-limit-default"]), int(body["data-limit-max"])) == (LIMIT_DEFAULT, LIMIT_MAX)
