"""app/release.py: `flask --app app release` migrates, backfills resumably under a lock, prunes old
vectors only when the new ones are complete, is a no-op the second time, and shows progress."""

import io
import threading

import pytest
import sqlalchemy as sa

from app import create_app, release
from app.semantic import hnsw, index
from app.state import get_service, get_settings
from app.db import MIGRATIONS_DIR, Embedding, Item, Tag, create_schema, db
from support import make_settings, postgres_url

HEADS = release._script(MIGRATIONS_DIR)[0]


def invoke(app, *args):
    return app.test_cli_runner().invoke(args=["release", *args])


def seeded_app(make_app, model, **env):
    app = make_app(SEMANTIC_MODEL=str(model), **env)
    result = app.test_cli_runner().invoke(args=["seed"])
    assert result.exit_code == 0, result.output
    return app


def add_old_vectors(app, n=5):
    """Vectors of a previous model: they must survive until the new model's are complete."""
    with app.app_context():
        db.session.add_all(Embedding(model_fp="old-model", kind="item", ref_id=i + 1, text_hash="h", dim=2,
                                     vector=b"\x00\x3c\x00\x00") for i in range(n))
        db.session.commit()


def snapshot(app):
    with app.app_context():
        return sorted(db.session.execute(sa.select(Embedding.id, Embedding.model_fp, Embedding.kind,
                                                   Embedding.ref_id, Embedding.text_hash)).all())


def totals(app):
    with app.app_context():
        return (db.session.scalar(sa.select(sa.func.count()).select_from(Tag)),
                db.session.scalar(sa.select(sa.func.count()).select_from(Item)))


def current_vectors(app):
    """(kind, ref_id) -> how many vectors of the configured model it has."""
    with app.app_context():
        fp = get_service(app).encoder().fingerprint
        rows = db.session.execute(sa.select(Embedding.kind, Embedding.ref_id, sa.func.count())
                                  .where(Embedding.model_fp == fp).group_by(Embedding.kind, Embedding.ref_id))
        return {(kind, ref): n for kind, ref, n in rows}


def old_vectors(app):
    with app.app_context():
        return db.session.scalar(sa.select(sa.func.count()).select_from(Embedding)
                                 .where(Embedding.model_fp == "old-model"))


def test_release_embeds_everything_prunes_old_vectors_and_the_second_run_is_a_noop(make_app, tiny_onnx, backend):
    app = seeded_app(make_app, tiny_onnx)
    add_old_vectors(app)
    first = invoke(app)
    assert first.exit_code == 0, first.output
    tags, items = totals(app)
    vectors = current_vectors(app)
    assert len(vectors) == tags + items and set(vectors.values()) == {1}
    assert f"{tags} tags and {items} items embedded" in first.output
    assert "pruned 5 vectors of older models" in first.output and old_vectors(app) == 0
    if backend == "postgresql":  # Debian's PostgreSQL has no pgvector: said in one line, release goes on
        line = next(line for line in first.output.splitlines() if line.startswith("pgvector:"))
        assert "not available" in line and "in-process index" in line
    before = snapshot(app)
    second = invoke(app)
    assert second.exit_code == 0, second.output
    assert "nothing to migrate" in second.output and "0 tags and 0 items embedded" in second.output
    assert "pruned" not in second.output
    assert snapshot(app) == before  # not one row rewritten


def test_release_migrates_an_empty_database(make_app):
    app = make_app(ENABLE_SEMANTIC_SEARCH="false")
    with app.app_context():
        db.drop_all()
        db.session.execute(sa.text("DROP TABLE alembic_version"))
        db.session.commit()
    result = invoke(app)
    assert result.exit_code == 0, result.output
    assert f"schema: empty -> {', '.join(HEADS)}" in result.output
    with app.app_context():
        assert release.current_revisions() == HEADS


@pytest.mark.parametrize("env, reason", [
    ({"ENABLE_SEMANTIC_SEARCH": "false"}, "semantic search is disabled"),
    ({}, "failed to load"),  # make_settings points SEMANTIC_MODEL at a folder that does not exist
])
def test_without_a_model_migrations_run_and_the_backfill_is_skipped(make_app, env, reason):
    app = make_app(**env)
    result = invoke(app)
    assert result.exit_code == 0, result.output
    assert "embeddings: backfill skipped" in result.output and reason in result.output
    assert "release done" in result.output
    strict = invoke(app, "--require-semantic")
    assert strict.exit_code == 1 and "backfill impossible" in strict.output and reason in strict.output


class InterruptingStore:
    """Fault injection: Ctrl-C lands inside embed_rows after batch k+1 is flushed, before its commit."""

    def __init__(self, after_batches: int):
        self.after, self.calls = after_batches, 0

    def write(self, ids, vectors):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt


def test_ctrl_c_keeps_whole_batches_only_and_a_rerun_resumes(make_app, tiny_onnx, monkeypatch):
    app = seeded_app(make_app, tiny_onnx, EMBEDDING_BATCH_SIZE="10")
    add_old_vectors(app)
    monkeypatch.setattr(release, "_batch_store", lambda pgvector: InterruptingStore(after_batches=3))
    stopped = invoke(app)
    assert stopped.exit_code == 130 and "interrupted" in stopped.output
    vectors = current_vectors(app)
    assert sorted(vectors) == [("tag", ref) for ref in sorted(ref for _, ref in vectors)]
    assert len(vectors) == 30  # three whole batches of ten, nothing of the fourth
    assert old_vectors(app) == 5  # the new model is incomplete: the old one's vectors stay

    monkeypatch.undo()
    resumed = invoke(app)
    assert resumed.exit_code == 0, resumed.output
    tags, items = totals(app)
    assert f"{tags - 30} tags and {items} items embedded" in resumed.output  # resumed, not restarted
    vectors = current_vectors(app)
    assert len(vectors) == tags + items and set(vectors.values()) == {1}  # every vector, once
    assert old_vectors(app) == 0


def test_progress_writes_plain_lines_with_rate_and_eta_when_not_a_terminal():
    lines, now = [], [0.0]
    progress = release.Progress("embedding items", 100, echo=lines.append, stream=io.StringIO(),
                                interval=10, clock=lambda: now[0])
    for t in (5.0, 10.0, 20.0):
        now[0] = t
        progress.update(10)
    now[0] = 50.0
    progress.update(70)
    progress.close()
    assert lines == [
        "embedding items: 100 to do",
        "embedding items: 20/100 (20.0%), 2.0/s, ETA 0m40s",
        "embedding items: 30/100 (30.0%), 1.5/s, ETA 0m46s",
        "embedding items: 100/100 (100.0%), 2.0/s, ETA 0m00s",
        "embedding items: 100/100 done in 50.0s (2.0/s)",
    ]


def test_progress_draws_a_tqdm_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    lines, stream = [], Terminal()
    progress = release.Progress("embedding tags", 40, echo=lines.append, stream=stream)
    for _ in range(4):
        progress.update(10)
    progress.close()
    drawn = stream.getvalue()
    assert lines == []  # no log lines on a terminal
    assert "embedding tags" in drawn and "40/40" in drawn and "row/s" in drawn and "100%" in drawn


def hold_lock_elsewhere(app):
    """Take the release lock as another process would; returns the function that releases it."""
    settings = get_settings(app)
    if settings.is_sqlite:
        import fcntl

        handle = open(f"{settings.sqlite_path}.release.lock", "a+")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle.close
    engine = sa.create_engine(settings.database_url, poolclass=sa.pool.NullPool)
    conn = engine.connect()
    conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": release.ADVISORY_LOCK_KEY})

    def free():
        conn.close()
        engine.dispose()
    return free


def test_a_second_release_waits_for_the_first(app):
    free = hold_lock_elsewhere(app)
    waiting, entered = threading.Event(), threading.Event()

    def second():
        with release.release_lock(app, echo=lambda message: waiting.set()):
            entered.set()

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    try:
        assert waiting.wait(30), "the second release neither waited nor said so"
        assert not entered.is_set(), "the second release went in while the first held the lock"
    finally:
        free()
    assert entered.wait(30), "the second release never got the lock once the first let go"
    thread.join(30)


def seeded_on(url, model, tmp_path):
    """An app on a fresh schema of that PostgreSQL with the sample data, the model set, no release run yet."""
    app = create_app(make_settings(tmp_path, DATABASE_URL=url, SEMANTIC_MODEL=str(model)))
    with app.app_context():
        db.drop_all()
        db.session.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        db.session.commit()
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    return app


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Did not recognize type 'vector'")  # reflection of vec: excluded anyway
def test_release_on_pgvector_fills_vec_builds_hnsw_and_is_then_a_noop(pgvector_url, tiny_onnx, tmp_path):
    app = seeded_on(pgvector_url, tiny_onnx, tmp_path)
    first = invoke(app, "--hnsw-min-rows", "50")
    assert first.exit_code == 0, first.output
    assert "pgvector: ready" in first.output and "index ix_embeddings_vec_hnsw_d32 built" in first.output
    with app.app_context():
        assert index.pgvector_ready()
        assert db.session.scalar(sa.text("SELECT count(*) FROM embeddings WHERE vec IS NULL")) == 0
        # The index matches PgVectorIndex.top's ordering expression and its literal dim (the partial
        # predicate). Whether the planner picks it over the (model_fp, kind) b-tree is a matter of cost
        # at scale, so here the b-tree's columns are left out and the sequential scan is discouraged.
        db.session.execute(sa.text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(db.session.scalars(sa.text(
            "EXPLAIN SELECT ref_id FROM embeddings WHERE dim = 32 AND vec IS NOT NULL ORDER BY vec::vector(32) <=> CAST('[" + ",".join(["0.1"] * 32) + "]' AS "
            "vector(32)) LIMIT 5")))
        db.session.rollback()
        assert "ix_embeddings_vec_hnsw_d32" in plan, plan
        from alembic.autogenerate import compare_metadata
        from alembic.runtime.migration import MigrationContext

        context = MigrationContext.configure(db.session.connection(), opts={
            "compare_type": True, "include_object": release.include_object})
        assert compare_metadata(context, db.metadata) == []  # vec and the index are not "drift"
        db.session.rollback()
    before = snapshot(app)
    second = invoke(app, "--hnsw-min-rows", "50")
    assert second.exit_code == 0, second.output
    assert "index ix_embeddings_vec_hnsw_d32 present" in second.output
    assert "0 tags and 0 items embedded" in second.output and snapshot(app) == before
    response = app.test_client().get("/search", query_string={"q": "ספרים לילדים", "mode": "semantic"})
    assert response.status_code == 200 and response.get_json()["count"] == 10
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def test_postgres_without_the_extension_is_refused_in_one_line(tmp_path):
    from support import require

    require(postgres_url() is not None, "TEST_DATABASE_URL is not set (Debian's PostgreSQL, without pgvector)")
    app = create_app(make_settings(tmp_path, DATABASE_URL=postgres_url()))
    with app.app_context():
        why_not = release.ensure_pgvector()
        assert why_not and "\n" not in why_not and "vector" in why_not
        assert not index.pgvector_ready()
        assert db.session.execute(sa.text("SELECT 1")).scalar() == 1  # the session is still usable
        db.session.remove()
        db.engine.dispose()


def test_two_release_processes_at_once_embed_every_row_once(make_app, tiny_onnx, backend):
    import os
    import subprocess

    from support import ROOT, venv_bin

    app = seeded_app(make_app, tiny_onnx, EMBEDDING_BATCH_SIZE="8")
    env = {**os.environ, "DATABASE_URL": get_settings(app).database_url,
           "SEMANTIC_MODEL": str(tiny_onnx), "EMBEDDING_BATCH_SIZE": "8",
           "MEMORY_CHECK_INTERVAL": "3600"}
    # Both start while the lock is held elsewhere, so they really are concurrent: each must wait.
    free = hold_lock_elsewhere(app)
    try:
        procs = [subprocess.Popen([venv_bin("flask"), "--app", "app", "release"], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
        for proc in procs:
            first = proc.stdout.readline()
            assert first.startswith("waiting for another release"), f"went ahead without the lock: {first!r}"
    finally:
        free()
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    tags, items = totals(app)
    vectors = current_vectors(app)
    assert len(vectors) == tags + items and set(vectors.values()) == {1}
    # One did the work; the other waited for it to finish and found nothing left.
    assert sorted(f"{tags} tags and {items} items embedded" in out for out in outputs) == [False, True], outputs
    assert sum("0 tags and 0 items embedded" in out for out in outputs) == 1, outputs


def test_backfill_with_check_text_re_embeds_only_changed_texts(make_app, tiny_onnx):
    app = seeded_app(make_app, tiny_onnx)
    assert invoke(app).exit_code == 0
    with app.app_context():
        item = db.session.get(Item, 3)
        item.title = "כותרת חדשה לגמרי"
        db.session.commit()
        encoder = get_service(app).encoder()
        lines = []
        assert release.backfill(encoder, 10, echo=lines.append, stream=io.StringIO()) == {"tag": 0, "item": 0}
        done = release.backfill(encoder, 10, echo=lines.append, stream=io.StringIO(), check_text=True)
        assert done == {"tag": 0, "item": 1}
        stored = db.session.scalar(sa.select(Embedding.text_hash).where(
            Embedding.model_fp == encoder.fingerprint, Embedding.kind == "item", Embedding.ref_id == 3))
        from app.db import text_hash

        assert stored == text_hash(db.session.get(Item, 3).embedding_text)


def _as_the_old_analyzer_left_them(app) -> None:
    """Rows analysed by the analyzer before the lexicon: words as written, no lemmas, version 1."""
    import json

    from app import hebrew

    with app.app_context(), db.engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT id, title, body FROM items")).all()
        conn.execute(sa.text("UPDATE items SET index_text = :doc WHERE id = :id"), [
            {"id": i, "doc": json.dumps([" ".join(hebrew.terms(t)), " ".join(hebrew.terms(b)), "", "", 1])}
            for i, t, b in rows])


def test_release_analyses_old_rows_again_and_resumes_after_an_interruption(make_app, monkeypatch):
    from app import textindex

    app = make_app(ENABLE_SEMANTIC_SEARCH="false")
    with app.app_context():
        db.session.add_all([Item(title="עכברים אלחוטיים", body="")] + [Item(title=f"פריט {n}", body="") for n in range(4)])
        db.session.commit()
    _as_the_old_analyzer_left_them(app)

    def found(query):
        with app.app_context():
            return [i for i, _ in textindex.search(db.session, query, 10).hits]

    def stale():
        with app.app_context(), db.engine.connect() as conn:
            return textindex.count_stale(conn)

    assert found("עכבר") == [] and stale() == 5  # an old row holds no lemma: the plural misses

    def interrupt(_self, _n):
        raise KeyboardInterrupt

    monkeypatch.setattr(release.Progress, "update", interrupt)  # Ctrl-C once the first batch is committed
    with app.app_context(), pytest.raises(KeyboardInterrupt):
        release.reanalyse_text(echo=lambda _line: None, batch_size=2)
    monkeypatch.undo()
    assert stale() == 3
    result = invoke(app)
    assert result.exit_code == 0, result.output
    assert "text index: 3 items analysed again" in result.output
    assert stale() == 0 and found("עכבר") == [1]
    again = invoke(app)
    assert "text index: every item analysed by" in again.output


@pytest.fixture
def halfvec_app(pgvector_halfvec_url, tmp_path):
    """An app on a fresh schema of the PostgreSQL whose pgvector has halfvec, with 400 32-d vectors in vec."""
    import numpy as np

    app = create_app(make_settings(tmp_path, DATABASE_URL=pgvector_halfvec_url))
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((400, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with app.app_context():
        db.drop_all()
        db.session.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        db.session.commit()
        create_schema()
        db.session.add_all(Embedding(model_fp="fp", kind="item", ref_id=i + 1, text_hash="h", dim=32,
                                     vector=index.to_blob(v)) for i, v in enumerate(vectors))
        db.session.commit()
        assert index.enable_pgvector()
    yield app, vectors[0]
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


# What a release built before half precision, on every server: kept by name until the index replacing it is valid.
FULL, HALF = "ix_embeddings_vec_hnsw_d32", "ix_embeddings_vec_hnsw_half_d32"
BUILD_FULL = f"CREATE INDEX {FULL} ON embeddings USING hnsw ((vec::vector(32)) vector_cosine_ops) WHERE dim = 32"


def index_used(query) -> str:
    """The HNSW index PgVectorIndex.top's search went through (the b-trees and scans left out of the plan,
    as on a large table; rolled back after)."""
    from support import search_plan

    db.session.execute(sa.text("SET LOCAL enable_seqscan = off"))
    db.session.execute(sa.text("DROP INDEX ix_embedding_fp_kind"))
    db.session.execute(sa.text("ALTER TABLE embeddings DROP CONSTRAINT uq_embedding_ref"))
    hits, plan = search_plan(index.PgVectorIndex(), "fp", "item", query, 10)
    db.session.rollback()
    assert hits[0][0] == 1, hits  # the query is the first vector
    used = [name for name in (FULL, HALF) if f"Index Scan using {name} " in plan]
    assert len(used) == 1, plan
    return used[0]


@pytest.mark.postgres
def test_release_moves_a_full_precision_index_to_half_precision_where_pgvector_has_it(halfvec_app):
    app, query = halfvec_app
    with app.app_context():
        db.session.execute(sa.text(BUILD_FULL))
        db.session.commit()
        assert index_used(query) == FULL  # the search follows the index there is
        # However few vectors: an index serves today, and the half-precision one replaces it.
        assert release.ensure_hnsw("fp", 32, min_rows=10**6) == f"index {HALF} built on 400 vectors, {FULL} dropped"
        assert hnsw.present(32) == {HALF: True}
        definition = db.session.scalar(sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"), {"n": HALF})
        assert "(vec)::halfvec(32)" in definition and "halfvec_cosine_ops" in definition, definition
        assert index_used(query) == HALF
        assert release.ensure_hnsw("fp", 32, min_rows=1) == f"index {HALF} present"
        # A release stopped between the build and the drop left both: the search takes the half-precision
        # one, and the next release drops the other.
        db.session.execute(sa.text(BUILD_FULL))
        db.session.commit()
        assert index_used(query) == HALF
        assert release.ensure_hnsw("fp", 32, min_rows=1) == f"index {HALF} present, {FULL} dropped"
        assert hnsw.present(32) == {HALF: True}


@pytest.mark.postgres
def test_a_failed_half_precision_build_leaves_the_search_on_the_old_index_and_the_next_release_finishes(halfvec_app):
    app, query = halfvec_app
    with app.app_context():
        db.session.execute(sa.text(BUILD_FULL))
        # A value no float16 holds: the half-precision build fails half way (as a killed one would), leaving
        # an invalid index behind. The app never stores one: its vectors come from float16 blobs.
        db.session.execute(sa.text("UPDATE embeddings SET vec = CAST(:v AS vector) WHERE ref_id = 400"),
                           {"v": "[" + ",".join(["1e6"] * 32) + "]"})
        db.session.commit()
        with pytest.raises(sa.exc.DBAPIError):
            release.ensure_hnsw("fp", 32, min_rows=1)
        db.session.rollback()
        assert hnsw.present(32) == {FULL: True, HALF: False}
        assert index_used(query) == FULL  # never the invalid one, nor an exact scan
        db.session.execute(sa.text("UPDATE embeddings SET vec = NULL WHERE ref_id = 400"))
        db.session.commit()
        assert release.ensure_hnsw("fp", 32, min_rows=1) == f"index {HALF} built on 400 vectors, {FULL} dropped"
        assert hnsw.present(32) == {HALF: True}
        assert index_used(query) == HALF


def test_the_half_precision_index_needs_pgvector_0_7():
    assert hnsw.kind_for((0, 6)) == hnsw.VECTOR
    assert hnsw.kind_for((0, 7)) == hnsw.kind_for((0, 8)) == hnsw.HALFVEC
    assert hnsw.kind_for((0,)) == hnsw.VECTOR  # no extension: nothing is built, nothing half


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Did not recognize type 'vector'")  # reflection of vec: excluded anyway
def test_release_on_a_pgvector_with_halfvec_builds_the_half_precision_index_and_search_answers(
        pgvector_halfvec_url, tiny_onnx, tmp_path):
    app = seeded_on(pgvector_halfvec_url, tiny_onnx, tmp_path)
    first = invoke(app, "--hnsw-min-rows", "50")
    assert first.exit_code == 0, first.output
    assert "pgvector: ready" in first.output and f"index {HALF} built" in first.output, first.output
    assert f"index {HALF} present" in invoke(app, "--hnsw-min-rows", "50").output
    response = app.test_client().get("/search", query_string={"q": "ספרים לילדים", "mode": "semantic"})
    assert response.status_code == 200 and response.get_json()["count"] == 10
    with app.app_context():
        db.session.remove()
        db.engine.dispose()
