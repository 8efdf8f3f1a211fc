"""The OpenAPI 3.0 description of the API, served at /openapi.json; the fuzz tests generate requests from it."""

from __future__ import annotations

from flask import Blueprint, jsonify

from .db import BODY_MAX, TAG_MAX, TAGS_PER_ITEM_MAX, TITLE_MAX
from .search import LIMIT_MAX, MODES
from .state import get_settings

bp = Blueprint("openapi", __name__)

ERROR = {"$ref": "#/components/schemas/Error"}
# A search's 503: semantic search off or failing, or shed because its worker's queue would not answer in time.
SEARCH_UNAVAILABLE = {
    "description": "semantic search unavailable (code semantic_unavailable), or shed under load (code "
                   "overloaded: retry after the seconds in Retry-After, or search with mode=text)",
    "headers": {"Retry-After": {"description": "seconds to wait before retrying (with code overloaded)",
                                "schema": {"type": "integer", "minimum": 0}}},
    "content": {"application/json": {"schema": ERROR}},
}
MODE_DESCRIPTION = ("text (default): the Hebrew text index, BM25; tags: items carrying the query's tags; "
                    "semantic: nearest by meaning (503 while the model is off or unavailable); hybrid: text and "
                    "semantic fused by their normalised scores, text alone (with fallback) without the model")
# Present only when the mode asked for could not run in full (hybrid without semantic search).
FALLBACK = {"type": "object", "required": ["mode", "reason"],
            "description": "the mode that answered instead of the one asked for, and why",
            "properties": {"mode": {"type": "string", "enum": ["text"]}, "reason": {"type": "string"}}}
RANKS = {"type": "object", "description": "hybrid: each ranking that found the result, with its 1-based rank there",
         "properties": {"text": {"type": "integer", "minimum": 1}, "semantic": {"type": "integer", "minimum": 1}}}


def _responses(ok: dict, *errors: int) -> dict:
    out = {"200": ok} if "description" in ok else ok
    for status in errors:
        out[str(status)] = {"description": "error", "content": {"application/json": {"schema": ERROR}}}
    return out


def _write_security() -> list[dict]:
    """The bearer token is required where writes check it (WRITE_TOKEN set) or are closed without it
    (production); only a development instance without a token takes writes from anyone."""
    settings = get_settings()
    if settings.write_token or settings.app_env == "production":
        return [{"writeToken": []}]
    return [{"writeToken": []}, {}]


def spec() -> dict:
    """The description of the running app: its limits come from its settings and the search package."""
    json_of = lambda ref: {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}  # noqa: E731
    return {
        "openapi": "3.0.3",
        "info": {"title": "memfit", "version": "1.0.0", "description":
                 "Hebrew text, tag, semantic and hybrid search. Every error is JSON {error: {code, message}}."},
        "paths": {
            "/search": {"get": {
                "operationId": "search",
                "parameters": [
                    {"name": "q", "in": "query", "required": True,
                     "schema": {"type": "string", "minLength": 1, "maxLength": get_settings().max_query_length}},
                    {"name": "mode", "in": "query", "schema": {"type": "string", "enum": list(MODES)},
                     "description": MODE_DESCRIPTION},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX}},
                ],
                "responses": {**_responses({"description": "results", "content": json_of("SearchResults")},
                                           400, 414), "503": SEARCH_UNAVAILABLE},
            }},
            "/items": {"post": {
                "operationId": "createItem",
                "requestBody": {"required": True, "content": json_of("NewItem")},
                "security": _write_security(),
                "responses": {"201": {"description": "created", "content": json_of("Item")},
                              **_responses({}, 400, 401, 403, 409, 413, 429, 503)},
            }},
            "/items/{item_id}": {"get": {
                "operationId": "getItem",
                "parameters": [{"name": "item_id", "in": "path", "required": True,
                                "schema": {"type": "integer", "minimum": 0}}],
                "responses": _responses({"description": "the item", "content": json_of("Item")}, 400, 404, 503),
            }},
            "/healthz": {"get": {"operationId": "healthz", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {"get": {"operationId": "readyz", "responses": {
                "200": {"description": "ready"}, "503": {"description": "database unavailable"}}}},
        },
        "components": {"securitySchemes": {"writeToken": {"type": "http", "scheme": "bearer"}}, "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            "NewItem": {"type": "object", "required": ["title"], "additionalProperties": False, "properties": {
                "title": {"type": "string", "minLength": 1, "maxLength": TITLE_MAX},
                "body": {"type": "string", "maxLength": BODY_MAX},
                "tags": {"type": "array", "maxItems": TAGS_PER_ITEM_MAX,
                         "items": {"type": "string", "minLength": 1, "maxLength": TAG_MAX}}}},
            "Item": {"type": "object", "required": ["id", "title", "body", "tags"], "properties": {
                "id": {"type": "integer"}, "title": {"type": "string"}, "body": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"}}},
            "SearchResults": {"type": "object", "required": ["query", "mode", "count", "results"], "properties": {
                "query": {"type": "string"}, "mode": {"type": "string"}, "count": {"type": "integer"},
                "took_ms": {"type": "number"}, "fallback": FALLBACK,
                "results": {"type": "array", "items": {"type": "object", "required": ["id", "title", "score"],
                                                        "properties": {"id": {"type": "integer"},
                                                                       "title": {"type": "string"},
                                                                       "score": {"type": "number"},
                                                                       "ranks": RANKS}}}}},
        }},
    }


@bp.get("/openapi.json")
def openapi_json():
    return jsonify(spec())
