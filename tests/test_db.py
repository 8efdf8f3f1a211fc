"""app/db.py: models, the per-tier pool, the SQLite connection settings, and search_text kept in the row.
Every test runs on SQLite and, with TEST_DATABASE_URL, on PostgreSQL; each checks what its back end does."""

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.db import Item, Tag, db, engine_options, item_tags
from support import make_settings


def test_search_text_is_normalised_on_insert(app):
    with app.app_context():
        item = Item(title="סִפְרֵי קַיִץ", body="קריאה", tags=[Tag(name="ספרים", norm="ספרים")])
        db.session.add(item)
        db.session.commit()
        stored = db.session.scalar(select(Item))
        assert stored.search_text == "ספרי קיץ קריאה"
        assert [t.name for t in stored.tags] == ["ספרים"]


def test_a_link_to_a_missing_item_is_refused(app):
    # SQLite ignores foreign keys unless each connection turns them on (app/db.py's pragmas).
    with app.app_context():
        tag = Tag(name="יתום", norm="יתום")
        db.session.add(tag)
        db.session.commit()
        with pytest.raises(IntegrityError):
            db.session.execute(item_tags.insert().values(item_id=987654, tag_id=tag.id))
            db.session.commit()
        db.session.rollback()


def test_deleting_an_item_deletes_its_links_not_its_tags(app):
    with app.app_context():
        db.session.add(Item(title="נמחק", tags=[Tag(name="נשאר", norm="נשאר")]))
        db.session.commit()
        db.session.execute(Item.__table__.delete())
        db.session.commit()
        assert db.session.execute(select(item_tags)).all() == []  # ON DELETE CASCADE, enforced
        assert db.session.scalars(select(Tag.name)).all() == ["נשאר"]


def test_pool_settings_reach_the_engine_options(tmp_path):
    s = make_settings(tmp_path, DATABASE_URL="postgresql://u:p@127.0.0.1/db", SQLALCHEMY_POOL_SIZE="4",
                      SQLALCHEMY_MAX_OVERFLOW="1", SQLALCHEMY_POOL_RECYCLE="60", SQLALCHEMY_POOL_PRE_PING="false")
    options = engine_options(s)
    assert (options["pool_size"], options["max_overflow"], options["pool_recycle"]) == (4, 1, 60)
    assert options["pool_pre_ping"] is False


def test_the_engine_uses_the_configured_pool_or_connection_settings(make_app, backend):
    if backend == "postgresql":
        app = make_app(SQLALCHEMY_POOL_SIZE="4", SQLALCHEMY_MAX_OVERFLOW="1", SQLALCHEMY_POOL_RECYCLE="60",
                       SQLALCHEMY_POOL_PRE_PING="false")
        with app.app_context():
            pool = db.engine.pool
            assert (pool.size(), pool.timeout()) == (4, 10)
            assert (pool._max_overflow, pool._recycle, pool._pre_ping) == (1, 60, False)
            assert db.session.execute(db.text("SELECT 1")).scalar() == 1
    else:
        # SQLite has no pool to size: what matters is each connection's settings, read back from it.
        app = make_app()
        with app.app_context():
            pragma = lambda name: db.session.execute(db.text(f"PRAGMA {name}")).scalar()  # noqa: E731
            assert pragma("journal_mode") == "wal"  # readers beside one writer: several workers, one file
            assert pragma("foreign_keys") == 1
            assert pragma("synchronous") == 1  # NORMAL
            assert pragma("busy_timeout") == 15000  # a writer waits 15 s for another, not "database is locked"
