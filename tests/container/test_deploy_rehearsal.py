"""Deploy rehearsal: the image against PostgreSQL with pgvector, as a platform runs it.

release on an empty database -> seed -> release (backfill) -> app up, every item and every semantic
result recorded -> release again (a no-op) -> a schema change (a test-only revision 0002, mounted over
the image's migrations/) released onto the populated database -> the app, running the new scripts,
serves the same items and the same semantic results.

The server is the pgserver package's PostgreSQL 16 + pgvector (tests/conftest.py's pgvector_url); the
container reaches it through its unix-socket folder, mounted at the same path.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from alembic.script import ScriptDirectory

from dockertools import DOCKER, PUBLISH, Running, docker
from support import ROOT, wait_http

QUERIES = ["ספר", "טיול בצפון", "מתכון לעוגה", "מוזיקה ישראלית", "בריאות ושינה", "חיות בית"]
DATABASE = "memfit_rehearsal"
# The code's newest revision: the rehearsal's own revision goes on top of it, whatever it is.
BASE = ScriptDirectory(str(ROOT / "migrations")).get_current_head()
# A schema change of the kind later releases make: a nullable column and an index, on tables with data.
REVISION_0002 = '''"""Rehearsal only: a column and an index added to a populated database.

Revision ID: rehearsal
Revises: BASE
"""

from alembic import op
import sqlalchemy as sa

revision = "rehearsal"
down_revision = "BASE"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("items", sa.Column("rehearsal_note", sa.String(40), nullable=True))
    op.create_index("ix_items_rehearsal_note", "items", ["rehearsal_note"])


def downgrade():
    op.drop_index("ix_items_rehearsal_note", table_name="items")
    op.drop_column("items", "rehearsal_note")
'''.replace("BASE", BASE)


def host_engine(url: str, **kwargs):
    """An engine on the host: psycopg2, the driver memfit ships (bare postgresql:// would ask for psycopg 3)."""
    from sqlalchemy import create_engine

    return create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1), **kwargs)


def _open_to_all(path: Path) -> None:
    """The app runs as uid 10001: the mounted scripts and the socket's folders must be readable to it."""
    for folder in [path, *path.parents]:
        if str(folder) in ("/", "/tmp"):
            break
        folder.chmod(folder.stat().st_mode | stat.S_IRUSR | stat.S_IXUSR | stat.S_IROTH | stat.S_IXOTH)


@pytest.fixture(scope="module")
def database(pgvector_url):
    """A fresh database on the pgvector server: (URL seen by the host, docker args to reach it)."""
    from sqlalchemy import text

    admin = host_engine(pgvector_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE}"))
        conn.execute(text(f"CREATE DATABASE {DATABASE}"))
    admin.dispose()
    url = re.sub(r"/[^/?]+(\?|$)", rf"/{DATABASE}\1", pgvector_url, count=1)
    socket_dir = parse_qs(urlsplit(url).query).get("host", [None])[0]
    assert socket_dir, f"expected a unix-socket URL from pgserver, got {pgvector_url}"
    _open_to_all(Path(socket_dir))
    return url, ["-v", f"{socket_dir}:{socket_dir}", "-e", f"DATABASE_URL={url}"]


@pytest.fixture(scope="module")
def migrations_0002(tmp_path_factory) -> Path:
    """The image's migrations/ plus revision 0002, to mount over /app/migrations."""
    folder = tmp_path_factory.mktemp("migrations-0002") / "migrations"
    shutil.copytree(ROOT / "migrations", folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "versions" / "9999_rehearsal.py").write_text(REVISION_0002, encoding="utf-8")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    _open_to_all(folder.parent)
    return folder


def run_once(image: str, access: list[str], *command: str, mounts: tuple[str, ...] = ()) -> str:
    """A one-off container of the image, as a platform's release machine runs it; its whole output."""
    return docker("run", "--rm", "-e", "SECRET_KEY=rehearsal", *access, *mounts, image, *command, timeout=600)


def serve(image: str, access: list[str], mounts: tuple[str, ...] = ()) -> Running:
    cid = docker("run", "-d", "-p", PUBLISH, "-e", "SECRET_KEY=rehearsal", *access, *mounts, image)
    app = Running(cid, "512mb")
    wait_http(app.url + "/healthz", timeout=60)
    return app


def logs(cid: str) -> str:
    """Both of the container's streams: gunicorn's own log (the start-up line) goes to stderr."""
    return subprocess.run([DOCKER, "logs", cid], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=60).stdout


def snapshot(app: Running, item_ids: list[int]) -> dict:
    """What users see: every item by id, and every query's semantic results."""
    items = {}
    for item_id in item_ids:
        status, body = app.request(f"/items/{item_id}")
        assert status == 200, (item_id, status, body)
        items[item_id] = body
    semantic = {}
    for q in QUERIES:
        status, body = app.request(f"/search?q={quote(q)}&mode=semantic&limit=10", timeout=120)
        assert status == 200, (q, status, body)
        semantic[q] = body["results"]
    return {"items": items, "semantic": semantic}


def item_ids(url: str) -> list[int]:
    from sqlalchemy import text

    engine = host_engine(url)
    try:
        with engine.connect() as conn:
            return [row[0] for row in conn.execute(text("SELECT id FROM items ORDER BY id"))]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def rehearsal(image, database, migrations_0002):
    url, access = database
    mount_0002 = ("-v", f"{migrations_0002}:/app/migrations:ro")
    out = {"release_empty": run_once(image, access, "flask", "--app", "app", "release")}
    out["seed"] = run_once(image, access, "flask", "--app", "app", "seed")
    out["release_populated"] = run_once(image, access, "flask", "--app", "app", "release")
    ids = item_ids(url)
    out["ids"] = ids
    app = serve(image, access)
    try:
        out["before"] = snapshot(app, ids)
        # The second release of the same code, the app still up: must change nothing.
        out["release_again"] = run_once(image, access, "flask", "--app", "app", "release")
    finally:
        out["logs_before"] = logs(app.cid)
        docker("rm", "-f", app.cid, check=False)
    out["release_0002"] = run_once(image, access, "flask", "--app", "app", "release", mounts=mount_0002)
    app = serve(image, access, mount_0002)
    try:
        out["after"] = snapshot(app, ids)
    finally:
        out["logs_after"] = logs(app.cid)
        docker("rm", "-f", app.cid, check=False)
    out["ids_after"] = item_ids(url)
    return out


def test_first_release_migrates_an_empty_database_and_sets_up_pgvector(rehearsal):
    out = rehearsal["release_empty"]
    assert f"schema: empty -> {BASE}" in out, out
    assert "pgvector: ready" in out, out


def test_release_backfills_the_seeded_items_with_the_baked_model(rehearsal):
    out = rehearsal["release_populated"]
    n = len(rehearsal["ids"])
    assert n > 0 and f"{n} items embedded" in out, out
    assert "nothing to migrate" in out, out


def test_second_release_is_a_no_op(rehearsal):
    out = rehearsal["release_again"]
    assert f"schema: at {BASE}, nothing to migrate" in out, out
    assert "0 tags and 0 items embedded" in out, out


def test_schema_change_is_applied_to_the_populated_database(rehearsal):
    out = rehearsal["release_0002"]
    assert f"schema: {BASE} -> rehearsal" in out, out
    assert "0 tags and 0 items embedded" in out, out  # the vectors survived the migration
    assert rehearsal["ids_after"] == rehearsal["ids"]


def start_up_line(logs: str) -> str:
    lines = [line for line in logs.splitlines() if "memfit start-up:" in line]
    assert lines, f"no start-up line in the log:\n{logs[:2000]}"
    return lines[0]


@pytest.mark.parametrize("logs, revision", [("logs_before", BASE), ("logs_after", "rehearsal")])
def test_start_up_line_names_the_schema_revision(rehearsal, logs, revision):
    line = start_up_line(rehearsal[logs])
    assert line.endswith(f"database=postgresql schema={revision}"), line


def test_every_item_is_served_the_same_after_the_migration(rehearsal):
    before, after = rehearsal["before"]["items"], rehearsal["after"]["items"]
    assert len(after) == len(rehearsal["ids"])
    changed = [i for i in before if before[i] != after[i]]
    assert not changed, f"items served differently after the migration: {changed[:10]}"


@pytest.mark.parametrize("query", QUERIES)
def test_every_semantic_result_is_the_same_after_the_migration(rehearsal, query):
    before, after = rehearsal["before"]["semantic"][query], rehearsal["after"]["semantic"][query]
    assert before, f"no semantic results for {query!r} before the migration"
    assert after == before


def test_without_the_release_the_app_names_the_command_to_run(image):
    # The image's CMD serves only (the Dockerfile says why): before any release, data requests get a
    # 503 that says what to run, and liveness still answers so the platform does not loop on restarts.
    cid = docker("run", "-d", "-p", PUBLISH, "-e", "SECRET_KEY=rehearsal",
                 "--tmpfs", "/data:uid=10001,gid=10001", image)
    try:
        app = Running(cid, "512mb")
        wait_http(app.url + "/healthz", timeout=60)
        status, body = app.request("/search?q=%D7%A1%D7%A4%D7%A8&mode=text")
        assert status == 503 and body["error"]["code"] == "schema_not_ready", body
        assert "flask --app app release" in body["error"]["message"], body
    finally:
        docker("rm", "-f", cid, check=False)
