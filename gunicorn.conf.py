# gunicorn configuration for memfit, in the style of gunicorn's examples/example_config.py.
#
# Every value can be overridden from the environment (the variable is named beside it), so one file
# serves the 512 MB and 1 GB tiers: deploy/tiers.yaml sets the per-tier values, and every manifest
# generated from it passes them as environment variables. Run with:
#
#     gunicorn -c gunicorn.conf.py "app:create_app()"
#
# Every variable named here is declared (default, range, meaning) in app/settings.py and read from its
# Settings, so .env.example and docs/configuration.md list it; this file reads the environment only for
# the metrics folder it hands to the workers (tests/test_gunicorn.py checks both).

import dataclasses
import os
import tempfile

from app.settings import ConfigError, Settings
from monitoring.hooks import guarded, leaves_without_teardown

#
# Metrics across workers: prometheus_client's multiprocess mode keeps each worker's values in files in
# PROMETHEUS_MULTIPROC_DIR. Unless it is set, on_starting (below) makes /dev/shm/memfit-metrics-<pid>
# and sets it in the environment, which every worker inherits when forked; on_exit removes it. Not
# here: this file is also loaded by `gunicorn --check-config` and on every reload (SIGHUP), and a
# folder made at load time would be left behind in /dev/shm each time.
#


def owned_metrics_dir() -> str:
    """The metrics folder this master makes when none is given; named by its pid, so on_exit can tell
    it from a folder the operator set (which it leaves alone)."""
    return os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                        f"memfit-metrics-{os.getpid()}")

#
# The app's settings (app/settings.py), built once here from the environment and handed to every
# hook below; gunicorn's own values (PORT, WEB_CONCURRENCY, GUNICORN_*) are parsed there too, with
# the app's validation. The workers' app builds the same Settings from the same
# environment. A bad value stops gunicorn with one line naming it, before any worker starts.
#
try:
    settings = Settings.from_env()
except ConfigError as exc:
    raise SystemExit(f"configuration error: {exc}") from None


#
# Server socket
#
#   bind - Where to listen: GUNICORN_BIND, else 0.0.0.0:PORT. Platforms (Render, Heroku, Fly) hand the
#       port in $PORT and route to 0.0.0.0 inside the container; a local run takes PORT's default. The
#       image's deploy/serve.sh binds a unix socket behind its nginx instead.
#
bind = settings.gunicorn_bind or f"0.0.0.0:{settings.port}"

#   backlog - Connections waiting to be accepted. Small: a 512 MB instance cannot serve a large queue
#       quickly anyway, and the platform's proxy retries elsewhere.
#
backlog = settings.gunicorn_backlog

#   limit_request_line - Largest request line (method, path and query string, version), in bytes, from 0
#       (no limit) to 8190. 8190, gunicorn's most, so that a query string over 4,096 bytes reaches the app,
#       which answers 414 uri_too_long (app/api.py); under gunicorn's default, 4094, gunicorn would refuse
#       the line itself with a 400. A line past 8190 bytes gunicorn refuses, and app/errors.py makes that a
#       414 as well.
#
limit_request_line = 8190

#
# Worker processes
#
#   workers - Worker processes. From WEB_CONCURRENCY (the variable Render and Heroku set), default 1.
#       The model's weights are a memory-mapped file every worker shares (app/semantic/encoders.py),
#       and the app's code is imported in the master before fork (PRELOAD_MODULES), so a worker adds
#       only its own written pages: session buffers, activations, its objects. The tiers' workers and
#       threads are in deploy/tiers.yaml, with why.
#
workers = settings.web_concurrency

#   worker_class - "sync", and with GUNICORN_THREADS above 1 gunicorn's "gthread" (the tiers run many
#       threads per worker). Semantic queries wait in their worker's model queue (app/semantic/queue.py)
#       and are shed with 503 + Retry-After only when the queue would not answer them within
#       SEMANTIC_DEADLINE_MS. With one thread per worker, a waiting query holds the whole worker and text
#       requests queue behind it; with threads a text request finds a free handler, and SEMANTIC_HANDLERS
#       keeps some of a worker's threads (a quarter, at most 8) out of semantic search's reach. Measured side
#       by side (docs/capacity.md, bench.serving): under the 64-client overload, text p50 with 4 threads is
#       a third of that with 1, at the same memory (threads add stacks, and activations only while holding
#       a slot).
#       The platform's proxy buffers slow clients.
#
worker_class = settings.gunicorn_worker_class

#   threads - Request threads per worker (GUNICORN_THREADS); above 1 gunicorn runs its gthread worker.
#
threads = settings.gunicorn_threads

#   max_requests / max_requests_jitter - Restart a worker after this many requests (plus 0..jitter,
#       so that several workers do not restart together). Fragmentation in glibc's heap and Python's
#       object pools makes a long-lived worker's memory creep; a fresh worker starts lean. The tiers set
#       it high, as a backstop (deploy/tiers.yaml): recycling on private memory (MAX_WORKER_MEMORY_MB)
#       catches growth, and each restart costs a fork, a warm-up and a drain the other handlers make up
#       for. 0 disables.
#
max_requests = settings.gunicorn_max_requests
max_requests_jitter = settings.gunicorn_max_requests_jitter

#   timeout - Seconds a worker may stay silent before the master kills and replaces it. 120 covers a
#       cold model load plus a first batch of embeddings on a slow shared CPU.
#
timeout = settings.gunicorn_timeout

#   graceful_timeout - Seconds a worker gets to finish its request on restart or shutdown. Below
#       Render's maxShutdownDelaySeconds (deploy/tiers.yaml), so requests finish before the platform
#       kills the container.
#
graceful_timeout = settings.gunicorn_graceful_timeout

#   keepalive - Seconds to hold an idle connection. Sync workers close after each response anyway.
#
keepalive = settings.gunicorn_keepalive

#   preload_app - False. gunicorn's preload would create the app in the master before forking: its
#       engine, Sentry client and anything that ever started a thread (torch's OpenMP pool, onnxruntime)
#       would be copied into every worker without their threads, a known deadlock. Instead, with
#       PRELOAD_MODULES (on), on_starting imports the app's modules only (app/preload.py): the ~55-65 MB
#       of code every worker would import becomes pages they share, and a recycled worker starts
#       without importing it again. Each worker still creates its app after fork, and the model's
#       runtime is imported after fork too.
#
preload_app = settings.gunicorn_preload

#   worker_tmp_dir - The heartbeat file each worker touches for the master (GUNICORN_WORKER_TMP_DIR).
#       By default on /dev/shm (memory) where it exists: on a disk-backed /tmp, a slow or full disk makes
#       the master think healthy workers are stuck (gunicorn's docs on Docker).
#
worker_tmp_dir = settings.gunicorn_worker_tmp_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)

#   control_socket_disable - No runtime control socket (gunicornc). memfit is managed by the platform
#       (signals, redeploys); the socket would need a writable home directory, which the non-root
#       container user does not have. GUNICORN_CONTROL_SOCKET=true turns it back on.
#
control_socket_disable = not settings.gunicorn_control_socket

#
# Logging: access log to standard output and error log to standard error by default, where the
# platform collects them (GUNICORN_ACCESS_LOG, GUNICORN_ERROR_LOG, GUNICORN_LOG_LEVEL).
#
accesslog = settings.gunicorn_access_log
errorlog = settings.gunicorn_error_log
loglevel = settings.gunicorn_log_level
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms pid=%(p)s'
#   logconfig_dict - Route the app's own loggers (memfit.*, app.*) through gunicorn's console handler,
#       so watchdog alerts and recycle notices land in the same stream, with the same format. gunicorn's
#       error logger reports a malformed chunk met after the answer as a server error with a traceback;
#       client_faults makes it one warning line, which Sentry does not report (monitoring/faults.py).
logconfig_dict = {
    "filters": {"client_faults": {"()": "monitoring.faults.ClientFaultFilter"}},
    "root": {"level": loglevel.upper(), "handlers": ["console"]},
    "loggers": {  # gunicorn's own loggers keep their handlers and stop there (no double lines via root)
        "gunicorn.error": {"level": loglevel.upper(), "handlers": ["error_console"], "propagate": False,
                           "filters": ["client_faults"]},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}

#
# Process naming
#
proc_name = settings.effective_service_name  # RENDER_SERVICE_NAME, else SERVICE_NAME

#
# Protocol errors (malformed request lines, oversized headers) never reach Flask; gunicorn answers
# them itself. memfit's errors are JSON everywhere, so gunicorn's HTML error writer is replaced.
#
from app.errors import install_json_protocol_errors  # noqa: E402

install_json_protocol_errors()

#
# Server hooks: plain functions handing the settings above to monitoring/hooks.py (tested there).
#
#   on_starting - master, before workers: make (or empty) the metrics folder; log the start-up report.
#   post_worker_init - worker, after the app loaded: start the memory watchdog thread; with
#       SEMANTIC_WARM, load the model and answer one query before the first request arrives; with
#       SEMANTIC_EMBEDDER, start the background embedder (one worker per database works, the others wait).
#   post_request - worker, after each response: hand freed heap pages back to the system (at most once
#       per MEMORY_TRIM_INTERVAL), then recycle the worker if its private memory (its own written pages,
#       not the shared weights) passed MAX_WORKER_MEMORY_MB (the memory-based twin of max_requests).
#   worker_abort - worker, on SIGABRT (the master's GUNICORN_TIMEOUT for a silent worker): mark the
#       exit as a timeout (gunicorn runs worker_exit next, as for a graceful exit).
#   worker_exit - worker, on exit: mark how it ended, flush Sentry within sentry.EXIT_FLUSH_BUDGET_S.
#   child_exit - master: count the exit (graceful, recycled, timeout, or killed), drop its live
#       gauges and fold its counters into the archive files.
#   on_exit - master, last: remove the metrics folder if on_starting made it.
#
# gunicorn does not catch exceptions from master-side hooks: one would stop the master. Those hooks
# (and worker_abort, which runs in a signal handler) are wrapped in hooks.guarded, which logs the
# error and carries on.
#


def startup_facts(server):
    """What the start-up line says of the server and the app, beside monitoring's own settings
    (monitoring does not import the app, so the app's facts are gathered here)."""
    return {
        # The class gunicorn runs: "sync" with GUNICORN_THREADS above 1 is its gthread worker.
        "workers": workers, "worker_class": server.cfg.worker_class_str, "threads": threads,
        "max_requests": max_requests, "semantic": "on" if settings.enable_semantic_search else "off",
        "model": settings.model_shown, "database": "sqlite" if settings.is_sqlite else "postgresql",
        "schema": schema_revision(),
    }


def schema_revision():
    """The database's schema revision for the start-up line (monitoring does not import the app, so
    it is read here), read in a short-lived forked child: the imports it needs (SQLAlchemy, Alembic,
    the app) would otherwise stay in the master for its whole life, ~30 MB that every instance pays
    (measured with psutil: master 24 MB after this file, 54 MB after reading the revision in-process).
    It never stops the start: a database that is away is the workers' 503 to report."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer through the pipe, then leave without running the master's exit code
        os.close(read_end)
        try:
            answer = _read_schema_revision()
        except BaseException as exc:  # noqa: BLE001 -- the report line says what went wrong
            answer = f"unknown ({type(exc).__name__})"
        os.write(write_end, answer.encode()[:4096])
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return answer or "unknown (the reader exited without an answer)"


def _read_schema_revision():
    """schema_revision()'s work, in the child: one connection of its own, closed before it exits."""
    try:
        from alembic.script import ScriptDirectory
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        from app.db import MIGRATIONS_DIR, engine_options
        from app.release import RELEASE_COMMAND, current_revisions

        found = frozenset()
        # Connecting would create a missing SQLite file; the release makes it, not the report.
        if not settings.sqlite_path or os.path.exists(settings.sqlite_path):
            engine = create_engine(settings.database_url, poolclass=NullPool,
                                   connect_args=engine_options(settings)["connect_args"])
            try:
                with engine.connect() as connection:
                    found = current_revisions(connection)
            finally:
                engine.dispose()
        heads = frozenset(ScriptDirectory(MIGRATIONS_DIR).get_heads())
    except Exception as exc:  # a start-up report must not be the reason a server fails to start
        return f"unknown ({type(exc).__name__})"
    current = ",".join(sorted(found)) or "none"
    return current if found == heads else f"{current} (code needs {','.join(sorted(heads))}: run {RELEASE_COMMAND})"


@guarded
def on_starting(server):
    global settings
    from monitoring import hooks

    # Before anything in this process imports prometheus_client, and before any worker is forked: the
    # workers and prometheus_client find the folder in the environment.
    folder = settings.prometheus_multiproc_dir or owned_metrics_dir()
    try:
        hooks.reset_metrics_dir(folder)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    except OSError as exc:
        # A read-only or full /dev/shm: workers could not write their metric files and would fail to
        # boot. Without the variable each worker counts on its own (/metrics shows the one that answers).
        server.log.error("memfit: no metrics folder (%s): /metrics covers only the worker that answers", exc)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        folder = ""
    settings = dataclasses.replace(settings, prometheus_multiproc_dir=folder)
    if settings.preload_modules and not preload_app:
        # After the metrics folder exists (the app's modules define their metrics at import) and
        # before any worker is forked: the workers share these pages (app/preload.py).
        from app.preload import preload

        try:
            # A remote model has no tokenizer here to share (SEMANTIC_BACKEND=remote loads nothing).
            local_model = settings.enable_semantic_search and not settings.is_remote
            preload(settings.semantic_model if local_model else None)
        except Exception as exc:  # the workers import what is missing themselves
            server.log.error("memfit: preloading the app's modules failed (%s); workers import them", exc)
    hooks.startup_report(server, settings, startup_facts(server))


def post_worker_init(worker):
    from monitoring import hooks

    hooks.worker_started(worker, settings)
    if settings.semantic_warm and settings.enable_semantic_search:
        # After fork, before this worker accepts a request: no session exists before fork, and a
        # recycled worker's first user gets an answer, not a model load.
        from app.state import warm

        warm(worker.wsgi)
    if settings.semantic_embedder and settings.enable_semantic_search:
        # Every worker starts one; the one holding the database's embedder lock works (app/semantic/embedder.py).
        from app.state import start_embedder

        start_embedder(worker.wsgi)


def post_request(worker, req, environ, resp):
    from monitoring import hooks

    hooks.after_request(worker, settings)


@guarded
def worker_abort(worker):
    from monitoring import hooks

    hooks.worker_aborted(worker, settings)


@leaves_without_teardown  # last: a worker that ends normally leaves here, with os._exit(0)
@guarded
def worker_exit(server, worker):
    from monitoring import hooks

    hooks.worker_exiting(worker, settings)


@guarded
def child_exit(server, worker):
    from monitoring import hooks

    hooks.child_exited(server, worker, settings)


@guarded
def on_exit(server):
    from monitoring import hooks

    if settings.prometheus_multiproc_dir == owned_metrics_dir():
        hooks.remove_metrics_dir(settings.prometheus_multiproc_dir)
