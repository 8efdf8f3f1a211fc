"""Writes: the WRITE_TOKEN (bearer, constant-time), production without one (writes closed, 403),
development without one (open, one warning at start-up), and the per-client write rate limit (429)."""

import json
import logging

import pytest

from test_api import error_of

TOKEN = "s3cret-write-token"
ITEM = {"title": "פריט"}


@pytest.fixture
def guarded(make_app):
    return make_app(APP_ENV="production", SECRET_KEY="a-real-secret", WRITE_TOKEN=TOKEN).test_client()


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN}x",
                                    f"Bearer {TOKEN[:-1]}", "Bearer \u05e1\u05d5\u05d3", f"Token {TOKEN}"])
def test_writes_without_the_token_are_401_with_a_challenge(guarded, header):
    headers = {} if header is None else {"Authorization": header}
    response = guarded.post("/items", json=ITEM, headers=headers)
    assert error_of(response, 401)["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert guarded.get("/search", query_string={"q": "פריט"}).get_json()["count"] == 0, "a refused write was stored"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_the_token_opens_writes_and_reads_need_none(guarded, scheme):
    created = guarded.post("/items", json=ITEM, headers={"Authorization": f"{scheme} {TOKEN}"})
    assert created.status_code == 201, created.data
    assert guarded.get(f"/items/{created.get_json()['id']}").status_code == 200
    assert guarded.get("/search", query_string={"q": "פריט"}).get_json()["count"] == 1


def test_the_token_is_compared_in_constant_time(guarded, monkeypatch):
    import hmac

    seen = []
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((a, b)) or a == b)
    guarded.post("/items", json=ITEM, headers={"Authorization": "Bearer guess"})
    assert seen == [(b"guess", TOKEN.encode())]


def test_production_without_a_token_closes_writes_and_keeps_reads(make_app, caplog):
    client = make_app(APP_ENV="production", SECRET_KEY="a-real-secret").test_client()
    with caplog.at_level(logging.WARNING, logger="app.api"):
        error = error_of(client.post("/items", json=ITEM, headers={"Authorization": "Bearer anything"}), 403)
    assert any("writes are closed" in r.getMessage() for r in caplog.records)
    assert error["code"] == "writes_disabled" and "WRITE_TOKEN" in error["message"]
    assert client.get("/search", query_string={"q": "x"}).status_code == 200
    assert client.get("/").status_code == 200


def test_development_without_a_token_is_open_with_one_warning(make_app, caplog):
    with caplog.at_level(logging.WARNING, logger="app.api"):
        app = make_app(APP_ENV="development")
        app.test_cli_runner().invoke(args=["seed"])  # a command serves nothing: no warning in its output
        assert not [r for r in caplog.records if "writes are open" in r.getMessage()]
        client = app.test_client()
        assert client.get("/healthz").status_code == 200
        for _ in range(3):
            assert client.post("/items", json=ITEM).status_code == 201
    warnings = [r for r in caplog.records if "writes are open" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_a_configured_token_is_required_in_development_too(make_app):
    client = make_app(APP_ENV="development", WRITE_TOKEN=TOKEN).test_client()
    error_of(client.post("/items", json=ITEM), 401)


def test_the_page_stays_read_only(guarded):
    # The page never writes, so it never needs (and never carries) the token.
    page = guarded.get("/").get_data(as_text=True)
    assert TOKEN not in page
    script = guarded.get("/static/app.js")
    assert script.status_code == 200 and "POST" not in script.get_data(as_text=True).upper()


def test_writes_past_the_rate_limit_are_429_with_retry_after(make_app):
    client = make_app(WRITE_RATE_LIMIT="3 per minute").test_client()
    statuses = [client.post("/items", json=ITEM).status_code for _ in range(3)]
    assert statuses == [201, 201, 201]
    response = client.post("/items", json=ITEM)
    error = error_of(response, 429)
    assert error["code"] == "rate_limited" and "3 per 1 minute" in error["message"]
    assert 0 < int(response.headers["Retry-After"]) <= 60
    # Reads are not writes: they are never counted or limited.
    assert all(client.get("/search", query_string={"q": "x"}).status_code == 200 for _ in range(5))


def test_the_limit_is_per_client_address(make_app):
    client = make_app(WRITE_RATE_LIMIT="2 per minute").test_client()
    one, other = {"REMOTE_ADDR": "10.0.0.1"}, {"REMOTE_ADDR": "10.0.0.2"}
    assert [client.post("/items", json=ITEM, environ_base=one).status_code for _ in range(3)] == [201, 201, 429]
    assert client.post("/items", json=ITEM, environ_base=other).status_code == 201


def test_behind_a_trusted_proxy_the_limit_keys_on_the_forwarded_address(make_app):
    client = make_app(WRITE_RATE_LIMIT="1 per minute", TRUSTED_PROXIES="1").test_client()
    proxy = {"REMOTE_ADDR": "10.9.9.9"}

    def post(forwarded):
        return client.post("/items", json=ITEM, environ_base=proxy,
                           headers={"X-Forwarded-For": forwarded}).status_code

    assert post("203.0.113.1") == 201 and post("203.0.113.2") == 201
    # A client cannot pick a new key by prepending addresses: the proxy's own entry is the last one.
    assert post("198.51.100.7, 203.0.113.1") == 429


def test_unauthorised_writes_count_against_the_limit(make_app):
    client = make_app(WRITE_TOKEN=TOKEN, WRITE_RATE_LIMIT="2 per minute").test_client()
    assert [client.post("/items", json=ITEM).status_code for _ in range(3)] == [401, 401, 429]


def test_a_bad_rate_limit_setting_stops_start_up_naming_it(tmp_path):
    from app.settings import ConfigError
    from support import make_settings

    with pytest.raises(ConfigError, match="WRITE_RATE_LIMIT"):
        make_settings(tmp_path, WRITE_RATE_LIMIT="lots")


def test_openapi_describes_the_write_token_and_its_errors(client):
    spec = client.get("/openapi.json").get_json()
    post = spec["paths"]["/items"]["post"]
    assert spec["components"]["securitySchemes"]["writeToken"] == {"type": "http", "scheme": "bearer"}
    assert {"401", "403", "429"} <= set(post["responses"])


@pytest.mark.parametrize("env, required", [
    ({"APP_ENV": "production", "SECRET_KEY": "a-real-secret", "WRITE_TOKEN": TOKEN}, True),
    ({"APP_ENV": "production", "SECRET_KEY": "a-real-secret"}, True),  # writes closed: 403 without a token
    ({"WRITE_TOKEN": TOKEN}, True),
    ({}, False),  # development without a token: writes are open
])
def test_openapi_requires_the_write_token_wherever_writes_check_it(make_app, env, required):
    security = make_app(**env).test_client().get("/openapi.json").get_json()["paths"]["/items"]["post"]["security"]
    assert security == ([{"writeToken": []}] if required else [{"writeToken": []}, {}])


def test_generated_manifests_ask_for_the_token_like_the_secret_key():
    import yaml

    from support import ROOT

    render = yaml.safe_load((ROOT / "render.yaml").read_text(encoding="utf-8"))
    env = {e["key"]: e for e in render["services"][0]["envVars"]}
    assert env["WRITE_TOKEN"] == {"key": "WRITE_TOKEN", "generateValue": True}
    heroku = json.loads((ROOT / "app.json").read_text(encoding="utf-8"))
    assert heroku["env"]["WRITE_TOKEN"]["generator"] == "secret"
    assert "WRITE_TOKEN=..." in (ROOT / "deploy/fly/512mb/fly.toml").read_text(encoding="utf-8")
