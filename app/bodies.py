"""Request bodies are whole or refused, whatever their framing.

With a Content-Length, a body over MAX_CONTENT_LENGTH is refused (413) before a byte of it is read. A
chunked body says its length only at its end: Werkzeug reads one up to MAX_CONTENT_LENGTH and hands the
view that prefix as if it were the whole body, so a prefix that parses is saved. A malformed chunk
(gunicorn raises it as an OSError) became Werkzeug's generic "could not understand" 400 where a view
read the body, and where none did, gunicorn met it while discarding the unread body after the answer,
with a logged traceback and a Sentry event. So every chunked body is read here, before any other hook:
whole and within the limit, it becomes the request's stream; otherwise the request is refused, 413 or a
400 naming what is wrong with the framing.
"""

from __future__ import annotations

import io
import logging

from flask import Flask, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from monitoring.faults import is_client_fault

from .errors import ApiError

log = logging.getLogger(__name__)

# What each of gunicorn's body-framing errors means, for the client; keyed by class name so that the app
# does not import gunicorn (it also runs under `flask run`, whose server raises a plain OSError). gunicorn
# raises OSErrors for the chunks and its header errors for the trailer fields.
FRAMING_PROBLEMS = {
    "InvalidChunkSize": "a chunk size is not a hexadecimal number",
    "ChunkMissingTerminator": "a chunk is not followed by CRLF where its size says it ends",
    "InvalidChunkExtension": "a chunk extension is malformed",
    "NoMoreData": "the body ended before its last chunk (a chunk of size 0 and an empty line)",
    # The trailer fields after the last chunk are parsed as headers are.
    "InvalidHeader": "a trailer field after the last chunk is malformed",
    "InvalidHeaderName": "a trailer field's name after the last chunk is malformed",
    "ObsoleteFolding": "a trailer field after the last chunk is folded over lines",
    "LimitRequestHeaders": "the trailer fields after the last chunk are too many or too large",
}


def register(app: Flask) -> None:
    """Read chunked bodies before every other before_request hook, so none answers with a body unread."""
    app.before_request_funcs.setdefault(None, []).insert(0, whole_body)


def whole_body() -> None:
    """Refuse a body over MAX_CONTENT_LENGTH (413) or one with broken chunked framing (400); hand on the rest."""
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    length = request.content_length
    if length is not None:
        if limit is not None and length > limit:
            raise RequestEntityTooLarge()
        return
    environ = request.environ
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return
    try:
        body = _read(environ["wsgi.input"], None if limit is None else limit + 1)
    except Exception as exc:
        if not (isinstance(exc, OSError) or is_client_fault(exc)):
            raise
        _close_after_answer(environ)
        problem = FRAMING_PROBLEMS.get(type(exc).__name__, "the body could not be read to its end")
        # The client's fault, not the server's: one line, no traceback, nothing for Sentry.
        log.warning("refused a chunked body from %s: %s (%s)", request.remote_addr, problem, exc)
        raise ApiError(400, "bad_chunked_body", f"the chunked request body is malformed: {problem} ({exc})"
                       [:300]) from None
    if limit is not None and len(body) > limit:
        raise RequestEntityTooLarge()
    environ["wsgi.input"] = io.BytesIO(body)


def _read(stream, most: int | None) -> bytes:
    """Everything the stream holds, or its first ``most`` bytes when it holds more."""
    parts, size = [], 0
    while most is None or size < most:
        part = stream.read(65536 if most is None else min(65536, most - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _close_after_answer(environ: dict) -> None:
    """Ask gunicorn to close the connection after this answer: past a framing error nobody knows where the
    next request starts, and gunicorn would read the rest of this body as one. Nothing under other servers."""
    message = getattr(getattr(environ.get("wsgi.input"), "reader", None), "req", None)
    if callable(getattr(message, "force_close", None)):
        message.force_close()
