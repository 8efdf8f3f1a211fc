"""A test-only fault-injection point, so that tests/test_faults.py can stop a worker in the middle of a
write and SIGKILL it there, instead of hoping that a kill happens to land mid-write.

Off unless MEMFIT_TEST_FAULT_DIR names a folder; never set it in a deployment (it is also ignored when
APP_ENV=production). When it is set, a request reaching ``pause_point(name)`` while the file
``<dir>/<name>`` exists takes that file (one request per arming, even with several workers), writes
``<dir>/<name>.reached`` holding its pid, and waits until ``<dir>/<name>.release`` appears, at most
RELEASE_WAIT seconds. The test waits on the first file, then kills the worker or releases it.

Read from ``os.environ`` here rather than declared in app/settings.py: it configures the test
harness, not the app, so it must not appear in .env.example or the README; unset, it costs a dict
lookup per write.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "MEMFIT_TEST_FAULT_DIR"
RELEASE_WAIT = 60.0  # seconds; past it the request goes on, so a test that never kills cannot wedge a worker


def pause_point(name: str) -> None:
    """Pause this request here if a test armed the point ``name``; nothing at all otherwise."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    from .state import get_settings

    if get_settings().app_env == "production":
        return
    try:
        Path(folder, name).unlink()  # atomic: of two requests reaching an armed point, one pauses
    except FileNotFoundError:
        return
    reached = Path(folder, f"{name}.reached")
    partial = Path(folder, f"{name}.reached.part")
    partial.write_text(str(os.getpid()))
    partial.replace(reached)  # the test never reads a half-written pid
    release = Path(folder, f"{name}.release")
    deadline = time.monotonic() + RELEASE_WAIT
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
