"""The semantic-search service: the one front door to the model, the vector store, catch-up and the
nearest-neighbour query. The model is loaded on the first semantic request, once.

Its state (encoder, vector store, catch-up memo) lives on the instance, one per app (``app.state``).
Every model run (a query, a catch-up batch) holds one of the instance's semantic slots (slots.py), so
semantic work never takes every handler from text and tag search: past a short wait a query is shed
(Overloaded: 503 with Retry-After) and catch-up is left to a later request.
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

from ..db import Item, Tag, db
from ..settings import Settings
from .slots import ModelRunner, Slots

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .encoders import Encoder

log = logging.getLogger(__name__)

DISABLED, NOT_LOADED, LOADING, LOADED, FAILED = "disabled", "not_loaded", "loading", "loaded", "failed"
# A failed load is retried at most this often, so a bad model name does not cost a load per request.
RETRY_AFTER_SECONDS = 300.0
KINDS = ("tag", "item")  # tags first: they are few, and every item's score reads them
TAG_CANDIDATES = 50  # closest tags read per query
CARRYING_TAGS = 10  # items carrying one of this many closest tags are candidates too
WARM_QUERY = "חיפוש"  # "search": any short Hebrew text exercises the tokenizer and the session
# What a shed query is told to wait: a query holds a slot for tens of ms, so a slot is very likely
# free a second later, and a longer wait would only make text-only clients of a busy instance slower.
SHED_RETRY_AFTER_SECONDS = 1
# How long a catch-up batch waits for a semantic slot: not at all. Catch-up runs inside a user's
# semantic request, whose query then waits up to SEMANTIC_QUEUE_TIMEOUT_MS itself; a batch that
# waited too would double that wait on a saturated instance, where deferring costs nothing visible.
CATCH_UP_SLOT_WAIT = 0.0


class SemanticUnavailable(RuntimeError):
    """Semantic search cannot answer now; the message says why (shown to the client with a 503)."""


class Overloaded(SemanticUnavailable):
    """Every semantic slot of the instance stayed busy past SEMANTIC_QUEUE_TIMEOUT_MS: the query is shed
    (503 overloaded with Retry-After). A SemanticUnavailable, so callers that fall back on one fall back."""

    def __init__(self, message: str, retry_after: int = SHED_RETRY_AFTER_SECONDS):
        super().__init__(message)
        self.retry_after = retry_after


class _CatchUpDeferred(Exception):
    """No slot freed up for a catch-up batch in time: the batches done stay, the rest wait for a later request."""


@dataclass(frozen=True)
class SemanticHits:
    """What a semantic query found, by id only: the caller loads the items it returns."""

    scored: list[tuple[float, int]]  # (score, item id), best first, at most the limit
    tag_scores: dict[int, float]  # tag id -> cosine to the query, for the closest tags
    item_tags: dict[int, set[int]]  # item id -> the ids of closest tags it carries


class SemanticService:
    """One per app: loads the model once, keeps the vectors current and answers nearest-neighbour queries."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._encoder: Encoder | None = None
        self._state = NOT_LOADED if settings.enable_semantic_search else DISABLED
        self._error: str | None = None
        self._failed_at = 0.0
        self.load_seconds: float | None = None
        self.load_count = 0
        self._store = None  # the vector store, chosen on first use: see vector_store()
        self._caught_up: tuple | None = None  # (fingerprint, max tag id, max item id) with nothing missing
        self._slots: Slots | None = None  # the instance's semantic slots, opened on first use: see slots()
        self._runner: ModelRunner | None = None  # low-priority model threads, made on first use: see runner()
        # This worker's request threads that hold a semantic search (SEMANTIC_HANDLERS): a search waiting
        # for a slot holds its thread, and without this bound a burst of them takes every thread of the
        # worker, so text searches queue for a thread although no slot is theirs to wait for.
        self._handlers = threading.BoundedSemaphore(settings.semantic_handler_limit)

    @property
    def state(self) -> str:
        return self._state

    def status(self) -> dict:
        status = {"state": self._state, "model": self.settings.semantic_model}
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
        with self._lock:
            if self._encoder is not None:
                return self._encoder
            if self._state == FAILED and time.monotonic() - self._failed_at < RETRY_AFTER_SECONDS:
                raise SemanticUnavailable(f"the semantic model failed to load: {self._error}")
            self._state = LOADING
            started = time.perf_counter()
            try:
                from .encoders import load_encoder  # heavy imports happen only here

                self._encoder = load_encoder(self.settings)
            except Exception as exc:  # any load failure degrades semantic search, never the app
                self._state, self._failed_at = FAILED, time.monotonic()
                self._error = _describe(exc)
                log.error("semantic model %r failed to load: %s", self.settings.semantic_model, self._error)
                raise SemanticUnavailable(f"the semantic model failed to load: {self._error}") from None
            self.load_seconds = time.perf_counter() - started
            self.load_count += 1
            self._state, self._error = LOADED, None
            log.info("semantic model loaded in %.2fs: %s", self.load_seconds, self._encoder.describe())
            return self._encoder

    def vector_store(self):
        """This worker's vector store, chosen on first use: pgvector on PostgreSQL when the release
        command (app/release.py) has set it up, else the bounded in-process index (a race makes two;
        one is kept, both are correct). No schema work here: a request never runs DDL."""
        if self._store is None:
            from . import index  # numpy and the vector code, only on this path

            if not self.settings.is_sqlite and index.pgvector_ready():
                store = index.PgVectorIndex()
            else:
                store = index.VectorIndex(self.settings.semantic_index_max_mb * 1024 * 1024)
            if self._store is None:
                self._store = store
        return self._store

    def slots(self) -> Slots:
        """The instance's semantic slots (the lock files every worker shares); a race makes two equal ones."""
        if self._slots is None:
            self._slots = Slots.from_settings(self.settings)
        return self._slots

    def runner(self) -> ModelRunner:
        """This process's low-priority model threads (SEMANTIC_NICE), one per slot, made on first use:
        after fork, since gunicorn's workers load the model themselves."""
        with self._lock:
            if self._runner is None:
                self._runner = ModelRunner(self.slots().count, self.settings.semantic_nice)
            return self._runner

    def pending(self, kind: str, check_text: bool = False, limit: int | None = None) -> list:
        """Rows of kind ("tag" or "item") with no vector for this model (with check_text, also those
        whose text changed); loads the model."""
        from . import index

        return index.missing(kind, self.encoder().fingerprint, limit, check_text=check_text)

    def embed(self, kind: str, rows: Sequence, progress: Callable[[int], None] | None = None) -> int:
        """Encode and store the vectors of rows, in batches of EMBEDDING_BATCH_SIZE, each batch holding
        a semantic slot; returns how many. When every slot is busy (CATCH_UP_SLOT_WAIT) it stops with
        _CatchUpDeferred: the batches stored so far are committed (and were reported to progress),
        the others are left for later."""
        from . import index

        return index.embed_rows(_SlotPerBatch(self.encoder(), self.slots(), self.runner()), kind, rows,
                                self.settings.embedding_batch_size, progress=progress,
                                vector_store=self.vector_store())

    def prune(self) -> int:
        """Delete the vectors of every other model; returns how many went."""
        from . import index

        return index.prune(self.encoder().fingerprint)

    def counts(self) -> dict:
        """Stored vectors: this model's per kind, and the stale ones of other models."""
        from . import index

        return index.counts(self.encoder().fingerprint)

    def catch_up(self) -> int:
        """Embed up to SEMANTIC_CATCHUP_LIMIT tags and items that have no vector for this model yet.

        The search for missing rows is skipped while the newest tag and item ids are those this worker
        saw when it last found nothing missing (one cheap query instead of two anti-joins per request).
        Each batch holds a semantic slot like a query, but is never shed with an error: when every
        slot is busy the rest is deferred to a later request (searching meanwhile without the newest
        rows' vectors).
        """
        limit = self.settings.semantic_catchup_limit
        if limit <= 0:
            return 0
        newest = (self.encoder().fingerprint, *db.session.execute(
            select(select(func.max(Tag.id)).scalar_subquery(), select(func.max(Item.id)).scalar_subquery())).one())
        if self._caught_up == newest:
            return 0
        done = 0

        def count(stored: int) -> None:
            nonlocal done
            done += stored

        try:
            for kind in KINDS:
                self.embed(kind, self.pending(kind, limit=limit - done), progress=count)
                if done >= limit:
                    return done
        except _CatchUpDeferred:
            log.info("catch-up deferred after %d embeddings: every semantic slot stayed busy", done)
            return done
        self._caught_up = newest  # nothing was left missing up to these ids
        return done

    def search(self, query: str, limit: int) -> SemanticHits:
        """The items nearest the query, scored by their own vector and their closest tags'.

        Loads the model and catches up on missing vectors first; raises SemanticUnavailable with a reason,
        Overloaded at once when SEMANTIC_HANDLERS of this worker's threads already hold a semantic search.
        """
        encoder = self.encoder()
        if not self._handlers.acquire(blocking=False):
            _count_shed()
            raise Overloaded(f"semantic search is at capacity ({self.settings.semantic_handler_limit} semantic "
                             f"searches in this worker); retry after {SHED_RETRY_AFTER_SECONDS} s, or search "
                             f"with mode=text")
        from . import index

        try:
            self.catch_up()
            vector = self._encode_query(encoder, query)
            store = self.vector_store()
            tag_hits = dict(store.top(encoder.fingerprint, "tag", vector, TAG_CANDIDATES))
            item_hits = dict(store.top(encoder.fingerprint, "item", vector, max(limit * 5, 50)))
            # Items carrying one of the closest tags are candidates even if their own text is farther.
            top_tags = sorted(tag_hits, key=tag_hits.get, reverse=True)[:CARRYING_TAGS]
            tagged = index.items_with_tags(top_tags)
            floor = min(item_hits.values()) if item_hits else 0.0
            scored = []
            for item_id in set(item_hits) | set(tagged):
                own = item_hits.get(item_id, floor)
                best_tag = max((tag_hits[t] for t in tagged.get(item_id, ())), default=None)
                scored.append((own if best_tag is None else 0.6 * own + 0.4 * max(best_tag, own), item_id))
            scored.sort(key=lambda entry: (-entry[0], -entry[1]))
            return SemanticHits(scored=scored[:limit], tag_scores=tag_hits, item_tags=tagged)
        finally:
            self._handlers.release()

    def _encode_query(self, encoder: "Encoder", query: str):
        """The query's vector, computed while holding a semantic slot; raises Overloaded (counted in
        /metrics) when none frees up within SEMANTIC_QUEUE_TIMEOUT_MS."""
        slots = self.slots()
        slot = slots.acquire()
        if slot is None:
            _count_shed()
            raise Overloaded(f"semantic search is at capacity ({slots.count} model runs in flight on this "
                             f"instance); retry after {SHED_RETRY_AFTER_SECONDS} s, or search with mode=text")
        with slot:
            return self.runner().run(encoder.encode, [query], 1, kind="query")[0]


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
            # The whole path: model, catch-up (bounded by SEMANTIC_CATCHUP_LIMIT, a few items in the tiers), vector
            # store, one query. Left to the first request instead, the catch-up's look for missing rows and
            # its batch made a recycled worker's first query under the mix wait up to seconds.
            self.search(WARM_QUERY, 1)
        except Exception as exc:  # noqa: BLE001 -- a failed warm-up must not stop a worker from starting
            log.warning("semantic warm-up did not complete: %s", _describe(exc))
        return self._encoder is not None


class _SlotPerBatch:
    """An encoder whose every encode() call (one catch-up batch) holds a semantic slot; when none is
    free it raises _CatchUpDeferred instead of shedding, before the batch touches the database."""

    def __init__(self, encoder: "Encoder", slots: Slots, runner: ModelRunner):
        self._encoder, self._slots, self._runner = encoder, slots, runner
        self.fingerprint, self.dim = encoder.fingerprint, encoder.dim

    def encode(self, texts: Sequence[str], batch_size: int):
        slot = self._slots.acquire(timeout=CATCH_UP_SLOT_WAIT)
        if slot is None:
            raise _CatchUpDeferred()
        with slot:
            return self._runner.run(self._encoder.encode, texts, batch_size)


def _count_shed() -> None:
    try:
        from monitoring import metrics

        metrics.semantic_shed.inc()
    except Exception:  # counting must never turn a clean 503 into a 500
        log.debug("the shed counter could not be incremented", exc_info=True)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
