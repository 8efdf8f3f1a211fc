"""Prometheus metrics, safe with several gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn.conf.py sets it before any worker starts),
prometheus_client keeps each process's values in files there, and ``/metrics`` merges them, so a
scrape that lands on any worker sees the whole instance. Without it (tests, ``flask run``) the
ordinary in-process registry is used.

prometheus_client leaves a dead worker's counter and histogram files behind (only its live gauges go),
so each worker lifetime would add files and every scrape would read them all. The master folds a dead
worker's files into one archive file per type (``archive_dead_process``); a lock keeps a scrape from
reading in the middle of a fold, which would count the dead worker twice or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import multiprocess

PREFIX = "memfit_"

process_rss = Gauge(PREFIX + "process_rss_bytes", "Resident memory of each worker process.",
                    multiprocess_mode="liveall")
container_usage = Gauge(PREFIX + "container_memory_usage_bytes",
                        "Container (cgroup) memory in use, page cache included.", multiprocess_mode="livemax")
container_working_set = Gauge(PREFIX + "container_memory_working_set_bytes",
                              "Container memory in use minus reclaimable page cache.", multiprocess_mode="livemax")
container_limit = Gauge(PREFIX + "container_memory_limit_bytes",
                        "Effective memory limit: the cgroup limit, or host RAM if smaller or unset.",
                        multiprocess_mode="livemax")
model_loaded = Gauge(PREFIX + "semantic_model_loaded", "1 where this worker has the semantic model loaded.",
                     multiprocess_mode="liveall")
alerts = Counter(PREFIX + "memory_alerts_total", "Memory alerts raised (logged, and sent to Sentry when set).",
                 ["subject"])
recycles = Counter(PREFIX + "worker_recycles_total", "Workers that exited gracefully after a request "
                   "because their RSS passed MAX_WORKER_MEMORY_MB.")
worker_exits = Counter(PREFIX + "worker_exits_total", "Worker processes that ended, by how.", ["cause"])
requests = Counter(PREFIX + "requests_total", "HTTP requests by search mode (or endpoint) and status.",
                   ["mode", "status"])


def render(multiprocess_dir: str) -> tuple[bytes, str]:
    """The exposition text for a scrape, merged across workers when running multi-process."""
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)
        with _fold_lock(multiprocess_dir, exclusive=False):
            return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int, multiprocess_dir: str) -> None:
    if multiprocess_dir:
        multiprocess.mark_process_dead(pid, multiprocess_dir)


# Types whose values add up across processes: a dead worker's share can be folded into one file.
# Gauges cannot (live* gauges of a dead pid are dropped by mark_process_dead; memfit has no others).
ADDITIVE_TYPES = ("counter", "histogram", "summary")
# Named like prometheus_client's files (type first, so the collector reads them as that type), with a
# name in place of a pid: no process ever writes it, only the master, in archive_dead_process.
ARCHIVE_NAME = "{}_archive.db"
LOCK_NAME = "fold.lock"  # not *.db: the collector reads only those
FOLD_LOCK_WAIT_S = 2.0  # how long the master waits for scrapes in progress before leaving a fold for later


@contextlib.contextmanager
def _fold_lock(directory: str, exclusive: bool, wait: float | None = None):
    """flock on the folder's lock file: scrapes share it, a fold takes it alone. Yields whether it is
    held: a shared lock always ends up held; an exclusive one gives up after ``wait`` seconds, so the
    master never blocks on a worker that is stuck in a scrape."""
    with open(os.path.join(directory, LOCK_NAME), "a") as handle:
        if not exclusive:
            fcntl.flock(handle, fcntl.LOCK_SH)
            yield True
            return
        deadline = time.monotonic() + (wait or 0)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.01)
        yield True  # closing the file releases the lock


def archive_dead_process(pid: int, multiprocess_dir: str, wait: float | None = None) -> bool:
    """In the master, after the worker ``pid`` has exited: add its counter, histogram and summary
    values into the archive file of each type and delete its files, so totals stay the same (and
    monotonic) while the folder stops growing. Returns False when scrapes kept the lock past ``wait``
    (FOLD_LOCK_WAIT_S): the worker's files stay, still counted, and the caller tries again later.

    Only the master calls this, one exit at a time (gunicorn reaps children in its main loop), so
    the archive files have one writer.
    """
    if not multiprocess_dir:
        return True
    from prometheus_client.mmap_dict import MmapedDict

    wait = FOLD_LOCK_WAIT_S if wait is None else wait
    with _fold_lock(multiprocess_dir, exclusive=True, wait=wait) as held:
        if not held:
            return False
        for typ in ADDITIVE_TYPES:
            source = os.path.join(multiprocess_dir, f"{typ}_{pid}.db")
            if not os.path.exists(source):
                continue
            # Every raw value adds: counters, histogram buckets (stored per bucket, not cumulative),
            # _sum and _count alike; keys are identical across processes (mmap_key).
            values = [(key, value, stamp) for key, value, stamp, _ in MmapedDict.read_all_values_from_file(source)]
            archive = MmapedDict(os.path.join(multiprocess_dir, ARCHIVE_NAME.format(typ)))
            try:
                for key, value, stamp in values:
                    total, _ = archive.read_value(key)
                    archive.write_value(key, total + value, stamp)
            finally:
                archive.close()
            os.remove(source)
    return True
