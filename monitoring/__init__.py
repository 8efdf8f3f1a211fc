"""Ops runtime: memory watchdog and alerts, memory-based worker recycling, Sentry, and metrics.

``init_app`` attaches the request-side parts to the Flask app (Sentry, ``/metrics``, request
counts). The process-side parts (watchdog thread, recycling, exit accounting) are started from
gunicorn's hooks in ``gunicorn.conf.py`` through ``monitoring.hooks``.
"""

from __future__ import annotations

import os

from flask import Flask, Response, request

from app.settings import Settings


def init_app(app: Flask, settings: Settings) -> None:
    if settings.prometheus_multiproc_dir:
        # prometheus_client writes its per-process files there from the first metric on.
        os.makedirs(settings.prometheus_multiproc_dir, exist_ok=True)
    from . import metrics, sentry

    sentry.init(settings)

    from .watchdog import MemoryWatchdog

    # Used only for its sample(): alerting stays with the watchdog thread, so a scrape never alerts.
    sampler = MemoryWatchdog(settings)

    @app.get("/metrics", endpoint="metrics")
    def metrics_view():
        from app.state import get_service

        semantic = get_service(app)
        metrics.model_loaded.set(1 if semantic.state == "loaded" else 0)
        try:
            MemoryWatchdog.export(sampler.sample())  # this worker's figures as of the scrape
        except Exception:  # a failed sample leaves the last exported figures; the scrape still answers
            pass
        body, content_type = metrics.render(settings.prometheus_multiproc_dir)
        return Response(body, content_type=content_type)

    @app.after_request
    def _count(response):
        try:
            mode = request.args.get("mode", "text") if request.endpoint == "api.search_view" else (
                request.endpoint or "unmatched")
            if mode not in ("text", "tags", "semantic") and request.endpoint == "api.search_view":
                mode = "invalid"
            metrics.requests.labels(mode=mode, status=str(response.status_code)).inc()
        except Exception:  # counting must never break a response
            pass
        return response
