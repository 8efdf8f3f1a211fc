"""What monitoring reads from its settings, declared here so that monitoring never imports the app.

monitoring is the lower layer: the app (app/__init__.py, app/status.py, the semantic service's counters)
and gunicorn.conf.py use it, and it uses neither. Its functions take any object with these attributes;
the app's one ``Settings`` (app/settings.py) is such an object and is what the app and gunicorn.conf.py
pass in (tests/test_monitoring_layout.py checks that it has every one, and that monitoring reads no
other). Facts that belong to the app alone (the semantic model, the database) reach monitoring as plain
values, never as settings monitoring would have to know about.
"""

from __future__ import annotations

from typing import Protocol


class MonitoringSettings(Protocol):
    """The settings monitoring reads: memory thresholds, the shared folder, Sentry and the tier's name."""

    # Memory: the instance's alert threshold, its re-arm ratio and cooldown, the watchdog's interval,
    # the private memory past which a worker is recycled (0: never), and how often a worker hands its
    # freed heap pages back (0: never).
    @property
    def max_memory_mb(self) -> int: ...
    @property
    def memory_rearm_ratio(self) -> float: ...
    @property
    def memory_alert_cooldown(self) -> float: ...
    @property
    def memory_check_interval(self) -> float: ...
    @property
    def max_worker_memory_mb(self) -> int: ...
    @property
    def memory_trim_interval(self) -> float: ...

    # Where the workers meet: prometheus_client's multiprocess folder ("" for one process), the folder
    # of the recycle lock, and the status history's slot count.
    @property
    def prometheus_multiproc_dir(self) -> str: ...
    @property
    def shared_folder(self) -> str: ...
    @property
    def status_history_slots(self) -> int: ...

    # gunicorn's silence limit, named in the log line of a worker it timed out.
    @property
    def gunicorn_timeout(self) -> int: ...

    # Sentry ("" DSN: off) and the names its events and log lines carry.
    @property
    def sentry_dsn(self) -> str: ...
    @property
    def effective_sentry_environment(self) -> str: ...
    @property
    def effective_sentry_release(self) -> str | None: ...
    @property
    def sentry_cron_monitor(self) -> str: ...
    @property
    def sentry_cron_interval(self) -> float: ...
    @property
    def effective_service_name(self) -> str: ...
    @property
    def memory_tier(self) -> str: ...
