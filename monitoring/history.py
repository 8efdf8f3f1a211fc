"""The instance's recent memory history: a small, bounded ring of records shared by every worker.

Each worker's watchdog appends its samples, and the hooks append events (a recycle, an alert), to
one file in the shared metrics folder (PROMETHEUS_MULTIPROC_DIR, on /dev/shm where it exists). The
file is created once at its full size and never grows: a header, then STATUS_HISTORY_SLOTS slots of
SLOT_SIZE bytes; record n goes to slot n % slots, so the newest records overwrite the oldest whatever
the uptime. Writers take an exclusive ``fcntl.flock``, readers a shared one. The folder outlives any
one worker (gunicorn's master empties it only when it starts), so a recycled worker's samples stay.

A record is keyed, not positional: ``{"kind": ..., "pid": ..., <figures>}`` as compact JSON in its
slot, so whatever figures the sampler returns (RSS, PSS where the kernel gives it, private memory,
the cgroup's) are kept, and a figure added to the sampler needs no format change. The name does not
end in ``.db``: prometheus_client reads every ``*.db`` file there as metrics.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from .config import MonitoringSettings

log = logging.getLogger("memfit.history")

FILE_NAME = "status-history.ring"
MAGIC = b"MEMFITRG"
FORMAT_VERSION = 1
# magic, format version, slot size, slot count, records ever written (the next one's number).
HEADER = struct.Struct("<8sHHIQ")
HEADER_SIZE = 64  # room for the header to grow without moving the slots
# Each slot: the record's number (0: never written), wall-clock time, payload length, then the payload.
SLOT_HEAD = struct.Struct("<QdH")
SLOT_SIZE = 512
PAYLOAD_MAX = SLOT_SIZE - SLOT_HEAD.size
# Keys every record keeps when a payload must be cut down to fit its slot.
CORE_KEYS = ("kind", "pid")


@dataclass(frozen=True)
class Record:
    """One sample or event as read back: its number, time (seconds since the epoch) and keyed figures."""

    seq: int
    time: float
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", ""))

    @property
    def pid(self) -> int | None:
        pid = self.data.get("pid")
        return pid if isinstance(pid, int) else None


def _payload(data: dict[str, Any]) -> bytes:
    """data as compact JSON that fits a slot: the longest figures are dropped until it does (logged);
    kind and pid always stay."""
    kept = dict(data)
    while True:
        raw = json.dumps(kept, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")
        if len(raw) <= PAYLOAD_MAX:
            return raw
        droppable = [key for key in kept if key not in CORE_KEYS]
        if not droppable:
            return b"{}"
        longest = max(droppable, key=lambda key: len(json.dumps(kept[key], ensure_ascii=False, default=str)))
        log.warning("status history: record too long for its %d-byte slot, dropped %r", SLOT_SIZE, longest)
        del kept[longest]


class Ring:
    """The ring file at path with slots slots; created (or re-created, if its geometry or format
    differs) on first write. Every call opens and closes the file, so nothing is shared across fork."""

    def __init__(self, path: str | os.PathLike, slots: int):
        if slots < 1:
            raise ValueError("a ring needs at least one slot")
        self.path = os.fspath(path)
        self.slots = slots

    @property
    def size(self) -> int:
        """The file's size in bytes, fixed by the slot count."""
        return HEADER_SIZE + self.slots * SLOT_SIZE

    def _header(self, fd: int) -> tuple | None:
        raw = os.pread(fd, HEADER.size, 0)
        if len(raw) < HEADER.size:
            return None
        magic, version, slot_size, slots, count = HEADER.unpack(raw)
        if (magic, version, slot_size, slots) != (MAGIC, FORMAT_VERSION, SLOT_SIZE, self.slots):
            return None
        return magic, version, slot_size, slots, count

    def _initialise(self, fd: int) -> None:
        # A file of another format or size (an older release, a changed STATUS_HISTORY_SLOTS) starts over.
        os.ftruncate(fd, 0)
        os.ftruncate(fd, self.size)
        os.pwrite(fd, HEADER.pack(MAGIC, FORMAT_VERSION, SLOT_SIZE, self.slots, 0), 0)

    def append(self, data: dict[str, Any], now: float | None = None) -> int:
        """Write one record over the oldest slot; returns its number."""
        payload = _payload(data)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            header = self._header(fd)
            if header is None:
                self._initialise(fd)
                count = 0
            else:
                count = header[4]
            seq = count + 1
            slot = count % self.slots
            os.pwrite(fd, SLOT_HEAD.pack(seq, time.time() if now is None else now, len(payload)) + payload,
                      HEADER_SIZE + slot * SLOT_SIZE)
            os.pwrite(fd, HEADER.pack(MAGIC, FORMAT_VERSION, SLOT_SIZE, self.slots, seq), 0)
            return seq
        finally:
            os.close(fd)  # closing releases the lock

    def read(self, since: float | None = None) -> list[Record]:
        """Every record still in the ring (at or after since, when given), oldest first."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return []
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if self._header(fd) is None:
                return []
            raw = os.pread(fd, self.slots * SLOT_SIZE, HEADER_SIZE)
        finally:
            os.close(fd)
        records = []
        for offset in range(0, len(raw) - SLOT_HEAD.size + 1, SLOT_SIZE):
            seq, when, length = SLOT_HEAD.unpack_from(raw, offset)
            if not seq or length > PAYLOAD_MAX or (since is not None and when < since):
                continue
            start = offset + SLOT_HEAD.size
            try:
                data = json.loads(raw[start:start + length].decode("utf-8"))
            except ValueError:  # a slot torn by a crash mid-write is skipped, not fatal
                continue
            if isinstance(data, dict):
                records.append(Record(seq, when, data))
        records.sort(key=lambda r: r.seq)
        return records


def ring(settings: MonitoringSettings) -> Ring | None:
    """The instance's ring, or None when there is no shared folder (a single process: flask run, tests)."""
    folder = settings.prometheus_multiproc_dir
    if not folder:
        return None
    return Ring(os.path.join(folder, FILE_NAME), settings.status_history_slots)


def _append(settings: MonitoringSettings, data: dict[str, Any]) -> None:
    try:
        target = ring(settings)
        if target is not None:
            target.append(data)
    except Exception:  # history is for people reading /status: it must never break a sample or a request
        log.exception("status history: could not record %s", data.get("kind"))


def record_sample(settings: MonitoringSettings, figures: dict[str, Any]) -> None:
    """Keep one watchdog sample (whatever figures the sampler returned) in the instance's ring."""
    _append(settings, {"kind": "sample", **figures})


def record_event(settings: MonitoringSettings, kind: str, pid: int, **details: Any) -> None:
    """Keep one event (kind: "recycle", "alert", ...) of process pid, with its details, in the ring.

    The one way anything records an event for /status; it never raises.
    """
    _append(settings, {"kind": kind, "pid": pid, **details})


def read(settings: MonitoringSettings, since: float | None = None) -> list[Record]:
    """The instance's records (at or after since), oldest first; [] without a shared folder."""
    target = ring(settings)
    return target.read(since) if target is not None else []
