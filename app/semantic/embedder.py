"""The background embedder: computes the vectors of new tags and items, never inside a request.

One embedder works per database at a time. Every gunicorn worker starts the thread
(gunicorn.conf.py's post_worker_init, SEMANTIC_EMBEDDER), and only the one that holds the database's
embedder lock works; the others try again every LOCK_RETRY_S, so when the holder dies (SIGKILL, OOM,
a recycle) another takes over within seconds. The lock is one the kernel or the server drops with
its holder, so it cannot leak:

* PostgreSQL: a session advisory lock (``pg_try_advisory_lock``) on a connection the embedder keeps
  open; it covers every instance on the database.
* SQLite: an exclusive ``flock`` on a file beside the database file (the database is one machine's).

It works only in a process whose model is loaded (SEMANTIC_WARM loads it at start; otherwise the
first semantic query does), so a lazy worker stays lazy; with SEMANTIC_BACKEND=remote, where loading
costs no memory, it connects to the embedding service itself. While the service is away its batches
fail, nothing is stored, and the next rounds find the same rows again: it waits and resumes. Its model runs go through the worker's
model queue as background work, so they run only while no semantic query waits. Each batch is stored in one transaction: a crash mid-batch leaves none of it,
and the unique (model, kind, row) constraint keeps a vector from being stored twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select, text

if TYPE_CHECKING:  # pragma: no cover - typing only
    from flask import Flask

log = logging.getLogger(__name__)

# An advisory lock key of the embedder's own ("mfembd" in ASCII): not the release's (app/release.py), so a
# release runs while the embedder works, and other users of the database do not collide.
ADVISORY_KEY = 0x6D66656D6264
LOCK_RETRY_S = 5.0  # how often a worker without the lock tries to take it
ERROR_PAUSE_S = 5.0  # after a failed round (database away, model failed): try again, quietly
# A round looks only at ids above the newest seen when nothing was missing, less this margin: a row
# whose id was handed out earlier but committed later (concurrent writers) is still found. Every
# FULL_SCAN_EVERY_S a round looks at every id (a vector lost some other way, a new model's backlog).
RECENT_IDS = 1000
FULL_SCAN_EVERY_S = 60.0
BACKLOG_EVERY_S = 5.0  # the backlog's counts (three, over whole tables) at most this often
INDEX_CHECK_EVERY_S = 10.0  # how often each worker looks whether the shared index needs a new generation


class DatabaseLock:
    """The embedder's lock for the app's database; ``acquire()`` does not block, ``held()`` re-checks."""

    def __init__(self, app: "Flask"):
        self.app = app
        settings = app.extensions["memfit"].settings
        self._path = None
        if settings.is_sqlite:
            base = settings.sqlite_path or str(Path(settings.shared_folder) / "memory.sqlite3")
            self._path = f"{base}.embedder.lock"
        self._fd: int | None = None
        self._conn = None

    def acquire(self) -> bool:
        if self._path is not None:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._fd = fd
            return True
        from ..db import db

        conn = db.engine.connect()  # kept checked out while the lock is held: no request ever gets it
        try:
            taken = conn.execute(select(func.pg_try_advisory_lock(ADVISORY_KEY))).scalar()
            conn.commit()
        except Exception:
            conn.close()
            raise
        if not taken:
            conn.close()
            return False
        self._conn = conn
        return True

    def held(self) -> bool:
        """Whether the lock is still ours: a database connection can drop (and its lock with it)."""
        if self._fd is not None:
            return True
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
            return True
        except Exception:  # noqa: BLE001 -- the server went away: the lock went with the connection
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()
            return False

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:  # a session lock outlives the pool's reset: unlock before the connection goes back
            conn.execute(select(func.pg_advisory_unlock(ADVISORY_KEY)))
            conn.commit()
            conn.close()
        except Exception:  # noqa: BLE001 -- the connection is broken: discard it (and the lock with it)
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()


class Embedder:
    """The background embedder of one app in one process; ``start()`` it once, ``wake()`` after a write."""

    def __init__(self, app: "Flask", interval: float):
        self.app, self.interval = app, interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = DatabaseLock(app)
        self.working = False  # this process holds the lock
        self.backlog: int | None = None  # rows without a vector at the last look (None: not looked yet)
        self.embedded = 0  # vectors this process has stored
        self._forced = False

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="memfit-embedder", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still in a batch: the thread lets the lock go when it leaves, not before
        self.lock.release()
        self.working = False

    def wake(self) -> None:
        """Look for new rows now rather than at the next interval (a write in this process)."""
        self._forced = True
        self._wake.set()

    def _loop(self) -> None:
        service = self.app.extensions["memfit"].semantic
        floor: dict[str, int] = {}  # look above these ids (empty: everywhere)
        seen: dict[str, int] | None = None  # the newest ids at the last round
        last_full = last_count = last_index = 0.0
        last_problem: str | None = None
        while not self._stop.is_set():
            pause = self.interval
            try:
                with self.app.app_context():
                    if not service.loaded and service.settings.is_remote:
                        # A remote model costs this worker no memory: the embedder connects to it itself, so
                        # vectors are computed even before the first semantic query (and after an outage).
                        service.load_remote()
                    if not service.loaded:
                        # The embedder works where the model already is (SEMANTIC_WARM, or a first semantic
                        # query): it never loads it itself, so a lazy worker stays lazy.
                        pass
                    elif not self.working:
                        self.working = self.lock.acquire()
                        if self.working:
                            log.info("background embedder: this process (pid %d) embeds for the database",
                                     os.getpid())
                    elif not self.lock.held():
                        self.working = False
                    if service.loaded and time.monotonic() - last_index > INDEX_CHECK_EVERY_S:
                        # Every worker with the model, not only the embedder: the index is the instance's
                        # (another instance may hold the database's embedder lock).
                        last_index = time.monotonic()
                        try:
                            service.maintain_index()
                        except Exception as exc:  # noqa: BLE001 -- the index waits; embedding goes on
                            _rollback()
                            log.warning("shared vector index: no new generation started (%s: %s)",
                                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                    if not service.loaded:
                        pause = self.interval
                    elif not self.working:
                        pause = LOCK_RETRY_S
                    else:
                        newest = service.newest()
                        full = time.monotonic() - last_full > FULL_SCAN_EVERY_S
                        if newest != seen or full or self._forced:
                            self._forced = False
                            done = service.embed_pending(wanted=lambda: not self._stop.is_set(),
                                                         after={} if full else floor)
                            self.embedded += done
                            if done:
                                pause = 0.0  # maybe more: the next round now
                            else:  # nothing missing up to these ids
                                seen = newest
                                floor = {kind: max(0, newest[kind] - RECENT_IDS) for kind in newest}
                                if full:
                                    last_full = time.monotonic()
                            if not done or time.monotonic() - last_count > BACKLOG_EVERY_S:
                                self.backlog, last_count = service.backlog(), time.monotonic()
                                _report_backlog(self.backlog)
            except Exception as exc:  # noqa: BLE001 -- the database or the model away: retry later
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                if problem != last_problem:  # once per distinct problem, not every few seconds
                    log.warning("background embedder paused (retrying every %.0f s): %s", ERROR_PAUSE_S, problem)
                last_problem = problem
                pause = ERROR_PAUSE_S
                if self.working:
                    self._recount(service)
            else:
                last_problem = None
            if pause:
                self._wake.wait(pause)
            self._wake.clear()
        self.lock.release()

    def _recount(self, service) -> None:
        """After a failed round, count the rows still waiting: with the model's service away the database
        may still answer, and /readyz then shows the backlog growing instead of the last count before."""
        try:
            with self.app.app_context():
                if service.loaded:
                    self.backlog = service.backlog()
                    _report_backlog(self.backlog)
        except Exception:  # noqa: BLE001 -- the database is away too: the count stays as it was
            _rollback_quietly(self.app)


def _rollback_quietly(app) -> None:
    with contextlib.suppress(Exception), app.app_context():
        _rollback()


def _rollback() -> None:
    from ..db import db

    with contextlib.suppress(Exception):
        db.session.rollback()


def _report_backlog(backlog: int) -> None:
    try:
        from monitoring import metrics

        metrics.semantic_backlog.set(backlog)
    except Exception:  # noqa: BLE001 -- a metric must never stop the embedder
        log.debug("the backlog gauge could not be set", exc_info=True)
