"""app/api.py and app/errors.py: items, health, readiness, and JSON errors for every failure."""

import pytest


def error_of(response, status):
    assert response.status_code == status, (response.status_code, response.data[:300])
    assert response.is_json, response.data[:200]
    body = response.get_json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    assert "Traceback" not in response.get_data(as_text=True)
    return body["error"]


def test_create_and_read_an_item(client):
    created = client.post("/items", json={"title": "  ספר חדש ", "body": "על ספרים", "tags": ["ספרים", "#חדש"]})
    assert created.status_code == 201
    item = created.get_json()
    assert item["title"] == "ספר חדש" and sorted(item["tags"]) == ["חדש", "ספרים"]
    assert created.headers["Location"] == f"/items/{item['id']}"
    fetched = client.get(f"/items/{item['id']}").get_json()
    assert fetched == item


def test_tags_differing_only_in_case_are_one_tag_counted_once(client):
    first = client.post("/items", json={"title": "א", "tags": ["Python", "PYTHON", "python"]}).get_json()
    second = client.post("/items", json={"title": "ב", "tags": ["pyThon", "web"]}).get_json()
    assert first["tags"] == ["python"] and second["tags"] == ["python", "web"]
    found = client.get("/search", query_string={"q": "Python", "mode": "tags"}).get_json()
    assert [r["id"] for r in found["results"]] == [second["id"], first["id"]]
    assert all(r["matched_tags"] == [{"name": "python", "score": 1.0}] for r in found["results"]), found


def test_times_carry_their_utc_offset_on_every_back_end(client):
    from datetime import datetime, timedelta

    created = client.post("/items", json={"title": "שעה"}).get_json()
    fetched = client.get(f"/items/{created['id']}").get_json()
    for item in (created, fetched):
        for field in ("created_at", "updated_at"):
            moment = datetime.fromisoformat(item[field])
            assert moment.utcoffset() == timedelta(0), (field, item[field])


def test_existing_tags_are_reused(client):
    a = client.post("/items", json={"title": "א", "tags": ["משותף"]}).get_json()
    b = client.post("/items", json={"title": "ב", "tags": ["משותף"]}).get_json()
    assert a["tags"] == b["tags"] == ["משותף"]
    assert client.get("/search", query_string={"q": "משותף", "mode": "tags"}).get_json()["count"] == 2


@pytest.mark.parametrize("payload, fragment", [
    ({}, "title is required"),
    ({"title": ""}, "title is required"),
    ({"title": 5}, "title is required"),
    ({"title": "x" * 201}, "at most 200"),
    ({"title": "x", "body": 3}, "body must be"),
    ({"title": "x", "tags": "a,b"}, "tags must be a list"),
    ({"title": "x", "tags": [1]}, "tags[0] is required"),
    ({"title": "x", "tags": ["t"] * 21}, "at most 20"),
    ({"title": "x", "colour": "red"}, "unknown field"),
    ([1, 2], "JSON object"),
])
def test_invalid_items_are_refused_with_the_reason(client, payload, fragment):
    assert fragment in error_of(client.post("/items", json=payload), 400)["message"]


@pytest.mark.parametrize("data, content_type", [
    (b"{not json", "application/json"),
    (b"\xff\xfe\xfa", "application/json"),
    (b"title=x", "application/x-www-form-urlencoded"),
])
def test_malformed_bodies_are_400(client, data, content_type):
    assert error_of(client.post("/items", data=data, content_type=content_type), 400)["code"] == "bad_json"


def test_oversize_body_is_413(client):
    body = b'{"title": "' + b"x" * 70000 + b'"}'
    assert error_of(client.post("/items", data=body, content_type="application/json"), 413)["code"]


def test_missing_item_is_404_json(client):
    assert "no item with id 999" in error_of(client.get("/items/999"), 404)["message"]
    error_of(client.get("/no/such/page"), 404)


def test_wrong_method_is_405_json(client):
    assert error_of(client.delete("/items/1"), 405)["message"].startswith("method not allowed")


@pytest.mark.parametrize("params, code", [
    ({}, "bad_query"),
    ({"q": "   "}, "bad_query"),
    ({"q": "x" * 501}, "bad_query"),
    ({"q": "x", "mode": "fuzzy"}, "bad_mode"),
    ({"q": "x", "limit": "-1"}, "bad_limit"),
    ({"q": "x", "limit": "0"}, "bad_limit"),
    ({"q": "x", "limit": "10000"}, "bad_limit"),
    ({"q": "x", "limit": "ten"}, "bad_limit"),
    ({"q": "x", "page": "2"}, "bad_parameter"),
])
def test_bad_search_parameters_are_400(client, params, code):
    assert error_of(client.get("/search", query_string=params), 400)["code"] == code


def test_huge_query_string_is_refused(client):
    error_of(client.get("/search?q=" + "a" * 5000), 414)


def test_readyz_reports_database_and_semantic_state(client):
    body = client.get("/readyz").get_json()
    assert body["status"] == "ready" and body["database"] == "ok"
    assert body["semantic"]["state"] == "not_loaded"


def test_database_unreachable_gives_503_but_live(tmp_path):
    from app import create_app
    from support import make_settings

    broken = create_app(make_settings(tmp_path, DATABASE_URL="postgresql://nobody:x@127.0.0.1:9/none"))
    client = broken.test_client()
    response = client.get("/readyz")
    assert response.status_code == 503 and response.get_json()["status"] == "not_ready"
    assert client.get("/healthz").status_code == 200
    assert error_of(client.get("/search", query_string={"q": "ספר"}), 503)["code"] == "database_unavailable"
    assert error_of(client.post("/items", json={"title": "x"}), 503)["code"] == "database_unavailable"


def test_security_headers_on_the_page_and_api(client):
    for path in ("/", "/healthz"):
        headers = client.get(path).headers
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"


def test_openapi_limits_are_the_apps_own(make_app):
    from app.search import LIMIT_MAX, MODES

    client = make_app(MAX_QUERY_LENGTH="37").test_client()
    params = {p["name"]: p["schema"] for p in
              client.get("/openapi.json").get_json()["paths"]["/search"]["get"]["parameters"]}
    assert params["q"]["maxLength"] == 37
    assert params["limit"]["maximum"] == LIMIT_MAX and params["mode"]["enum"] == list(MODES)
    # The API enforces the same figure the description announces.
    assert client.get("/search", query_string={"q": "א" * 38}).status_code == 400
    assert client.get("/search", query_string={"q": "א" * 37}).status_code == 200
