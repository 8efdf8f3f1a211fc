"""A worker's model queue: semantic queries wait in arrival order and share model runs.

One model thread per worker runs the model (at nice SEMANTIC_NICE, so request threads pass it on a
busy CPU). Each time the model is free it takes every query waiting, oldest first, up to
SEMANTIC_BATCH_MAX, and encodes them in one run (the encoder splits a run by padded tokens): dynamic
batching as text-embeddings-inference and Triton do it, so queries that arrive while the model is
busy share the next run instead of paying one each. Every run holds one of the instance's semantic
slots (slots.py), which bounds the model runs of all workers together by the instance's CPUs; the
thread takes the slot before it takes the queries of its run, so that those arriving while another
worker's run holds the slot are in it.

Admission is by deadline, not by a fixed wait: a query is refused (Overloaded: 503 with Retry-After)
only when the queue's measured drain rate says it would wait longer than SEMANTIC_DEADLINE_MS. A
query that is admitted is answered; it is never overtaken by a later one.

Background work (the embedder's passages) runs only when no query waits, in pieces of at most
BACKGROUND_PIECE_UNITS, so a query that arrives meanwhile waits at most for one piece.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from typing import Callable, Sequence

from ..concurrency import released
from .slots import Slots

log = logging.getLogger(__name__)

# Runs whose seconds and work make the estimate of seconds per unit of work (their sums' ratio: the
# queue's drain rate). A ratio of sums, not an average of each run's ratio: a run of one query that waited
# for another worker's run to free the slot says little of what a full run costs, and is weighed as one.
RECENT_RUNS = 8
# A text's work, in units: the tokens the model reads for it (the encoder's count: prompt included,
# truncated) plus a fixed part, its share of a run's own overhead. A model run costs about its padded
# tokens (and the encoder batches texts of like length, so padding stays small): a 500-character query
# costs twenty times a one-word one, and counting queries alone let a queue of long queries admit waits
# many times the deadline. Characters were no better: Hebrew words of the same length are one token or four.
UNIT_OVERHEAD = 4
# Most work (tokens, as above) of one run of background passages: a query that arrives while passages
# are encoded waits for the piece in flight, not for the embedder's whole batch. About one passage at the
# tiers' SEMANTIC_MAX_SEQ_LENGTH (128), ~80 ms of one core alone: under bench.serving's overload, where
# the model thread gets a fraction of a core, a whole batch of ten such passages held queries for seconds.
# A run's own overhead is ~2.5 ms, so the pieces cost the embedder a few per cent.
BACKGROUND_PIECE_UNITS = 128
# How long an admitted query waits at most, as a multiple of the deadline (plus a floor): only a model
# thread that stopped answering gets there, since admission already checked the expected wait.
STUCK_FACTOR, STUCK_FLOOR_S = 4, 10.0
SLOT_POLL_S = 0.5  # how long one wait for an instance slot lasts before the model thread looks again
# How long a model thread that has just released its slot stands back when another worker's waits: more
# than the waiters' longest pause between tries (slots.LAST_PAUSE), so one of them takes it.
HANDOVER_PAUSE_S = 0.02


class QueueFull(Exception):
    """The query would wait past the deadline; ``retry_after`` says when the queue will have room."""

    def __init__(self, expected_wait: float, retry_after: int, unmeasured_waiting: int = 0):
        super().__init__(f"expected wait {expected_wait:.2f} s")
        self.expected_wait, self.retry_after = expected_wait, retry_after
        # Until a full batch of queries has been timed the drain rate is provisional: one batch is the bound.
        self.unmeasured_waiting = unmeasured_waiting

    def reason(self, deadline_s: float) -> str:
        if self.unmeasured_waiting:
            return (f"the model's pace here is not measured yet, with {self.unmeasured_waiting} queries already "
                    f"waiting")
        return f"this query would wait about {self.expected_wait:.1f} s, past the {deadline_s:g} s deadline"


class QueueStuck(Exception):
    """An admitted query got no answer in far longer than the deadline: the model thread is stuck."""


class _Job:
    __slots__ = ("texts", "kind", "batch_size", "text_units", "units", "done", "result", "error", "cancelled",
                 "cursor", "parts")

    def __init__(self, texts: Sequence[str], kind: str, batch_size: int, measure: Callable[[str, str], int]):
        self.texts, self.kind, self.batch_size = list(texts), kind, batch_size
        self.text_units = [measure(text, kind) + UNIT_OVERHEAD for text in self.texts]
        self.units = sum(self.text_units)
        self.done = threading.Event()
        self.result = self.error = None
        self.cancelled = False
        self.cursor, self.parts = 0, []  # background work: texts handed to runs so far, and their results

    def deliver(self, result) -> None:
        self.result = result
        self.done.set()

    def next_piece(self, max_units: int) -> "_Piece":
        """The next texts of a background job: at least one, at most batch_size and max_units of work."""
        start = stop = self.cursor
        units = 0
        while stop < len(self.texts) and stop - start < self.batch_size and (
                stop == start or units + self.text_units[stop] <= max_units):
            units += self.text_units[stop]
            stop += 1
        self.cursor = stop
        return _Piece(self, start, stop, units)


class _Piece:
    """One run's share of a background job; the job is answered when its last piece is."""

    __slots__ = ("job", "texts", "kind", "batch_size", "units", "error", "last")

    def __init__(self, job: _Job, start: int, stop: int, units: int):
        self.job, self.texts, self.units = job, job.texts[start:stop], units
        self.kind, self.batch_size, self.error = job.kind, job.batch_size, None
        self.last = stop == len(job.texts)

    def deliver(self, result) -> None:
        job = self.job
        if job.done.is_set():  # an earlier piece failed: the job has its answer
            return
        if self.error is not None:
            job.error = self.error
            job.done.set()
            return
        job.parts.append(result)
        if self.last:
            job.deliver(_joined(job.parts))


def _joined(parts: list):
    """The pieces' results as one: rows of vectors (the encoders' arrays), or a list of anything else."""
    if len(parts) == 1:
        return parts[0]
    if hasattr(parts[0], "shape"):
        import numpy as np

        return np.concatenate(parts)
    return [row for part in parts for row in part]


class ModelQueue:
    """The queue and the model thread of one process. ``encode`` is the encoder's encode(texts,
    batch_size, kind=...) and ``measure`` its tokens(text, kind), a text's work; the thread starts on
    first use (after gunicorn's fork)."""

    def __init__(self, encode: Callable, slots: Slots | None, max_batch: int, deadline_s: float, nice: int = 0,
                 on_run: Callable[[str, int], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 measure: Callable[[str, str], int] = lambda text, kind: len(text)):
        self._encode, self._slots, self._on_run, self._clock = encode, slots, on_run, clock
        self._measure = measure
        self.max_batch, self.deadline_s, self.nice = max(1, max_batch), deadline_s, nice
        self._cond = threading.Condition()
        self._queries: deque[_Job] = deque()
        self._background: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        # The run in flight: when it started and its estimated length (for the wait of those behind it).
        self._run_started: float | None = None
        self._run_estimate = 0.0
        # Estimates of seconds per unit of work (UNIT_OVERHEAD), from slot request to results, per kind of
        # run (RECENT_RUNS). None until a run has been measured: until then one run's worth is admitted.
        self.seconds_per_unit: float | None = None
        self.seconds_per_passage_unit: float | None = None
        self._waiting_units = 0  # the work of the queries waiting
        self._least_units: int | None = None  # the work of the shortest query (an empty text): refusal()
        self._recent: dict[str, deque] = {"query": deque(maxlen=RECENT_RUNS), "passage": deque(maxlen=RECENT_RUNS)}
        self.runs = self.batched = 0  # model runs for queries, and the queries they encoded

    # -- callers --------------------------------------------------------------------------------------

    def encode_query(self, text: str):
        """The query's vector, after the queries ahead of it; QueueFull when it would wait past the deadline."""
        job = _Job([text], "query", self.max_batch, self._measure)  # tokenized outside the lock
        with self._cond:
            self._ensure_thread()
            full = self._refusal(job.units)
            if full is not None:
                raise full
            self._queries.append(job)
            self._waiting_units += job.units
            self._cond.notify()
        return self._await(job, self.deadline_s * STUCK_FACTOR + STUCK_FLOOR_S)[0]

    def refusal(self) -> QueueFull | None:
        """What any query would be told now: QueueFull when even the shortest would wait past the deadline,
        else None. Reads the queue only (no thread, no tokenizing of the query): the cheap check made
        before a semantic search takes a turn (service.early_refusal)."""
        if self._least_units is None:
            self._least_units = self._measure("", "query") + UNIT_OVERHEAD
        with self._cond:
            return self._refusal(self._least_units)

    def _refusal(self, units: int) -> QueueFull | None:
        """QueueFull for a query of ``units`` of work arriving now, or None if it is admitted (under the lock)."""
        wait = self.expected_wait(self._waiting_units + units)
        # A rate from a query or two timed on an idle instance says little of a full batch under load:
        # under bench.serving's overload a worker's first run (one query, 7 ms) admitted two batches that
        # then took 3.7 and 4.6 s. Until a full batch's worth is timed, one batch waits at most.
        provisional = self.seconds_per_unit is None or self.batched < self.max_batch
        if provisional and len(self._queries) >= self.max_batch:
            return QueueFull(wait, self.retry_after(wait), unmeasured_waiting=len(self._queries))
        if wait > self.deadline_s:
            return QueueFull(wait, self.retry_after(wait))
        return None

    def encode_background(self, texts: Sequence[str], batch_size: int, timeout: float | None = None):
        """Vectors of passages, computed when no query waits; waits as long as that takes (or timeout)."""
        job = _Job(texts, "passage", batch_size, self._measure)
        with self._cond:
            self._ensure_thread()
            self._background.append(job)
            self._cond.notify()
        return self._await(job, timeout)

    def depth(self) -> int:
        """Queries waiting (not counting the run in flight)."""
        return len(self._queries)

    def expected_wait(self, units: int) -> float:
        """Seconds until a query is answered with ``units`` of work ahead of it and its own: the rest of
        the run in flight, then that work at the measured seconds per unit. 0 before any measurement."""
        if self.seconds_per_unit is None:
            return 0.0
        in_flight = 0.0
        if self._run_started is not None:
            # The rest of the run in flight; one already past its estimate (its slot held elsewhere, a
            # starved CPU) is taken to need as long again as it is late, so a stalled model sheds.
            in_flight = abs(self._run_estimate - (self._clock() - self._run_started))
        return in_flight + units * self.seconds_per_unit

    def waiting_time(self) -> float:
        """The expected wait of the queries in line now (what /readyz shows)."""
        return self.expected_wait(self._waiting_units)

    def retry_after(self, wait: float) -> int:
        """Whole seconds until the queue has drained to where a new query would fit the deadline."""
        return max(1, math.ceil(wait - self.deadline_s))

    # -- the model thread --------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        # A thread does not survive fork: a process that inherited a queue starts its own.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="memfit-model", daemon=True)
            self._thread.start()

    def _await(self, job: _Job, timeout: float | None):
        with released():  # a request waiting for the model computes nothing: its turn goes to another
            answered = job.done.wait(timeout)
        if not answered:
            with self._cond:
                job.cancelled = True  # the model thread skips it if it has not started it
                if not job.done.is_set():  # answered between the wait's end and the lock: take it
                    raise QueueStuck(f"no answer from the model in {timeout:.0f} s")
        if job.error is not None:
            raise job.error
        return job.result

    def _lower_priority(self) -> None:
        if not self.nice:
            return
        try:  # per thread on Linux: PRIO_PROCESS with a thread id sets that thread's nice value
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.nice)
        except OSError as exc:  # not Linux, or a sandbox that refuses it: run at normal priority
            log.warning("the model thread keeps normal priority: %s", exc)

    def _await_work(self) -> None:
        """Return once a query waits, or background work does and no other worker's model thread waits
        for a slot (their queries go before our passages)."""
        with self._cond:
            while True:
                while self._queries and self._queries[0].cancelled:
                    self._waiting_units -= self._queries.popleft().units
                if self._queries:
                    return
                if self._background and self._slots is not None and self._slots.others_waiting():
                    self._cond.wait(HANDOVER_PAUSE_S)
                    continue
                if self._background:
                    return
                self._cond.wait()

    def _take(self, since: float) -> list:
        """The run, taken once the slot is held: the oldest queries (up to max_batch), else a piece of the
        oldest background job; [] if nothing is left (every query waiting was cancelled)."""
        with self._cond:
            run = []
            while self._queries and len(run) < self.max_batch:
                job = self._queries.popleft()
                self._waiting_units -= job.units
                if not job.cancelled:
                    run.append(job)
            if run:
                return self._started(run, self.seconds_per_unit, since)
            while self._background:
                job = self._background[0]
                if job.cancelled or job.done.is_set():  # its caller stopped waiting, or a piece failed
                    self._background.popleft()
                    continue
                piece = job.next_piece(BACKGROUND_PIECE_UNITS)
                if piece.last:
                    self._background.popleft()
                return self._started([piece], self.seconds_per_passage_unit, since)
            return []

    def _started(self, run: list, per_unit: float | None, since: float) -> list:
        # The run's estimate counts from its slot request, as its measurement (per_unit) does.
        self._run_started = since
        self._run_estimate = (per_unit or 0.0) * sum(job.units for job in run)
        return run

    def _loop(self) -> None:
        self._lower_priority()
        while True:
            self._await_work()
            started = self._clock()
            # The slot first, then the run: the queries that arrive while another worker's run holds
            # the slot join this run. A run taken before its slot left them for the next one, a whole
            # turn of every worker's runs later: with two workers on one slot (the 512 MB tier at 0.5
            # CPU) a closed loop's queries came back a few at a time and each turn ran short runs.
            slot = self._slot()
            try:
                run = self._take(started)
                if not run:
                    continue
                try:
                    results = self._run(run)
                except Exception as exc:  # noqa: BLE001 -- one failed run must not stop the queue
                    # Each job again on its own, so that a text the runtime cannot encode fails only its caller.
                    results = self._one_by_one(run) if len(run) > 1 else [_failed(run[0], exc)]
            finally:
                if slot is not None:
                    slot.release()
            took = self._clock() - started
            with self._cond:
                self._run_started = None
                texts = sum(len(job.texts) for job in run)
                units = sum(job.units for job in run)
                if all(job.error is None for job in run):
                    if run[0].kind == "query":
                        self.runs += 1
                        self.batched += texts
                        self.seconds_per_unit = _per_unit(self._recent["query"], took, units)
                    elif units:
                        self.seconds_per_passage_unit = _per_unit(self._recent["passage"], took, units)
            for job, result in zip(run, results):
                job.deliver(result)
            if self._on_run is not None:
                try:
                    self._on_run(run[0].kind, texts)
                except Exception:  # noqa: BLE001 -- counting must never stop the model thread
                    log.debug("on_run failed", exc_info=True)

    def _one_by_one(self, run: list) -> list:
        results = []
        for job in run:
            try:
                results.append(self._run([job])[0])
            except Exception as exc:  # noqa: BLE001 -- its caller gets the error
                results.append(_failed(job, exc))
        return results

    def _run(self, run: list) -> list:
        """One model run (its slot held by the caller): each job's result, in order."""
        if run[0].kind == "query":
            vectors = self._encode([job.texts[0] for job in run], len(run), kind="query")
            return [vectors[i : i + 1] for i in range(len(run))]
        return [self._encode(run[0].texts, run[0].batch_size, kind="passage")]

    def _slot(self):
        """One of the instance's slots, waited for as long as it takes (the queue's deadline covers it)."""
        if self._slots is None:
            return None
        if self._slots.others_waiting():
            time.sleep(HANDOVER_PAUSE_S)  # our last run just ended: a waiting worker goes first
        with self._slots.waiting():
            while True:
                slot = self._slots.acquire(timeout=SLOT_POLL_S)
                if slot is not None:
                    return slot


def _failed(job: _Job, exc: Exception) -> None:
    job.error = exc
    return None


def _per_unit(recent: deque, seconds: float, units: int) -> float:
    recent.append((seconds, units))
    return sum(s for s, _ in recent) / sum(n for _, n in recent)
