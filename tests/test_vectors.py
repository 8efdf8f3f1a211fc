"""app/semantic/index.py: the two vector stores agree, pgvector keeps vectors out of the web process,
and the in-process index stays within SEMANTIC_INDEX_MAX_MB."""

import numpy as np
import pytest

from app import create_app
from app.db import Embedding, create_schema, db
from app.semantic import hnsw, index
from app.state import get_service, get_settings
from support import make_settings

pytestmark = pytest.mark.postgres


def fill(app, n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with app.app_context():
        db.session.add_all(Embedding(model_fp="fp", kind="item", ref_id=i + 1, text_hash="h", dim=dim,
                                     vector=index.to_blob(v)) for i, v in enumerate(vectors))
        db.session.commit()
    return vectors


def expected_top(vectors, query, k):
    scores = vectors.astype(np.float16).astype(np.float32) @ query
    order = np.argsort(-scores)[:k]
    return [int(i) + 1 for i in order]


def fresh_app(url: str, tmp_path):
    app = create_app(make_settings(tmp_path, DATABASE_URL=url))
    with app.app_context():
        db.drop_all()
        db.session.execute(db.text("DROP TABLE IF EXISTS alembic_version"))
        db.session.commit()
        create_schema()
    yield app
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def pg_app(pgvector_url, tmp_path):
    yield from fresh_app(pgvector_url, tmp_path)


# Each pgvector the tests have, with the HNSW index the release builds there for 32-d vectors.
SERVERS = {"pgvector 0.6": ("pgvector_url", "ix_embeddings_vec_hnsw_d32"),
           "pgvector 0.8": ("pgvector_halfvec_url", "ix_embeddings_vec_hnsw_half_d32")}


@pytest.fixture(params=list(SERVERS))
def each_pg(request, tmp_path):
    """(an app on a fresh database of that server, the name of the index the release builds there)."""
    server, index_name = SERVERS[request.param]
    for app in fresh_app(request.getfixturevalue(server), tmp_path):
        yield app, index_name


def test_pgvector_search_matches_exact_search(pg_app):
    vectors = fill(pg_app, 500)
    query = vectors[17] * 0.7 + vectors[3] * 0.3
    query /= np.linalg.norm(query)
    with pg_app.app_context():
        assert index.enable_pgvector()  # backfills the 500 vectors stored before the column existed
        hits = index.PgVectorIndex().top("fp", "item", query, 10)
    assert [ref for ref, _ in hits][:5] == expected_top(vectors, query, 5)
    assert hits[0][1] == pytest.approx(float(max(vectors @ query)), abs=2e-3)


def test_semantic_search_on_pgvector_end_to_end(pg_app, tiny_onnx, tmp_path):
    app = create_app(make_settings(tmp_path, DATABASE_URL=get_settings(pg_app).database_url,
                                   SEMANTIC_MODEL=str(tiny_onnx)))
    app.test_cli_runner().invoke(args=["seed"])
    # The release command (not a request) creates the vec column: a worker only checks for it.
    result = app.test_cli_runner().invoke(args=["release"])
    assert "pgvector: ready" in result.output, result.output
    client = app.test_client()
    body = client.get("/search", query_string={"q": "ספרים לילדים", "mode": "semantic"}).get_json()
    assert body["count"] == 10
    store = get_service(app).vector_store()
    assert store.kind == "pgvector" and store.memory_bytes() == 0
    with app.app_context():
        assert db.session.execute(db.text("SELECT count(*) FROM embeddings WHERE vec IS NULL")).scalar() == 0
    # The same query through the in-process index on the same rows gives the same ranking, up to the
    # float16 the in-process matrix keeps (pgvector keeps float32): near-ties may swap, scores agree.
    local = index.VectorIndex(64 * 2**20)
    encoder = get_service(app).encoder()
    query = encoder.encode(["ספרים לילדים"], 1)[0]
    with app.app_context():
        mine = local.top(encoder.fingerprint, "item", query, 6)
        theirs = store.top(encoder.fingerprint, "item", query, 5)
    assert all(abs(a[1] - b[1]) < 2e-3 for a, b in zip(mine, theirs)), (mine, theirs)
    assert {r for r, _ in theirs} <= {r for r, _ in mine}, (mine, theirs)


def test_pgvector_hnsw_returns_every_row_asked_for(each_pg):
    """Through an HNSW index a query gets the rows it asks for: pgvector's default ef_search (40) gave
    39-40 of 50, and a filter (another model's vectors of the same size) can leave fewer still. The index
    is half precision where pgvector has halfvec (0.7+), and the search goes through it whichever it is."""
    from app import release
    from support import search_plan

    pg_app, index_name = each_pg
    fill(pg_app, 400)  # this model's vectors
    rng = np.random.default_rng(9)
    with pg_app.app_context():
        others = rng.standard_normal((3000, 32)).astype(np.float32)
        db.session.execute(Embedding.__table__.insert(), [
            {"model_fp": "old", "kind": "item", "ref_id": i + 1, "text_hash": "h", "dim": 32,
             "vector": index.to_blob(v / np.linalg.norm(v))} for i, v in enumerate(others)])
        db.session.commit()
        assert index.enable_pgvector()
        assert release.ensure_hnsw("fp", 32, min_rows=1) == f"index {index_name} built on 400 vectors"
        assert list(hnsw.present(32)) == [index_name]
        store = index.PgVectorIndex()
        query = rng.standard_normal(32).astype(np.float32)
        query /= np.linalg.norm(query)
        # The plan a large table gets: the HNSW index, not the b-trees on (model_fp, kind) nor a scan
        # (dropped and discouraged in this transaction only; rolled back below).
        db.session.execute(db.text("SET LOCAL enable_seqscan = off"))
        db.session.execute(db.text("DROP INDEX ix_embedding_fp_kind"))
        db.session.execute(db.text("ALTER TABLE embeddings DROP CONSTRAINT uq_embedding_ref"))
        hits, plan = search_plan(store, "fp", "item", query, 50)
        assert f"Index Scan using {index_name}" in plan, plan
        assert len(hits) == 50 and len({r for r, _ in hits}) == 50
        assert db.session.scalar(db.text("SHOW hnsw.ef_search")) == "200"  # PGVECTOR_EF_SEARCH's default
        db.session.rollback()
        # The search's settings were the transaction's own: the pooled connection is back to defaults.
        assert db.session.scalar(db.text("SHOW hnsw.ef_search")) == "40"
        stored = np.stack([np.frombuffer(b, dtype="<f2").astype(np.float32) for b in db.session.scalars(
            db.text("SELECT vector FROM embeddings WHERE model_fp = 'fp' ORDER BY ref_id"))])
    exact = stored @ query / np.linalg.norm(stored, axis=1)  # cosines: float16 leaves norms off 1 by ~1e-4
    assert len(set(np.argsort(-exact)[:10] + 1) & {r for r, _ in hits[:10]}) >= 9  # recall@10 of what came back
    # Scores at full precision, whichever index ordered the rows: a half-precision query is off by ~1e-4.
    assert max(abs(score - exact[ref - 1]) for ref, score in hits) < 1e-5


def test_postgres_without_pgvector_falls_back(tmp_path):
    from support import postgres_url, require

    require(postgres_url() is not None, "TEST_DATABASE_URL is not set (Debian's PostgreSQL, without pgvector)")
    app = create_app(make_settings(tmp_path, DATABASE_URL=postgres_url()))
    with app.app_context():
        create_schema()
        assert not index.enable_pgvector()  # Debian's PostgreSQL has no pgvector: degrade, not break
        assert db.session.execute(db.text("SELECT 1")).scalar() == 1  # the session is still usable
        db.engine.dispose()


def test_in_process_index_streams_past_its_bound(app):
    vectors = fill(app, 3000)
    query = vectors[42]
    small = index.VectorIndex(max_bytes=1000)  # far below 3000 x 32 x 2 bytes: must stream
    large = index.VectorIndex(max_bytes=64 * 2**20)
    with app.app_context():
        streamed = small.top("fp", "item", query, 5)
        cached = large.top("fp", "item", query, 5)
    assert small.memory_bytes() == 0 and large.memory_bytes() >= 3000 * 32 * 2
    assert [r for r, _ in streamed] == [r for r, _ in cached] == expected_top(vectors, query, 5)
    assert streamed[0][0] == 43


def test_matrix_refreshes_when_vectors_are_added(app):
    fill(app, 10)
    store = index.VectorIndex(64 * 2**20)
    query = np.zeros(32, dtype=np.float32)
    query[0] = 1
    with app.app_context():
        assert len(store.top("fp", "item", query, 100)) == 10
        db.session.add(Embedding(model_fp="fp", kind="item", ref_id=999, text_hash="h", dim=32,
                                 vector=index.to_blob(query)))
        db.session.commit()
        hits = store.top("fp", "item", query, 100)
    assert len(hits) == 11 and hits[0][0] == 999


def add_row(ref_id: int, vector: np.ndarray, row_id: int | None = None) -> None:
    db.session.add(Embedding(id=row_id, model_fp="fp", kind="item", ref_id=ref_id, text_hash="h", dim=32,
                             vector=index.to_blob(vector)))
    db.session.commit()


def test_rows_added_are_appended_to_the_matrix_not_rebuilt(app):
    """New vectors (a create every few seconds under load) are read on their own: the matrix's
    buffers stay the same ones, and the new rows are found."""
    vectors = fill(app, 100)
    store = index.VectorIndex(64 * 2**20)
    with app.app_context():
        store.top("fp", "item", vectors[0], 5)
        (before,) = store._matrices.values()
        for ref_id in (501, 502):
            add_row(ref_id, vectors[ref_id - 491])
        hits = store.top("fp", "item", vectors[11], 3)
        (after,) = store._matrices.values()
    assert after.vectors_buffer is before.vectors_buffer and len(after.ids) == 102
    assert {hits[0][0], hits[1][0]} == {12, 502}  # vectors[11] is item 12's vector and item 502's


def test_a_change_that_is_not_only_appends_rebuilds_the_matrix(app):
    """A row deleted and another committed late with a lower id (PostgreSQL ids are taken at insert,
    seen at commit) leave a count that an append would match: the sum of ids tells them apart."""
    vectors = fill(app, 10)
    query = np.zeros(32, dtype=np.float32)
    query[0] = 1
    store = index.VectorIndex(64 * 2**20)
    with app.app_context():
        db.session.execute(Embedding.__table__.delete().where(Embedding.id.in_([4, 5])))
        db.session.commit()
        store.top("fp", "item", query, 20)
        db.session.execute(Embedding.__table__.delete().where(Embedding.id == 3))
        add_row(444, query, row_id=4)  # the late commit
        add_row(777, vectors[0])
        hits = dict(store.top("fp", "item", query, 20))
    assert 444 in hits and 777 in hits and 3 not in hits and len(hits) == 9


def test_a_rebuild_lets_the_old_matrix_go_before_allocating_the_new(app, monkeypatch):
    """Peak memory of a refresh is one matrix, not two: what the index holds plus what it is allocating
    stays within the bound, and the previous matrix is already freed when the new one is allocated."""
    import weakref

    fill(app, 2000)  # 2000 x (32 x 2 + 8) = 144,000 bytes: one fits the bound below, two do not
    store = index.VectorIndex(max_bytes=200_000)
    query = np.ones(32, dtype=np.float32) / np.sqrt(32)
    with app.app_context():
        store.top("fp", "item", query, 5)
        (old,) = [weakref.ref(m) for m in store._matrices.values()]
        # A row replaced (not only added): the matrix is rebuilt, not appended to.
        db.session.execute(Embedding.__table__.delete().where(Embedding.ref_id == 7))
        db.session.add(Embedding(model_fp="fp", kind="item", ref_id=5000, text_hash="h", dim=32,
                                 vector=index.to_blob(query)))
        db.session.commit()
        allocations = []
        real_empty = np.empty

        def watched_empty(shape, *args, **kwargs):
            array = real_empty(shape, *args, **kwargs)
            allocations.append((old() is not None, store.memory_bytes() + array.nbytes))
            return array

        monkeypatch.setattr(np, "empty", watched_empty)
        hits = store.top("fp", "item", query, 5)
        monkeypatch.undo()
    assert hits[0][0] == 5000  # the rebuilt matrix holds the new row
    assert len(allocations) >= 2, allocations  # the ids and the vectors of the new matrix
    assert not any(alive for alive, _ in allocations), "the old matrix was alive while the new one was allocated"
    assert max(held for _, held in allocations) <= store.max_bytes, allocations
    assert store.memory_bytes() <= store.max_bytes and len(store._matrices) == 1
