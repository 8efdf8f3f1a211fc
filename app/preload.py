"""The modules gunicorn's master imports before it forks the workers (PRELOAD_MODULES, on by default).

A worker's own memory is mostly the code it imports: Flask, SQLAlchemy, Alembic (the schema check),
Sentry's SDK, prometheus_client and the app come to ~55-65 MB of private pages in every worker
(measured with /proc/PID/smaps_rollup), more than the model's share. Imported once in the master,
they are pages every forked worker shares copy-on-write, and a recycled worker starts without
importing them again.

Only imports happen here: no app, engine, connection, Sentry client, thread or model session is
created before fork (each worker still runs create_app() itself), and the model's runtime
(onnxruntime, numpy) is left out on purpose: importing onnxruntime starts a thread, and a thread
does not survive fork. One part of the model is read here: the tokenizer file of a local model
folder (preload_tokenizer), whose vocabulary structures would otherwise be each worker's own heap
(~21 MB for multilingual-e5-small with SentencePiece, ~82 MB with tokenizers: app/semantic/unigram.py). tests/test_preload.py checks all of this, and that the pages
are shared.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import threading
from pathlib import Path

from app.semantic.encoders import TOKENIZER_FILE, preload_tokenizer

# What create_app() and a worker's first requests import, model runtime excepted (found by listing
# sys.modules after create_app() and a request of each kind): the register_* steps of app/__init__.py,
# the schema check's Alembic modules (imported inside app/release.py's function), the limiter, both
# database drivers and the metrics.
MODULES = (
    "app.state", "app.db", "app.errors", "app.release", "app.api", "app.limits", "app.openapi", "app.status",
    "app.web", "app.cli", "app.search", "app.semantic.service", "app.semantic.remote", "alembic.script",
    "alembic.runtime.migration", "flask_limiter", "sqlite3", "sqlalchemy.dialects.sqlite.pysqlite",
    "psycopg2", "sqlalchemy.dialects.postgresql.psycopg2", "monitoring", "monitoring.sentry",
    "monitoring.metrics", "monitoring.memory", "monitoring.watchdog", "psutil",
)
# Never imported in the master (see above).
FORBIDDEN = ("onnxruntime", "numpy", "torch")


def preload(model_folder: str | None = None) -> list[str]:
    """Import MODULES with the collector off, and read model_folder's tokenizer if it is a local
    model folder with one, then freeze what exists so the workers' collector leaves those pages
    alone (a collection writes to every object's header and unshares its page; Python's gc.freeze()
    documentation describes this pattern for pre-fork servers).
    Returns the modules imported; raises RuntimeError if an import started a thread or pulled in
    a FORBIDDEN module, since forking would then copy a half-initialised runtime."""
    # No collection while importing: one would free objects between the imported ones, and the
    # workers' new objects would then land in those holes, on pages shared with the master.
    gc.disable()
    # Alembic logs a line per autogenerate plugin at import: noise in the server's log, once per start.
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)
    try:
        for name in MODULES:
            importlib.import_module(name)
        tokenizer = Path(model_folder, TOKENIZER_FILE) if model_folder else None
        if tokenizer is not None and tokenizer.is_file():
            preload_tokenizer(tokenizer)
    finally:
        alembic_log.setLevel(level)
        gc.freeze()
        gc.enable()
    pulled = [name for name in FORBIDDEN if name in sys.modules]
    if pulled or _threads() > 1:
        raise RuntimeError(f"preloading must not start threads or import {', '.join(pulled) or 'a runtime'}")
    _drop_own_metric_files()
    return list(MODULES)


def _threads() -> int:
    """This process's threads, native ones included where /proc shows them."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _drop_own_metric_files() -> None:
    """monitoring.metrics defines its gauges at import, which writes a zero-valued file for this
    (master) pid in PROMETHEUS_MULTIPROC_DIR: the "live" ones would show the master as a worker in
    /metrics. Each worker starts its own files on first use (prometheus_client resets on a new pid)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())
