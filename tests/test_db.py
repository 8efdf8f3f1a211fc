"""app/db.py: models, the per-tier pool, and search_text kept in the row."""

from sqlalchemy import select

from app.db import Item, Tag, db, engine_options
from support import make_settings


def test_search_text_is_normalised_on_insert(app):
    with app.app_context():
        item = Item(title="סִפְרֵי קַיִץ", body="קריאה", tags=[Tag(name="ספרים", norm="ספרים")])
        db.session.add(item)
        db.session.commit()
        stored = db.session.scalar(select(Item))
        assert stored.search_text == "ספרי קיץ קריאה"
        assert [t.name for t in stored.tags] == ["ספרים"]


def test_pool_settings_reach_the_engine_on_postgresql(tmp_path):
    s = make_settings(tmp_path, DATABASE_URL="postgresql://u:p@127.0.0.1/db", SQLALCHEMY_POOL_SIZE="4",
                      SQLALCHEMY_MAX_OVERFLOW="1", SQLALCHEMY_POOL_RECYCLE="60", SQLALCHEMY_POOL_PRE_PING="false")
    options = engine_options(s)
    assert (options["pool_size"], options["max_overflow"], options["pool_recycle"]) == (4, 1, 60)
    assert options["pool_pre_ping"] is False


def test_the_engine_uses_the_configured_pool(app, backend):
    with app.app_context():
        if backend == "postgresql":
            assert db.engine.pool.size() == 2
        else:
            assert "sqlite" in db.engine.url.drivername
