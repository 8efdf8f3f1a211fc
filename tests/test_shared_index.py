"""app/semantic/shared.py: the instance's shared vector index: a published generation searched by every
worker through a read-only view, the rows stored after it found beside it, nothing half-written or
mismatched ever trusted, one publisher at a time, and the background path that publishes by itself."""

import json
import os
import sys
import time

import numpy as np
import pytest

from app.db import Embedding, db
from app.semantic import index, publisher, shared
from app.state import get_service
from support import make_settings
from test_vectors import add_row, expected_top, fill

pytest.importorskip("usearch")


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "vectors"


def store_in(folder, max_bytes=64 * 2**20):
    return shared.SharedIndex(folder, index.VectorIndex(max_bytes))


def unit(rng, dim=32):
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_a_published_generation_is_searched_by_every_worker_from_one_file(app, folder):
    vectors = fill(app, 3000)
    rng = np.random.default_rng(1)
    queries = [unit(rng) for _ in range(20)]
    first, second = store_in(folder), store_in(folder)  # two workers of one instance
    with app.app_context():
        manifest = shared.publish(folder, "fp", "item")
        assert manifest["count"] == 3000 and (folder / manifest["file"]).exists()
        assert manifest["search"] == "hnsw"  # 32-d: the graph passes its probe
        results = [first.top("fp", "item", q, 10) for q in queries]
        assert [second.top("fp", "item", q, 10) for q in queries] == results
        generation = first.generation("fp", "item")
    assert generation is not None and generation.file == second.generation("fp", "item").file
    # Nothing of the generation is the worker's own: no rows after it, so no matrix either.
    assert first.memory_bytes() == 0 and first.mapped_bytes() > 3000 * 32 * 2
    found = sum(len({r for r, _ in got} & set(expected_top(vectors, q, 10))) for got, q in zip(results, queries))
    assert found / (10 * len(queries)) >= 0.95  # approximate search, measured against the exact top 10
    scores = dict(results[0])
    exact = vectors.astype(np.float16).astype(np.float32) @ queries[0]
    assert all(abs(scores[r] - exact[r - 1]) < 2e-3 for r in scores)  # cosine, as the exact path gives


def test_rows_stored_after_the_generation_are_found_beside_it(app, folder):
    fill(app, 500)
    rng = np.random.default_rng(2)
    query = unit(rng)
    store = store_in(folder)
    with app.app_context():
        shared.publish(folder, "fp", "item")
        add_row(9001, query)
        hits = store.top("fp", "item", query, 5)
    assert hits[0][0] == 9001 and hits[0][1] > 0.99
    assert store.memory_bytes() > 0  # the newer row lives in the worker's small matrix


def test_a_vector_stored_again_after_the_generation_counts_with_its_new_vector(app, folder):
    fill(app, 500)
    query = unit(np.random.default_rng(3))
    store = store_in(folder)
    with app.app_context():
        shared.publish(folder, "fp", "item")
        db.session.execute(Embedding.__table__.delete().where(Embedding.ref_id == 42))
        add_row(42, query)
        hits = store.top("fp", "item", query, 20)
    assert hits[0][0] == 42 and hits[0][1] > 0.99
    assert [r for r, _ in hits].count(42) == 1


@pytest.mark.parametrize("damage", ["truncated", "count", "missing", "garbage manifest"])
def test_a_damaged_generation_is_never_trusted_and_the_next_publication_replaces_it(app, folder, damage):
    vectors = fill(app, 800)
    query = vectors[7]
    store = store_in(folder)
    with app.app_context():
        manifest = shared.publish(folder, "fp", "item")
        file, path = folder / manifest["file"], publisher.manifest_path(folder, "fp", "item")
        if damage == "truncated":
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        elif damage == "count":
            path.write_text(json.dumps({**manifest, "count": manifest["count"] + 1}))
        elif damage == "missing":
            file.unlink()
        else:
            path.write_text("{half a manifest")
        hits = store.top("fp", "item", query, 5)
        assert store.generation("fp", "item") is None  # not trusted: every row searched in-process
        assert [r for r, _ in hits] == expected_top(vectors, query, 5)
        assert "unusable" in shared.publish_reason(folder, "fp", "item", 2000)
        shared.publish(folder, "fp", "item")
        assert store.generation("fp", "item") is not None
        assert store.top("fp", "item", query, 1)[0][0] == 8
        assert shared.publish_reason(folder, "fp", "item", 2000) is None


def test_publication_is_due_for_enough_new_rows_or_any_other_change(app, folder, monkeypatch):
    vectors = fill(app, 20)  # a tenth of it is below the 3 rows asked for below
    with app.app_context():
        assert shared.publish_reason(folder, "fp", "item", 21) is None  # 20 rows: the matrix is enough
        assert shared.publish_reason(folder, "fp", "item", 3) == "no generation yet"
        shared.publish(folder, "fp", "item")
        assert shared.publish_reason(folder, "fp", "item", 3) is None
        assert shared.publish(folder, "fp", "item", if_due=3) is None  # a second build for the same reason
        add_row(501, vectors[0])
        add_row(502, vectors[1])
        assert shared.publish_reason(folder, "fp", "item", 3) is None  # 2 newer rows: searched beside it
        add_row(503, vectors[2])
        assert shared.publish_reason(folder, "fp", "item", 3) == "3 vectors stored after it"
        shared.publish(folder, "fp", "item")
        db.session.execute(Embedding.__table__.delete().where(Embedding.ref_id == 5))
        db.session.commit()
        assert shared.publish_reason(folder, "fp", "item", 3) is None  # a publication just happened
        monkeypatch.setattr(publisher, "MIN_PUBLISH_GAP_S", 0.0)
        assert shared.publish_reason(folder, "fp", "item", 3) == "vectors were replaced or removed since it was built"


def test_one_publisher_per_instance_at_a_time(app, folder):
    fill(app, 50)
    with app.app_context():
        with publisher.publish_lock(folder) as taken:
            assert taken
            assert shared.publish(folder, "fp", "item") is None
        assert not publisher.manifest_path(folder, "fp", "item").exists()
        assert shared.publish(folder, "fp", "item")["count"] == 50
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("fp-item-")) == [
        "fp-item.json", publisher.PUBLISH_LOCK]


def test_a_new_generation_removes_the_old_ones_and_leftovers(app, folder):
    vectors = fill(app, 50)
    with app.app_context():
        first = shared.publish(folder, "fp", "item")["file"]
        (folder / ".fp-item-1-2.usearch.tmp").write_bytes(b"an interrupted build")
        (folder / "oldmodel-item.json").write_text("{}")
        add_row(51, vectors[0])
        second = shared.publish(folder, "fp", "item")["file"]
    assert first != second
    assert sorted(p.name for p in folder.iterdir()) == sorted([second, "fp-item.json", publisher.PUBLISH_LOCK])


def test_the_cli_publishes_and_the_store_of_the_app_uses_it(app, tmp_path):
    """`flask vectors publish` (what the embedder's loop runs in a child) and the app's own store."""
    fill(app, 200)
    result = app.test_cli_runner().invoke(args=["vectors", "publish", "--fingerprint", "fp", "--kind", "item"])
    assert result.exit_code == 0, result.output
    assert "item: published" in result.output and "200 vectors" in result.output
    with app.app_context():
        store = get_service(app).vector_store()
    folder = tmp_path / "test.sqlite3.vectors" if get_service(app).settings.is_sqlite else \
        tmp_path / "instance" / "vectors"  # PostgreSQL without pgvector: the instance's shared folder
    assert store.kind == "shared" and store.folder == folder
    with app.app_context():
        assert store.generation("fp", "item").count == 200


def test_the_matrix_alone_when_the_shared_index_is_off(tmp_path):
    from app import create_app

    app = create_app(make_settings(tmp_path, VECTOR_INDEX_DIR="off"))
    with app.app_context():
        assert get_service(app).vector_store().kind == "in-process"
    result = app.test_cli_runner().invoke(args=["vectors", "publish", "--fingerprint", "fp"])
    assert result.exit_code == 1 and "VECTOR_INDEX_DIR=off" in result.output


def test_the_background_path_publishes_in_a_child_process(tmp_path, monkeypatch, tiny_onnx):
    """maintain_index, as the embedder's loop calls it: a due generation is built by a child
    (app/semantic/publisher.py) on the same database, and is not started twice."""
    from app import create_app

    db_url = f"sqlite:///{tmp_path / 'bg.sqlite3'}"
    env = {"DATABASE_URL": db_url, "SEMANTIC_MODEL": str(tiny_onnx), "VECTOR_INDEX_DIR": str(tmp_path / "ix"),
           "VECTOR_INDEX_REBUILD_ROWS": "100"}
    for key, value in {**env, "APP_ENV": "test"}.items():
        monkeypatch.setenv(key, value)  # the child reads its settings from the environment
    app = create_app(make_settings(tmp_path, **env))
    app.test_cli_runner().invoke(args=["seed"])
    assert app.test_cli_runner().invoke(args=["embed"]).exit_code == 0
    service = get_service(app)
    with app.app_context():
        started = service.maintain_index()
        assert sorted(started) == ["item", "tag"]
        assert service.maintain_index() == []  # its build is running (or done, and nothing is due)
        service._publisher.wait(timeout=120)
        assert service._publisher.returncode == 0
        store = service.vector_store()
        fingerprint = service.encoder().fingerprint
        assert store.generation(fingerprint, "item").count == db.session.query(Embedding).filter_by(
            kind="item", model_fp=fingerprint).count()
        assert service.maintain_index() == []
    client = app.test_client()
    body = client.get("/search", query_string={"q": "ספרים לילדים", "mode": "semantic"}).get_json()
    assert body["count"] == 10


def test_under_gunicorn_the_workers_publish_and_search_one_shared_generation(tmp_path, tiny_onnx):
    """End to end: two workers with the model; one of them starts the publisher, both search the file it
    published, and new items (past VECTOR_INDEX_REBUILD_ROWS) bring a new generation that finds them."""
    import psutil

    from devtools.http import fetch
    from support import Gunicorn, wait_until
    from test_gunicorn import semantic_ids

    folder = tmp_path / "gunicorn.sqlite3.vectors"
    env = {"WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "4", "SEMANTIC_MODEL": str(tiny_onnx),
           "SEMANTIC_WARM": "true", "SEMANTIC_EMBED_INTERVAL": "0.1", "VECTOR_INDEX_REBUILD_ROWS": "1"}

    def generation() -> dict | None:
        manifests = list(folder.glob("*-item.json")) if folder.exists() else []
        return json.loads(manifests[0].read_text()) if manifests else None

    with Gunicorn(tmp_path, env) as server:
        first = wait_until(generation, "the first generation of the item index", timeout=120)
        assert first["count"] > 0

        def mapped_by_workers() -> bool:
            assert semantic_ids(server, "ספרים לילדים")  # each poll a query, to whichever worker takes it
            name = generation()["file"]
            users = [p for p in server.workers() if any(m.path.endswith(name) for m in psutil.Process(p).memory_maps())]
            return len(users) == 2

        wait_until(mapped_by_workers, "both workers to map the same generation file")
        # A new generation is due once the newer rows pass VECTOR_INDEX_REBUILD_ROWS and a tenth of it.
        for n in range(first["count"] // 10 + 1):
            title, body = f"פריט אינדקס משותף {n}", f"גוף חדש לגמרי לבדיקת הדור הבא {n}"
            status, answer, _ = fetch(f"{server.url}/items", {"title": title, "body": body}, timeout=30)
            assert status == 201, answer
        item_id = json.loads(answer)["id"]
        wait_until(lambda: generation()["count"] > first["count"], "a new generation with the new item", timeout=120)
        wait_until(lambda: item_id in semantic_ids(server, f"{title} {body}"), "the new item found by meaning")


def test_a_generation_whose_graph_fails_its_probe_is_searched_exactly(app, folder, monkeypatch):
    """Random 768-d vectors are equidistant: a graph walk finds few of the true neighbours (recall 0.50
    at 10 k in bench/vectors.py). The probe at publication sees it, and that generation is searched
    exactly, through the same shared file."""
    # The base breadth only: at the widest one such a graph comes near the bar, and a graph built on
    # several threads differs from run to run, so the probe there passed in some runs and not in others.
    monkeypatch.setattr(publisher, "EXPANSIONS", publisher.EXPANSIONS[:1])
    vectors = fill(app, 10_000, dim=768)
    rng = np.random.default_rng(5)
    store = store_in(folder)
    with app.app_context():
        manifest = shared.publish(folder, "fp", "item")
        assert manifest["search"] == "exact" and manifest["probe_recall"] < publisher.MIN_RECALL
        assert store.generation("fp", "item").exact
        for _ in range(10):
            q = unit(rng, 768)
            assert [r for r, _ in store.top("fp", "item", q, 10)] == expected_top(vectors, q, 10)


def test_a_graph_that_needs_a_wider_search_gets_it_in_its_manifest_and_every_reader(app, folder, monkeypatch):
    """Probes that miss at the base breadth are taken again wider; the breadth that passes is the one
    the generation is published with and every worker searches with."""
    fill(app, 3_000, dim=32)
    monkeypatch.setattr(publisher, "probe_recall", lambda index, probes: 0.99 if index.expansion_search >= 256 else 0.9)
    with app.app_context():
        manifest = shared.publish(folder, "fp", "item")
        assert (manifest["search"], manifest["expansion_search"]) == ("hnsw", 256)
        generation = store_in(folder).generation("fp", "item")
        assert not generation.exact and generation.index.expansion_search == 256
    monkeypatch.setattr(publisher, "probe_recall", lambda index, probes: 0.5)
    with app.app_context():
        manifest = shared.publish(folder, "fp", "item")
        assert (manifest["search"], manifest["expansion_search"]) == ("exact", publisher.EXPANSIONS[-1])


def test_the_publisher_lock_goes_with_the_child(app, folder):
    """Two workers that find a generation due at the same moment start one build: the first takes the
    instance's lock and hands it to its child, which holds it until it exits."""
    url = app.extensions["memfit"].settings.database_url
    first = shared.start_publisher(folder, url, "fp", ["item"], 0, 100)
    try:
        assert first is not None
        assert shared.start_publisher(folder, url, "fp", ["item"], 0, 100) is None  # the child is still starting
        with publisher.publish_lock(folder) as taken:
            assert not taken
    finally:
        first.wait(timeout=120)
    third = shared.start_publisher(folder, url, "fp", ["item"], 0, 100)
    assert third is not None
    third.wait(timeout=120)


def test_the_publisher_child_builds_without_loading_the_app(app, folder, tmp_path, monkeypatch):
    """The child beside the workers is publisher.py alone (the app's Flask, SQLAlchemy and text index were
    51 MB of its 85 MB PSS): with flask, sqlalchemy and the app made unimportable it still reads the
    database (SQLite, or PostgreSQL through psycopg2) and publishes what the table holds."""
    fill(app, 300)
    blocked = tmp_path / "blocked"
    for name in ("flask", "sqlalchemy", "app"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('the publisher child imported {name}')\n")
    monkeypatch.setenv("PYTHONPATH", str(blocked))
    url = app.extensions["memfit"].settings.database_url
    child = shared.start_publisher(folder, url, "fp", ["item"], 0, 100)
    assert child is not None and child.wait(timeout=120) == 0
    with app.app_context():
        assert store_in(folder).generation("fp", "item").count == 300
        assert shared.publish_reason(folder, "fp", "item", 100) is None


def test_a_database_url_the_child_cannot_read_is_refused_before_the_lock(folder):
    with pytest.raises(ValueError, match="mysql"):
        shared.start_publisher(folder, "mysql://db/x", "fp", ["item"], 0, 100)
    with publisher.publish_lock(folder) as taken:
        assert taken


def test_no_build_starts_where_the_instance_has_no_memory_for_it(tmp_path, monkeypatch, tiny_onnx, caplog):
    """A first build of 100 k vectors in the 512 MB tier's cgroup had the OOM killer take the workers
    (bench.instance_vectors): a build that would not fit under MAX_MEMORY_MB is not started, and says so."""
    from app import create_app
    from monitoring import memory

    env = {"SEMANTIC_MODEL": str(tiny_onnx), "VECTOR_INDEX_DIR": str(tmp_path / "ix"),
           "VECTOR_INDEX_REBUILD_ROWS": "100", "MAX_MEMORY_MB": "450"}
    app = create_app(make_settings(tmp_path, **env))
    app.test_cli_runner().invoke(args=["seed"])
    assert app.test_cli_runner().invoke(args=["embed"]).exit_code == 0
    service = get_service(app)
    full = memory.CgroupMemory(version=2, usage=440 * 2**20, limit=512 * 2**20, working_set=440 * 2**20,
                               peak=None, oom_kills=0)
    monkeypatch.setattr(memory, "read_cgroup", lambda *a, **k: full)
    with app.app_context():
        assert service.maintain_index() == []
        assert service._publisher is None
    assert (f"needs about {shared.BUILD_BASE_BYTES // 2**20} MB to build, and the instance has 10 MB left under "
            "MAX_MEMORY_MB") in caplog.text
    roomy = memory.CgroupMemory(version=2, usage=200 * 2**20, limit=512 * 2**20, working_set=200 * 2**20,
                                peak=None, oom_kills=0)
    monkeypatch.setattr(memory, "read_cgroup", lambda *a, **k: roomy)
    with app.app_context():
        assert sorted(service.maintain_index()) == ["item", "tag"]
        service._publisher.wait(timeout=120)


def test_the_release_publishes_the_first_generation_and_folds_in_newer_rows(tmp_path, tiny_onnx):
    """`flask release` builds the generation workers start with (a serving 512 MB instance has no room
    for a large first build), and at the next release folds in every vector stored since."""
    from app import create_app

    env = {"DATABASE_URL": f"sqlite:///{tmp_path / 'rel.sqlite3'}", "SEMANTIC_MODEL": str(tiny_onnx),
           "VECTOR_INDEX_DIR": str(tmp_path / "ix"), "VECTOR_INDEX_REBUILD_ROWS": "100"}
    app = create_app(make_settings(tmp_path, **env))
    runner = app.test_cli_runner()
    assert runner.invoke(args=["seed"]).exit_code == 0
    result = runner.invoke(args=["release"])
    assert result.exit_code == 0, result.output
    assert "vector index: items published (no generation yet)" in result.output
    service = get_service(app)
    with app.app_context():
        fingerprint = service.encoder().fingerprint
        items = db.session.query(Embedding).filter_by(kind="item", model_fp=fingerprint).count()
        first = service.vector_store().generation(fingerprint, "item")
        assert first.count == items
    client = app.test_client()
    assert client.post("/items", json={"title": "מחברת חדשה", "tags": ["כתיבה"]},
                       headers={"Authorization": "Bearer t"}).status_code == 201
    assert runner.invoke(args=["embed"]).exit_code == 0
    result = runner.invoke(args=["release"])
    assert result.exit_code == 0, result.output
    assert "vector index: items published (1 vectors stored after it)" in result.output
    with app.app_context():
        assert service.vector_store().generation(fingerprint, "item").count == items + 1
    result = runner.invoke(args=["release"])  # nothing new: nothing rebuilt
    assert result.exit_code == 0 and "vector index:" not in result.output
