"""What gunicorn.conf.py's hooks do, kept here as plain functions so they can be tested.

Master side: the start-up report, the metrics folder's life (emptied at start, removed at exit when
the master made it), telling graceful exits from kills (gunicorn passes no exit status to
``child_exit``, so a worker that exits on purpose leaves a marker first; a worker that died without
one was killed, e.g. by the OOM killer), and folding a dead worker's metric files into the archive.
Worker side: the watchdog thread, after a request the return of freed heap pages and recycling on
private memory, the timeout marker when gunicorn aborts a silent worker, and a Sentry flush bounded
by sentry.EXIT_FLUSH_BUDGET_S on exit.

gunicorn.conf.py builds the app's one ``Settings`` and passes it to every function here (which read
only what ``config.MonitoringSettings`` declares), and wraps each hook in ``guarded``: gunicorn does
not catch what a master-side hook raises, so one failing metrics call would stop the master and
every worker with it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from . import memory
from .config import MonitoringSettings

log = logging.getLogger("memfit.ops")
MB = memory.MB
_state: dict = {}


def guarded(hook: Callable) -> Callable:
    """Wrap a gunicorn server hook so that an exception is logged at ERROR and goes no further.

    Monitoring is optional and the master is not: a hook that fails costs a metric or a log line,
    never the server (the worker loop catches only worker_exit; child_exit, on_starting, on_exit and
    worker_abort would stop the master or turn a worker's abort into a traceback).
    """
    @functools.wraps(hook)
    def safe(*args, **kwargs):
        try:
            return hook(*args, **kwargs)
        except Exception:
            log.exception("memfit: the %s hook failed; carrying on without it", hook.__name__)
            return None

    return safe


def leaves_without_teardown(hook: Callable) -> Callable:
    """Wrap worker_exit (already guarded, so it never raises): run it, then exit_without_teardown()."""
    @functools.wraps(hook)
    def run(server, worker):
        hook(server, worker)
        exit_without_teardown(worker)

    return run


def startup_report(server, settings: MonitoringSettings, facts: dict) -> None:
    """One log line: effective memory limit, tier, thresholds, Sentry, and what the caller knows of the
    server and the app (facts: workers, worker_class, threads, max_requests, semantic, model, database,
    schema; gunicorn.conf.py gathers them, monitoring does not import the app)."""
    cgroup = memory.read_cgroup()
    limit = memory.effective_limit(cgroup)
    server.log.info(
        "memfit start-up: tier=%s effective_memory_limit=%dMB (cgroup v%s limit=%s, host=%dMB) "
        "MAX_MEMORY_MB=%d MAX_WORKER_MEMORY_MB=%s workers=%s worker_class=%s threads=%s max_requests=%s "
        "semantic=%s model=%s sentry=%s crons=%s database=%s schema=%s",
        settings.memory_tier, limit // MB, cgroup.version if cgroup else "-",
        f"{cgroup.limit // MB}MB" if cgroup and cgroup.limit else "none", memory.host_total() // MB,
        settings.max_memory_mb, settings.max_worker_memory_mb or "off", facts.get("workers"),
        facts.get("worker_class"), facts.get("threads", 1), facts.get("max_requests"),
        facts.get("semantic"), facts.get("model"), "on" if settings.sentry_dsn else "off",
        settings.sentry_cron_monitor or "off", facts.get("database"), facts.get("schema", "unknown"),
    )


def reset_metrics_dir(path: str) -> None:
    """Metric files of a previous run would be merged into this one's: start empty."""
    if not path:
        return
    shutil.rmtree(path, ignore_errors=True)
    Path(path, "exits").mkdir(parents=True, exist_ok=True)


def remove_metrics_dir(path: str) -> None:
    """on_exit, for a folder the master made itself: /dev/shm is memory, and nothing reads it after."""
    if path:
        shutil.rmtree(path, ignore_errors=True)


def worker_started(worker, settings: MonitoringSettings) -> None:
    """post_worker_init: start this worker's watchdog thread."""
    from .watchdog import MemoryWatchdog

    watchdog = MemoryWatchdog(settings, instance_root=worker.ppid)  # the instance: the master and its workers
    watchdog.ensure_running()
    _state["watchdog"] = watchdog


# Reading private memory walks the worker's page tables (/proc/self/smaps_rollup: milliseconds of CPU for a
# few hundred MB), too dear for every request once a worker's upper bound (memory.private_bound) is past
# the limit: a reading is reused for this long, so a worker that grew is recycled at most this much later.
PRIVATE_READING_MAX_AGE = 1.0  # seconds


def _private_memory(now: float) -> "memory.ProcessMemory":
    reading = _state.get("private_reading")
    if reading is None or now - reading[0] >= PRIVATE_READING_MAX_AGE:
        reading = _state["private_reading"] = (now, memory.read_process())
    return reading[1]


RECYCLE_LOCK = "recycle.lock"
_recycle_decision = threading.Lock()  # one request thread at a time decides this worker's recycle


def _take_recycle_turn(settings: MonitoringSettings) -> bool:
    """Whether this worker may recycle now: one worker of the instance at a time.

    Workers under the same load grow alike and cross MAX_WORKER_MEMORY_MB within seconds of each other;
    gunicorn starts a replacement only once a worker has drained and exited, so two recycling together
    left the instance with no worker accepting for seconds (the overload run: every request of that
    window waited ~3 s). The turn is an exclusive flock on a file in the folder every worker shares, held
    until this process exits, when the kernel drops it whatever the way out (SIGKILL included). A worker
    that finds it taken keeps serving and asks again after a later request; one that cannot use the file
    recycles anyway: the bound matters more than the spacing.
    """
    if "recycle_turn" in _state:
        return True
    try:
        fd = os.open(Path(settings.shared_folder, RECYCLE_LOCK), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        return exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)
    _state["recycle_turn"] = fd  # kept open, so held, until the process ends
    return True


def after_request(worker, settings: MonitoringSettings) -> None:
    """post_request: a worker whose private memory is past MAX_WORKER_MEMORY_MB finishes this request, then
    exits gracefully.

    This is uWSGI's reload-on-rss for gunicorn, decided on private memory (Private_Dirty) rather than RSS: the
    model weights are memory-mapped and shared by every worker, so they fill each worker's RSS without
    being that worker's growth, and a replacement would map them again. Setting ``alive = False`` is how
    gunicorn's own max_requests ends a worker: the response has been written and the connection
    closed, the worker leaves its loop, and the master starts a fresh one. Workers past the bound at
    the same time leave one after the other (_take_recycle_turn).

    Before that, at most once per MEMORY_TRIM_INTERVAL, the worker hands its C heap's free pages back
    (memory.release_free_heap): after a burst they would stay resident, counted in the instance's memory
    and in this worker's private memory, and could recycle a worker that holds nothing live.
    """
    _trim(settings)
    limit = settings.max_worker_memory_mb
    if not limit or not worker.alive:
        return
    if memory.private_bound() <= limit * MB:  # the cheap upper bound settles it
        return
    figures = _private_memory(time.monotonic())
    if figures.private <= limit * MB:
        return
    # With threads, several requests can end past the bound at once: one of them recycles the worker
    # (one log line, one event, one count), the others see it already leaving.
    with _recycle_decision:
        if not worker.alive:
            return
        if not _take_recycle_turn(settings):
            return  # a sibling is draining: this one goes after it, at a later request
        _recycle(worker, settings, figures, limit)


def _trim(settings: MonitoringSettings) -> None:
    if memory.release_free_heap_every(settings.memory_trim_interval, time.monotonic()):
        _state.pop("private_reading", None)  # read before the trim: the recycle decision reads afresh


def _recycle(worker, settings: MonitoringSettings, figures: "memory.ProcessMemory", limit: int) -> None:
    worker.log.warning("memfit recycle: worker pid=%d private=%.0fMB (rss=%.0fMB, pss=%s) > MAX_WORKER_MEMORY_MB=%d "
                       "after %d requests; exiting gracefully", figures.pid, figures.private / MB, figures.rss / MB,
                       "-" if figures.pss is None else f"{figures.pss / MB:.0f}MB", limit, getattr(worker, "nr", -1))
    from . import history, metrics

    history.record_event(settings, "recycle", figures.pid, private_mb=round(figures.private / MB, 1),
                         rss_mb=round(figures.rss / MB, 1), limit_mb=limit)
    metrics.recycles.inc()
    _state["recycled"] = True
    worker.alive = False


def _write_exit_marker(settings: MonitoringSettings, cause: str) -> None:
    """Leave this worker's cause of exit for the master's child_exited (gunicorn passes no status)."""
    if not settings.prometheus_multiproc_dir:
        return
    try:
        Path(settings.prometheus_multiproc_dir, "exits", str(os.getpid())).write_text(cause)
    except OSError:  # a full or vanished /dev/shm costs the label, not the exit
        pass


def worker_aborted(worker, settings: MonitoringSettings) -> None:
    """worker_abort (in the worker, on SIGABRT: gunicorn's timeout for a silent worker).

    gunicorn runs worker_exit right after, as for a graceful exit, so the cause is kept here for
    worker_exiting and written at once: the master follows SIGABRT with SIGKILL about a second later
    if the worker is still there, and the marker must already be on disk by then.
    """
    _state["cause"] = "timeout"
    _write_exit_marker(settings, "timeout")


def worker_exiting(worker, settings: MonitoringSettings) -> None:
    """worker_exit: leave the exit marker, stop the watchdog, send Sentry's pending events within the
    budget and log one line saying how the worker ended and what became of them."""
    if getattr(worker, "pid", None) != os.getpid():
        # gunicorn also calls worker_exit in the master, for a worker that was already gone when the
        # master signalled it (arbiter.kill_worker): there is nothing of the worker's to flush here,
        # and a marker would carry the master's pid. child_exited counts that worker.
        return
    from . import sentry

    cause = _state.get("cause") or ("recycled" if _state.get("recycled") else "graceful")
    _write_exit_marker(settings, cause)  # first: the flush below may be cut short by a SIGKILL
    watchdog = _state.get("watchdog")
    if watchdog is not None:
        watchdog.stop()
    outcome = sentry.close_for_exit()
    worker.log.info("memfit exit: worker pid=%d cause=%s sentry=%s", os.getpid(), cause, outcome)


def exit_without_teardown(worker) -> None:
    """worker_exit, last: a worker that ends normally leaves with os._exit(0) instead of tearing the
    interpreter down.

    Teardown would decrement the reference count of every object the worker inherited from the
    master (app/preload.py), copying each shared page into this exiting process just before it goes
    (the instance's PSS jumped by a worker's worth of memory at every recycle), and forked workers
    have hung in ONNX Runtime's own cleanup until gunicorn's timeout killed them. Everything worth
    keeping is already done by then: the exit marker and Sentry's flush (worker_exiting), and the
    metric files are memory-mapped on /dev/shm. A worker that failed to boot keeps gunicorn's exit
    code (the master stops on WORKER_BOOT_ERROR instead of respawning for ever), so it takes the
    normal path.
    """
    ending = sys.exc_info()[1]
    if getattr(worker, "pid", None) != os.getpid() or not isinstance(ending, SystemExit) \
            or ending.code not in (0, None):
        return
    logging.shutdown()  # flush the log handlers: os._exit skips every buffer
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def child_exited(server, worker, settings: MonitoringSettings) -> None:
    """child_exit (in the master): count how the worker ended, drop its live gauges and fold its
    counters and histograms into the archive files, so /dev/shm holds a bounded set of files."""
    from . import metrics

    directory = settings.prometheus_multiproc_dir
    marker = Path(directory, "exits", str(worker.pid)) if directory else None
    cause = "killed"
    if marker is not None and marker.exists():
        cause = marker.read_text() or "graceful"
        marker.unlink(missing_ok=True)
    elif marker is None:
        cause = "unknown"
    elif getattr(worker, "aborted", False):
        # The master timed it out (SIGABRT) and the worker never got to run worker_abort (stuck in
        # native code, say), so the SIGKILL that followed ended it: still a timeout, not the OOM killer.
        cause = "timeout"
    if cause == "killed":
        server.log.error("memfit: worker pid=%d died without a graceful exit (killed: OOM killer or SIGKILL)",
                         worker.pid)
    elif cause == "timeout":
        server.log.error("memfit: worker pid=%d timed out: silent for more than GUNICORN_TIMEOUT=%ds, aborted "
                         "by the master", worker.pid, settings.gunicorn_timeout)
    metrics.worker_exits.labels(cause=cause).inc()
    if cause in ("killed", "timeout"):  # the on-call page marks them (recycles are marked by the worker)
        from . import history

        history.record_event(settings, cause, worker.pid)
    metrics.mark_process_dead(worker.pid, directory)
    # A merge the lock held off (a scrape in progress) is retried with the next exit.
    pending = _state.setdefault("unarchived", [])
    pending.append(worker.pid)
    _state["unarchived"] = [pid for pid in pending if not metrics.archive_dead_process(pid, directory)]
