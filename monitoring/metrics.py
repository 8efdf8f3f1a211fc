"""Prometheus metrics, safe with several gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn.conf.py sets it before any worker starts),
prometheus_client keeps each process's values in files there, and ``/metrics`` merges them, so a
scrape that lands on any worker sees the whole instance. Without it (tests, ``flask run``) the
ordinary in-process registry is used.
"""

from __future__ import annotations

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
semantic_shed = Counter(PREFIX + "semantic_shed_total", "Semantic queries shed (503 overloaded, Retry-After) "
                        "because every semantic slot of the instance stayed busy past SEMANTIC_QUEUE_TIMEOUT_MS.")


def render(multiprocess_dir: str) -> tuple[bytes, str]:
    """The exposition text for a scrape, merged across workers when running multi-process."""
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int, multiprocess_dir: str) -> None:
    if multiprocess_dir:
        multiprocess.mark_process_dead(pid)
