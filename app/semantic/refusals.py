"""Refusing a semantic search before it costs anything: WSGI middleware, outside the turns and Flask.

When the worker's model queue would refuse any query now (its expected wait past SEMANTIC_DEADLINE_MS
whatever the query's length: service.early_refusal), a well-formed ``GET /search?mode=semantic`` is
answered 503 ``overloaded`` with Retry-After here, as the app would answer it, without waiting for a
turn (app/concurrency.py) or running Flask's routing, hooks and error handlers: 0.1 ms of CPU in the
app against 0.7-0.8 ms through Flask. Before the answer the refusal is held (service.hold_refusal).

Why both: a refusal's CPU is taken from the model thread, which runs below request threads
(SEMANTIC_NICE), and a client that sends again at once after each 503 makes refusals a loop. At 0.5 CPU,
32 such clients (bench.capacity's closed loop) got 35-84 % of the peak's answers when every refusal ran
through Flask, 88 % with this early answer alone, and 96-109 % with the refusals held too.

Everything else goes to the app: other paths and modes (hybrid falls back on text instead of refusing),
a request with anything the app would refuse as a bad parameter, so that it gets that error, and one
with a body (the app reads or refuses it).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

from werkzeug.wrappers import Request

if TYPE_CHECKING:  # pragma: no cover - typing only
    from flask import Flask


class EarlyRefusal:
    """WSGI middleware around ``wsgi_app``: semantic searches the model queue would refuse are answered here."""

    def __init__(self, wsgi_app: Callable, app: "Flask", headers: dict[str, str]):
        self.wsgi_app, self.app, self.headers = wsgi_app, app, headers

    def __call__(self, environ: dict, start_response: Callable):
        refusal = self._refusal(environ)
        if refusal is None:
            return self.wsgi_app(environ, start_response)
        from ..state import get_service

        get_service(self.app).hold_refusal()  # before answering: see there why
        from ..errors import error_body

        body = (json.dumps(error_body("overloaded", str(refusal)), ensure_ascii=False, separators=(",", ":"))
                + "\n").encode()
        start_response("503 SERVICE UNAVAILABLE", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            ("Retry-After", str(refusal.retry_after)), *self.headers.items()])
        _count_request()
        return [body]

    def _refusal(self, environ: dict):
        if environ.get("PATH_INFO") != "/search" or environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return None
        raw = environ.get("QUERY_STRING", "")
        if "mode=semantic" not in raw:  # cheap: most searches are text
            return None
        if environ.get("CONTENT_LENGTH") not in (None, "", "0") or environ.get("HTTP_TRANSFER_ENCODING"):
            return None  # a body: the app reads or refuses it (413)
        from ..api import QUERY_STRING_MAX, search_parameters
        from ..errors import ApiError
        from ..state import get_service, get_settings

        try:
            # Read as Flask reads them (Werkzeug's own parsing: the same decoding of escapes), and checked
            # as the search view checks them: a request the app would refuse as bad gets that 400, not a 503.
            request = Request(environ, shallow=True)
            if len(request.query_string) > QUERY_STRING_MAX:
                return None
            _, mode, _ = search_parameters(request.args, get_settings(self.app).max_query_length)
        except (ApiError, UnicodeError):
            return None  # the app says what is wrong with it
        if mode != "semantic":
            return None
        return get_service(self.app).early_refusal()


def _count_request() -> None:
    """memfit_requests_total for the refusal, as the app's own after_request counts an answer."""
    try:
        from monitoring import metrics

        metrics.requests.labels(mode="semantic", status="503").inc()
    except Exception:  # noqa: BLE001 -- counting must never turn a clean 503 into a 500
        pass
