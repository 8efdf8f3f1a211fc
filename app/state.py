"""The app's own state: one typed object in ``app.extensions["memfit"]``, reached through ``get_state``.

Settings and the semantic service live there, created once by ``create_app``; nothing else keeps
per-app state under string keys, so a test's second app never shares anything with the first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from flask import Flask, current_app

from .semantic.service import SemanticService
from .settings import Settings

KEY = "memfit"


@dataclass
class AppState:
    settings: Settings
    semantic: SemanticService
    # Set once this worker has seen the database at its code's revision (app.release.schema_problem).
    schema_ready: bool = False
    # The release lock is re-entrant within a process (release -> migrations -> env.py takes it again).
    release_mutex: threading.RLock = field(default_factory=threading.RLock)
    release_depth: int = 0


def init_app(app: Flask, settings: Settings) -> AppState:
    """Attach the state to app; the service loads nothing until the first semantic request."""
    state = AppState(settings=settings, semantic=SemanticService(settings))
    app.extensions[KEY] = state
    return state


def get_state(app: Flask | None = None) -> AppState:
    """The state of app, or of the current app when none is given."""
    return (app or current_app).extensions[KEY]


def get_settings(app: Flask | None = None) -> Settings:
    return get_state(app).settings


def get_service(app: Flask | None = None) -> SemanticService:
    return get_state(app).semantic


def warm(app: Flask) -> bool:
    """Warm app's semantic service in this process (SEMANTIC_WARM: gunicorn.conf.py calls it in each
    new worker); returns whether the model is loaded. Never raises."""
    with app.app_context():
        return get_service(app).warm()


def start_embedder(app: Flask) -> None:
    """Start app's background embedder in this process (SEMANTIC_EMBEDDER: gunicorn.conf.py calls it in
    each new worker, after the warm-up). Never raises: a worker without one still serves."""
    try:
        get_service(app).start_embedder(app)
    except Exception as exc:  # noqa: BLE001 -- the embedder is background work; serving goes on without it
        app.logger.warning("the background embedder did not start: %s: %s", type(exc).__name__, exc)
