"""app/errors.py: a database that is away is a 503 at WARNING; a statement the database refuses is a
bug: a JSON 500 with no detail, logged at ERROR with the exception so that Sentry receives it."""

import logging
import time

import pytest
from sqlalchemy import exc as sa

from test_api import error_of


class _Driver(Exception):
    pass


def _raising(error: Exception):
    def run(*_args):
        raise error

    return run


@pytest.mark.parametrize("error", [
    sa.DataError("INSERT ...", {}, _Driver("value too long for type character varying(64)")),
    sa.ProgrammingError("SELECT ...", {}, _Driver("column does not exist")),
    sa.IntegrityError("INSERT ...", {}, _Driver("null value in column")),
])
def test_a_refused_statement_is_a_logged_500(client, monkeypatch, caplog, error):
    monkeypatch.setattr("app.search.run", _raising(error))
    response = client.get("/search", query_string={"q": "ספר"})
    body = error_of(response, 500)
    assert body["code"] == "internal_error" and "character varying" not in response.get_data(as_text=True)
    records = [r for r in caplog.records if r.name == "app.errors"]
    assert [r.levelno for r in records] == [logging.ERROR] and records[0].exc_info[1] is error


@pytest.mark.parametrize("error", [
    sa.OperationalError("SELECT 1", {}, _Driver("server closed the connection unexpectedly")),
    sa.InterfaceError("SELECT 1", {}, _Driver("connection already closed")),
    sa.DBAPIError("SELECT 1", {}, _Driver("terminating connection"), connection_invalidated=True),
    sa.TimeoutError("QueuePool limit reached"),
])
def test_a_database_that_is_away_is_503_at_warning(client, monkeypatch, caplog, error):
    monkeypatch.setattr("app.search.run", _raising(error))
    assert error_of(client.get("/search", query_string={"q": "ספר"}), 503)["code"] == "database_unavailable"
    assert [r.levelno for r in caplog.records if r.name == "app.errors"] == [logging.WARNING]


def test_a_real_data_error_on_postgresql_is_500_not_an_outage(make_app, backend, monkeypatch, caplog):
    if backend != "postgresql":
        pytest.skip("SQLite does not type-check values")
    from app.db import db

    app = make_app()
    monkeypatch.setattr("app.search.run", lambda *_: db.session.execute(db.text("SELECT CAST('x' AS integer)")))
    assert error_of(app.test_client().get("/search", query_string={"q": "x"}), 500)["code"] == "internal_error"
    assert any(r.levelno == logging.ERROR and isinstance(r.exc_info[1], sa.DataError) for r in caplog.records)
    # The session was rolled back: the next request on the same worker works.
    monkeypatch.undo()
    assert app.test_client().get("/search", query_string={"q": "x"}).status_code == 200


def test_a_refused_statement_reaches_the_sentry_transport(tmp_path, monkeypatch):
    # Not parametrized by back end: the SDK is initialised once here, in this process, and switched off after.
    import sentry_sdk

    from app import create_app
    from fake_sentry import FakeSentry
    from support import make_settings

    with FakeSentry() as fake:
        app = create_app(make_settings(tmp_path, SENTRY_DSN=fake.dsn))
        with app.app_context():
            from app.db import create_schema

            create_schema()
        error = sa.DataError("INSERT INTO tags ...", {}, _Driver("value too long for type character varying(64)"))
        monkeypatch.setattr("app.search.run", _raising(error))
        try:
            assert app.test_client().get("/search", query_string={"q": "x"}).status_code == 500
            sentry_sdk.flush(timeout=10)
            deadline = time.monotonic() + 10
            while not fake.events("error") and time.monotonic() < deadline:
                time.sleep(0.05)  # the transport sends from its own thread: wait for the envelope
        finally:
            sentry_sdk.get_client().close(timeout=2)
            sentry_sdk.init()  # an inactive client, so no later test reports to this fake
        events = fake.events("error")
    assert events, "the database bug never reached Sentry"
    values = events[0]["exception"]["values"]
    assert any(v["type"] == "DataError" for v in values), values
