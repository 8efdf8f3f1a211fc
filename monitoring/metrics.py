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

# Per worker. The workers share the memory-mapped model weights: RSS counts those pages in every worker,
# PSS splits them among the workers, private memory leaves them out. Never add up RSS to judge memory.
worker_private = Gauge(PREFIX + "worker_private_bytes", "Private memory (USS) of each worker: what it alone "
                       "adds; memory recycling (MAX_WORKER_MEMORY_MB) decides on it.", multiprocess_mode="liveall")
worker_pss = Gauge(PREFIX + "worker_pss_bytes", "Proportional set size of each worker: shared pages split "
                   "among the processes mapping them.", multiprocess_mode="liveall")
worker_rss = Gauge(PREFIX + "worker_rss_bytes", "Resident memory (RSS) of each worker, shared pages included: "
                   "do not add up across workers.", multiprocess_mode="liveall")
process_rss = Gauge(PREFIX + "process_rss_bytes", "RSS of each worker (the same as memfit_worker_rss_bytes, "
                    "kept for existing dashboards).", multiprocess_mode="liveall")
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
