"""app/search/ (text.py, tags.py): text and tag search over the seeded sample (semantic search: test_semantic.py)."""

import pytest


def titles(response):
    assert response.status_code == 200, response.get_json()
    return [r["title"] for r in response.get_json()["results"]]


def search(client, q, mode="text", **extra):
    return client.get("/search", query_string={"q": q, "mode": mode, **extra})


def test_prefixed_query_finds_the_bare_word(seeded):
    found = titles(search(seeded.test_client(), "והספרים"))
    assert "ספרים חדשים לקיץ" in found


def test_niqqud_in_query_or_text_is_ignored(seeded):
    client = seeded.test_client()
    assert titles(search(client, "בראשית")) == ["בְּרֵאשִׁית בָּרָא"]
    assert titles(search(client, "בְּרֵאשִׁית")) == ["בְּרֵאשִׁית בָּרָא"]


def test_results_are_ranked_exact_title_word_first(seeded):
    client = seeded.test_client()
    body = search(client, "חומוס").get_json()
    assert body["results"][0]["title"] == "חומוס ביתי מאפס"
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) >= 2


@pytest.mark.parametrize("q", ["%", "_", "%%", "\\", "100%"])
def test_like_wildcards_in_query_are_literal(seeded, q):
    assert titles(search(seeded.test_client(), q)) == []


def test_wildcard_matches_literally_when_present(app):
    client = app.test_client()
    client.post("/items", json={"title": "הנחה 100% על ספרים"})
    client.post("/items", json={"title": "הנחה 1000 על ספרים"})
    assert titles(search(client, "100%")) == ["הנחה 100% על ספרים"]


def test_limit_caps_results(seeded):
    assert len(titles(search(seeded.test_client(), "ספר", limit=3))) == 3


def test_tag_search_ranks_by_number_of_matching_tags(seeded):
    body = search(seeded.test_client(), "ספרים,ילדים", mode="tags").get_json()
    first = body["results"][0]
    assert {"ספרים", "ילדים"} <= set(first["tags"])
    assert first["score"] == 1.0
    assert {m["name"] for m in first["matched_tags"]} >= {"ספרים", "ילדים"}
    assert all(r["score"] <= first["score"] for r in body["results"])


def test_tag_search_by_prefix(seeded):
    body = search(seeded.test_client(), "#קינוח", mode="tags").get_json()
    assert body["count"] >= 3
    assert all("קינוחים" in r["tags"] for r in body["results"])
    assert all(r["score"] == 0.5 for r in body["results"])  # a prefix hit counts half


def test_unknown_tag_finds_nothing(seeded):
    assert titles(search(seeded.test_client(), "אין-תגית-כזאת", mode="tags")) == []


def test_a_result_shows_its_own_tags_by_name(app):
    client = app.test_client()
    client.post("/items", json={"title": "עוגת גבינה", "tags": ["קינוח", "אפייה", "גבינות"]})
    client.post("/items", json={"title": "סלט ירקות", "tags": ["ירקות"]})
    [found] = search(client, "עוגת").get_json()["results"]
    assert found["tags"] == ["אפייה", "גבינות", "קינוח"]


@pytest.mark.parametrize("mode, q", [("text", "ספר"), ("tags", "ספרים")])
def test_an_item_deleted_between_ranking_and_reading_is_skipped(seeded, monkeypatch, mode, q):
    from app.search import results, tags, text
    client = seeded.test_client()
    before = [r["id"] for r in search(client, q, mode).get_json()["results"]]
    assert len(before) >= 2
    gone = before[0]

    def load_without_the_first(ids):
        found = results.load(ids)
        found.pop(gone, None)  # as if deleted after the ranking's read
        return found

    monkeypatch.setattr({"text": text, "tags": tags}[mode], "load", load_without_the_first)
    response = search(client, q, mode)
    assert response.status_code == 200
    assert [r["id"] for r in response.get_json()["results"]] == before[1:]
