"""The semantic-search service: the one front door to the model, the vector store, the background
embedder and the nearest-neighbour query. The model is loaded on the first semantic request, once.

Its state (encoder, vector store, model queue, embedder) lives on the instance, one per app
(``app.state``). Queries go through the worker's model queue (queue.py): they wait in arrival order,
share model runs, and are refused (Overloaded: 503 with Retry-After) only when the queue's drain rate
says they would wait past SEMANTIC_DEADLINE_MS. New rows get their vectors from the background
embedder (embedder.py), never inside a request: a search only reads.
Nothing here imports numpy, onnxruntime, torch or transformers at module level: a worker that only
serves text and tag search never pays for them (torch alone is ~220 MB of RSS on import).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from sqlalchemy import func, select

from ..db import Embedding, Item, Tag, db
from ..settings import Settings
from .queue import ModelQueue, QueueFull, QueueStuck
from .slots import Slots
from .unavailable import SemanticUnavailable  # raised here; callers import it from here too

if TYPE_CHECKING:  # pragma: no cover - typing only
    from flask import Flask

    from .embedder import Embedder
    from .encoders import Encoder

log = logging.getLogger(__name__)

DISABLED, NOT_LOADED, LOADING, LOADED, FAILED = "disabled", "not_loaded", "loading", "loaded", "failed"
# A failed load is retried at most this often, so a bad model name does not cost a load per request.
RETRY_AFTER_SECONDS = 300.0
KINDS = ("tag", "item")  # tags first: they are few, and every item's score reads them
TAG_CANDIDATES = 50  # closest tags read per query
CARRYING_TAGS = 10  # items carrying one of this many closest tags are candidates too
WARM_QUERY = "חיפוש"  # "search": any short Hebrew text exercises the tokenizer and the session
# What a query shed at the handler bound is told to wait: the searches holding this worker's semantic
# handlers are answered within the deadline, so a second later there is very likely room.
SHED_RETRY_AFTER_SECONDS = 1
# Rows the embedder reads and stores per round before it looks at its lock and at the newest ids again.
EMBED_ROUND_BATCHES = 8


def _memory_room(settings: Settings) -> int | None:
    """Bytes left for the instance under MAX_MEMORY_MB and its cgroup's limit (the working set, what the
    OOM killer weighs); None where no cgroup limit is readable (a developer's machine)."""
    try:
        from monitoring import memory

        cgroup = memory.read_cgroup()
    except Exception:  # noqa: BLE001 -- no reading: no guard, as without a cgroup
        return None
    if cgroup is None or cgroup.limit is None:
        return None
    bound = min(cgroup.limit, settings.max_memory_mb * 2**20) if settings.max_memory_mb else cgroup.limit
    return max(0, bound - cgroup.working_set)


class Overloaded(SemanticUnavailable):
    """The query would wait past SEMANTIC_DEADLINE_MS, or every semantic handler of the worker is taken: it
    is shed (503 overloaded with Retry-After). A SemanticUnavailable, so callers that fall back on one fall back."""

    def __init__(self, message: str, retry_after: int = SHED_RETRY_AFTER_SECONDS):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class SemanticHits:
    """What a semantic query found, by id only: the caller loads the items it returns."""

    scored: list[tuple[float, int]]  # (score, item id), best first, at most the limit
    tag_scores: dict[int, float]  # tag id -> cosine to the query, for the closest tags
    item_tags: dict[int, set[int]]  # item id -> the ids of closest tags it carries


def blend_tags(item_hits: dict[int, float], tag_hits: dict[int, float], tagged: dict[int, set[int]]
               ) -> list[tuple[float, int]]:
    """(score, item id) of the items read and of those carrying a close tag, best first (ties: newer id):
    an item's own cosine, raised to 0.6 × own + 0.4 × its closest tag's when that tag is nearer the query
    than the item. An item reached only by its tags has its own cosine taken as the farthest read."""
    floor = min(item_hits.values()) if item_hits else 0.0
    scored = []
    for item_id in set(item_hits) | set(tagged):
        own = item_hits.get(item_id, floor)
        best_tag = max((tag_hits[t] for t in tagged.get(item_id, ())), default=None)
        scored.append((own if best_tag is None else 0.6 * own + 0.4 * max(best_tag, own), item_id))
    scored.sort(key=lambda entry: (-entry[0], -entry[1]))
    return scored


class SemanticService:
    """One per app: loads the model once, keeps the vectors current and answers nearest-neighbour queries."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._encoder: Encoder | None = None
        self._state = NOT_LOADED if settings.enable_semantic_search else DISABLED
        self._error: str | None = None
        self._failed_at = 0.0
        self._retry_after = RETRY_AFTER_SECONDS
        self.load_seconds: float | None = None
        self.load_count = 0
        self._store = None  # the vector store, chosen on first use: see vector_store()
        self._publisher = None  # the child process building a shared index generation (maintain_index)
        self._publish_refused: tuple | None = None  # (needed, room) in MB last warned about
        self._slots: Slots | None = None  # the instance's semantic slots, opened on first use: see slots()
        self._queue: ModelQueue | None = None  # this process's model queue, made on first use: see queue()
        self.embedder: Embedder | None = None  # this process's background embedder, once started
        # This worker's request threads that hold a semantic search (SEMANTIC_HANDLERS): a search waiting
        # for a slot holds its thread, and without this bound a burst of them takes every thread of the
        # worker, so text searches queue for a thread although no slot is theirs to wait for.
        self._handlers = threading.BoundedSemaphore(settings.semantic_handler_limit)
        # Early refusals held at once (SEMANTIC_REFUSAL_HOLD_MS): at most half the handlers, so that queries
        # the queue would admit still find one free; none with one handler (a worker of one thread).
        self._held = threading.BoundedSemaphore(settings.semantic_handler_limit // 2)
        self._pause = time.sleep  # how a refusal is held (tests wait on an event instead)

    @property
    def state(self) -> str:
        return self._state

    @property
    def loaded(self) -> bool:
        """Whether this process has the model in memory (the background embedder works only then)."""
        return self._state == LOADED

    def status(self) -> dict:
        status = {"state": self._state, "model": self.settings.model_shown}
        if self._error:
            status["error"] = self._error
        if self._encoder is not None:
            status.update(self._encoder.describe(), load_seconds=round(self.load_seconds or 0.0, 3))
        return status

    def encoder(self) -> "Encoder":
        """The loaded encoder, loading it on first call; raises SemanticUnavailable with a reason."""
        encoder = self._encoder
        if encoder is not None:  # fast path without the lock once loaded
            return encoder
        if self._state == DISABLED:
            raise SemanticUnavailable("semantic search is disabled (ENABLE_SEMANTIC_SEARCH=false)")
        if self._state == LOADING and self.settings.is_remote:
            # A slow or hung service keeps its first request waiting for its timeouts: the others answer 503
            # now rather than each holding a request thread behind the lock that text search needs too.
            raise SemanticUnavailable("connecting to the embedding service; retry in a moment")
        with self._lock:
            if self._encoder is not None:
                return self._encoder
            if self._state == FAILED and time.monotonic() - self._failed_at < self._retry_after:
                raise SemanticUnavailable(f"the semantic model failed to load: {self._error}")
            self._state = LOADING
            started = time.perf_counter()
            try:
                if self.settings.is_remote:  # an embedding service: no weights in this process
                    from .remote import RemoteEncoder

                    self._encoder = RemoteEncoder(self.settings)
                else:
                    from .encoders import load_encoder  # heavy imports happen only here

                    self._encoder = load_encoder(self.settings)
            except Exception as exc:  # any load failure degrades semantic search, never the app
                self._state, self._failed_at = FAILED, time.monotonic()
                _mark_model_loaded(False)
                self._error = _describe(exc)
                # An embedding service that is down is tried again after its breaker's cool-down, and was
                # reported once when its breaker opened; a model that cannot load is an error to fix.
                self._retry_after = getattr(exc, "retry_load_after", RETRY_AFTER_SECONDS)
                if isinstance(exc, SemanticUnavailable):
                    log.warning("semantic model %r is not available yet: %s", self.settings.model_shown, self._error)
                else:
                    log.error("semantic model %r failed to load: %s", self.settings.model_shown, self._error)
                raise SemanticUnavailable(f"the semantic model failed to load: {self._error}") from None
            self.load_seconds = time.perf_counter() - started
            self.load_count += 1
            self._state, self._error = LOADED, None
            _mark_model_loaded(True)
            log.info("semantic model loaded in %.2fs: %s", self.load_seconds, self._encoder.describe())
            return self._encoder

    def load_remote(self) -> bool:
        """With SEMANTIC_BACKEND=remote, connect to the embedding service if not done yet (the background
        embedder's way in: no weights to load, so no reason to wait for a query); whether it is loaded."""
        if not self.settings.is_remote or self._state == DISABLED:
            return False
        try:
            self.encoder()
        except SemanticUnavailable:
            return False
        return True

    def vector_store(self):
        """This worker's vector store, chosen on first use: pgvector on PostgreSQL when the release
        command (app/release.py) has set it up, else the instance's shared index (shared.py) with
        the newer rows in a bounded in-process matrix, or that matrix alone with VECTOR_INDEX_DIR=off
        (a race makes two; one is kept, both are correct). No schema work here: a request never runs DDL."""
        if self._store is None:
            from . import index, shared  # numpy and the vector code, only on this path

            if not self.settings.is_sqlite and index.pgvector_ready():
                store = index.PgVectorIndex(self.settings.pgvector_ef_search)
            else:
                store = index.VectorIndex(self.settings.semantic_index_max_mb * 1024 * 1024)
                folder = shared.folder_for(self.settings)
                if folder is not None:
                    store = shared.SharedIndex(folder, store)
            if self._store is None:
                self._store = store
        return self._store

    def maintain_index(self) -> list[str]:
        """Start the build of a new generation of the shared index where one is due, in a child process
        (app/semantic/publisher.py, at SEMANTIC_NICE), unless one is building; returns the kinds
        it started. Called by the background embedder's loop in every worker whose model is loaded."""
        store = self.vector_store()
        if getattr(store, "kind", None) != "shared":
            return []
        if self._publisher is not None and self._publisher.poll() is None:
            return []  # this worker's build is still running
        from . import index, shared

        fingerprint = self.encoder().fingerprint
        reasons = {kind: shared.publish_reason(store.folder, fingerprint, kind,
                                               self.settings.vector_index_rebuild_rows) for kind in KINDS}
        db.session.commit()  # end the read transaction: the child reads on its own
        due = [kind for kind, reason in reasons.items() if reason]
        if not due:
            return []
        need = max(shared.build_bytes(index.table_version(fingerprint, kind)[0], self.encoder().dim) for kind in due)
        db.session.commit()
        room = _memory_room(self.settings)
        if room is not None and need > room:
            # Measured: a first build of 100 k vectors in the 512 MB tier's cgroup had the OOM killer take
            # the workers again and again. Searching without the new generation is slower, not broken.
            if self._publish_refused != (need // 2**20, room // 2**20):
                self._publish_refused = (need // 2**20, room // 2**20)
                log.warning("shared vector index: a new generation of %s needs about %d MB to build, and the "
                            "instance has %d MB left under MAX_MEMORY_MB: not built (searches use the older "
                            "generation or each worker's matrix). Use PostgreSQL with pgvector, a larger tier, "
                            "or run `flask --app app vectors publish` where there is room.",
                            " and ".join(due), need // 2**20, room // 2**20)
            return []
        publisher = shared.start_publisher(store.folder, db.engine.url.render_as_string(hide_password=False),
                                           fingerprint, due, self.settings.semantic_nice,
                                           self.settings.vector_index_rebuild_rows)
        if publisher is None:
            return []  # another worker's build is running
        self._publisher = publisher
        for kind in due:
            log.info("shared vector index: publishing a new generation of %ss (%s)", kind, reasons[kind])
        return due

    def slots(self) -> Slots:
        """The instance's semantic slots (the lock files every worker shares); a race makes two equal ones."""
        if self._slots is None:
            self._slots = Slots.from_settings(self.settings)
        return self._slots

    def queue(self) -> ModelQueue:
        """This process's model queue and its low-priority model thread, made on first use (after fork,
        since gunicorn's workers load the model themselves); loads the model."""
        encoder = self.encoder()
        with self._lock:
            if self._queue is None:
                # Looked up per run, not bound now: the encoder's method is what runs (tests wrap it).
                self._queue = ModelQueue(lambda *args, **kw: encoder.encode(*args, **kw), self.slots(), self.settings.semantic_batch_max,
                                         self.settings.semantic_deadline_ms / 1000, self.settings.semantic_nice,
                                         on_run=_count_run,
                                         measure=lambda text, kind: encoder.tokens(text, kind))
            return self._queue

    def pending(self, kind: str, check_text: bool = False, limit: int | None = None) -> list:
        """Rows of kind ("tag" or "item") with no vector for this model (with check_text, also those
        whose text changed); loads the model."""
        from . import index

        return index.missing(kind, self.encoder().fingerprint, limit, check_text=check_text)

    def embed(self, kind: str, rows: Sequence, progress: Callable[[int], None] | None = None) -> int:
        """Encode and store the vectors of rows, in batches of EMBEDDING_BATCH_SIZE, each batch one model
        run of the queue's background work (after every waiting query) and one transaction; returns how many."""
        from . import index

        return index.embed_rows(_Background(self.encoder(), self.queue()), kind, rows,
                                self.settings.embedding_batch_size, progress=progress,
                                vector_store=self.vector_store())

    def embed_pending(self, wanted: Callable[[], bool] = lambda: True, after: dict[str, int] | None = None) -> int:
        """One round of the background embedder: up to EMBED_ROUND_BATCHES batches of the rows that
        have no vector for this model (of each kind, only ids above after[kind]), tags first; returns
        how many were stored."""
        from . import index

        budget = self.settings.embedding_batch_size * EMBED_ROUND_BATCHES
        done = 0
        for kind in KINDS:
            rows = index.missing(kind, self.encoder().fingerprint, budget - done, after_id=(after or {}).get(kind, 0))
            for start in range(0, len(rows), self.settings.embedding_batch_size):
                if not wanted():
                    return done
                done += self.embed(kind, rows[start : start + self.settings.embedding_batch_size])
            if done >= budget:
                break
        if done:
            _count_embedded(done)
        return done

    def newest(self) -> dict[str, int]:
        """The newest id of each kind (0 when there is none): where the embedder's rounds start looking."""
        tag, item = db.session.execute(
            select(select(func.max(Tag.id)).scalar_subquery(), select(func.max(Item.id)).scalar_subquery())).one()
        return {"tag": tag or 0, "item": item or 0}

    def backlog(self) -> int:
        """Tags and items without a vector for this model (three counts, no anti-join)."""
        rows, vectors = db.session.execute(select(
            select(func.count()).select_from(Tag).scalar_subquery()
            + select(func.count()).select_from(Item).scalar_subquery(),
            select(func.count()).select_from(Embedding).where(
                Embedding.model_fp == self.encoder().fingerprint).scalar_subquery())).one()
        return max(0, rows - vectors)

    def start_embedder(self, app: "Flask") -> "Embedder | None":
        """Start this process's background embedder (SEMANTIC_EMBEDDER); the one holding the database's
        lock works, the others stand by. None when semantic search or the embedder is off."""
        if self._state == DISABLED or not self.settings.semantic_embedder:
            return None
        with self._lock:
            if self.embedder is None:
                from .embedder import Embedder

                self.embedder = Embedder(app, self.settings.semantic_embed_interval)
            self.embedder.start()
            return self.embedder

    def wake_embedder(self) -> None:
        """A row was written in this process: the embedder (if it runs here) looks now, not at its interval."""
        if self.embedder is not None:
            self.embedder.wake()

    def queue_status(self) -> dict:
        """What /readyz shows of this worker's queue and of the embedder it runs."""
        status: dict = {}
        queue = self._queue
        if queue is not None:
            status["queue"] = {"waiting": queue.depth(), "expected_wait_ms": round(queue.waiting_time() * 1000),
                               "runs": queue.runs, "queries": queue.batched}
        if self.embedder is not None:
            status["embedder"] = {"working": self.embedder.working, "backlog": self.embedder.backlog}
        return status

    def prune(self) -> int:
        """Delete the vectors of every other model; returns how many went."""
        from . import index

        return index.prune(self.encoder().fingerprint)

    def counts(self) -> dict:
        """Stored vectors: this model's per kind, and the stale ones of other models."""
        from . import index

        return index.counts(self.encoder().fingerprint)

    def search(self, query: str, limit: int) -> SemanticHits:
        """The items nearest the query, scored by their own vector and their closest tags'.

        Reads only: rows without a vector yet are the background embedder's. Raises SemanticUnavailable
        with a reason; Overloaded when the query would wait past SEMANTIC_DEADLINE_MS, or at once when
        SEMANTIC_HANDLERS of this worker's threads already hold a semantic search.
        """
        encoder = self.encoder()
        if not self._handlers.acquire(blocking=False):
            _count_shed("handlers")
            raise Overloaded(f"semantic search is at capacity ({self.settings.semantic_handler_limit} semantic "
                             f"searches in this worker); retry after {SHED_RETRY_AFTER_SECONDS} s, or search "
                             f"with mode=text")
        from . import index

        try:
            vector = self._encode_query(query)
            store = self.vector_store()
            tag_hits = dict(store.top(encoder.fingerprint, "tag", vector, TAG_CANDIDATES))
            item_hits = dict(store.top(encoder.fingerprint, "item", vector, max(limit * 5, 50)))
            # Items carrying one of the closest tags are candidates even if their own text is farther.
            top_tags = sorted(tag_hits, key=tag_hits.get, reverse=True)[:CARRYING_TAGS]
            tagged = index.items_with_tags(top_tags)
            return SemanticHits(scored=blend_tags(item_hits, tag_hits, tagged)[:limit], tag_scores=tag_hits,
                                item_tags=tagged)
        finally:
            self._handlers.release()

    def early_refusal(self) -> Overloaded | None:
        """The refusal any semantic query of this worker would get now (its model queue would have it wait
        past the deadline, whatever its length), counted as shed; None when one might be admitted, or
        before the queue exists. Cheap, and touches nothing else: checked before the request takes a turn
        or enters Flask (refusals.py), so a refusal costs little of the CPU the model needs."""
        queue = self._queue
        if queue is None or self._state != LOADED:
            return None
        full = queue.refusal()
        return None if full is None else _refused(full, queue)

    def hold_refusal(self) -> bool:
        """Hold an early refusal for SEMANTIC_REFUSAL_HOLD_MS before it is answered; whether it was held.

        A refusal costs the CPU of its request and its answer, taken from the model thread, which runs
        below request threads (SEMANTIC_NICE); clients that send again at once after each 503 turn that
        into a loop that starves the queries admitted (refusals.py has the figures). Held, a refusal costs
        no CPU, and such a client sends at most one query per hold. A held refusal keeps its request
        thread, so it takes one of this worker's semantic handlers (the other threads stay free for text)
        and at most half of them are held; past that it is answered at once.
        """
        seconds = self.settings.semantic_refusal_hold_ms / 1000
        if seconds <= 0 or not self._held.acquire(blocking=False):
            return False
        try:
            if not self._handlers.acquire(blocking=False):
                return False
            try:
                self._pause(seconds)
            finally:
                self._handlers.release()
        finally:
            self._held.release()
        return True

    def _encode_query(self, query: str):
        """The query's vector from the model queue; Overloaded (counted in /metrics) when it would wait
        past the deadline, SemanticUnavailable when the model stopped answering."""
        queue = self.queue()
        try:
            return queue.encode_query(query)
        except QueueFull as full:
            raise _refused(full, queue) from None
        except QueueStuck as stuck:
            raise SemanticUnavailable(f"the semantic model is not answering ({stuck})") from None
        except SemanticUnavailable:  # the embedding service is away: said once, when its breaker opened
            raise
        except Exception as exc:  # the runtime failed on this query: a 503 with the reason, never a 500
            log.error("the semantic model failed on a query: %s", _describe(exc))
            raise SemanticUnavailable(f"the semantic model failed on this query ({_describe(exc)})") from None

    def warm(self) -> bool:
        """Load the model and answer one query, so this process's first user query pays no load.

        Called in a new gunicorn worker before it accepts requests (SEMANTIC_WARM, gunicorn.conf.py).
        The weights are memory-mapped pages every worker shares, so a warm worker costs what any worker
        costs after its first semantic request: its session's own buffers and the query's activations.
        Never raises: a worker that cannot warm still serves text and tags, and semantic search reports
        its state as it would have on the first request. Returns whether the model is loaded.
        """
        if self._state == DISABLED:
            return False
        try:
            # The whole path: model, model queue and its thread, vector store, one query.
            self.search(WARM_QUERY, 1)
        except Exception as exc:  # noqa: BLE001 -- a failed warm-up must not stop a worker from starting
            log.warning("semantic warm-up did not complete: %s", _describe(exc))
        return self._encoder is not None


class _Background:
    """The encoder as index.embed_rows sees it, each encode() one background job of the model queue."""

    def __init__(self, encoder: "Encoder", queue: ModelQueue):
        self._queue = queue
        self.fingerprint, self.dim = encoder.fingerprint, encoder.dim

    def encode(self, texts: Sequence[str], batch_size: int):
        return self._queue.encode_background(texts, batch_size)


def _refused(full: QueueFull, queue: ModelQueue) -> Overloaded:
    """The 503 of a query the queue refuses by its deadline, counted."""
    _count_shed("deadline")
    return Overloaded(f"semantic search is at capacity: {full.reason(queue.deadline_s)}; retry after "
                      f"{full.retry_after} s, or search with mode=text", full.retry_after)


def _count_shed(reason: str) -> None:
    try:
        from monitoring import metrics

        metrics.semantic_shed.labels(reason=reason).inc()
    except Exception:  # counting must never turn a clean 503 into a 500
        log.debug("the shed counter could not be incremented", exc_info=True)


def _mark_model_loaded(loaded: bool) -> None:
    """Set this worker's memfit_semantic_model_loaded as the model's state changes: a scrape answered by
    another worker reads this worker's value from its file, and it was 0 until a scrape reached it."""
    try:
        from monitoring import metrics

        metrics.model_loaded.set(1 if loaded else 0)
    except Exception:  # noqa: BLE001 -- a metric must never fail a model load
        log.debug("the model-loaded gauge could not be set", exc_info=True)


def _count_run(kind: str, texts: int) -> None:
    from monitoring import metrics

    metrics.semantic_runs.labels(kind=kind).inc()
    metrics.semantic_run_texts.labels(kind=kind).inc(texts)


def _count_embedded(count: int) -> None:
    try:
        from monitoring import metrics

        metrics.semantic_embedded.inc(count)
    except Exception:  # noqa: BLE001 -- a metric must never stop the embedder
        log.debug("the embedded counter could not be incremented", exc_info=True)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
