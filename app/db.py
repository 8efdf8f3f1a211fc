"""Database set-up: one SQLAlchemy handle, a small pool sized for a 512 MB worker, and the models."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

from flask import Flask, current_app
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    inspect,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from . import hebrew, textindex
from .settings import Settings

TITLE_MAX = 200
BODY_MAX = 5000
TAG_MAX = 64
TAGS_PER_ITEM_MAX = 20
ID_MAX = 2**31 - 1  # ids are 32-bit integers in the schema: a larger one cannot exist


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
# The Alembic environment beside the app package (migrations/); absolute, so any working directory works.
MIGRATIONS_DIR = str(Path(__file__).resolve().parent.parent / "migrations")
migrate = Migrate(directory=MIGRATIONS_DIR)


def _now() -> datetime:
    return datetime.now(timezone.utc)


item_tags = Table(
    "item_tags",
    Base.metadata,
    Column("item_id", ForeignKey("items.id", ondelete="CASCADE"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
)


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(TAG_MAX), unique=True, nullable=False)
    # Normalised form (no niqqud, lower case): what tag search compares against.
    norm: Mapped[str] = mapped_column(String(TAG_MAX), index=True, nullable=False)

    @property
    def embedding_text(self) -> str:
        return self.name


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(TITLE_MAX), nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # Normalised "title body", kept in the row so that text search runs as SQL LIKE on both back ends.
    search_text: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # Analysed title and body (app/textindex.py); the text index is built from it.
    index_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now, nullable=False
    )
    tags: Mapped[list[Tag]] = relationship(secondary=item_tags, lazy="selectin", order_by=Tag.name)

    @property
    def embedding_text(self) -> str:
        return f"{self.title}\n{self.body}".strip()

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "title": self.title,
            "body": self.body,
            "tags": [t.name for t in self.tags],
            "created_at": utc_iso(self.created_at),
            "updated_at": utc_iso(self.updated_at),
        }


def utc_iso(moment: datetime) -> str:
    """moment in ISO 8601 with its UTC offset (+00:00) on every back end.

    SQLite keeps no zone and hands back naive datetimes, which are UTC here (``_now`` writes them);
    PostgreSQL hands back its session's zone, which need not be UTC.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat()


@event.listens_for(Item, "before_insert")
def _refresh_search_text(_mapper, _conn, item: Item) -> None:
    item.search_text = hebrew.normalize(f"{item.title} {item.body}")
    item.index_text = textindex.document(item.title, item.body)


@event.listens_for(Item, "before_update")
def _refresh_changed_search_text(mapper, conn, item: Item) -> None:
    """Analyse again only when the title or the body changed: an update of the tags or of updated_at
    alone (a new item's tags are flushed after its row) would repeat the whole analysis for nothing."""
    state = inspect(item)
    if state.attrs.title.history.has_changes() or state.attrs.body.history.has_changes():
        _refresh_search_text(mapper, conn, item)


textindex.attach(Item.__table__)  # the text index is created and dropped with items


class Embedding(Base):
    """A stored vector of one tag or item under one model fingerprint.

    ``model_fp`` names the model and its encoding settings; ``text_hash`` the text that was
    encoded. A vector whose fingerprint is not the loaded model's is never searched, and one whose
    text changed is recomputed, so vectors of two models are never mixed silently.
    """

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("model_fp", "kind", "ref_id", name="uq_embedding_ref"),
        Index("ix_embedding_fp_kind", "model_fp", "kind"),
        # A vector stored again gets a new id, never a freed one (migration 0004): the in-process
        # matrices tell appends from other changes by their ids.
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_fp: Mapped[str] = mapped_column(String(64), nullable=False)
    kind: Mapped[str] = mapped_column(String(8), nullable=False)  # "item" | "tag"
    ref_id: Mapped[int] = mapped_column(Integer, nullable=False)
    text_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    # L2-normalised float16 little-endian: half the bytes of fp32, cosine error ~1e-3.
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, nullable=False)


class ImportRun(Base):
    """How far `flask import` got in one file (by the SHA-256 of its bytes): committed with each batch of
    items, so a run stopped by Ctrl-C or a crash resumes after the last batch that landed."""

    __tablename__ = "imports"
    source: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the file
    path: Mapped[str] = mapped_column(Text, nullable=False)  # as given when it started, for people
    lines_done: Mapped[int] = mapped_column(Integer, nullable=False)
    items: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now,
                                                 nullable=False)


def tags_by_name(names: list[str]) -> list[Tag]:
    """The Tag rows for names, creating the missing ones in the current transaction."""
    if not names:
        return []
    found = {t.name: t for t in db.session.scalars(select(Tag).where(Tag.name.in_(names)))}
    for name in names:
        if name not in found:
            found[name] = Tag(name=name, norm=hebrew.normalize(name))
            db.session.add(found[name])
    return [found[name] for name in names]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def engine_options(settings: Settings) -> dict:
    """Pool sized for a small worker; SQLite gets no pool options (it has no server to pool for)."""
    if settings.is_sqlite:
        # timeout: wait for a concurrent writer rather than failing at once with "database is locked".
        return {"connect_args": {"timeout": 15}}
    return {
        "pool_size": settings.sqlalchemy_pool_size,
        "max_overflow": settings.sqlalchemy_max_overflow,
        "pool_recycle": settings.sqlalchemy_pool_recycle,
        "pool_pre_ping": settings.sqlalchemy_pool_pre_ping,
        # Fail fast when the database is away, so the request gets its 503 instead of hanging.
        "pool_timeout": 10,
        # keepalives: a connection to a server that vanished (a failover, a dropped network) fails within
        # about a minute instead of hanging a thread, the background embedder's lock connection included.
        "connect_args": {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                         "keepalives_count": 3},
    }


def init_app(app: Flask, settings: Settings) -> None:
    app.config["SQLALCHEMY_DATABASE_URI"] = settings.database_url
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(settings)
    db.init_app(app)
    migrate.init_app(app, db)  # `flask db upgrade|migrate|current` on the same engine and models
    if settings.is_sqlite:
        with app.app_context():
            event.listen(db.engine, "connect", _sqlite_pragmas)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets readers run beside one writer: several gunicorn workers share one file.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_schema() -> None:
    """Bring the schema to the newest migration: the one way a schema is made (see migrations/README).

    Idempotent; adopts a database made by create_all before migrations existed. Needs an app context.
    """
    from alembic import command

    command.upgrade(current_app.extensions["migrate"].migrate.get_config(), "head")
