"""Bad input: requests generated from /openapi.json (schemathesis, thousands of them) and hand-made
hostile ones. No 500, no stack trace in any body, every error JSON."""

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app import create_app
from support import make_settings

_APP = None


def fuzz_app():
    global _APP
    if _APP is None:
        import tempfile
        from pathlib import Path

        tmp = Path(tempfile.mkdtemp(prefix="memfit-fuzz-"))
        _APP = create_app(make_settings(tmp, ENABLE_SEMANTIC_SEARCH="false"))
        _APP.test_cli_runner().invoke(args=["seed"])
    return _APP


schema = schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app())


def no_stack_trace(ctx, response, case):
    text = response.text
    assert "Traceback" not in text and 'File "' not in text, f"stack trace in the body of {case.method} {case.path}"
    if response.status_code >= 400:
        body = json.loads(text)
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), text[:200]


@schema.parametrize()
@settings(max_examples=1200, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_crash(case):
    response = case.call()
    assert response.status_code < 500 or response.status_code == 503, (case.method, case.path, response.text[:300])
    no_stack_trace(None, response, case)


@pytest.fixture(scope="module")
def client():
    return fuzz_app().test_client()


@pytest.mark.parametrize("q", ["%", "_", "'", '"', "' OR 1=1 --", "\\", "%_%", "<script>alert(1)</script>",
                               "\u202e\u05e9\u05dc\u05d5\u05dd", "\x00", "a" * 500, "🙂" * 100])
@pytest.mark.parametrize("mode", ["text", "tags"])
def test_hostile_queries_are_answered(client, q, mode):
    response = client.get("/search", query_string={"q": q, "mode": mode})
    assert response.status_code in (200, 400), response.data[:200]
    assert response.is_json


@pytest.mark.parametrize("raw", [b"/search?q=%FF%FE&mode=text", b"/search?q=%D7&mode=tags", b"/search?q=x&limit=1e9",
                                 b"/search?q=x&limit=%00", b"/items/99999999999999999999999", b"/items/-1"])
def test_invalid_encodings_and_numbers(client, raw):
    response = client.get(raw.decode("latin-1"))
    assert response.status_code in (200, 400, 404) and response.is_json


def test_very_long_query_is_refused_with_its_limit(client):
    body = client.get("/search", query_string={"q": "א" * 501}).get_json()
    assert body["error"]["code"] == "bad_query" and "500" in body["error"]["message"]


def test_openapi_document_is_served_and_lists_the_api(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.") and {"/search", "/items", "/items/{item_id}"} <= set(spec["paths"])


def test_production_has_debug_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASK_DEBUG", "1")
    app = create_app(make_settings(tmp_path, APP_ENV="production", SECRET_KEY="a-real-secret"))
    assert app.debug is False
