"""app/semantic/embedder.py: one background embedder per database computes the missing vectors.

A process killed mid-batch leaves none of that batch and no lock behind; another embedder takes over
and every row ends with exactly one vector. Two embedders on one database never both work."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from app.semantic import embedder as embedder_module
from app.state import get_service
from support import ROOT, embed_all, wait_until

# Runs the embedder's rounds in another process on the test's database and SIGKILLs itself while the
# second batch is flushed but not committed (the vector store's write, between the two).
KILLED_MID_BATCH = """
import os, signal, sys
from app import create_app
from app.semantic import embedder, index, shared
from app.settings import Settings

writes = []
def write(self, ids, vectors):
    writes.append(len(ids))
    if len(writes) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
index.VectorIndex.write = write
index.PgVectorIndex.write = write
shared.SharedIndex.write = write
app = create_app(Settings.from_env(instance_path=sys.argv[1]))
with app.app_context():
    lock = embedder.DatabaseLock(app)
    assert lock.acquire(), "the test's process held the lock"
    print("locked", flush=True)
    app.extensions["memfit"].semantic.embed_pending()
sys.exit("the batch was never killed")
"""


def counts(app) -> tuple[int, int, int]:
    """(rows with a vector, rows, vectors stored) for the app's model."""
    from sqlalchemy import func

    from app.db import Embedding, Item, Tag, db

    with app.app_context():
        fp = get_service(app).encoder().fingerprint
        vectors = db.session.query(Embedding).filter_by(model_fp=fp).count()
        distinct = db.session.query(func.count(func.distinct(Embedding.kind + ":" + func.cast(Embedding.ref_id,
                                                                                               db.String)))).filter(
            Embedding.model_fp == fp).scalar()
        rows = db.session.query(Tag).count() + db.session.query(Item).count()
    return distinct, rows, vectors


def test_an_embedder_killed_mid_batch_loses_and_duplicates_nothing(make_app, tiny_onnx, tmp_path):
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), EMBEDDING_BATCH_SIZE="5")
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    settings = app.extensions["memfit"].settings
    env = {"SEMANTIC_MODEL": str(tiny_onnx), "EMBEDDING_BATCH_SIZE": "5", "DATABASE_URL": settings.database_url,
           "APP_ENV": "test", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_BATCH, settings.instance_path], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "locked" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    distinct, rows, vectors = counts(app)
    assert vectors == distinct == 5, "the killed batch left vectors behind, or the first batch was lost"
    # The kernel (SQLite) or the server (PostgreSQL) dropped the dead process's lock: this one takes it.
    with app.app_context():
        lock = embedder_module.DatabaseLock(app)
        assert lock.acquire(), "the killed embedder's lock was never released"
        lock.release()
    embed_all(app)
    distinct, rows, vectors = counts(app)
    assert vectors == distinct == rows, (vectors, distinct, rows)


def test_two_embedders_on_one_database_never_both_work(make_app, tiny_onnx):
    first = make_app(SEMANTIC_MODEL=str(tiny_onnx), EMBEDDING_BATCH_SIZE="4", SEMANTIC_EMBED_INTERVAL="0.05")
    second = make_app(SEMANTIC_MODEL=str(tiny_onnx), EMBEDDING_BATCH_SIZE="4", SEMANTIC_EMBED_INTERVAL="0.05",
                      DATABASE_URL=first.extensions["memfit"].settings.database_url)
    assert first.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    encoded: list[str] = []
    for app in (first, second):
        encoder = get_service(app).encoder()
        original = encoder.encode

        def recording(texts, batch_size, kind="passage", original=original):
            if kind == "passage":
                encoded.extend(texts)
            return original(texts, batch_size, kind=kind)

        encoder.encode = recording
    embedders = [get_service(app).start_embedder(app) for app in (first, second)]
    try:
        wait_until(lambda: any(e.working for e in embedders) and counts(first)[0] == counts(first)[1],
                   "every row to have a vector")
        assert sum(e.working for e in embedders) == 1, [e.working for e in embedders]
        distinct, rows, vectors = counts(first)
        assert vectors == rows and len(encoded) == rows, "a row was embedded twice"
    finally:
        for e in embedders:
            e.stop()


def test_a_new_item_is_embedded_in_the_background_and_the_backlog_is_shown(make_app, tiny_onnx):
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), SEMANTIC_EMBED_INTERVAL="0.05")
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    client = app.test_client()
    service = get_service(app)
    embedder = service.start_embedder(app)
    try:
        assert client.get("/search", query_string={"q": "ספר", "mode": "semantic"}).status_code == 200
        wait_until(lambda: embedder.backlog == 0, "the seed's rows to be embedded")
        created = client.post("/items", json={"title": "אופניים חשמליים למכירה", "body": "כמעט חדשים",
                                              "tags": ["תחבורה ירוקה"]})
        assert created.status_code == 201
        item_id = created.get_json()["id"]

        def found() -> bool:
            body = client.get("/search", query_string={"q": "אופניים חשמליים למכירה כמעט חדשים",
                                                       "mode": "semantic", "limit": 50}).get_json()
            return item_id in [r["id"] for r in body["results"]]

        wait_until(found, "the new item to be found by meaning")
        ready = client.get("/readyz").get_json()["semantic"]
        assert ready["embedder"] == {"working": True, "backlog": 0}, ready
        assert "memfit_semantic_backlog 0.0" in client.get("/metrics").get_data(as_text=True)
    finally:
        embedder.stop()


def test_a_released_lock_is_free_for_another_process(make_app, tiny_onnx):
    """Released means free for everyone: on PostgreSQL the session lock is unlocked before its
    connection goes back to the pool (where it would otherwise stay held)."""
    import sqlalchemy as sa

    app = make_app(SEMANTIC_MODEL=str(tiny_onnx))
    settings = app.extensions["memfit"].settings
    with app.app_context():
        lock = embedder_module.DatabaseLock(app)
        assert lock.acquire()
        assert not embedder_module.DatabaseLock(app).acquire(), "a second lock was granted while held"
        lock.release()
    if settings.is_sqlite:
        with app.app_context():
            other = embedder_module.DatabaseLock(app)
            assert other.acquire()
            other.release()
        return
    engine = sa.create_engine(settings.database_url)  # another client, as another instance would be
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.pg_try_advisory_lock(embedder_module.ADVISORY_KEY))).scalar()
            conn.execute(sa.select(sa.func.pg_advisory_unlock(embedder_module.ADVISORY_KEY)))
    finally:
        engine.dispose()


def test_the_release_lock_is_free_while_the_embedder_holds_its_own(make_app, tiny_onnx):
    """A release (app/release.py) runs while an instance's embedder works: their locks differ."""
    import sqlalchemy as sa

    from app import release

    app = make_app(SEMANTIC_MODEL=str(tiny_onnx))
    settings = app.extensions["memfit"].settings
    with app.app_context():
        lock = embedder_module.DatabaseLock(app)
        assert lock.acquire()
        try:
            if settings.is_sqlite:
                assert not str(lock._path).endswith(".release.lock")
                return
            engine = sa.create_engine(settings.database_url)
            try:
                with engine.connect() as conn:
                    key = release.ADVISORY_LOCK_KEY
                    assert conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar()
                    conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))
            finally:
                engine.dispose()
        finally:
            lock.release()


def test_a_failing_index_publication_does_not_stop_the_embedder(make_app, tiny_onnx, monkeypatch, caplog):
    from app.semantic import embedder as embedder_module

    monkeypatch.setattr(embedder_module, "INDEX_CHECK_EVERY_S", 0.0)  # every round tries, and fails
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), SEMANTIC_EMBED_INTERVAL="0.05")
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    service = get_service(app)
    service.encoder()  # the embedder works where the model is loaded

    def broken():
        raise OSError("No space left on device")

    monkeypatch.setattr(service, "maintain_index", broken)
    embedder = service.start_embedder(app)
    try:
        wait_until(lambda: embedder.backlog == 0, "the seed's rows to be embedded despite the index")
    finally:
        embedder.stop()
    assert "shared vector index: no new generation started (OSError: No space left on device)" in caplog.text
