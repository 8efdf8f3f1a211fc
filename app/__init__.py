"""memfit: Hebrew text, tag and semantic search that fits a 512 MB instance.

``create_app`` is a small factory of ``register_*`` steps. It never imports numpy, torch,
transformers or onnxruntime: the semantic model and its libraries load on the first semantic
request (see ``app/semantic/service.py``).
"""

from __future__ import annotations

import os

from flask import Flask, request

from .settings import ConfigError, Settings

__all__ = ["create_app", "ConfigError", "Settings"]

SECURITY_HEADERS = {
    # The page loads only its own script and style; nothing inline, nothing third-party.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


# Endpoints that must answer without the database (liveness, readiness's own check, the page).
NO_DATABASE_ENDPOINTS = {"api.healthz", "api.readyz", "web.index", "web.static", "static", "metrics",
                         "openapi.openapi_json", "status.page"}


def create_app(settings: Settings | None = None) -> Flask:
    if settings is None:
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            # Entry points (flask CLI, any WSGI server) stop with the one line, not a traceback.
            raise SystemExit(f"configuration error: {exc}") from None
    app = Flask(__name__, instance_path=settings.instance_path)
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_content_length,
        DEBUG=False if settings.app_env == "production" else app.config["DEBUG"],
    )
    app.json.ensure_ascii = False  # Hebrew as Hebrew, not \u05e1 escapes
    register_state(app, settings)
    register_bodies(app)
    register_database(app, settings)
    register_errors(app)
    register_blueprints(app)
    register_headers(app)
    register_cli(app)
    register_monitoring(app, settings)
    if settings.request_concurrency:
        from .concurrency import Gate

        # Outermost, so that a request's whole run in the app (hooks included) is in its turn.
        app.wsgi_app = Gate(app.wsgi_app, settings.request_concurrency, settings.max_content_length)
    if settings.enable_semantic_search:
        from .semantic.refusals import EarlyRefusal

        # Outside the turns: a search the model queue would refuse anyway waits for no turn.
        app.wsgi_app = EarlyRefusal(app.wsgi_app, app, SECURITY_HEADERS)
    return app


def register_state(app: Flask, settings: Settings) -> None:
    from .settings import RETIRED
    from .state import init_app

    for name in settings.retired:
        app.logger.warning("%s is set but no longer read: %s", name, RETIRED[name])

    # Settings and the semantic service, reached through app.state.get_state(). The service creates
    # its vector store (numpy) on the first semantic search, not here.
    init_app(app, settings)


def register_bodies(app: Flask) -> None:
    from .bodies import register

    register(app)


def register_database(app: Flask, settings: Settings) -> None:
    from . import db

    if settings.is_sqlite and settings.sqlite_path:
        folder = os.path.dirname(settings.sqlite_path)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"DATABASE_URL: cannot create the SQLite folder {folder} ({exc.strerror})") from None
    db.init_app(app, settings)
    # Schema work belongs to the release command (app/release.py), never to a request: a worker
    # only checks, once, that the database is at its code's revision, and until then answers 503.
    from .state import get_state

    @app.before_request
    def _require_schema():
        state = get_state(app)
        if state.schema_ready or request.endpoint in NO_DATABASE_ENDPOINTS:
            return None
        from .errors import error_response
        from .release import schema_problem

        problem = schema_problem()
        if problem:
            return error_response(503, "schema_not_ready", problem)
        state.schema_ready = True
        return None


def register_errors(app: Flask) -> None:
    from .errors import register_errors as register

    register(app)


def register_blueprints(app: Flask) -> None:
    from .api import bp as api
    from .openapi import bp as openapi
    from .status import bp as status
    from .web import bp as web

    app.register_blueprint(api)
    app.register_blueprint(openapi)
    app.register_blueprint(web)
    app.register_blueprint(status)
    from . import limits

    limits.init_app(app, writes=api, guarded=[status])


def register_headers(app: Flask) -> None:
    @app.after_request
    def _headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def register_cli(app: Flask) -> None:
    from .cli import register

    register(app)
    from .release import register as register_release
    register_release(app)


def register_monitoring(app: Flask, settings: Settings) -> None:
    """Hand monitoring the app's own facts: whether the model is loaded and how to label a request."""
    from monitoring import init_app

    from .api import bp as api, search_view
    from .search import MODES
    from .semantic.service import LOADED
    from .state import get_service

    search_endpoint = f"{api.name}.{search_view.__name__}"

    def model_loaded() -> bool:
        return get_service(app).state == LOADED

    def request_label() -> str:
        # Search requests count by mode (an unknown one as "invalid"); every other request by endpoint.
        if request.endpoint != search_endpoint:
            return request.endpoint or "unmatched"
        mode = request.args.get("mode", "text")
        return mode if mode in MODES else "invalid"

    init_app(app, settings, model_loaded=model_loaded, request_label=request_label)
