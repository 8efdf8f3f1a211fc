"""migrations/: the baseline equals the models, adopts a database made by the first release's
create_all with its data, `flask db upgrade` is idempotent, and no request does schema work."""

from datetime import datetime, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from app import create_app
from app.db import MIGRATIONS_DIR, create_schema, db
from app.release import _script, current_revisions, include_object
from support import make_settings, postgres_url

HEADS = _script(MIGRATIONS_DIR)[0]


def first_release_metadata() -> sa.MetaData:
    """The schema exactly as the first release's models made it with create_all (frozen here, so
    that this test keeps testing the upgrade of *that* database when the models change)."""
    md = sa.MetaData()
    sa.Table("tags", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("name", sa.String(64), unique=True, nullable=False),
             sa.Column("norm", sa.String(64), index=True, nullable=False))
    sa.Table("items", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("title", sa.String(200), nullable=False), sa.Column("body", sa.Text, nullable=False),
             sa.Column("search_text", sa.Text, nullable=False),
             sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
             sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False))
    sa.Table("item_tags", md,
             sa.Column("item_id", sa.ForeignKey("items.id", ondelete="CASCADE"), primary_key=True),
             sa.Column("tag_id", sa.ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True))
    sa.Table("embeddings", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("model_fp", sa.String(64), nullable=False), sa.Column("kind", sa.String(8), nullable=False),
             sa.Column("ref_id", sa.Integer, nullable=False), sa.Column("text_hash", sa.String(64), nullable=False),
             sa.Column("dim", sa.Integer, nullable=False), sa.Column("vector", sa.LargeBinary, nullable=False),
             sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
             sa.UniqueConstraint("model_fp", "kind", "ref_id", name="uq_embedding_ref"),
             sa.Index("ix_embedding_fp_kind", "model_fp", "kind"))
    return md


def schema_diff(connection) -> list:
    """What autogenerate would still change: empty when the database matches app/db.py's models."""
    context = MigrationContext.configure(connection, opts={"compare_type": True,
                                                           "include_object": include_object})
    return compare_metadata(context, db.metadata)


@pytest.fixture
def bare_app(tmp_path, backend):
    """An app on an EMPTY database: no tables, no revision (what a first deploy meets)."""
    env = {"DATABASE_URL": postgres_url()} if backend == "postgresql" else {}
    app = create_app(make_settings(tmp_path, **env))
    with app.app_context():
        db.drop_all()
        db.session.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        db.session.commit()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def test_upgrade_makes_exactly_the_models_schema(bare_app):
    with bare_app.app_context():
        create_schema()
        assert current_revisions() == HEADS
        assert schema_diff(db.session.connection()) == []


def test_upgrade_twice_through_the_cli_changes_nothing(bare_app):
    runner = bare_app.test_cli_runner()
    first = runner.invoke(args=["db", "upgrade"])
    assert first.exit_code == 0, first.output
    with bare_app.app_context():
        db.session.execute(sa.text("INSERT INTO items (title, body, search_text, created_at, updated_at) "
                                   "VALUES ('שלום', '', 'שלום', :t, :t)"), {"t": datetime.now(timezone.utc)})
        db.session.commit()
    second = runner.invoke(args=["db", "upgrade"])
    assert second.exit_code == 0, second.output
    with bare_app.app_context():
        assert current_revisions() == HEADS
        assert db.session.scalar(sa.text("SELECT title FROM items")) == "שלום"


def test_a_database_made_by_the_first_release_is_adopted_with_its_data(bare_app):
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    with bare_app.app_context():
        first_release_metadata().create_all(db.engine)
        db.session.execute(sa.text("INSERT INTO tags (id, name, norm) VALUES (1, 'ספרים', 'ספרים'), "
                                   "(2, 'קיץ', 'קיץ')"))
        db.session.execute(sa.text("INSERT INTO items (id, title, body, search_text, created_at, updated_at) "
                                   "VALUES (7, 'סִפְרֵי קַיִץ', 'גוף', 'ספרי קיץ גוף', :t, :t)"), {"t": created})
        db.session.execute(sa.text("INSERT INTO item_tags VALUES (7, 1), (7, 2)"))
        db.session.execute(sa.text("INSERT INTO embeddings (model_fp, kind, ref_id, text_hash, dim, vector, "
                                   "created_at) VALUES ('fp', 'item', 7, 'h', 2, :v, :t)"),
                           {"v": b"\x00\x3c\x00\x00", "t": created})
        db.session.commit()
        assert current_revisions() == frozenset()  # made before migrations: no revision yet

    client = bare_app.test_client()
    refused = client.get("/items/7")  # not adopted yet: the worker says what to run
    assert refused.status_code == 503 and refused.get_json()["error"]["code"] == "schema_not_ready"

    with bare_app.app_context():
        create_schema()
        assert current_revisions() == HEADS
        assert schema_diff(db.session.connection()) == []
        fp, ref_id, vector = db.session.execute(sa.text("SELECT model_fp, ref_id, vector FROM embeddings")).one()
        assert (fp, ref_id, bytes(vector)) == ("fp", 7, b"\x00\x3c\x00\x00")
    item = client.get("/items/7").get_json()
    assert (item["title"], item["body"], sorted(item["tags"])) == ("סִפְרֵי קַיִץ", "גוף", ["ספרים", "קיץ"])
    assert item["created_at"].startswith("2026-01-02T03:04:05")
    found = client.get("/search", query_string={"q": "ספרים", "mode": "tags"}).get_json()
    assert [r["id"] for r in found["results"]] == [7]
    # Migration 0002 analysed the rows already there: the text index finds the old item (niqqud ignored).
    found = client.get("/search", query_string={"q": "קיץ", "mode": "text"}).get_json()
    assert [r["id"] for r in found["results"]] == [7]


def test_text_index_command_analyses_rows_written_around_the_app_and_is_idempotent(bare_app):
    with bare_app.app_context():
        create_schema()
        db.session.execute(sa.text("INSERT INTO items (id, title, body, search_text, created_at, updated_at) "
                                   "VALUES (3, 'מפה של הגליל', '', '', :t, :t)"), {"t": datetime.now(timezone.utc)})
        db.session.commit()
    client = bare_app.test_client()
    assert client.get("/search", query_string={"q": "הגליל"}).get_json()["count"] == 0  # not analysed yet
    runner = bare_app.test_cli_runner()
    first = runner.invoke(args=["text-index"])
    assert first.exit_code == 0 and "1 analysed" in first.output, first.output
    assert [r["id"] for r in client.get("/search", query_string={"q": "הגליל"}).get_json()["results"]] == [3]
    again = runner.invoke(args=["text-index"])
    assert again.exit_code == 0 and "0 analysed" in again.output, again.output


def test_a_foreign_table_of_the_same_name_is_not_adopted(bare_app):
    with bare_app.app_context():
        db.session.execute(sa.text("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)"))
        db.session.commit()
    result = bare_app.test_cli_runner().invoke(args=["db", "upgrade"])
    assert result.exit_code != 0
    with bare_app.app_context():
        assert current_revisions() == frozenset()
        db.session.execute(sa.text("DROP TABLE items"))
        db.session.commit()


def test_a_worker_on_an_unmigrated_database_answers_503_and_creates_nothing(bare_app):
    client = bare_app.test_client()
    response = client.get("/search", query_string={"q": "ספר"})
    assert response.status_code == 503
    error = response.get_json()["error"]
    assert error["code"] == "schema_not_ready" and "flask --app app release" in error["message"]
    assert client.get("/healthz").status_code == 200  # liveness does not depend on the schema
    with bare_app.app_context():
        assert sa.inspect(db.engine).get_table_names() == []  # no schema work in the request path
        create_schema()
    assert client.get("/search", query_string={"q": "ספר"}).status_code == 200  # rechecked until ready


def test_embedding_ids_are_never_reused_after_upgrade(bare_app, backend):
    """A vector stored again (delete, then insert) after the newest one went gets a fresh id, on a
    database made before migration 0004 too: SQLite would otherwise hand out the freed id again."""
    with bare_app.app_context():
        first_release_metadata().create_all(db.engine)
        insert = sa.text("INSERT INTO embeddings (model_fp, kind, ref_id, text_hash, dim, vector, created_at) "
                         "VALUES ('fp', 'item', :ref, 'h', 1, :v, :t)")
        for ref in (1, 2):
            db.session.execute(insert, {"ref": ref, "v": b"\x00\x3c", "t": datetime.now(timezone.utc)})
        db.session.commit()
        create_schema()
        assert db.session.execute(sa.text("SELECT count(*) FROM embeddings")).scalar() == 2  # rows kept
        newest = db.session.execute(sa.text("SELECT max(id) FROM embeddings")).scalar()
        db.session.execute(sa.text("DELETE FROM embeddings WHERE id = :id"), {"id": newest})
        db.session.execute(insert, {"ref": 2, "v": b"\x00\x3c", "t": datetime.now(timezone.utc)})
        db.session.commit()
        assert db.session.execute(sa.text("SELECT max(id) FROM embeddings")).scalar() > newest


def test_tags_differing_only_in_case_are_merged_into_the_oldest_in_lower_case(bare_app):
    from alembic import command

    with bare_app.app_context():
        command.upgrade(bare_app.extensions["migrate"].migrate.get_config(), "0005")
        run = lambda sql, **values: db.session.execute(sa.text(sql), values)  # noqa: E731
        now = datetime.now(timezone.utc)
        for item_id in (1, 2, 3):
            run("INSERT INTO items (id, title, body, search_text, created_at, updated_at) "
                "VALUES (:id, 't', '', 't', :now, :now)", id=item_id, now=now)
        for tag_id, name in [(1, "Python"), (2, "python"), (3, "PYTHON"), (4, "ספר"), (5, "Web")]:
            run("INSERT INTO tags (id, name, norm) VALUES (:id, :name, :norm)", id=tag_id, name=name,
                norm=name.lower())
        for item_id, tag_id in [(1, 1), (1, 2), (2, 3), (3, 4), (3, 5)]:
            run("INSERT INTO item_tags (item_id, tag_id) VALUES (:item, :tag)", item=item_id, tag=tag_id)
        for ref in (1, 2):
            run("INSERT INTO embeddings (model_fp, kind, ref_id, text_hash, dim, vector, created_at) "
                "VALUES ('fp', 'tag', :ref, 'h', 1, :v, :now)", ref=ref, v=b"\x00\x3c", now=now)
        db.session.commit()
        create_schema()
        tags = run("SELECT id, name FROM tags ORDER BY id").all()
        links = run("SELECT item_id, tag_id FROM item_tags ORDER BY item_id, tag_id").all()
        vectors = run("SELECT ref_id FROM embeddings WHERE kind = 'tag'").scalars().all()
    assert [tuple(t) for t in tags] == [(1, "python"), (4, "ספר"), (5, "web")]
    assert [tuple(link) for link in links] == [(1, 1), (2, 1), (3, 4), (3, 5)]
    assert vectors == [1]  # the merged tags' vectors went with them
