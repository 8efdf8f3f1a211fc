"""Sentry: error reporting for the app, memory alerts, and a Crons heartbeat.

Everything here is a no-op without SENTRY_DSN, and ``sentry_sdk`` is not even imported then.
Sentry's transport sends from its own background thread, so a dead or slow Sentry never holds
up a request; a worker that exits sends what is pending within EXIT_FLUSH_BUDGET_S, then closes the
client, so the SDK's own exit hook has nothing left to wait on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)
# The most a worker's exit waits on Sentry, in seconds, in total: the flush in close_for_exit and the
# SDK's shutdown_timeout (its atexit wait) are both this, and close_for_exit closes the client, so the
# atexit wait never comes on top. A hanging Sentry used to hold every recycle ~4.7 s.
EXIT_FLUSH_BUDGET_S = 0.5


def init(settings: "Settings") -> bool:
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
        )
        sentry_sdk.set_tag("service", settings.effective_service_name)
        sentry_sdk.set_tag("tier", settings.memory_tier)
    except Exception as exc:  # a malformed DSN must not stop the app: report it and run without
        log.error("Sentry is off: %s", exc)
        return False
    return True


def active() -> bool:
    try:
        import sentry_sdk
    except ImportError:
        return False
    return sentry_sdk.get_client().is_active()


def capture_memory_alert(subject: str, message: str, figures: dict, settings: "Settings", pid: int) -> bool:
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


def cron_checkin(settings: "Settings") -> None:
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
