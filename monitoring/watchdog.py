"""The memory watchdog: a named daemon thread that samples memory and raises one alert per crossing.

Its jobs are separate pieces: ``MemorySampler`` takes a sample, ``export`` publishes it as gauges,
``MemoryAlarms`` decides and sends alerts, ``Heartbeat`` checks in with Sentry Crons, and
``MemoryWatchdog`` runs them on its thread. Started from a gunicorn hook in each worker
(``post_worker_init``), never at import. It is fork-aware (a copy inherited through fork is not
running: ``ensure_running`` starts a new one in the child) and it can never take its worker down:
every sample is wrapped, and errors are logged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from . import memory, sentry
from .config import MonitoringSettings

log = logging.getLogger("memfit.watchdog")
MB = memory.MB


@dataclass
class Alarm:
    """Hysteresis for one subject: fire once on crossing, re-arm below the lower mark, honour a cooldown."""

    threshold: int
    rearm_below: int
    cooldown: float
    armed: bool = True
    last_fired: float = field(default=-1e18)

    def update(self, value: int, now: float) -> bool:
        """Feed one sample; returns True when this sample should raise an alert."""
        if value < self.rearm_below:
            self.armed = True
            return False
        if value > self.threshold and self.armed and now - self.last_fired >= self.cooldown:
            self.armed = False
            self.last_fired = now
            return True
        return False


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MB, 1)


class MemorySampler:
    """Reads this worker's, the instance's and the container's memory into one dict of figures (MB).

    The instance is ``instance_root`` (the gunicorn master) and its descendants; without one, this
    process alone. Per process: RSS (labelled as such, never summed to judge), PSS and private memory.
    """

    def __init__(self, threshold_mb: int, cgroup_root: str = "/sys/fs/cgroup", instance_root: int | None = None):
        self.threshold_mb = threshold_mb
        self.cgroup_root = cgroup_root
        self.instance_root = instance_root

    def sample(self) -> dict:
        cgroup = memory.read_cgroup(self.cgroup_root)
        own = memory.read_process()
        pids = memory.process_tree(self.instance_root) if self.instance_root else []
        # Alone (no instance tree), the instance is this process as just read: a second reading could
        # differ by what it freed meanwhile, and show an instance smaller than its one process.
        tree = memory.read_tree(pids) if pids else memory.total([own])
        figures = {
            "pid": own.pid,
            "process_rss_mb": _mb(own.rss),
            "process_pss_mb": _mb(own.pss),
            "process_private_mb": _mb(own.private),
            "memory_source": own.source,
            "instance_processes": tree.processes,
            "instance_pss_mb": _mb(tree.pss),
            "instance_rss_sum_mb": _mb(tree.rss),
            "threshold_mb": self.threshold_mb,
            "effective_limit_mb": _mb(memory.effective_limit(cgroup)),
        }
        if cgroup is not None:
            figures.update(
                cgroup_version=cgroup.version,
                container_usage_mb=_mb(cgroup.usage),
                container_working_set_mb=_mb(cgroup.working_set),
                container_limit_mb=_mb(cgroup.limit) if cgroup.limit else None,
                container_peak_mb=_mb(cgroup.peak),
            )
        judged = memory.instance_figure(cgroup, tree.pss)
        if judged is not None:
            figures["instance_basis"], figures["instance_mb"] = judged[0], _mb(judged[1])
        return figures


def export(figures: dict) -> None:
    """Publish one sample's figures as the process's gauges."""
    from . import metrics

    metrics.worker_rss.set(figures["process_rss_mb"] * MB)
    metrics.worker_private.set(figures["process_private_mb"] * MB)
    if figures["process_pss_mb"] is not None:
        metrics.worker_pss.set(figures["process_pss_mb"] * MB)
    if figures["instance_pss_mb"] is not None:
        metrics.instance_pss.set(figures["instance_pss_mb"] * MB)
    metrics.container_limit.set(figures["effective_limit_mb"] * MB)
    if "container_usage_mb" in figures:
        metrics.container_usage.set(figures["container_usage_mb"] * MB)
        metrics.container_working_set.set(figures["container_working_set_mb"] * MB)
        metrics.instance_working_set.set(figures["container_working_set_mb"] * MB)


BASIS_WORDING = {"cgroup_working_set": "cgroup working set", "pss_sum": "PSS sum of its processes"}


class MemoryAlarms:
    """The instance's alarm: its cgroup working set where the cgroup has a limit, else the PSS sum of its
    processes, against MAX_MEMORY_MB. An alert is logged, counted and sent to Sentry.

    A worker is not alarmed on its own: its private memory is part of the instance's figure, and a
    worker that grows past MAX_WORKER_MEMORY_MB is recycled (hooks.after_request).
    """

    def __init__(self, settings: MonitoringSettings):
        self.settings = settings
        threshold = settings.max_memory_mb * MB
        rearm = int(threshold * settings.memory_rearm_ratio)
        self.alarms = {"instance": Alarm(threshold, rearm, settings.memory_alert_cooldown)}
        self.alerts_sent = 0

    def feed(self, figures: dict, now: float) -> list[str]:
        """Update every alarm with one sample; alert on crossings and return the subjects alerted."""
        values = {}
        if figures.get("instance_mb") is not None:
            values["instance"] = int(figures["instance_mb"] * MB)
        fired = [s for s, v in values.items() if self.alarms[s].update(v, now)]
        for subject in fired:
            self._alert(subject, figures)
        return fired

    def _alert(self, subject: str, figures: dict) -> None:
        basis = BASIS_WORDING.get(figures.get("instance_basis"), figures.get("instance_basis"))
        message = (f"memory high: {subject} at {figures['instance_mb']:.0f} MB ({basis}), over "
                   f"MAX_MEMORY_MB={self.settings.max_memory_mb} "
                   f"({self.settings.effective_service_name}, tier {self.settings.memory_tier})")
        log.warning("%s %s", message, figures)
        self.alerts_sent += 1
        from . import metrics

        metrics.alerts.labels(subject=subject).inc()
        sentry.capture_memory_alert(subject, message, figures, self.settings, figures["pid"])


class Heartbeat:
    """Sentry Crons check-ins at most once per SENTRY_CRON_INTERVAL; nothing when no monitor is set."""

    def __init__(self, settings: MonitoringSettings):
        self.settings = settings
        self._last = 0.0

    def beat(self, now: float) -> None:
        if self.settings.sentry_cron_monitor and now - self._last >= self.settings.sentry_cron_interval:
            self._last = now
            sentry.cron_checkin(self.settings)


class MemoryWatchdog:
    """The thread: every MEMORY_CHECK_INTERVAL, sample, export, feed the alarms, beat the heartbeat."""

    THREAD_NAME = "memfit-memory-watchdog"

    def __init__(self, settings: MonitoringSettings, cgroup_root: str = "/sys/fs/cgroup",
                 instance_root: int | None = None):
        self.settings = settings
        self.sampler = MemorySampler(settings.max_memory_mb, cgroup_root, instance_root)
        self.alarms = MemoryAlarms(settings)
        self.heartbeat = Heartbeat(settings)
        self.last_sample: dict | None = None
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Start the thread in this process if it is not running here (after fork it never is).

        The lock makes check-and-start one step, so two threads calling at once start one watchdog.
        """
        with self._lock:
            if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.settings.memory_check_interval)

    # --- one round -------------------------------------------------------------------------------

    @property
    def alerts_sent(self) -> int:
        return self.alarms.alerts_sent

    def sample(self) -> dict:
        return self.sampler.sample()

    def check(self, now: float | None = None) -> list[str]:
        """Take a sample, update metrics, alert on crossings; never raises. Returns subjects alerted."""
        try:
            now = time.monotonic() if now is None else now
            # A worker that went idle after a burst gets no request to trim after (hooks.after_request).
            memory.release_free_heap_every(self.settings.memory_trim_interval, time.monotonic())
            figures = self.sample()
            self.last_sample = figures
            export(figures)
            fired = self.alarms.feed(figures, now)
            from . import history  # the /status page's ring: this sample and any alert it raised

            history.record_sample(self.settings, figures)
            for subject in fired:
                history.record_event(self.settings, "alert", figures["pid"], subject=subject)
            self.heartbeat.beat(now)
            return fired
        except Exception:  # the watchdog must outlive any surprise: log it and sample again later
            log.exception("memory watchdog sample failed")
            return []
