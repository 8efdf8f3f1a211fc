"""Fault points for tests: the app with its `fault_point`s armed from a folder, so that a test can stop a
request at a named place and SIGKILL its worker there (tests/test_faults.py), never by timing.

Served by gunicorn as ``devtools.faultpoints:create_app()`` (tests/support.py's Gunicorn with
``app=faultpoints.APP``); the production app has no such hook registered and its points do nothing.
The folder is MEMFIT_TEST_FAULT_DIR, read here, by the harness, not by the app's settings.

A request reaching point ``name`` while ``<dir>/<name>`` exists takes that file (one request per
arming, even with several workers), writes ``<dir>/<name>.reached`` holding its pid, and waits until
``<dir>/<name>.release`` appears, at most RELEASE_WAIT seconds.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from flask import Flask

APP = "devtools.faultpoints:create_app()"
FAULT_DIR_ENV = "MEMFIT_TEST_FAULT_DIR"
RELEASE_WAIT = 60.0  # seconds; past it the request goes on, so a test that never kills cannot wedge a worker


def pause(folder: Path, name: str) -> None:
    """Stop here if the point is armed (see the module docstring); return at once otherwise."""
    try:
        Path(folder, name).unlink()  # atomic: of two requests reaching an armed point, one pauses
    except FileNotFoundError:
        return
    partial = Path(folder, f"{name}.reached.part")
    partial.write_text(str(os.getpid()))
    partial.replace(Path(folder, f"{name}.reached"))  # the test never reads a half-written pid
    release = Path(folder, f"{name}.release")
    deadline = time.monotonic() + RELEASE_WAIT
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def install(app: Flask, folder: Path) -> Flask:
    """Arm app's fault points from folder; refused for a production app."""
    from app.api import FAULT_POINT
    from app.state import get_settings

    if get_settings(app).app_env == "production":
        raise RuntimeError("fault points are a test harness: not installed with APP_ENV=production")
    app.extensions[FAULT_POINT] = functools.partial(pause, Path(folder))
    return app


def create_app() -> Flask:
    """The app as gunicorn builds it, with its fault points armed from MEMFIT_TEST_FAULT_DIR."""
    from app import create_app as make

    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        raise RuntimeError(f"{FAULT_DIR_ENV} names no folder: the fault points have nowhere to be armed")
    return install(make(), Path(folder))
