"""Stored embeddings: computing the missing ones in batches, and nearest-neighbour search over them.

Imported only inside ``SemanticService``'s methods, the semantic path (it imports numpy at module
level), and by tests and benchmarks.

Vectors live in the ``embeddings`` table as L2-normalised float16 under the model's fingerprint.
Two stores search them (``SemanticService.vector_store()`` picks one per app):

* PostgreSQL with pgvector: the database does the search (``vec <=> query``); the web process
  holds no vectors at all, whatever the corpus size.
* Otherwise (SQLite, or PostgreSQL without the extension): a per-worker float16 matrix (half of
  fp32's bytes), appended to as rows are added (rebuilt on any other change) and bounded by SEMANTIC_INDEX_MAX_MB; past that
  bound it streams the rows from the database in chunks, so memory does not grow with the corpus.
"""

from __future__ import annotations

import heapq
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
from sqlalchemy import and_, bindparam, func, select, text
from sqlalchemy.exc import IntegrityError

from ..db import Embedding, Item, Tag, db, item_tags, text_hash
from . import hnsw
from .encoders import Encoder
from .publisher import from_blobs

log = logging.getLogger(__name__)
KINDS = {"item": Item, "tag": Tag}
STREAM_CHUNK = 4096  # rows per chunk when streaming: ~6 MB of float16 at 768 dims


def to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f2").tobytes()


class Pending(NamedTuple):
    """A row to embed, as read: its id and the text its vector is made from (no ORM object to expire)."""

    id: int
    embedding_text: str


def missing(kind: str, fingerprint: str, limit: int | None = None, check_text: bool = False,
            after_id: int = 0) -> list[Pending]:
    """Rows of ``kind`` (ids above after_id) without a current vector (and, with check_text, whose text changed)."""
    model = KINDS[kind]
    joined = and_(Embedding.model_fp == fingerprint, Embedding.kind == kind, Embedding.ref_id == model.id)
    query = select(model, Embedding.text_hash).outerjoin(Embedding, joined).where(model.id > after_id)
    query = query.order_by(model.id)
    if not check_text:
        query = query.where(Embedding.id.is_(None))
        if limit is not None:
            query = query.limit(limit)
        return [Pending(row.id, row.embedding_text) for row, _ in db.session.execute(query)]
    stale = [Pending(row.id, row.embedding_text) for row, stored in db.session.execute(query)
             if stored != text_hash(row.embedding_text)]
    return stale[:limit] if limit is not None else stale


def embed_rows(encoder: Encoder, kind: str, rows: Sequence, batch_size: int,
               progress: Callable[[int], None] | None = None, vector_store=None) -> int:
    """Encode rows batch by batch and store their vectors, one commit per batch (a crash loses a batch).

    No transaction is open while a batch is encoded (which may wait for the model): on PostgreSQL an
    idle transaction would hold its locks and snapshot for as long as the queries ahead take."""
    done = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        texts = [row.embedding_text for row in batch]
        ids = [row.id for row in batch]
        db.session.commit()  # nothing is written yet: this only ends the transaction of the reads
        vectors = encoder.encode(texts, batch_size)
        # Replace, not update: a fresh id tells other workers' matrices that the table changed.
        db.session.execute(
            Embedding.__table__.delete().where(
                Embedding.model_fp == encoder.fingerprint, Embedding.kind == kind, Embedding.ref_id.in_(ids)
            )
        )
        stored = [Embedding(model_fp=encoder.fingerprint, kind=kind, ref_id=row_id, text_hash=text_hash(text),
                            dim=encoder.dim, vector=to_blob(vector))
                  for row_id, text, vector in zip(ids, texts, vectors)]
        db.session.add_all(stored)
        try:
            if vector_store is not None:
                db.session.flush()
                vector_store.write([e.id for e in stored], vectors)
            db.session.commit()
        except IntegrityError:
            # Another worker stored the same vectors first: theirs are as good as ours.
            db.session.rollback()
            log.info("embedding batch of %d %ss already stored by another worker", len(batch), kind)
        done += len(batch)
        if progress:
            progress(len(batch))
    return done


def prune(fingerprint: str) -> int:
    """Delete vectors of every other model; returns how many went."""
    result = db.session.execute(Embedding.__table__.delete().where(Embedding.model_fp != fingerprint))
    db.session.commit()
    return result.rowcount or 0


def counts(fingerprint: str) -> dict:
    rows = db.session.execute(
        select(Embedding.kind, Embedding.model_fp == fingerprint, func.count()).group_by(
            Embedding.kind, Embedding.model_fp == fingerprint
        )
    )
    result = {"current": {"item": 0, "tag": 0}, "stale": 0}
    for kind, current, n in rows:
        if current:
            result["current"][kind] = n
        else:
            result["stale"] += n
    return result


def table_version(fingerprint: str, kind: str, after_id: int = 0) -> tuple[int, int | None, int]:
    """(count, largest id, sum of ids) of kind's vectors above after_id.

    From the (model_fp, kind) index alone: cheap enough for every query. The sum of ids tells rows
    added from a row deleted plus another committed late, which leave the same count (_append)."""
    count, newest, total = db.session.execute(
        _VERSION, {"fingerprint": fingerprint, "kind": kind, "after_id": after_id}).one()
    return int(count), (int(newest) if newest is not None else None), int(total)


# Built once: two of these run for every semantic query, and building the statement (SQLAlchemy's
# coercions of each clause) cost more than running it, about 1 ms of a query's CPU each.
_VERSION = (select(func.count(), func.max(Embedding.id), func.coalesce(func.sum(Embedding.id), 0))
            .where(Embedding.model_fp == bindparam("fingerprint"), Embedding.kind == bindparam("kind"),
                   Embedding.id > bindparam("after_id")))


@dataclass
class _Matrix:
    version: tuple  # (count, max id, sum of ids) of the table's rows it holds
    after_id: int  # it holds the rows above this id (0: all; a shared index's newer rows otherwise)
    ids: np.ndarray
    vectors: np.ndarray  # float16, (n, dim): views of the first n rows of the buffers below
    ids_buffer: np.ndarray
    vectors_buffer: np.ndarray  # rows past n are free room for appends


class VectorIndex:
    """Per-worker nearest-neighbour search over one model's stored vectors."""

    kind = "in-process"

    def write(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Nothing to do: the matrix follows the table (new rows appended, anything else rebuilt)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._matrices: dict[tuple[str, str], _Matrix] = {}

    def memory_bytes(self) -> int:
        return sum(m.vectors_buffer.nbytes + m.ids_buffer.nbytes for m in self._matrices.values())

    def top(self, fingerprint: str, kind: str, query: np.ndarray, k: int,
            after_id: int = 0) -> list[tuple[int, float]]:
        """The k most similar (ref_id, cosine) of kind (rows above after_id), best first."""
        version = table_version(fingerprint, kind, after_id)
        n = version[0]
        if not n:
            return []
        dim = query.shape[0]
        query = np.asarray(query, dtype=np.float32)
        if n * (dim * 2 + 8) > self.max_bytes:
            self._matrices.pop((fingerprint, kind), None)
            return self._stream_top(fingerprint, kind, query, k, after_id)
        matrix = self._matrix(fingerprint, kind, version, dim, after_id)
        return _top_k(matrix.ids, _scores(matrix.vectors, query), k)

    def _matrix(self, fingerprint: str, kind: str, version: tuple, query_dim: int, after_id: int) -> _Matrix:
        key = (fingerprint, kind)
        cached = self._matrices.get(key)
        if cached is not None and cached.version == version and cached.after_id == after_id:
            return cached
        with self._lock:
            cached = self._matrices.get(key)
            if cached is not None and cached.version == version and cached.after_id == after_id:
                return cached
            if cached is not None and cached.after_id == after_id:
                appended = self._append(key, cached, version)
                if appended is not None:
                    return appended
            cached = None  # no reference of ours may keep the old matrix alive through the rebuild
            return self._rebuild(key, version, query_dim, after_id)

    def _rows(self, fingerprint: str, kind: str, after_id: int = 0):
        return db.session.execute(
            select(Embedding.id, Embedding.ref_id, Embedding.vector).where(
                Embedding.model_fp == fingerprint, Embedding.kind == kind, Embedding.id > after_id)
            .order_by(Embedding.id).execution_options(yield_per=STREAM_CHUNK))

    def _append(self, key: tuple[str, str], cached: _Matrix, version: tuple) -> _Matrix | None:
        """The cached matrix plus the rows stored after it, when that is all that changed: creates
        (one row each, every few seconds under load) then cost their rows, not a rebuild per worker.

        None when the table changed otherwise (a row deleted or replaced, or committed late with an id
        below the cached max: the rows after the max no longer add up to the count and the sum of
        ids) or the free room is used up."""
        held, held_max, held_sum = cached.version
        count, newest, total = version
        added = count - held
        if added <= 0 or newest is None or held_max is None or newest <= held_max:
            return None
        if held + added > len(cached.ids_buffer):
            return None
        rows = self._rows(*key, after_id=held_max).all()
        if len(rows) != added or held_sum + sum(row[0] for row in rows) != total:
            return None
        # Rows past `held` are not in any published matrix: queries scoring the old view never see them.
        for offset, (_, ref_id, blob) in enumerate(rows):
            cached.ids_buffer[held + offset] = ref_id
            cached.vectors_buffer[held + offset] = np.frombuffer(blob, dtype="<f2")
        matrix = _Matrix(version, cached.after_id, cached.ids_buffer[:count], cached.vectors_buffer[:count],
                         cached.ids_buffer, cached.vectors_buffer)
        self._matrices[key] = matrix
        return matrix

    def _rebuild(self, key: tuple[str, str], version: tuple, dim: int, after_id: int) -> _Matrix:
        # Let the old matrix go before the new one is allocated: holding both while copying would
        # make the peak twice the bound. Queries already scoring the old one keep it until they end.
        self._matrices.pop(key, None)
        # Rows are copied one by one into preallocated float16 arrays: no list of blobs and no joined
        # copy. A quarter more room than today's rows (within the bound) takes the appends to come.
        n = version[0]
        room = max(n, min(n + max(n // 4, 256), self.max_bytes // (dim * 2 + 8)))
        ids = np.empty(room, dtype=np.int64)
        vectors = np.empty((room, dim), dtype="<f2")
        rows = self._rows(*key, after_id=after_id)
        count, newest, total = 0, None, 0
        for row_id, ref_id, blob in rows:
            if count == n:  # rows added since the version was read: the next query appends them
                break
            ids[count] = ref_id
            vectors[count] = np.frombuffer(blob, dtype="<f2")
            newest, total = row_id, total + row_id
            count += 1
        rows.close()
        matrix = _Matrix((count, newest, total), after_id, ids[:count], vectors[:count], ids, vectors)
        self._matrices[key] = matrix
        return matrix

    def _stream_top(self, fingerprint: str, kind: str, query: np.ndarray, k: int,
                    after_id: int = 0) -> list[tuple[int, float]]:
        best: list[tuple[float, int]] = []
        rows = db.session.execute(
            select(Embedding.ref_id, Embedding.vector, Embedding.dim).where(
                Embedding.model_fp == fingerprint, Embedding.kind == kind, Embedding.id > after_id)
            .execution_options(yield_per=STREAM_CHUNK)
        )
        for chunk in rows.partitions(STREAM_CHUNK):
            ids = np.asarray([r[0] for r in chunk], dtype=np.int64)
            scores = _scores(from_blobs([r[1] for r in chunk], chunk[0][2]), query)
            for ref_id, score in _top_k(ids, scores, k):
                _push(best, (score, ref_id), k)
        return [(ref_id, score) for score, ref_id in sorted(best, reverse=True)]


def _scores(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    # float16 has no BLAS kernel: widen in blocks so the temporary stays small and BLAS does the work.
    out = np.empty(len(vectors), dtype=np.float32)
    for start in range(0, len(vectors), STREAM_CHUNK):
        out[start : start + STREAM_CHUNK] = vectors[start : start + STREAM_CHUNK].astype(np.float32) @ query
    return out


def _top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    if len(scores) > k:
        part = np.argpartition(-scores, k)[:k]
    else:
        part = np.arange(len(scores))
    order = part[np.argsort(-scores[part], kind="stable")]
    return [(int(ids[i]), float(scores[i])) for i in order]


def _push(heap: list, entry: tuple, k: int) -> None:
    if len(heap) < k:
        heapq.heappush(heap, entry)
    elif entry > heap[0]:
        heapq.heapreplace(heap, entry)


def items_with_tags(tag_ids: Iterable[int]) -> dict[int, set[int]]:
    """item id -> the ids among tag_ids that the item carries."""
    result: dict[int, set[int]] = {}
    ids = list(tag_ids)
    if not ids:
        return result
    for item_id, tag_id in db.session.execute(
        select(item_tags.c.item_id, item_tags.c.tag_id).where(item_tags.c.tag_id.in_(ids))
    ):
        result.setdefault(item_id, set()).add(tag_id)
    return result


def _literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.6g}" for x in np.asarray(vector, dtype=np.float32)) + "]"


class PgVectorIndex:
    """Nearest-neighbour search inside PostgreSQL with pgvector: no vectors in the web process."""

    kind = "pgvector"

    def __init__(self, ef_search: int = 200):
        self.ef_search = ef_search
        self._iterative: bool | None = None  # pgvector >= 0.8 can continue a filtered HNSW scan

    def write(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        if ids:
            db.session.execute(text("UPDATE embeddings SET vec = CAST(:v AS vector) WHERE id = :id"),
                               [{"id": i, "v": _literal(v)} for i, v in zip(ids, vectors)])

    def memory_bytes(self) -> int:
        return 0

    def top(self, fingerprint: str, kind: str, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        # The HNSW indexes are built on a typed expression of vec (release.ensure_hnsw, docs/vectors.md):
        # ordered by the expression of a valid one, the search is approximate and fast, otherwise exact.
        dim = int(query.shape[0])
        params = {"q": _literal(query), "fp": fingerprint, "kind": kind, "k": k, "dim": dim}
        # An HNSW scan returns at most hnsw.ef_search rows, before the WHERE drops other kinds and
        # models: at pgvector's default (40) a top-50 came back with 39-40 rows. Local to this
        # transaction, so nothing leaks to the pooled connection's next user. The same statement reads
        # which index is valid now: a release may have just moved dim's index to half precision.
        valid = db.session.execute(text(
            f"SELECT set_config('hnsw.ef_search', :ef, true), ARRAY(SELECT name FROM ({hnsw.PRESENT}) p WHERE valid)"),
            {"ef": str(min(1000, max(self.ef_search, k))), "names": hnsw.names(dim)}).one()[1]
        through = next((kind for kind in hnsw.KINDS if kind.name(dim) in valid), None)

        def nearest(exact: bool):
            # Scores at full precision whichever expression orders the rows; "+ 0" orders by an
            # expression no index has: the exact scan, whatever the planner's settings.
            score = f"{hnsw.VECTOR.expression(dim)} <=> CAST(:q AS vector({dim}))"
            order = f"({score}) + 0"
            if not exact and through is not None:
                order = f"{through.expression(dim)} <=> CAST(:q AS {through.type}({dim}))"
            return [(int(ref_id), float(score)) for ref_id, score in db.session.execute(text(
                f"SELECT ref_id, 1 - ({score}) AS score FROM embeddings "
                f"WHERE model_fp = :fp AND kind = :kind AND dim = :dim AND vec IS NOT NULL ORDER BY {order} LIMIT :k"),
                params)]

        if self._iterative is None:
            self._iterative = hnsw.pgvector_version() >= (0, 8)
        if self._iterative:
            db.session.execute(text("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)"))
        rows = nearest(exact=False)
        if len(rows) < k and self._short(fingerprint, kind, dim, len(rows)):
            # The filter left fewer rows than asked although the table has them (an older pgvector,
            # without iterative scans): the exact scan gives them all.
            rows = nearest(exact=True)
        return sorted(rows, key=lambda hit: -hit[1])

    def _short(self, fingerprint: str, kind: str, dim: int, got: int) -> bool:
        have = db.session.scalar(text(
            "SELECT count(*) FROM (SELECT 1 FROM embeddings WHERE model_fp = :fp AND kind = :kind AND dim = :dim "
            "AND vec IS NOT NULL LIMIT :enough) s"), {"fp": fingerprint, "kind": kind, "dim": dim, "enough": got + 1})
        return have > got


def pgvector_ready() -> bool:
    """Whether embeddings.vec exists (read-only): what a web worker checks; the DDL is the release's."""
    return bool(db.session.execute(text(
        "SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "WHERE a.attrelid = to_regclass('embeddings') AND a.attname = 'vec' AND t.typname = 'vector' "
        "AND NOT a.attisdropped")).first())


def enable_pgvector() -> bool:
    """Create the extension and the ``vec`` column where possible; backfill vectors stored before."""
    try:
        with db.session.begin_nested():
            db.session.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
            db.session.execute(text("ALTER TABLE embeddings ADD COLUMN IF NOT EXISTS vec vector"))
        db.session.commit()
    except Exception as exc:  # no extension on this server, or no right to create it: degrade, not break
        db.session.rollback()
        log.warning("pgvector unavailable (%s); semantic search uses the in-process index",
                    str(exc).splitlines()[0][:160])
        return False
    store = PgVectorIndex()
    while True:
        rows = db.session.execute(select(Embedding.id, Embedding.vector, Embedding.dim).where(
            text("vec IS NULL")).limit(STREAM_CHUNK)).all()
        if not rows:
            return True
        store.write([r[0] for r in rows], np.stack([from_blobs([r[1]], r[2])[0] for r in rows]).astype(np.float32))
        db.session.commit()
