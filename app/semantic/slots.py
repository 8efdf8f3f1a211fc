"""Instance-wide slots for model runs: at most N in flight across every worker of the instance.

A slot is an exclusive ``flock`` on one of N lock files in a directory every worker of the instance
shares (PROMETHEUS_MULTIPROC_DIR when set, else the instance folder). The kernel drops a flock when
its open file description closes, and that includes the holder dying by SIGKILL or the OOM killer,
so a dead worker can never leak a slot the way a counter in shared memory would.

A flock belongs to an open file description, not to a process: two descriptors a process opened
separately conflict with each other. Each acquisition therefore opens its own descriptors, which
bounds the threads of one worker as well as the workers of one instance. Each worker's model thread
(queue.py) takes a slot for each run, so the runs of all workers together use the instance's CPUs
without oversubscribing them.

Waiting is a loop of non-blocking tries until a deadline: a blocking flock cannot be given a timeout
from a thread (SIGALRM only reaches the main thread), and the model thread looks up between waits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..settings import Settings

log = logging.getLogger(__name__)

SLOTS_FOLDER = "semantic-slots"
# Held shared by every model thread waiting for a slot, so that one that has just released its slot can
# see another worker waiting and let it go first (a flock waiter is not queued: without this, the thread
# that releases takes the slot back before a polling waiter notices it was free).
WAITING_FILE = "waiting.lock"
# Pauses between two rounds of tries grow from the first to the last: a slot freed by a query
# (tens of ms) is noticed quickly, and a long wait does not spin on the CPU it is waiting for.
FIRST_PAUSE, LAST_PAUSE = 0.001, 0.01


class Slot:
    """One slot taken; release it (or leave the ``with`` block) to hand it to the next waiter."""

    def __init__(self, fd: int | None, index: int | None):
        self.fd, self.index = fd, index

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor of the description drops the flock

    def __del__(self) -> None:
        self.release()  # a slot dropped by mistake must not stay taken for the worker's whole life

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Slots:
    """N lock files in ``directory``; ``acquire`` takes a free one or gives up at a deadline."""

    def __init__(self, directory: str | os.PathLike, count: int, timeout: float = 0.5):
        if count < 1:
            raise ValueError("a semantic slot count must be at least 1")
        self.directory = Path(directory) / SLOTS_FOLDER
        self.count, self.timeout = count, timeout
        self.paths = [self.directory / f"{i}.lock" for i in range(count)]
        self._warned = threading.Lock()  # held for ever once the unbounded fallback has been logged

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Slots":
        """SEMANTIC_MAX_INFLIGHT slots (0: the CPUs the instance really has, counted as the model
        runtime counts them for its threads) in the folder every worker of the instance shares."""
        from .encoders import available_cpus  # a light import: encoders loads numpy & co. in functions only

        return cls(settings.shared_folder, settings.semantic_max_inflight or available_cpus())

    def acquire(self, timeout: float | None = None) -> Slot | None:
        """A free slot, waiting at most ``timeout`` seconds (default: the one given at creation); None if
        every slot stayed busy. If the lock files cannot be used at all, an unbounded slot is
        returned and the reason logged once: the bound protects latency, it must not stop search."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        start = random.randrange(self.count)  # waiters spread over the files instead of all on the first
        fds: list[tuple[int, int]] = []
        taken: int | None = None
        try:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for i in (*range(start, self.count), *range(start)):
                    fds.append((i, os.open(self.paths[i], os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)))
            except OSError as exc:
                return self._unbounded(exc)
            pause = FIRST_PAUSE
            while True:
                for i, fd in fds:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as exc:
                        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                            continue  # held by another worker or thread
                        return self._unbounded(exc)
                    taken = fd
                    return Slot(fd, i)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, LAST_PAUSE)
        finally:
            for _, fd in fds:
                if fd != taken:
                    os.close(fd)

    @contextlib.contextmanager
    def waiting(self):
        """Announce, for the block, that this thread waits for a slot (see others_waiting)."""
        fd = self._open_waiting()
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            if fd is not None:
                os.close(fd)

    def others_waiting(self) -> bool:
        """Whether a model thread of this instance (another worker's) waits for a slot now."""
        fd = self._open_waiting()
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def _open_waiting(self) -> int | None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return os.open(self.directory / WAITING_FILE, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:  # an unusable folder: no handover, as no bound (see _unbounded)
            return None

    def _unbounded(self, exc: OSError) -> Slot:
        if self._warned.acquire(blocking=False):
            log.error("semantic slots in %s are unusable (%s: %s); semantic work runs without a bound",
                      self.directory, type(exc).__name__, exc.strerror or exc)
        return Slot(None, None)
