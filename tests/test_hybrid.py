"""app/search/hybrid.py: text and semantic rankings fused by reciprocal rank fusion, on both back ends;
text alone, with a fallback field that says why, whenever semantic search cannot answer."""

import jsonschema
import pytest

from app.search import LIMIT_MAX, hybrid
from app.semantic.service import SemanticHits, SemanticUnavailable
from app.state import get_service
from support import embed_all


def search(client, q, mode="hybrid", **extra):
    response = client.get("/search", query_string={"q": q, "mode": mode, **extra})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def ids(body):
    return [r["id"] for r in body["results"]]


def add(client, title, body=""):
    response = client.post("/items", json={"title": title, "body": body})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def fixed_semantic_ranking(app, monkeypatch, ranking):
    """Make the app's semantic service answer with ranking (item ids, best first); returns the limits asked."""
    asked = []

    def fake(query, limit):
        asked.append(limit)
        return SemanticHits(scored=[(1.0 - n / 100, item_id) for n, item_id in enumerate(ranking)][:limit],
                            tag_scores={}, item_tags={})

    monkeypatch.setattr(get_service(app), "search", fake)
    return asked


# --- the fusion itself ------------------------------------------------------------------------


def test_an_item_found_by_both_rankings_beats_the_first_of_either():
    fused = hybrid.fuse({"text": [1, 2, 3], "semantic": [4, 5, 3]}, 10)
    assert [item_id for _, item_id, _ in fused][0] == 3, fused
    assert fused[0][2] == {"text": 3, "semantic": 3}


def test_equal_fused_scores_put_the_newer_id_first():
    # 1 and 4 are each first in one ranking, 2 and 5 each second: equal sums, decided by id.
    fused = hybrid.fuse({"text": [1, 2], "semantic": [4, 5]}, 10)
    assert [item_id for _, item_id, _ in fused] == [4, 1, 5, 2]


def test_an_id_listed_twice_in_one_ranking_counts_once():
    fused = dict((item_id, score) for score, item_id, _ in hybrid.fuse({"text": [7, 8, 7, 7], "semantic": [8]}, 10))
    assert fused[8] > fused[7]


# --- through the API, on both back ends ---------------------------------------------------------


def test_the_item_both_rankings_found_comes_first(app, monkeypatch):
    client = app.test_client()
    add(client, "מתכונים לקיץ", "סלט אבטיח וגבינה")
    add(client, "ספר מתכונים חדש", "מתכונים מהירים")
    unrelated = add(client, "טיול בגליל העליון")
    by_text = ids(search(client, "מתכונים", mode="text"))
    assert len(by_text) == 2 and unrelated not in by_text
    # Semantic puts the unrelated item first and text's second item second: only that one is found by both.
    fixed_semantic_ranking(app, monkeypatch, [unrelated, by_text[1]])
    body = search(client, "מתכונים")
    assert body["mode"] == "hybrid" and "fallback" not in body
    # Then text's first and semantic's first tie (1/61 each): the newer id, the unrelated item, first.
    assert ids(body) == [by_text[1], unrelated, by_text[0]]
    assert [r["ranks"] for r in body["results"]] == [{"text": 2, "semantic": 2}, {"semantic": 1}, {"text": 1}]
    # Scores are shares of the best possible (first in both = 1.0): second in both is 61/62 of it.
    assert [r["score"] for r in body["results"]] == [round(61 / 62, 4), 0.5, 0.5]


def test_limit_is_respected_and_each_ranking_read_to_a_bounded_depth(app, monkeypatch):
    client = app.test_client()
    by_text = [add(client, f"מחברת {n}") for n in range(8)]
    by_meaning = [add(client, f"כתיבה {n}") for n in range(8)]
    asked = fixed_semantic_ranking(app, monkeypatch, by_meaning)
    assert search(client, "מחברת", limit=5)["count"] == 5
    assert asked == [hybrid.depth(5)] and hybrid.depth(5) == hybrid.DEPTH_MIN
    assert set(ids(search(client, "מחברת", limit=LIMIT_MAX))) == set(by_text + by_meaning)
    assert asked[-1] == LIMIT_MAX * hybrid.DEPTH_PER_RESULT


def test_a_query_neither_ranking_finds_answers_empty(app, monkeypatch):
    fixed_semantic_ranking(app, monkeypatch, [])
    assert search(app.test_client(), "אין-מילה-כזאת")["results"] == []


def test_with_the_tiny_model_both_rankings_answer(make_app, tiny_onnx):
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx))
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    embed_all(app)
    body = search(app.test_client(), "ספרים לילדים")
    assert "fallback" not in body and body["count"] == 10
    assert any("semantic" in r["ranks"] for r in body["results"])
    assert get_service(app).status()["state"] == "loaded"


# --- falling back to text -----------------------------------------------------------------------


def assert_text_fallback(client, reason_part):
    body = search(client, "ספר")
    assert body["mode"] == "hybrid"
    assert body["fallback"]["mode"] == "text" and reason_part in body["fallback"]["reason"], body["fallback"]
    assert ids(body) == ids(search(client, "ספר", mode="text")) and body["count"] > 0
    assert all(r["ranks"].keys() == {"text"} for r in body["results"])
    return body


def test_semantic_off_falls_back_to_text_and_says_so(make_app):
    app = make_app(ENABLE_SEMANTIC_SEARCH="false")
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    assert_text_fallback(app.test_client(), "ENABLE_SEMANTIC_SEARCH=false")


def test_a_model_that_failed_to_load_falls_back_to_text(make_app, tmp_path):
    app = make_app(SEMANTIC_MODEL=str(tmp_path / "missing-model"))
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    client = app.test_client()
    assert_text_fallback(client, "failed to load")
    assert get_service(app).status()["state"] == "failed"
    assert client.get("/search", query_string={"q": "ספר", "mode": "semantic"}).status_code == 503


def test_semantic_unavailable_at_query_time_falls_back(seeded, monkeypatch):
    """Shed under load (the service's Overloaded is a SemanticUnavailable): text answers, not a 503."""
    def shed(query, limit):
        raise SemanticUnavailable("semantic search is at capacity")

    monkeypatch.setattr(get_service(seeded), "search", shed)
    assert_text_fallback(seeded.test_client(), "at capacity")


def test_another_semantic_error_is_not_hidden_behind_a_fallback(seeded, monkeypatch):
    def broken(query, limit):
        raise ZeroDivisionError("a bug in the vector code")

    monkeypatch.setattr(get_service(seeded), "search", broken)
    assert seeded.test_client().get("/search", query_string={"q": "ספר", "mode": "hybrid"}).status_code == 500


# --- the OpenAPI document -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"])
def test_openapi_offers_hybrid_and_documents_the_fallback(make_app):
    app = make_app(ENABLE_SEMANTIC_SEARCH="false")
    client = app.test_client()
    spec = client.get("/openapi.json").get_json()
    mode = next(p for p in spec["paths"]["/search"]["get"]["parameters"] if p["name"] == "mode")
    assert "hybrid" in mode["schema"]["enum"] and "hybrid" in mode["description"]
    schema = spec["components"]["schemas"]["SearchResults"]
    assert schema["properties"]["fallback"]["required"] == ["mode", "reason"]
    client.post("/items", json={"title": "ספר טוב"})
    body = search(client, "ספר")
    # The answer is what the document says, down to the fallback's and each result's ranks' shape.
    schema = {**schema, "properties": {**schema["properties"], "fallback": {
        **schema["properties"]["fallback"], "additionalProperties": False}}}
    jsonschema.validate(body, schema)
    assert body["fallback"]
