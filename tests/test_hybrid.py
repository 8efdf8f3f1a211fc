"""app/search/hybrid.py: text and semantic rankings fused by a weighted sum of their normalised scores, on
both back ends; text alone, with a fallback field that says why, whenever semantic search cannot answer."""

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


def fixed_semantic_ranking(app, monkeypatch, ranking, scores=None):
    """Make the app's semantic service answer with ranking (item ids, best first; cosines ``scores``, by
    default 1.0, 0.99, …); returns the limits asked."""
    asked = []
    scores = scores or [1.0 - n / 100 for n in range(len(ranking))]

    def fake(query, limit):
        asked.append(limit)
        return SemanticHits(scored=list(zip(scores, ranking))[:limit], tag_scores={}, item_tags={})

    monkeypatch.setattr(get_service(app), "search", fake)
    return asked


# --- the fusion itself ------------------------------------------------------------------------


def ids_of(fused):
    return [item_id for _, item_id, _ in fused]


def test_an_item_strong_in_both_rankings_beats_one_strong_in_one_only():
    # Item 2: second in text (9.5 of 10) and a hair behind semantic's first; 4 tops semantic, 1 tops text.
    fused = hybrid.fuse({"text": [(1, 10.0), (2, 9.5), (3, 1.0)],
                         "semantic": [(4, 0.90), (2, 0.895), (5, 0.80)]}, 10)
    assert ids_of(fused)[:2] == [2, 4], fused
    assert fused[0][2] == {"text": 2, "semantic": 2}


def test_a_weak_text_match_does_not_outvote_what_the_query_means():
    # Text's only matches are weak (a common word), semantic is sure of 7: text reorders nothing at the top.
    fused = hybrid.fuse({"text": [(8, 2.0), (9, 1.9)], "semantic": [(7, 0.88), (8, 0.81), (10, 0.80)]}, 10)
    assert ids_of(fused)[0] == 7, fused


def test_the_scale_of_text_scores_does_not_matter():
    # FTS5's bm25() runs to tens, PostgreSQL's ts_rank to tenths: the same ranking fuses the same.
    semantic = [(4, 0.90), (2, 0.895), (5, 0.80), (3, 0.79)]
    bm25 = hybrid.fuse({"text": [(1, 12.0), (2, 11.0), (3, 3.0)], "semantic": semantic}, 10)
    ts_rank = hybrid.fuse({"text": [(1, 0.12), (2, 0.11), (3, 0.03)], "semantic": semantic}, 10)
    assert ids_of(bm25) == ids_of(ts_rank)
    assert [round(s, 9) for s, _, _ in bm25] == [round(s, 9) for s, _, _ in ts_rank]


def test_scores_are_shares_of_the_best_possible():
    fused = hybrid.fuse({"text": [(1, 4.0), (2, 2.0)], "semantic": [(1, 0.9), (3, 0.8), (2, 0.7)]}, 10)
    assert fused[0][:2] == (pytest.approx(1.0), 1)  # first in both
    assert dict((i, s) for s, i, _ in fused)[2] == pytest.approx(hybrid.TEXT_WEIGHT * 0.5)
    assert all(0.0 <= s <= 1.0 for s, _, _ in fused)


def test_equal_fused_scores_put_the_newer_id_first():
    fused = hybrid.fuse({"text": [(1, 3.0), (2, 3.0)], "semantic": []}, 10)
    assert ids_of(fused) == [2, 1]


def test_an_id_listed_twice_in_one_ranking_counts_once_at_its_better_score():
    fused = hybrid.fuse({"text": [(7, 1.0), (8, 4.0), (7, 2.0)], "semantic": [(8, 0.5), (7, 0.4)]}, 10)
    scores = dict((item_id, score) for score, item_id, _ in fused)
    assert scores[7] == pytest.approx(hybrid.TEXT_WEIGHT * 0.5)
    assert fused[-1][2] == {"text": 1, "semantic": 2}


def test_text_alone_keeps_the_text_ranking():
    text = [(5, 9.0), (3, 7.0), (9, 7.0), (1, 0.5)]
    assert ids_of(hybrid.fuse({"text": text}, 10, text_weight=1.0)) == [5, 9, 3, 1]


def test_text_weighs_by_its_coverage_of_the_query():
    assert hybrid.text_share(1.0) == hybrid.TEXT_WEIGHT
    assert hybrid.text_share(0.5) == pytest.approx(hybrid.TEXT_WEIGHT * 0.5 ** hybrid.COVERAGE_POWER)
    assert hybrid.text_share(0.5) < hybrid.TEXT_WEIGHT / 4  # a half match weighs far less than half
    assert hybrid.text_share(0.0) == 0.0


# --- through the API, on both back ends ---------------------------------------------------------


def test_the_item_both_rankings_found_comes_first(app, monkeypatch):
    client = app.test_client()
    add(client, "מתכונים לקיץ", "סלט אבטיח וגבינה")
    add(client, "ספר מתכונים חדש", "מתכונים מהירים")
    unrelated = add(client, "טיול בגליל העליון")
    filler = [add(client, f"כתיבה {n}") for n in range(3)]
    by_text = ids(search(client, "מתכונים", mode="text"))
    assert len(by_text) == 2 and unrelated not in by_text
    # Semantic puts the unrelated item first and text's second item a hair behind: only that one is found by
    # both, and it comes first; then semantic's first; then text's first, which semantic did not find, above
    # semantic's weak tail.
    fixed_semantic_ranking(app, monkeypatch, [unrelated, by_text[1], *filler], [0.9, 0.8999, 0.52, 0.51, 0.5])
    body = search(client, "מתכונים")
    assert body["mode"] == "hybrid" and "fallback" not in body
    assert ids(body)[:3] == [by_text[1], unrelated, by_text[0]], body
    assert [r["ranks"] for r in body["results"][:3]] == [{"text": 2, "semantic": 2}, {"semantic": 1}, {"text": 1}]
    assert body["results"][1]["score"] == round(1 - hybrid.TEXT_WEIGHT, 4)
    assert all(0 <= r["score"] <= 1 for r in body["results"])


def test_a_query_no_item_shares_a_word_with_gets_semantics_ranking(app, monkeypatch):
    client = app.test_client()
    found = [add(client, f"ניקוי {n}", "חומץ וסודה") for n in range(4)]
    fixed_semantic_ranking(app, monkeypatch, [found[2], found[0], found[3], found[1]], [0.9, 0.8, 0.7, 0.5])
    body = search(client, "החתלתול עשה פיפי")
    assert ids(body) == [found[2], found[0], found[3], found[1]]
    assert [r["score"] for r in body["results"]] == [1.0, 0.75, 0.5, 0.0]  # semantic's, min-max: text weighs 0
    assert all(r["ranks"].keys() == {"semantic"} for r in body["results"])


def test_a_match_on_a_common_word_of_the_query_leaves_semantics_order(app, monkeypatch):
    # The query's other words are in no item; its one word the items hold, שטיח, is in most of them. Text's
    # best match holds next to nothing of the query, so it does not lift semantic's close second.
    client = app.test_client()
    meant = add(client, "ניקוי שתן של חתולים", "חומץ וסודה לשתייה")
    weak = add(client, "שטיח לסלון", "שטיח צמר")
    others = [add(client, f"שטיח {n}", "שטיח גדול") for n in range(5)]
    fixed_semantic_ranking(app, monkeypatch, [meant, weak, *others], [0.9, 0.899, 0.5, 0.5, 0.5, 0.5, 0.49])
    assert weak in ids(search(client, "החתלתול עושה פיפי על השטיח", mode="text"))
    body = search(client, "החתלתול עושה פיפי על השטיח")
    assert ids(body)[:2] == [meant, weak], body
    assert "text" in body["results"][1]["ranks"]


def test_an_exact_match_of_the_whole_query_is_lifted(app, monkeypatch):
    # Semantic ranks the item titled with the query's very words third; text holds all of it: text's full share.
    client = app.test_client()
    first, second = add(client, "סיר לחץ חשמלי"), add(client, "מחבת נון סטיק")
    exact = add(client, "מחבת ברזל יצוק", "איך משמנים אותה")
    filler = [add(client, f"כלי מטבח {n}") for n in range(3)]
    fixed_semantic_ranking(app, monkeypatch, [first, second, exact, *filler], [0.9, 0.85, 0.8, 0.52, 0.51, 0.5])
    body = search(client, "מחבת ברזל יצוק")
    assert ids(body)[0] == exact, body
    assert body["results"][0]["ranks"] == {"text": 1, "semantic": 3}
    assert body["results"][0]["score"] == round(hybrid.TEXT_WEIGHT + (1 - hybrid.TEXT_WEIGHT) * 0.75, 4)


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
