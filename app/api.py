"""The JSON API: search, items, liveness and readiness."""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from . import search
from .db import BODY_MAX, ID_MAX, TAG_MAX, TAGS_PER_ITEM_MAX, TITLE_MAX, Item, db, tags_by_name
from .errors import ApiError
from .search import LIMIT_DEFAULT, LIMIT_MAX
from .state import get_service, get_settings

bp = Blueprint("api", __name__)

QUERY_STRING_MAX = 4096  # bytes; the q parameter has its own, smaller limit (MAX_QUERY_LENGTH)


@bp.before_app_request
def _limit_query_string():
    if len(request.query_string) > QUERY_STRING_MAX:
        raise ApiError(414, "uri_too_long", f"query string too long (limit {QUERY_STRING_MAX} bytes)")


@bp.get("/search")
def search_view():
    args = request.args
    unknown = sorted(set(args) - {"q", "mode", "limit"})
    if unknown:
        raise ApiError(400, "bad_parameter", f"unknown parameter(s): {', '.join(unknown)}; accepts q, mode, limit")
    query = args.get("q", "").strip()
    if not query:
        raise ApiError(400, "bad_query", "q is required: the text to search for")
    max_length = get_settings().max_query_length
    if len(query) > max_length:
        raise ApiError(400, "bad_query", f"q is too long: at most {max_length} characters")
    mode = args.get("mode", "text")
    if mode not in search.MODES:
        raise ApiError(400, "bad_mode", f"mode {mode[:20]!r} is unknown; accepts {', '.join(search.MODES)}")
    raw_limit = args.get("limit", str(LIMIT_DEFAULT))
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= LIMIT_MAX:
        raise ApiError(400, "bad_limit", f"limit accepts a whole number from 1 to {LIMIT_MAX}")
    started = time.perf_counter()
    results = search.run(mode, query, int(raw_limit))
    return jsonify(query=query, mode=mode, count=len(results), results=results,
                   took_ms=round((time.perf_counter() - started) * 1000, 1))


def _item_payload() -> dict:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object (Content-Type: application/json, UTF-8)")
    unknown = sorted(set(payload) - {"title", "body", "tags"})
    if unknown:
        raise ApiError(400, "bad_field", f"unknown field(s): {', '.join(unknown)}; accepts title, body, tags")
    title, body, tags = payload.get("title"), payload.get("body", ""), payload.get("tags", [])
    if not isinstance(title, str) or not title.strip():
        raise ApiError(400, "bad_field", "title is required: a non-empty string")
    if len(title) > TITLE_MAX:
        raise ApiError(400, "bad_field", f"title is too long: at most {TITLE_MAX} characters")
    if not isinstance(body, str) or len(body) > BODY_MAX:
        raise ApiError(400, "bad_field", f"body must be a string of at most {BODY_MAX} characters")
    if not isinstance(tags, list) or len(tags) > TAGS_PER_ITEM_MAX:
        raise ApiError(400, "bad_field", f"tags must be a list of at most {TAGS_PER_ITEM_MAX} strings")
    clean = []
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip() or len(tag.strip()) > TAG_MAX:
            raise ApiError(400, "bad_field", f"each tag must be a non-empty string of at most {TAG_MAX} characters")
        clean.append(tag.strip().lstrip("#").strip() or tag.strip())
    for value in [title, body, *clean]:
        if "\x00" in value:
            raise ApiError(400, "bad_field", "text must not contain NUL characters")
    return {"title": title.strip(), "body": body.strip(), "tags": list(dict.fromkeys(clean))}


@bp.post("/items")
def create_item():
    payload = _item_payload()
    # One transaction: the item, its new tags and the links land together or not at all.
    for attempt in range(3):
        try:
            item = Item(title=payload["title"], body=payload["body"], tags=tags_by_name(payload["tags"]))
            db.session.add(item)
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
    return jsonify(item.to_dict()), 201, {"Location": f"/items/{item.id}"}


@bp.get("/items/<int:item_id>")
def get_item(item_id: int):
    # A number past ID_MAX cannot exist (and would overflow the driver): not found, not a 500.
    item = db.session.get(Item, item_id) if item_id <= ID_MAX else None
    if item is None:
        raise ApiError(404, "not_found", f"no item with id {item_id}")
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
    return jsonify(status="ready" if ready else "not_ready", database=database, semantic=semantic), (
        200 if ready else 503)
