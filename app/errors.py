"""Every error leaves as JSON ``{"error": {"code", "message"}}`` with its status; never HTML or a trace."""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the app refuses; raised by views, rendered by the handler below."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def error_body(code: str, message: str) -> dict:
    """The one shape of every error memfit sends, from Flask or from gunicorn."""
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    response = jsonify(error_body(code, message))
    response.status_code = status
    response.headers.update(headers or {})
    return response


def is_outage(exc: Exception) -> bool:
    """Whether a database error means "the database is away" (503) rather than a bug in memfit (500).

    Lost or refused connections, a pool with no free connection and a connection the driver
    invalidated are outages; a DataError, ProgrammingError or an IntegrityError nobody expected is a
    bug that must reach the error log and Sentry, not hide behind "try again shortly".
    """
    from sqlalchemy.exc import InterfaceError, OperationalError, TimeoutError as PoolTimeout

    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    return bool(getattr(exc, "connection_invalidated", False))


def register_errors(app: Flask) -> None:
    # Imported here, not at the top: gunicorn's master imports this module for
    # install_json_protocol_errors and should not carry SQLAlchemy (about 13 MB) for it.
    from flask_limiter import RateLimitExceeded
    from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeout

    from .semantic.service import Overloaded, SemanticUnavailable

    @app.errorhandler(ApiError)
    def _api(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(exc: RateLimitExceeded):
        from .limits import AUTH_SCOPE, retry_after

        what = "failed token checks" if getattr(exc.limit, "scope", None) == AUTH_SCOPE else "writes"
        return error_response(429, "rate_limited", f"too many {what} from this address (limit: {exc.description}); "
                                                   "retry after the number of seconds in Retry-After",
                              {"Retry-After": str(retry_after(app))})

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        messages = {
            413: f"request body too large (limit {app.config.get('MAX_CONTENT_LENGTH')} bytes)",
            404: "no such resource",
            405: f"method not allowed; allowed: {', '.join(sorted(exc.valid_methods or []))}"
            if getattr(exc, "valid_methods", None) else "method not allowed",
        }
        response = error_response(exc.code or 500, code, messages.get(exc.code, exc.description or code))
        if getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(SemanticUnavailable)
    def _semantic(exc: SemanticUnavailable):
        return error_response(503, "semantic_unavailable", str(exc))

    @app.errorhandler(Overloaded)  # Flask picks the most specific class, so this wins over the one above
    def _overloaded(exc: Overloaded):
        return error_response(503, "overloaded", str(exc), {"Retry-After": str(exc.retry_after)})

    @app.errorhandler(DBAPIError)
    @app.errorhandler(PoolTimeout)
    def _database(exc: Exception):
        from .db import db

        # The connection may be dead; drop the session so the next request starts clean.
        db.session.rollback()
        if is_outage(exc):
            log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
            return error_response(503, "database_unavailable", "the database is unavailable; try again shortly")
        # A statement the database refused: input validation missed a case, or a bug. ERROR with the
        # exception, so Sentry's logging integration reports it; the client gets no detail.
        log.error("database refused a statement: %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "internal_error", "internal error; it has been logged")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")  # the trace goes to the log (and Sentry), not to the client
        return error_response(500, "internal_error", "internal error; it has been logged")


def install_json_protocol_errors() -> None:
    """Make gunicorn's own error responses (malformed request line, oversized headers) JSON.

    Those requests never reach Flask; gunicorn answers them from ``util.write_error`` with an HTML
    page. memfit promises JSON errors everywhere, so that one function is replaced, same signature.
    Called from gunicorn.conf.py, in the master, before any worker forks.

    The code and the reason phrase follow the status: gunicorn passes "Bad Request" with its 501 for an
    unknown transfer coding. A request line over gunicorn's limit_request_line is a URI too long, 414 as
    the app's own answer to a long query string, where gunicorn says 400.
    """
    import contextlib
    import json
    from http import HTTPStatus

    from gunicorn import util
    from gunicorn.http.errors import LimitRequestLine

    line_too_long = str(LimitRequestLine(0, 0)).partition("(")[0]  # gunicorn's words, before the figures

    def write_error(sock, status_int, reason, mesg):
        mesg = str(mesg)
        if status_int == 400 and mesg.startswith(line_too_long):
            status_int, reason = 414, "URI Too Long"  # RFC 9110's phrase: code uri_too_long, as the app's 414
        else:
            with contextlib.suppress(ValueError):  # a status Python does not name keeps gunicorn's phrase
                reason = HTTPStatus(status_int).phrase
        body = json.dumps(error_body(reason.lower().replace(" ", "_").replace("-", "_"), mesg[:300])).encode()
        head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        util.write_nonblock(sock, head + body)

    util.write_error = write_error
