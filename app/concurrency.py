"""Turns to run: at most REQUEST_CONCURRENCY requests of a worker run the app at once.

A gthread worker hands every accepted connection to one of its GUNICORN_THREADS threads, and under
load all of them run Python together: they contend for the one interpreter lock, each switch evicts
the others' data from the CPU's caches, and a request costs more CPU the more run beside it. On the
1 GB tier at a 1-CPU quota, a step of 145 requests a second of the mix cost 5.0-5.4 ms of server CPU
an answer with four turns per worker, 6.7-7.1 ms with every thread computing at once (bench.capacity
ladders, 15 s steps; docs/capacity.md has the full run). The threads stay: they are how many requests
can wait (a semantic query queued for the model holds one), while the turns bound how many compute.

A turn is held only while the request computes:

* its body is read before it asks for a turn, so a client sending slowly holds a thread, as before,
  but no turn (a chunked body, rare, is read by the app as it was: that request runs without a turn);
* a semantic query gives its turn back while it waits for the model (``released``), and asks again
  for the rest of its work;
* the answer is written to the client after the turn is returned (gunicorn writes what the app
  returned), so a slow reader holds none either.

Turns go to quick reads first (any GET but a semantic or hybrid search: a few ms of CPU each), so text
stays fast while the CPU is full; a slower request (a write, a search that runs the model) waits at
most PASS_LIMIT_S while quick ones pass it, then goes next. A semantic query back from the model asks
as a quick one: it has waited already.

A request never waits for a turn while holding something another turn holder needs (no database
transaction is open when a request asks), so turns cannot deadlock.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import deque
from typing import Callable, Iterator
from urllib.parse import parse_qs

_local = threading.local()  # whether this thread holds a turn, and of which gate


# A request that is not a quick read waits at most this long while quick ones pass it: then it goes
# next, so a flood of searches cannot starve writes (it only delays them).
PASS_LIMIT_S = 0.25


class _Waiter:
    __slots__ = ("since", "event")

    def __init__(self, since: float):
        self.since, self.event = since, threading.Event()


class Turns:
    """``count`` turns, handed directly to waiters: quick reads first, each class in arrival order, and a
    slower request first once quick ones have passed it for PASS_LIMIT_S."""

    def __init__(self, count: int, clock: Callable[[], float] = time.monotonic):
        self._lock, self._free, self._clock = threading.Lock(), count, clock
        self._quick: deque[_Waiter] = deque()
        self._slow: deque[_Waiter] = deque()

    def take(self, quick: bool) -> None:
        with self._lock:
            if self._free:
                self._free -= 1
                return
            waiter = _Waiter(self._clock())
            (self._quick if quick else self._slow).append(waiter)
        gauge = _waiting_gauge()  # only when waiting: a free turn, the usual case, costs no metric
        if gauge is not None:
            gauge.inc()
        try:
            waiter.event.wait()
        finally:
            if gauge is not None:
                gauge.dec()

    def give(self) -> None:
        with self._lock:
            quick, slow = self._quick, self._slow
            if slow and (not quick or self._clock() - slow[0].since >= PASS_LIMIT_S):
                waiter = slow.popleft()
            elif quick:
                waiter = quick.popleft()
            else:
                self._free += 1
                return
        waiter.event.set()  # the turn passes to it without being free in between


class Gate:
    """WSGI middleware: the app runs in one of ``turns`` turns; the body is read before a turn is asked."""

    def __init__(self, app: Callable, turns: int, max_body: int | None):
        self.app, self.turns, self.max_body = app, turns, max_body
        self._turns = Turns(turns)

    def __call__(self, environ: dict, start_response: Callable):
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            return self.app(environ, start_response)  # read by the app (app/bodies.py): no turn
        _prefetch(environ, self.max_body)
        self._take(_quick(environ))
        try:
            return self.app(environ, start_response)
        finally:
            self._give()

    def _take(self, quick: bool) -> None:
        self._turns.take(quick)
        _local.gate = self

    def _give(self) -> None:
        if getattr(_local, "gate", None) is self:
            _local.gate = None
            self._turns.give()


def _quick(environ: dict) -> bool:
    """A read that costs a few ms of CPU: any GET but a search that runs the model (semantic, hybrid)."""
    if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
        return False
    if environ.get("PATH_INFO") != "/search":
        return True
    mode = parse_qs(environ.get("QUERY_STRING", "")).get("mode", ["text"])[-1]
    return mode not in ("semantic", "hybrid")


@contextlib.contextmanager
def released() -> Iterator[None]:
    """Give this thread's turn back for the block (a wait that computes nothing); no-op without one. The
    turn asked for after it is a quick one: the request has waited already, and has little left to do."""
    gate = getattr(_local, "gate", None)
    if gate is None:
        yield
        return
    gate._give()
    try:
        yield
    finally:
        gate._take(quick=True)


def _waiting_gauge():
    """memfit_requests_waiting_for_turn, or None where monitoring cannot load (a metric never stops a request)."""
    try:
        from monitoring import metrics

        return metrics.requests_waiting_turn
    except Exception:  # noqa: BLE001
        return None


def _prefetch(environ: dict, max_body: int | None) -> None:
    """Read a Content-Length body whole, before the turn, into the stream the app reads.

    A body over the limit is left unread: the app refuses it (413) before reading a byte. A read that
    fails (the client went away, a broken connection) hands the app the bytes read and then the same
    error, where it reads, as if it had read the socket itself."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return  # the app answers a malformed length
    if length <= 0 or (max_body is not None and length > max_body):
        return
    stream = environ["wsgi.input"]
    chunks, got, error = [], 0, None
    try:
        while got < length:
            chunk = stream.read(length - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except Exception as exc:  # noqa: BLE001 -- re-raised where the app reads
        error = exc
    environ["wsgi.input"] = _Prefetched(b"".join(chunks), error)


class _Prefetched(io.RawIOBase):
    """The body read ahead: its bytes, then the error the read met (if any)."""

    def __init__(self, data: bytes, error: BaseException | None):
        super().__init__()
        self._data, self._error = io.BytesIO(data), error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._data.readinto(buffer)
        if not n and len(buffer) and self._error is not None:
            error, self._error = self._error, None
            raise error
        return n
