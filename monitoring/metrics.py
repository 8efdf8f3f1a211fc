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

# Per worker. The workers share the memory-mapped model weights: RSS counts those pages in every worker,
# PSS splits them among the workers, private memory leaves them out. Never add up RSS to judge memory.
worker_private = Gauge(PREFIX + "worker_private_bytes", "Private memory of each worker (its own written pages, "
                       "Private_Dirty): what it alone adds; memory recycling (MAX_WORKER_MEMORY_MB) decides on "
                       "it.", multiprocess_mode="liveall")
worker_pss = Gauge(PREFIX + "worker_pss_bytes", "Proportional set size of each worker: shared pages split "
                   "among the processes mapping them.", multiprocess_mode="liveall")
worker_rss = Gauge(PREFIX + "worker_rss_bytes", "Resident memory (RSS) of each worker, shared pages included: "
                   "do not add up across workers.", multiprocess_mode="liveall")
# Per instance: each worker samples the whole instance; the latest sample of a live worker is shown.
instance_pss = Gauge(PREFIX + "instance_pss_bytes", "Sum of the PSS of the instance's processes (gunicorn "
                     "master and workers): what they really occupy.", multiprocess_mode="livemostrecent")
instance_working_set = Gauge(PREFIX + "instance_working_set_bytes", "The instance's cgroup memory in use "
                             "minus reclaimable page cache; alerts (MAX_MEMORY_MB) judge it where the cgroup "
                             "has a limit, else the PSS sum.", multiprocess_mode="livemostrecent")
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
                   "because their private memory passed MAX_WORKER_MEMORY_MB.")
worker_exits = Counter(PREFIX + "worker_exits_total", "Worker processes that ended, by how.", ["cause"])
requests = Counter(PREFIX + "requests_total", "HTTP requests by search mode (or endpoint) and status.",
                   ["mode", "status"])
semantic_shed = Counter(PREFIX + "semantic_shed_total", "Semantic queries shed (503 overloaded, Retry-After), by "
                        "reason: deadline (the queue's drain rate says the wait would pass SEMANTIC_DEADLINE_MS) or "
                        "handlers (SEMANTIC_HANDLERS of the worker's threads already hold semantic searches).",
                        ["reason"])
semantic_runs = Counter(PREFIX + "semantic_model_runs_total", "Model runs, by kind: query (a batch of waiting "
                        "queries) or passage (a batch of the background embedder).", ["kind"])
semantic_run_texts = Counter(PREFIX + "semantic_model_run_texts_total", "Texts encoded by model runs, by kind; "
                             "divided by memfit_semantic_model_runs_total, the mean batch.", ["kind"])
semantic_embedded = Counter(PREFIX + "semantic_embedded_total", "Vectors stored by the background embedder.")
requests_waiting_turn = Gauge(PREFIX + "requests_waiting_for_turn", "Requests of the instance waiting for a turn "
                              "to run (REQUEST_CONCURRENCY): accepted, in a thread, not yet computed.",
                              multiprocess_mode="livesum")
semantic_backlog = Gauge(PREFIX + "semantic_backlog", "Tags and items without a vector for the served model, as "
                         "the background embedder last counted them (0: every row is found by meaning).",
                         multiprocess_mode="livemostrecent")
remote_breaker = Gauge(PREFIX + "semantic_remote_breaker_state", "The embedding service's circuit breaker "
                       "(SEMANTIC_BACKEND=remote), the worst of the live workers: 0 closed, 1 half-open (a probe "
                       "request), 2 open (semantic search answers 503, hybrid falls back to text).",
                       multiprocess_mode="livemax")
remote_requests = Counter(PREFIX + "semantic_remote_requests_total", "Requests to the embedding service, by "
                          "outcome: success, retry (failed, tried again) or failure (failed after its retries).",
                          ["outcome"])


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
