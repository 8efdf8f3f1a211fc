"""Rate limits that hold for the whole deployment, not per worker: writes per client (WRITE_RATE_LIMIT)
and failed token checks per client (AUTH_FAILURE_LIMIT) on every token-guarded path (writes, /status).

Flask-Limiter counts; where the counts live decides what "per client" means:

* ``REDIS_URL`` set (Render Key Value, Heroku Redis, Upstash on Fly): in Redis, through Flask-Limiter's
  own storage, shared by every worker of every instance.
* otherwise: in a small SQLite file in the instance's shared folder (``LocalStorage``), shared by the
  instance's workers. Several instances without Redis each count on their own: a client gets the limit
  once per instance (docs/deploy.md says what a multi-instance deployment needs).

A storage that fails never fails a request: Flask-Limiter counts in the worker's memory meanwhile
(``in_memory_fallback_enabled``) and goes back to the storage when it answers again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Iterator

from flask import Blueprint, Flask, request
from limits.storage import Storage

from .state import get_settings

log = logging.getLogger(__name__)

WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]
LOCAL_FILE = "limits.sqlite3"
AUTH_SCOPE = "auth-failures"
# Longest wait for the counters, the file's lock (another worker writing) or this process's connection.
LOCK_WAIT_S = 2.0

# Storages of this process, renewed in a forked child (LocalStorage._forked); weak, so tests' storages go.
_after_fork: "weakref.WeakSet[LocalStorage]" = weakref.WeakSet()
_inherited: list = []  # connections a forked child inherited: kept open and unused (see _forked)


class LocalStorage(Storage):
    """Fixed-window counters in one SQLite file, for the workers of one instance (the ``limits`` library
    has Redis, Memcached, MongoDB and process memory; none is shared by processes without a server)."""

    STORAGE_SCHEME = ["memfit-local"]

    def __init__(self, uri: str | None = None, wrap_exceptions: bool = False, **options):
        super().__init__(uri, wrap_exceptions, **options)
        self.path = uri.split("://", 1)[1] if uri else ":memory:"
        # One connection per process, used by one thread at a time. A connection per thread cost each
        # worker a connection per request thread that ever wrote (48 on the 512 MB tier), each with
        # its own page cache and lookaside: about 5 MB of a worker's private memory under load
        # (sqlite3_memory_used), for statements that take microseconds.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        _after_fork.add(self)

    def _forked(self) -> None:
        """In a forked child: a new lock (a thread of the parent may have held the old one) and a new
        connection on first use. The inherited one is set aside, never used or closed: SQLite forbids
        carrying a connection across fork, and closing it could checkpoint the parent's WAL."""
        self._lock = threading.Lock()
        if self._conn is not None:
            _inherited.append(self._conn)
        self._conn = None

    @property
    def base_exceptions(self):
        return sqlite3.Error

    def _db(self) -> sqlite3.Connection:
        """This process's connection; call with the lock held."""
        if self._conn is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=LOCK_WAIT_S, isolation_level=None, check_same_thread=False)
            # Counters of the last minutes: losing them in a power cut costs nothing, so no fsync.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, count INTEGER NOT NULL, "
                       "expires REAL NOT NULL)")
            self._conn = db
        return self._conn

    @contextlib.contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        """The connection, for one thread at a time. A thread that waits past LOCK_WAIT_S gets the storage's
        error, and Flask-Limiter counts in memory meanwhile: a busy file never queues a worker's threads
        behind each other's waits."""
        if not self._lock.acquire(timeout=LOCK_WAIT_S):
            raise sqlite3.OperationalError(f"the rate limit counters were busy for {LOCK_WAIT_S} s")
        try:
            yield self._db()
        finally:
            self._lock.release()

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        """The first row of one statement."""
        with self._locked() as db:
            return db.execute(sql, params).fetchone()

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        now = time.time()
        # One statement: a window that has ended starts again at amount, atomically for every worker.
        row = self._one(
            "INSERT INTO counters (key, count, expires) VALUES (?1, ?2, ?3) ON CONFLICT(key) DO UPDATE SET "
            "count = CASE WHEN expires <= ?4 THEN ?2 ELSE count + ?2 END, "
            "expires = CASE WHEN expires <= ?4 THEN ?3 ELSE expires END RETURNING count",
            (key, amount, now + expiry, now))
        return int(row[0])

    def get(self, key: str) -> int:
        row = self._one("SELECT count FROM counters WHERE key = ? AND expires > ?", (key, time.time()))
        return int(row[0]) if row else 0

    def get_expiry(self, key: str) -> float:
        row = self._one("SELECT expires FROM counters WHERE key = ?", (key,))
        return float(row[0]) if row else time.time()

    def check(self) -> bool:
        try:
            self._one("SELECT 1")
            return True
        except sqlite3.Error:
            return False

    def reset(self) -> int | None:
        with self._locked() as db:
            count = db.execute("SELECT count(*) FROM counters").fetchone()[0]
            db.execute("DELETE FROM counters")
        return int(count)

    def clear(self, key: str) -> None:
        self._one("DELETE FROM counters WHERE key = ?", (key,))


def _renew_after_fork() -> None:
    for storage in list(_after_fork):
        storage._forked()


os.register_at_fork(after_in_child=_renew_after_fork)


def client_address() -> str:
    """The address a rate limit counts against: the peer, or what the outermost trusted proxy saw."""
    hops = get_settings().trusted_proxies
    forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",") if part.strip()]
    # Each trusted proxy appends the address it received from; entries further left are the client's word.
    if hops and len(forwarded) >= hops:
        return forwarded[-hops][:64]
    return request.remote_addr or "unknown"


def storage_uri(settings) -> str:
    """Where the counts live: REDIS_URL, else the instance's own file."""
    return settings.redis_url or f"memfit-local://{Path(settings.shared_folder, LOCAL_FILE)}"


def init_app(app: Flask, writes: Blueprint, guarded: list[Blueprint]) -> None:
    """Limit writes on the writes blueprint, and failed token checks on it and on every guarded one."""
    from flask_limiter import Limiter

    settings = get_settings(app)
    # A Redis that stops answering must not hold a request for long: half a second, then the fallback.
    options = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5} if settings.redis_url else {}
    limiter = Limiter(key_func=client_address, app=app, storage_uri=storage_uri(settings), storage_options=options,
                      default_limits=[], key_prefix="memfit", in_memory_fallback_enabled=True,
                      swallow_errors=True)
    app.extensions["memfit_limiter"] = limiter
    limiter.limit(settings.write_rate_limit, methods=WRITE_METHODS, scope="writes")(writes)
    failed = lambda response: response.status_code == 401  # noqa: E731 -- counted after the answer
    limiter.shared_limit(settings.auth_failure_limit, scope=AUTH_SCOPE, methods=WRITE_METHODS,
                         deduct_when=failed)(writes)
    for blueprint in guarded:
        limiter.shared_limit(settings.auth_failure_limit, scope=AUTH_SCOPE, deduct_when=failed)(blueprint)


def retry_after(app: Flask) -> int:
    """Seconds until the limit this request broke lets it through again (at least 1)."""
    limiter = app.extensions.get("memfit_limiter")
    current = getattr(limiter, "current_limit", None) if limiter else None
    if current is None:
        return 60
    # reset_at is rounded up to the next whole second: never say more than the window itself.
    return max(1, min(current.limit.get_expiry(), math.ceil(current.reset_at - time.time())))
