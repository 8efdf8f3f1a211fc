"""Sentry: error reporting for the app, memory alerts, and a Crons heartbeat.

Everything here is a no-op without SENTRY_DSN, and ``sentry_sdk`` is not even imported then.
Sentry's transport sends from its own background thread, so a dead or slow Sentry never holds
up a request; a worker that exits sends what is pending within EXIT_FLUSH_BUDGET_S, then closes the
client, so the SDK's own exit hook has nothing left to wait on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .config import MonitoringSettings

log = logging.getLogger(__name__)
# The most a worker's exit waits on Sentry, in seconds, in total: the flush in close_for_exit and the
# SDK's shutdown_timeout (its atexit wait) are both this, and close_for_exit closes the client, so the
# atexit wait never comes on top. Without this bound a hanging Sentry holds every recycle for the SDK's
# own waits (~4.7 s measured).
EXIT_FLUSH_BUDGET_S = 0.5
# Error events sent per kind (fingerprint, else exception type, else log message) per window, per process:
# a flood of one error, whoever causes it, costs this many events of the quota, and an error of another
# kind still gets through. Memory alerts have their own cooldown and fingerprint, so a budget of their own.
EVENT_BUDGET = 10
EVENT_WINDOW_S = 60.0


def init(settings: MonitoringSettings) -> bool:
    """Initialise the SDK once per process; returns whether Sentry is on."""
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.flask import FlaskIntegration

    client = sentry_sdk.get_client()
    if client.is_active() and client.options.get("dsn"):  # an earlier init; one without a DSN sends nothing
        return True
    try:
        sentry_sdk.init(
            dsn=settings.sentry_dsn,
            environment=settings.effective_sentry_environment,
            release=settings.effective_sentry_release,
            integrations=[FlaskIntegration()],
            send_default_pii=False,  # no user IPs, cookies or headers with secrets
            max_request_body_size="never",  # an item's text is its author's, never an error report's
            traces_sample_rate=0.0,
            shutdown_timeout=EXIT_FLUSH_BUDGET_S,
            before_send=EventGate(),
        )
        sentry_sdk.set_tag("service", settings.effective_service_name)
        sentry_sdk.set_tag("tier", settings.memory_tier)
    except Exception as exc:  # a malformed DSN must not stop the app: report it and run without
        log.error("Sentry is off: %s", exc)
        return False
    return True


class EventGate:
    """Sentry's before_send: drop client-caused protocol faults, and events of a kind past its budget.

    Fixed windows per kind; the first event dropped in a window is said once in the log (at WARNING,
    which Sentry keeps as a breadcrumb, not an event). Check-ins pass untouched.
    """

    MAX_KINDS = 512  # past it, kinds whose window has ended are forgotten: the table cannot grow without end

    def __init__(self, budget: int = EVENT_BUDGET, window: float = EVENT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic):
        self.budget, self.window, self.clock = budget, window, clock
        self.windows: dict[str, list] = {}  # kind -> [window start, events sent, events dropped]
        self.lock = threading.Lock()

    def __call__(self, event: dict, hint: dict) -> dict | None:
        if event.get("type") == "check_in":
            return event
        from .faults import is_client_fault

        exc_info = (hint or {}).get("exc_info")
        if exc_info and is_client_fault(exc_info[1]):
            return None
        return event if self.admit(event_kind(event, hint)) else None

    def admit(self, kind: str) -> bool:
        """Whether one more event of kind fits this window's budget."""
        now = self.clock()
        with self.lock:
            if len(self.windows) >= self.MAX_KINDS:
                self.windows = {k: w for k, w in self.windows.items() if now - w[0] < self.window}
            current = self.windows.get(kind)
            if current is None or now - current[0] >= self.window:
                current = self.windows[kind] = [now, 0, 0]
            if current[1] < self.budget:
                current[1] += 1
                return True
            current[2] += 1
            first_dropped = current[2] == 1
        if first_dropped:
            log.warning("Sentry: more than %d events of %s within %.0fs from this process; the rest of this "
                        "window are dropped", self.budget, kind[:200], self.window)
        return False


def event_kind(event: dict, hint: dict | None) -> str:
    """What makes two events the same for the budget: their fingerprint, exception type or log message."""
    if event.get("fingerprint"):
        return "fingerprint:" + "/".join(map(str, event["fingerprint"]))
    exc_info = (hint or {}).get("exc_info")
    if exc_info and exc_info[0] is not None:
        return f"exception:{exc_info[0].__module__}.{exc_info[0].__qualname__}"
    values = (event.get("exception") or {}).get("values") or []
    if values:
        return f"exception:{values[-1].get('module')}.{values[-1].get('type')}"
    # The message before formatting: "database refused a statement: %s" is one kind whatever fills it.
    message = (event.get("logentry") or {}).get("message") or event.get("message") or ""
    return f"message:{event.get('logger')}:{message}"


def active() -> bool:
    try:
        import sentry_sdk
    except ImportError:
        return False
    return sentry_sdk.get_client().is_active()


def capture_memory_alert(subject: str, message: str, figures: dict, settings: MonitoringSettings, pid: int) -> bool:
    """Send one warning event for a memory crossing; returns whether it was handed to Sentry."""
    if not active():
        return False
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        # One issue per subject and service, however the figures vary between alerts.
        scope.fingerprint = ["memfit-memory-threshold", settings.effective_service_name, subject]
        scope.set_tag("service", settings.effective_service_name)
        scope.set_tag("tier", settings.memory_tier)
        scope.set_tag("pid", str(pid))
        scope.set_tag("memory.subject", subject)
        scope.set_context("memory", figures)
        sentry_sdk.capture_message(message, level="warning")
    return True


def cron_checkin(settings: MonitoringSettings) -> None:
    """Tell Sentry Crons this instance is alive; a missed check-in means it died (e.g. OOM-killed)."""
    if not settings.sentry_cron_monitor or not active():
        return
    from sentry_sdk.crons import capture_checkin
    from sentry_sdk.crons.consts import MonitorStatus

    interval_minutes = max(1, round(settings.sentry_cron_interval / 60))
    capture_checkin(
        monitor_slug=settings.sentry_cron_monitor,
        status=MonitorStatus.OK,
        monitor_config={"schedule": {"type": "interval", "value": interval_minutes, "unit": "minute"},
                        "checkin_margin": interval_minutes + 1, "max_runtime": 1},
    )


def close_for_exit(budget: float = EXIT_FLUSH_BUDGET_S) -> str:
    """Send pending events within budget seconds, then close the client; says what happened, for the
    exit log line: "off", "sent in 0.01s", or "gave up after 0.50s (budget 0.50s)".

    flush(timeout) waits until the transport's queue is empty or the deadline passes, whichever comes
    first, so having waited the whole budget means the queue did not drain: events were dropped.
    """
    if not active():
        return "off"
    import sentry_sdk

    client = sentry_sdk.get_client()
    started = time.monotonic()
    client.close(timeout=budget)  # flush, then stop the transport: the atexit hook finds nothing to send
    waited = time.monotonic() - started
    if waited >= budget:
        return f"gave up after {waited:.2f}s (budget {budget:.2f}s)"
    return f"sent in {waited:.2f}s (budget {budget:.2f}s)"
