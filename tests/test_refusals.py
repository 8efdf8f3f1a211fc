"""app/semantic/refusals.py and SemanticService.hold_refusal: a semantic search that the worker's model
queue would refuse whatever its length is answered 503 overloaded before it takes a turn or runs in
Flask, as the app itself would answer it, and is held a while first (no CPU) so that clients sending
again at once cannot take the model's CPU; every other request goes to the app as before.

The queue is made full by a measured rate so slow that even an empty query would wait past the deadline."""

from __future__ import annotations

import dataclasses
import json
import re
import threading

import pytest

from app import SECURITY_HEADERS
from app.state import get_service
from support import metric, wait_until

SEMANTIC = {"q": "ספרים לילדים", "mode": "semantic"}
REQUESTS = "memfit_requests_total"
SHED = "memfit_semantic_shed_total"


def overloaded_app(make_app, tiny_onnx, **env):
    """A seeded app whose model queue refuses every query by its deadline, and the calls that reached
    the app behind the early refusal (its turns, Flask)."""
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), **env)
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    assert app.test_client().get("/search", query_string=SEMANTIC).status_code == 200  # model and queue made
    queue = get_service(app).queue()
    queue.seconds_per_unit, queue.batched = 60.0, queue.max_batch  # measured: a minute per token
    reached: list[str] = []
    inner = app.wsgi_app.wsgi_app

    def counting(environ, start_response):
        reached.append(environ.get("QUERY_STRING", ""))
        return inner(environ, start_response)

    app.wsgi_app.wsgi_app = counting
    return app, reached


def shape(body: dict) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", json.dumps(body, ensure_ascii=False))


def counts(client) -> tuple[float, float]:
    text = client.get("/metrics").get_data(as_text=True)
    return metric(text, REQUESTS, mode="semantic", status="503"), metric(text, SHED, reason="deadline")


def test_a_query_the_queue_would_refuse_is_answered_before_the_app_as_the_app_answers_it(make_app, tiny_onnx):
    app, reached = overloaded_app(make_app, tiny_onnx, SEMANTIC_REFUSAL_HOLD_MS="0")
    client = app.test_client()
    before = counts(client)
    reached.clear()
    early = client.get("/search", query_string=SEMANTIC)
    assert reached == [], "the refused search went on into the app"
    assert counts(client) == (before[0] + 1, before[1] + 1)  # counted as the app counts its own 503s
    # The same query refused by the app itself (no early check): the same answer.
    get_service(app).early_refusal = lambda: None
    late = client.get("/search", query_string=SEMANTIC)
    assert reached, "without the early check the search should have reached the app"
    assert early.status_code == late.status_code == 503
    # Word for word but the figures: the early check times the shortest query, the app this one.
    assert shape(early.get_json()) == shape(late.get_json())
    assert early.get_json()["error"]["code"] == "overloaded" and "deadline" in early.get_json()["error"]["message"]
    for name in ("Content-Type", *SECURITY_HEADERS):
        assert early.headers.get(name) == late.headers.get(name), name
    assert 1 <= int(early.headers["Retry-After"]) <= int(late.headers["Retry-After"])


@pytest.mark.parametrize("query, status", [
    ({"q": "ספרים", "mode": "hybrid"}, 200),  # hybrid falls back on text rather than refusing
    ({"q": "ספרים", "mode": "text"}, 200),
    ("q=%D7%A1%D7%A4%D7%A8&mode=text&mode=semantic", 200),  # the app reads the first mode given
    ({"q": "ספרים", "mode": "semantic", "sort": "new"}, 400),  # bad requests get their own error
    ({"q": "ספרים", "mode": "semantic", "limit": "0"}, 400),
    ({"q": "   ", "mode": "semantic"}, 400),
    ({"q": "א" * 600, "mode": "semantic"}, 400),
    ({"q": "ספרים\u202e", "mode": "semantic"}, 400),
    ("q=" + "%FF" * 200 + "&mode=semantic", 400),  # as the app decodes it: 600 characters, past 500
])
def test_any_other_request_goes_to_the_app_and_gets_its_answer(make_app, tiny_onnx, query, status):
    app, reached = overloaded_app(make_app, tiny_onnx, SEMANTIC_REFUSAL_HOLD_MS="0")
    reached.clear()
    response = app.test_client().get("/search", query_string=query)
    assert reached, f"{query} was answered before the app"
    assert response.status_code == status, response.get_data(as_text=True)[:300]


def test_a_refusal_is_held_without_a_turn_and_at_most_half_the_handlers_hold_one(make_app, tiny_onnx):
    # Four threads: three semantic handlers, of which one may hold a refusal.
    app, reached = overloaded_app(make_app, tiny_onnx, GUNICORN_THREADS="4", SEMANTIC_REFUSAL_HOLD_MS="700")
    service = get_service(app)
    assert service.settings.semantic_handler_limit == 3
    release, held = threading.Event(), []

    def pause(seconds):
        held.append(seconds)
        assert release.wait(30), "the test never released the held refusal"

    service._pause = pause
    first: dict = {}
    holding = threading.Thread(target=lambda: first.update(
        response=app.test_client().get("/search", query_string=SEMANTIC)))
    holding.start()
    try:
        wait_until(lambda: held, "the first refusal to be held")
        assert held == [0.7] and not first, "the refusal was answered before its hold ended"
        assert service._handlers._value == 2, "a held refusal must take one of the semantic handlers"
        # Past the held share, a refusal is answered at once, and text is not held up by the hold.
        assert app.test_client().get("/search", query_string=SEMANTIC).status_code == 503
        assert app.test_client().get("/search", query_string={"q": "ספרים", "mode": "text"}).status_code == 200
        assert held == [0.7]
    finally:
        release.set()
        holding.join(30)
    assert first["response"].status_code == 503 and first["response"].get_json()["error"]["code"] == "overloaded"
    assert service._handlers._value == 3 and service._held._value == 1  # both given back
    assert not [q for q in reached if "semantic" in q], "a refused search reached the app"


def test_a_search_with_a_body_goes_to_the_app(make_app, tiny_onnx):
    app, reached = overloaded_app(make_app, tiny_onnx, SEMANTIC_REFUSAL_HOLD_MS="0")
    reached.clear()
    response = app.test_client().get("/search", query_string=SEMANTIC, data=b"x" * 70000)
    assert reached and response.status_code == 413, response.get_data(as_text=True)[:300]


def holds(app) -> list:
    """The holds of one semantic search of app, refused (their pauses recorded instead of slept)."""
    held: list = []
    get_service(app)._pause = held.append
    assert app.test_client().get("/search", query_string=SEMANTIC).status_code == 503
    return held


def test_a_worker_of_one_thread_never_holds_a_refusal(make_app, tiny_onnx):
    # Its one semantic handler is its only thread: a held refusal would stop text search too.
    app, _ = overloaded_app(make_app, tiny_onnx, GUNICORN_THREADS="1", SEMANTIC_REFUSAL_HOLD_MS="500")
    assert holds(app) == []


def test_with_no_hold_or_no_free_handler_a_refusal_is_answered_at_once(make_app, tiny_onnx):
    app, _ = overloaded_app(make_app, tiny_onnx, GUNICORN_THREADS="4", SEMANTIC_REFUSAL_HOLD_MS="0")
    service = get_service(app)
    assert holds(app) == []
    service.settings = dataclasses.replace(service.settings, semantic_refusal_hold_ms=500)
    taken = [service._handlers.acquire(blocking=False) for _ in range(service.settings.semantic_handler_limit)]
    assert all(taken)  # every semantic handler busy: a held refusal would take a thread that text needs
    try:
        assert holds(app) == []
    finally:
        for _ in taken:
            service._handlers.release()
    assert holds(app) == [0.5]
