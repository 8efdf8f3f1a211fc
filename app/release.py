"""The release step a platform runs before new code takes traffic: ``flask --app app release``.

In order, under one lock (``pg_advisory_lock`` on PostgreSQL, an flock file beside SQLite):

1. schema migrations (migrations/, Alembic through Flask-Migrate);
2. on PostgreSQL, pgvector: the extension when the server allows it, the ``vec`` column and its
   values (a clear one-line message and the in-process index otherwise);
3. the text index: items analysed by another analyzer (an older version, or without the Hebrew
   lexicon) analysed again, one transaction per batch with progress, so that a rerun resumes;
4. the embedding backfill for the configured model's fingerprint, one transaction per batch, so
   that Ctrl-C or a crash keeps whole batches only and a rerun resumes; vectors of older
   fingerprints are pruned only once the new ones are complete;
5. the HNSW index on the typed vector expression, once the corpus is large enough to need it
   (half precision where the server's pgvector has it, replacing a full-precision one);
   without pgvector, a new generation of the instance's shared vector index (semantic/shared.py)
   when one is due, so that workers start with it rather than build it while they serve.

Run twice, the second run changes nothing. Web workers do no schema work: until the release has
run they answer 503 naming this command (``schema_problem``).
"""

from __future__ import annotations

import fcntl
import functools
import io
import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from sqlalchemy import and_, create_engine, func, select, text
from sqlalchemy.pool import NullPool

from . import textindex
from .db import MIGRATIONS_DIR, Embedding, Item, Tag, db
from .semantic import hnsw
from .state import get_service, get_settings, get_state

log = logging.getLogger(__name__)

RELEASE_COMMAND = "flask --app app release"
# pg_advisory_lock key: "memfit" in ASCII, so that it is recognisable in pg_locks.
ADVISORY_LOCK_KEY = 0x6D656D666974
# Below this many vectors of one model, pgvector's exact scan answers in milliseconds and an HNSW
# index would only slow the writes down; past it the scan grows linearly and the index pays off.
HNSW_MIN_ROWS = 20_000
# Rows read per round of the backfill: bounds the memory of a large backfill.
BACKFILL_CHUNK = 512
# Items analysed again per transaction by the text index step.
TEXT_BATCH = 1000
# Seconds between progress lines when the output is a log rather than a terminal.
LOG_EVERY_SECONDS = 10.0

Echo = Callable[[str], None]


# --- The lock ---------------------------------------------------------------------------------

@contextmanager
def release_lock(app: Flask, echo: Echo | None = None) -> Iterator[None]:
    """Hold the release lock: one release (or `flask db upgrade`) per database at a time.

    Re-entrant within a process (release -> migrations -> env.py takes it again); across processes
    the second waits, saying so, and then finds the work done.
    """
    state = get_state(app)
    with state.release_mutex:
        if state.release_depth:
            state.release_depth += 1
            try:
                yield
            finally:
                state.release_depth -= 1
            return
        settings = state.settings
        holder = _pg_lock if not settings.is_sqlite else _file_lock
        with holder(settings, echo or log.info):
            state.release_depth = 1
            try:
                yield
            finally:
                state.release_depth = 0


@contextmanager
def _pg_lock(settings, echo: Echo) -> Iterator[None]:
    # A connection of its own, outside the app's pool: a small pool must not starve the migrations.
    engine = create_engine(settings.database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY}).scalar():
                echo("waiting for another release on this database to finish")
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            conn.commit()  # the lock is held by the session, not by this transaction
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()  # closing the connection would release the lock in any case


@contextmanager
def _file_lock(settings, echo: Echo) -> Iterator[None]:
    path = settings.sqlite_path
    if path is None:  # an in-memory database belongs to one process: nothing to share
        yield
        return
    with open(f"{path}.release.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo("waiting for another release on this database to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- Schema -----------------------------------------------------------------------------------

def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Alembic filter (migrations/env.py): leave out what this module makes, not migrations.
    pgvector's `vec` column and the HNSW indexes exist only where the server has the extension, so
    autogenerate must never propose dropping them."""
    table = getattr(getattr(obj, "table", None), "name", None)
    if type_ == "column" and name == "vec" and table == "embeddings":
        return False
    # The text index (app/textindex.py, migration 0002): FTS5 tables and PostgreSQL's generated
    # tsvector column and its GIN index are DDL the models do not describe.
    if type_ == "table" and name and name.startswith(textindex.FTS):
        return False
    if table == "items" and name in textindex.PG_COLUMNS + textindex.PG_INDEXES:
        return False
    return not (type_ == "index" and name and name.startswith(hnsw.PREFIX))


@functools.lru_cache(maxsize=4)
def _script(directory: str):
    """The migration scripts' heads and revision ids (read once per process: they ship with the code)."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(directory)
    return frozenset(scripts.get_heads()), frozenset(s.revision for s in scripts.walk_revisions())


def current_revisions(connection=None) -> frozenset:
    """The revisions recorded in the database (empty when it was never migrated)."""
    from alembic.runtime.migration import MigrationContext

    connection = connection if connection is not None else db.session.connection()
    return frozenset(MigrationContext.configure(connection).get_current_heads())


def schema_problem() -> str | None:
    """Why this database cannot be served by this code, or None. One cheap query; no schema work."""
    try:
        heads, known = _script(MIGRATIONS_DIR)
    except Exception as exc:  # a build without migrations/: say so instead of a 500 on every request
        return f"the migration scripts cannot be read ({exc}); the build must ship {MIGRATIONS_DIR}"
    current = current_revisions()
    if current == heads:
        return None
    if current and not current & known:
        # A newer release migrated the database while this worker's code is older (a rolling
        # deploy): migrations are additive, so the old code keeps serving.
        log.warning("database schema %s is newer than this code's %s", sorted(current), sorted(heads))
        return None
    found = ", ".join(sorted(current)) or "none"
    return (f"the database schema is not up to date (revision {found}, this code needs "
            f"{', '.join(sorted(heads))}); run `{RELEASE_COMMAND}`")


def migrate_schema() -> tuple[frozenset, frozenset]:
    """Upgrade to the newest revision; returns the revisions before and after."""
    from .db import create_schema

    before = current_revisions()
    db.session.commit()  # end the read so that the migration's DDL is not blocked by it (SQLite)
    create_schema()
    after = current_revisions()
    db.session.commit()
    return before, after


# --- pgvector ---------------------------------------------------------------------------------

def ensure_pgvector() -> str | None:
    """Create the extension, the `vec` column and its values; returns why not, or None when ready."""
    try:
        with db.session.begin_nested():
            db.session.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
        db.session.commit()
    except Exception as exc:  # not installed on this server, or no right to create it
        db.session.rollback()
        return str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200]
    from .semantic import index

    # Adds the column where missing and copies the vectors stored before it existed.
    return None if index.enable_pgvector() else "the vec column could not be added (see the log)"



def ensure_hnsw(fingerprint: str, dim: int, min_rows: int, build_memory: str = "256MB",
                kind: hnsw.Hnsw | None = None) -> str:
    """Build the HNSW index of dim's vectors once the model has min_rows of them, of `kind` (by default
    half precision where the server's pgvector has it), and move an index of another kind to it;
    returns what happened. Built CONCURRENTLY: the running release keeps writing, and searches go
    through the other kind's index until this one is valid, and only then is that one dropped."""
    kind = kind or hnsw.kind_for(hnsw.pgvector_version())
    name = kind.name(dim)
    present = hnsw.present(dim)
    others = sorted(other for other in present if other != name)
    n = db.session.scalar(select(func.count()).select_from(Embedding).where(
        Embedding.model_fp == fingerprint, Embedding.dim == dim))
    db.session.commit()
    if present.get(name) is True and not others:
        return f"index {name} present"
    replacing = any(present[other] for other in others)  # a valid index of another kind serves today
    if present.get(name) is not True and n < min_rows and not replacing:
        return f"no index yet: {n} vectors < {min_rows} (HNSW_MIN_ROWS); the exact scan is fast enough"
    # CONCURRENTLY cannot run inside a transaction; an interrupted build leaves an invalid index,
    # which is dropped and rebuilt here rather than skipped by IF NOT EXISTS.
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if present.get(name) is True:
            done = f"index {name} present"
        else:
            if name in present:
                conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            # The graph is built in maintenance_work_mem (past it, pgvector builds on disk, several times
            # slower) by up to two parallel workers; both only for this connection, reset before it goes back.
            conn.execute(text("SELECT set_config('maintenance_work_mem', :m, false)"), {"m": build_memory})
            conn.execute(text("SELECT set_config('max_parallel_maintenance_workers', '2', false)"))
            try:
                # Partial on dim: the cast fails on vectors of another size (an older model's).
                conn.execute(text(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON embeddings "
                                  f"USING hnsw (({kind.expression(dim)}) {kind.ops()}) WHERE dim = {dim}"))
            finally:
                conn.execute(text("RESET maintenance_work_mem"))
                conn.execute(text("RESET max_parallel_maintenance_workers"))
            done = f"index {name} built on {n} vectors"
        # Only once the new index is valid: searches now go through it (PgVectorIndex.top reads which is).
        for other in others:
            conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {other}"))
    return done + "".join(f", {other} dropped" for other in others)


# --- Backfill with progress -------------------------------------------------------------------

class Progress:
    """A tqdm bar with rate and ETA on a terminal; a plain line every ``interval`` seconds (and at
    the end) otherwise, for platform logs, where a bar would be one endless line."""

    def __init__(self, label: str, total: int, echo: Echo = click.echo, stream: TextIO | None = None,
                 interval: float = LOG_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.echo, self.interval, self.clock = label, total, echo, interval, clock
        self.done = 0
        self.started = self.last = clock()
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if stream.isatty():
            from tqdm import tqdm

            # A pseudo-terminal without a size (some `docker run -t`, `script`) reports 0 x 0,
            # where tqdm would hide the bar: fall back to 80 x 24.
            sized = _terminal_sized(stream)
            self.bar = tqdm(total=total, desc=label, unit="row", file=stream, dynamic_ncols=sized,
                            ncols=None if sized else 80, nrows=None if sized else 24)
        else:
            echo(f"{label}: {total} to do")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.echo(self._line(now))

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = "?" if eta == float("inf") else f"{int(eta // 60)}m{int(eta % 60):02d}s"
        return f"{self.label}: {self.done}/{self.total} ({percent:.1f}%), {rate:.1f}/s, ETA {eta_text}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.total:
            elapsed = max(self.clock() - self.started, 1e-9)
            self.echo(f"{self.label}: {self.done}/{self.total} done in {elapsed:.1f}s "
                      f"({self.done / elapsed:.1f}/s)")


def _terminal_sized(stream: TextIO) -> bool:
    import os

    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
    return size.columns > 0 and size.lines > 0


def count_missing(kind: str, fingerprint: str) -> int:
    """How many rows of kind have no vector for this model (index.missing's join, counted in SQL)."""
    model = {"item": Item, "tag": Tag}[kind]
    joined = and_(Embedding.model_fp == fingerprint, Embedding.kind == kind, Embedding.ref_id == model.id)
    return db.session.scalar(select(func.count()).select_from(model).outerjoin(Embedding, joined)
                             .where(Embedding.id.is_(None)))


def backfill(encoder, batch_size: int, vector_store=None, echo: Echo = click.echo,
             stream: TextIO | None = None, chunk: int = BACKFILL_CHUNK, check_text: bool = False) -> dict[str, int]:
    """Embed every tag and item without a vector for the encoder's model (with check_text, also
    those whose text changed since); returns how many per kind.

    Each batch is its own transaction (index.embed_rows): an interruption, KeyboardInterrupt
    included, rolls back the batch in flight and keeps the ones committed; the next run resumes.
    """
    from .semantic import index

    done: dict[str, int] = {}
    for kind in ("tag", "item"):
        # check_text compares every row's text hash: one pass over all rows, not rounds of `chunk`.
        stale = index.missing(kind, encoder.fingerprint, check_text=True) if check_text else None
        total = len(stale) if check_text else count_missing(kind, encoder.fingerprint)
        progress = Progress(f"embedding {kind}s", total, echo=echo, stream=stream)
        done[kind] = 0
        previous: list[int] = []
        try:
            while True:
                rows = stale if check_text else index.missing(kind, encoder.fingerprint, limit=chunk)
                ids = [row.id for row in rows]
                if not rows:
                    break
                if ids == previous:  # a batch that cannot be stored must not loop for ever
                    raise RuntimeError(f"{kind}s {ids[:5]}... stay without vectors after a batch was stored")
                previous = ids
                done[kind] += index.embed_rows(encoder, kind, rows, batch_size, progress=progress.update,
                                               vector_store=vector_store)
                db.session.expunge_all()  # the rows of this round are done: let them go
                if check_text:
                    break
        except BaseException:
            db.session.rollback()  # the batch in flight, never half of it
            raise
        finally:
            progress.close()
    return done


def reanalyse_text(echo: Echo = click.echo, stream: TextIO | None = None, batch_size: int = TEXT_BATCH) -> int:
    """Analyse again every item the current text analyzer has not analysed (app/textindex.py stores
    the analyzer's version in each row); returns how many. Each batch is its own transaction: an
    interruption keeps the batches done, and the next release goes on with the rest."""
    from . import hebrew

    version = hebrew.analyzer_version()
    with db.engine.connect() as conn:
        total = textindex.count_stale(conn)
    if version.endswith("+rules"):
        echo("text index: no Hebrew lexicon (apt-get install hspell): prefixes by rule, no inflection")
    if not total:
        echo(f"text index: every item analysed by {version}")
        return 0
    progress = Progress("analysing items for the text index", total, echo=echo, stream=stream)
    try:
        done = textindex.rebuild(db.engine, batch_size=batch_size, progress=progress.update)
    finally:
        progress.close()
    echo(f"text index: {done['updated']} items analysed again by {version}")
    return done["updated"]


def _batch_store(pgvector: bool):
    """Where embed_rows writes each batch's vectors besides the blobs (a fault-injection point in tests)."""
    if not pgvector:
        return None
    from .semantic.index import PgVectorIndex

    return PgVectorIndex()


def publish_shared_index(settings, fingerprint: str, echo: Echo = click.echo, stream: TextIO | None = None) -> None:
    """A new generation of the shared vector index for each kind that has none yet (from
    VECTOR_INDEX_REBUILD_ROWS vectors) or has vectors stored after it. Here rather than in a serving
    instance: measured on the 512 MB tier, two workers with the model left no room for the first
    build of 100 k vectors (the OOM killer took them), and searches streamed every row meanwhile."""
    from .semantic import shared

    folder = shared.folder_for(settings)
    if folder is None:
        return
    for kind in ("tag", "item"):
        reason = shared.publish_reason(folder, fingerprint, kind, settings.vector_index_rebuild_rows, newer_rows=1)
        if reason is None:
            db.session.commit()
            continue
        total = db.session.scalar(select(func.count()).select_from(Embedding).where(
            Embedding.model_fp == fingerprint, Embedding.kind == kind))
        progress = Progress(f"indexing {kind} vectors", total, echo=echo, stream=stream)
        result = shared.publish(folder, fingerprint, kind, progress=progress.update,
                                if_due=settings.vector_index_rebuild_rows, newer_rows=1)
        progress.close()
        if result is None:
            echo(f"vector index: {kind}s not published now: a worker is publishing them")
        else:
            echo(f"vector index: {kind}s published ({reason}): {result['count']} vectors, search "
                 f"{result['search']}, built in {result['built_seconds']} s, in {folder}")


# --- The command ------------------------------------------------------------------------------

def run_release(app: Flask, echo: Echo = click.echo, hnsw_min_rows: int = HNSW_MIN_ROWS,
                require_semantic: bool = False, stream: TextIO | None = None) -> None:
    """Every release step in order, under the lock (see the module docstring)."""
    from .semantic.service import SemanticUnavailable

    settings = get_settings(app)
    started = time.monotonic()
    with release_lock(app, echo):
        before, after = migrate_schema()
        if before == after:
            echo(f"schema: at {', '.join(sorted(after))}, nothing to migrate")
        else:
            echo(f"schema: {', '.join(sorted(before)) or 'empty'} -> {', '.join(sorted(after))}")

        pgvector = False
        if not settings.is_sqlite:
            why_not = ensure_pgvector()
            pgvector = why_not is None
            echo("pgvector: ready" if pgvector else
                 f"pgvector: not available ({why_not}); semantic search will use the in-process index")
        reanalyse_text(echo, stream)

        try:
            encoder = get_service(app).encoder()
        except SemanticUnavailable as exc:
            if require_semantic:
                raise click.ClickException(f"backfill impossible: {exc}") from None
            echo(f"embeddings: backfill skipped: {exc}")
            echo(f"release done in {time.monotonic() - started:.1f}s")
            return
        fingerprint = encoder.fingerprint
        echo(f"embeddings: model {settings.semantic_model} (fingerprint {fingerprint[:12]})")
        done = backfill(encoder, settings.embedding_batch_size, vector_store=_batch_store(pgvector),
                        echo=echo, stream=stream)
        echo(f"embeddings: {done['tag']} tags and {done['item']} items embedded")
        if count_missing("tag", fingerprint) == 0 and count_missing("item", fingerprint) == 0:
            from .semantic import index

            # Only now: until the new vectors are complete, the old model's keep serving old workers.
            pruned = index.prune(fingerprint)
            if pruned:
                echo(f"embeddings: pruned {pruned} vectors of older models")
        if pgvector:
            echo(f"hnsw: {ensure_hnsw(fingerprint, encoder.dim, hnsw_min_rows, settings.hnsw_build_memory)}")
        else:
            publish_shared_index(settings, fingerprint, echo, stream)
    echo(f"release done in {time.monotonic() - started:.1f}s")


@click.command("release")
@click.option("--hnsw-min-rows", type=click.IntRange(1), default=HNSW_MIN_ROWS, show_default=True,
              help="Build the HNSW index once the model has this many vectors (PostgreSQL + pgvector).")
@click.option("--require-semantic", is_flag=True,
              help="Fail when the semantic model cannot load (by default the backfill is skipped).")
@with_appcontext
def release_command(hnsw_min_rows: int, require_semantic: bool):
    """Migrate the schema, set up pgvector and backfill embeddings: run before new code takes traffic."""
    app = current_app._get_current_object()
    try:
        run_release(app, hnsw_min_rows=hnsw_min_rows, require_semantic=require_semantic)
    except KeyboardInterrupt:
        db.session.rollback()
        click.echo("interrupted: committed batches are kept; run the release again to resume", err=True)
        sys.exit(130)


def register(app: Flask) -> None:
    app.cli.add_command(release_command)
