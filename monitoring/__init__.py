"""Ops runtime: memory watchdog and alerts, memory-based worker recycling, Sentry, and metrics.

``init_app`` attaches the request-side parts to the Flask app (Sentry, ``/metrics``, request
counts). The process-side parts (watchdog thread, recycling, exit accounting) are started from
gunicorn's hooks in ``gunicorn.conf.py`` through ``monitoring.hooks``.

monitoring is the lower layer: the app and gunicorn.conf.py import it, and it imports nothing from
``app``. The app hands over what monitoring needs in ``init_app``: its settings (any object with the
attributes of ``config.MonitoringSettings``), how to tell whether the model is loaded, how to label a
request.
"""

from __future__ import annotations

import os
from typing import Callable

from flask import Flask, Response, request

from .config import MonitoringSettings


def init_app(app: Flask, settings: MonitoringSettings, *, model_loaded: Callable[[], bool],
             request_label: Callable[[], str]) -> None:
    """Register Sentry, ``/metrics`` and the request counter.

    ``model_loaded()`` says whether this worker has the semantic model in memory; ``request_label()``
    names the current request for the request counter (its search mode, or its endpoint). Both are
    called inside a request and belong to the app, which owns the modes and endpoints.
    """
    if settings.prometheus_multiproc_dir:
        # prometheus_client writes its per-process files there from the first metric on.
        os.makedirs(settings.prometheus_multiproc_dir, exist_ok=True)
    from . import metrics, sentry
    from .watchdog import MemorySampler, export

    sentry.init(settings)
    # Sampling only: alerting stays with the watchdog thread, so a scrape never alerts.
    # Multi-process metrics are set up by gunicorn.conf.py only, so there this process is a worker and its
    # parent the master: the instance is the master's tree. Elsewhere (flask run, tests) it is this process.
    sampler = MemorySampler(settings.max_memory_mb,
                            instance_root=os.getppid() if settings.prometheus_multiproc_dir else None)

    @app.get("/metrics", endpoint="metrics")
    def metrics_view():
        metrics.model_loaded.set(1 if model_loaded() else 0)
        try:
            export(sampler.sample())  # this worker's figures as of the scrape
        except Exception:  # a failed sample leaves the last exported figures; the scrape still answers
            pass
        body, content_type = metrics.render(settings.prometheus_multiproc_dir)
        return Response(body, content_type=content_type)

    @app.after_request
    def _count(response):
        try:
            metrics.requests.labels(mode=request_label(), status=str(response.status_code)).inc()
        except Exception:  # counting must never break a response
            pass
        return response
