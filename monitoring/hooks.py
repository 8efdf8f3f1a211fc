"""What gunicorn.conf.py's hooks do, kept here as plain functions so they can be tested.

Master side: the start-up report, clearing stale metric files, and telling graceful exits from
kills (gunicorn passes no exit status to ``child_exit``, so a worker that exits on purpose leaves
a marker first; a worker that died without one was killed, e.g. by the OOM killer).
Worker side: the watchdog thread, memory-based recycling after a request, and a Sentry flush
before a recycled worker exits.

gunicorn.conf.py builds the one ``Settings`` and passes it to every function here.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from . import memory

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("memfit.ops")
MB = memory.MB
_state: dict = {}


def startup_report(server, s: "Settings", cfg_summary: dict) -> None:
    """One log line: effective memory limit, tier, thresholds, features, and the schema revision the
    caller read (cfg_summary["schema"]: gunicorn.conf.py reads it, monitoring does not import the app)."""
    cgroup = memory.read_cgroup()
    limit = memory.effective_limit(cgroup)
    server.log.info(
        "memfit start-up: tier=%s effective_memory_limit=%dMB (cgroup v%s limit=%s, host=%dMB) "
        "MAX_MEMORY_MB=%d MAX_WORKER_MEMORY_MB=%s workers=%s worker_class=%s max_requests=%s "
        "semantic=%s model=%s sentry=%s crons=%s database=%s schema=%s",
        s.memory_tier, limit // MB, cgroup.version if cgroup else "-",
        f"{cgroup.limit // MB}MB" if cgroup and cgroup.limit else "none", memory.host_total() // MB,
        s.max_memory_mb, s.max_worker_memory_mb or "off", cfg_summary.get("workers"),
        cfg_summary.get("worker_class"), cfg_summary.get("max_requests"),
        "on" if s.enable_semantic_search else "off", s.semantic_model,
        "on" if s.sentry_dsn else "off", s.sentry_cron_monitor or "off",
        "sqlite" if s.is_sqlite else "postgresql", cfg_summary.get("schema", "unknown"),
    )


def reset_metrics_dir(path: str) -> None:
    """Metric files of a previous run would be merged into this one's: start empty."""
    if not path:
        return
    shutil.rmtree(path, ignore_errors=True)
    Path(path, "exits").mkdir(parents=True, exist_ok=True)


def worker_started(worker, settings: "Settings") -> None:
    """post_worker_init: start this worker's watchdog thread."""
    from .watchdog import MemoryWatchdog

    watchdog = MemoryWatchdog(settings)
    watchdog.ensure_running()
    _state["watchdog"] = watchdog


def after_request(worker, settings: "Settings") -> None:
    """post_request: a worker past MAX_WORKER_MEMORY_MB finishes this request, then exits gracefully.

    This is uWSGI's reload-on-rss for gunicorn. Setting ``alive = False`` is how gunicorn's own
    max_requests ends a worker: the response has been written and the connection closed, the
    worker leaves its loop, and the master starts a fresh one.
    """
    limit = settings.max_worker_memory_mb
    if not limit or not worker.alive:
        return
    rss = memory.process_rss()
    if rss <= limit * MB:
        return
    worker.log.warning("memfit recycle: worker pid=%d rss=%.0fMB > MAX_WORKER_MEMORY_MB=%d after %d requests; "
                       "exiting gracefully", os.getpid(), rss / MB, limit, getattr(worker, "nr", -1))
    from . import history, metrics

    history.record_event(settings, "recycle", os.getpid(), rss_mb=round(rss / MB, 1), limit_mb=limit)
    metrics.recycles.inc()
    _state["recycled"] = True
    worker.alive = False


def worker_exiting(worker, settings: "Settings") -> None:
    """worker_exit (in the worker, on a graceful exit): flush Sentry and leave the graceful marker."""
    from . import sentry

    watchdog = _state.get("watchdog")
    if watchdog is not None:
        watchdog.stop()
    sentry.flush()
    mark_dir = settings.prometheus_multiproc_dir
    if mark_dir:
        try:
            Path(mark_dir, "exits", str(os.getpid())).write_text("recycled" if _state.get("recycled") else "graceful")
        except OSError:
            pass


def child_exited(server, worker, settings: "Settings") -> None:
    """child_exit (in the master): count how the worker ended and drop its live gauges."""
    from . import metrics

    directory = settings.prometheus_multiproc_dir
    marker = Path(directory, "exits", str(worker.pid)) if directory else None
    cause = "killed"
    if marker is not None and marker.exists():
        cause = marker.read_text() or "graceful"
        marker.unlink(missing_ok=True)
    elif marker is None:
        cause = "unknown"
    if cause == "killed":
        server.log.error("memfit: worker pid=%d died without a graceful exit (killed: OOM killer or SIGKILL)",
                         worker.pid)
    metrics.worker_exits.labels(cause=cause).inc()
    metrics.mark_process_dead(worker.pid, directory)

