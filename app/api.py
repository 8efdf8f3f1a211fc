"""The JSON API: search, items, liveness and readiness.

Every input is checked here, before it reaches the database or a search engine: text must be valid
Unicode without control or bidi-override characters, numbers are ASCII digits, lengths are counted
after the normalisation the columns store. Writes need the WRITE_TOKEN and are rate-limited per client.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time

from flask import Blueprint, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from werkzeug.datastructures import MultiDict

from . import search
from .db import ID_MAX, Item, db, tags_by_name
from .errors import ApiError
from .items import checked_text, item_fields
from .search import LIMIT_DEFAULT, LIMIT_MAX
from .state import get_service, get_settings

log = logging.getLogger(__name__)
bp = Blueprint("api", __name__)

QUERY_STRING_MAX = 4096  # bytes; the q parameter has its own, smaller limit (MAX_QUERY_LENGTH)
READ_METHODS = ("GET", "HEAD", "OPTIONS")


# --- where a test may stop a request ------------------------------------------------------------

FAULT_POINT = "memfit_fault_point"  # app.extensions key; devtools/faultpoints.py sets it when testing


def fault_point(name: str) -> None:
    """A place where a test harness may stop this request (tests/test_faults.py SIGKILLs a worker there,
    instead of hoping a kill lands mid-write). Nothing happens unless the harness registered itself,
    which only devtools/faultpoints.py's app factory does."""
    hook = current_app.extensions.get(FAULT_POINT)
    if hook is not None:
        hook(name)


# --- writes: token and client address -------------------------------------------------------------


@bp.record_once
def _announce_writes(setup: BlueprintSetupState) -> None:
    """Say at start-up how writes are authorised (their rate limits are app/limits.py's)."""
    app = setup.app
    settings = get_settings(app)
    if settings.write_token:
        return
    if settings.app_env == "production":
        warning = "writes are closed (403): WRITE_TOKEN is not set and APP_ENV=production"
    else:
        warning = f"writes are open to anyone: WRITE_TOKEN is not set (APP_ENV={settings.app_env})"
    # Said when the process starts serving, once: CLI commands (release, seed) build the app too and
    # serve nothing, and their output must stay theirs.
    pending = [warning]
    lock = threading.Lock()

    @app.before_request
    def _warn_once():
        if pending:
            with lock:
                if pending:
                    log.warning(pending.pop())


@bp.before_request
def _authorise_writes():
    if request.method in READ_METHODS:
        return None
    settings = get_settings()
    token = settings.write_token
    if not token:
        if settings.app_env == "production":
            raise ApiError(403, "writes_disabled", "writes are closed on this instance: WRITE_TOKEN is not configured")
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token_matches(given.strip(), token):
        raise ApiError(401, "unauthorized", "writes need the write token: Authorization: Bearer <WRITE_TOKEN>",
                       {"WWW-Authenticate": 'Bearer realm="memfit writes"'})
    return None


def token_matches(given: str, token: str) -> bool:
    """Whether given is the write token (writes here, /status in app/status.py), in constant time."""
    # Compared as bytes; header text is latin-1 and decoded credentials are valid str, so encoding cannot fail.
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


# --- input checks -----------------------------------------------------------------------------


def _whole_number(name: str, raw: str, low: int, high: int, code: str) -> int:
    # str.isdigit() accepts '²' and '٣'; int() accepts '٣' but not '²'. Only ASCII digits are a number
    # here, and a long string is refused before int() (which stops at 4,300 digits with a ValueError).
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(high))) or not low <= int(raw) <= high:
        raise ApiError(400, code, f"{name} accepts a whole number from {low} to {high}, in ASCII digits 0-9")
    return int(raw)


@bp.before_app_request
def _limit_query_string():
    if len(request.query_string) > QUERY_STRING_MAX:
        raise ApiError(414, "uri_too_long", f"query string too long (limit {QUERY_STRING_MAX} bytes)")


def search_parameters(args: MultiDict, max_query_length: int) -> tuple[str, str, int]:
    """A search's query, mode and limit from its query string's arguments; ApiError (400) naming the
    problem. Also checked before a semantic search is refused early (app/semantic/refusals.py)."""
    unknown = sorted(set(args) - {"q", "mode", "limit"})
    if unknown:
        names = ", ".join(map(repr, unknown))[:200]
        raise ApiError(400, "bad_parameter", f"unknown parameter(s): {names}; accepts q, mode, limit")
    if not args.get("q", "").strip():
        raise ApiError(400, "bad_query", "q is required: the text to search for")
    query = checked_text("q", args["q"], limit=max_query_length, required=True, code="bad_query")
    mode = args.get("mode", "text")
    if mode not in search.MODES:
        raise ApiError(400, "bad_mode", f"mode {mode[:20]!r} is unknown; accepts {', '.join(search.MODES)}")
    limit = _whole_number("limit", args.get("limit", str(LIMIT_DEFAULT)), 1, LIMIT_MAX, "bad_limit")
    return query, mode, limit


@bp.get("/search")
def search_view():
    query, mode, limit = search_parameters(request.args, get_settings().max_query_length)
    started = time.perf_counter()
    answer = search.run(mode, query, limit)
    return jsonify(query=query, mode=mode, **answer.fields(),
                   took_ms=round((time.perf_counter() - started) * 1000, 1))


def _json_object() -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    shape = "the body must be a JSON object (Content-Type: application/json, UTF-8)"
    if not request.is_json:
        raise ApiError(400, "bad_json", shape)
    fault_point("request-body")  # tests/test_faults.py cuts the body off here
    raw = request.get_data(cache=False)  # within MAX_CONTENT_LENGTH: app/bodies.py refused larger ones
    # gunicorn marks its input as terminated, so Werkzeug does not check the length: a client that went
    # away mid-body leaves a shorter body, which may still parse (a whole object and promised bytes more).
    if request.content_length is not None and len(raw) != request.content_length:
        raise ApiError(400, "bad_json", f"the body ended after {len(raw)} of its {request.content_length} bytes "
                                        "(Content-Length)")
    try:
        payload = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not UTF-8 (byte 0x{raw[exc.start]:02x} at {exc.start})") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "the body is nested too deeply to read") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except ValueError:  # an integer of more than 4,300 digits
        raise ApiError(400, "bad_json", "the body holds a number too long to read") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "bad_json", shape)
    return payload


def _item_payload() -> dict:
    return item_fields(_json_object())


@bp.post("/items")
def create_item():
    payload = _item_payload()
    # One transaction: the item, its new tags and the links land together or not at all.
    for attempt in range(3):
        try:
            # The item row (with its text index row) goes first, then its tags and links, all before the
            # one commit; the test-only fault point between the two is where tests/test_faults.py kills.
            item = Item(title=payload["title"], body=payload["body"], tags=[])
            db.session.add(item)
            db.session.flush()
            fault_point("item-inserted")
            item.tags.extend(tags_by_name(payload["tags"]))
            db.session.commit()
            break
        except IntegrityError:
            # A concurrent request created one of the same new tags first: retry, it now exists.
            db.session.rollback()
            if attempt == 2:
                raise ApiError(409, "conflict", "the item's tags changed concurrently; retry the request")
        except Exception:
            db.session.rollback()
            raise
    get_service().wake_embedder()  # its vector comes from the background embedder, not from this request
    return jsonify(item.to_dict()), 201, {"Location": f"/items/{item.id}"}


@bp.get("/items/<item_id>")
def get_item(item_id: str):
    # Parsed here, not by the <int:> converter: it accepts any Unicode digit and lets int() fail on
    # thousands of them. A number past ID_MAX cannot exist (and would overflow the driver): not found.
    if not (item_id.isascii() and item_id.isdigit()):
        raise ApiError(400, "bad_id", "the item id is a whole number in ASCII digits 0-9")
    number = int(item_id) if len(item_id) <= len(str(ID_MAX)) else ID_MAX + 1
    item = db.session.get(Item, number) if number <= ID_MAX else None
    if item is None:
        raise ApiError(404, "not_found", f"no item with id {item_id[:20]}")
    return jsonify(item.to_dict())


@bp.get("/healthz")
def healthz():
    # Liveness only: the process answers. It touches neither the database nor the model.
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz():
    semantic = get_service().status()
    try:
        db.session.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:  # any failure to reach the database means "not ready"
        db.session.rollback()
        database = f"unavailable: {type(exc).__name__}"
    ready = database == "ok"
    semantic.update(get_service().queue_status())
    return jsonify(status="ready" if ready else "not_ready", database=database, semantic=semantic), (
        200 if ready else 503)
