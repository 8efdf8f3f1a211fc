"""Helpers shared by the test suites (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.gunicorn import APP, ROOT, GunicornServer
from devtools.http import free_port, wait_http  # noqa: F401  (re-exported for the suites)
from devtools.pgserver import PGVECTOR_PYTHON, PgServerProcess, server_folder  # noqa: F401  (re-exported)
from devtools.project import make_settings  # noqa: F401  (re-exported for the suites)

def in_ci(environ=os.environ) -> bool:
    """Whether this run is CI: any value but an empty one or an explicit no. CI systems spell it true,
    True, 1 or yes; reading only "true" would silently skip every service suite under the others."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


IN_CI = in_ci()


def require(condition: bool, reason: str) -> None:
    """Skip when a heavy dependency is missing on a developer's machine; in CI that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def postgres_url() -> str | None:
    return os.environ.get("TEST_DATABASE_URL") or None


def venv_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name) or name


class Gunicorn(GunicornServer):
    """devtools' gunicorn on a seeded SQLite database of tmp_path, one worker, no model, unless env says otherwise."""

    def __init__(self, tmp_path: Path, env: dict[str, str], seed: bool = True, app: str = APP):
        port = free_port()
        full = {**os.environ, "WEB_CONCURRENCY": "1", "DATABASE_URL": f"sqlite:///{tmp_path / 'gunicorn.sqlite3'}",
                "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{port}"),
                "SEMANTIC_MODEL": str(tmp_path / "no-model"), **env}
        super().__init__(full, tmp_path / f"gunicorn-{port}.log", app=app, port=port)
        if seed:
            subprocess.run([venv_bin("flask"), "--app", "app", "seed"], cwd=ROOT, env=self.env, check=True,
                           capture_output=True)

    def __exit__(self, *exc) -> None:
        self.stop(timeout=40)

    def workers(self) -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process(self.proc.pid).children()]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of a Prometheus metric whose labels include the given ones."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def search_plan(store, fingerprint: str, kind: str, query, k: int) -> tuple[list, str]:
    """PgVectorIndex.top's hits and the plan PostgreSQL chose for the ordering statement it ran, EXPLAINed
    in the same transaction (so with the search's own settings and whatever the test changed there)."""
    from sqlalchemy import event

    from app.db import db

    ran = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "ORDER BY" in statement:
            ran.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        hits = store.top(fingerprint, kind, query, k)
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)
    assert ran, "PgVectorIndex.top ran no ordered statement"
    statement, parameters = ran[0]
    plan = db.session.connection().exec_driver_sql("EXPLAIN " + statement, parameters).scalars()
    return hits, "\n".join(plan)


def wait_until(condition, what: str, timeout: float = 60.0):
    """Poll condition() until it is true and return its value; fail naming what never happened.

    The timeout only ends a test that would otherwise hang: nothing asserts how long the wait took.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)  # poll interval between checks of the condition


def embed_all(app) -> int:
    """Store every missing vector as the background embedder does (its rounds, in this thread); returns
    how many. Tests call it where a server's embedder would have caught up: a search never embeds."""
    from app.state import get_service

    done = 0
    with app.app_context():
        service = get_service(app)
        while True:
            stored = service.embed_pending()
            if not stored:
                return done
            done += stored


def raw_exchange(port: int, data: bytes, shut_write: bool = False, timeout: float = 30.0) -> tuple[int, dict, bytes]:
    """Send data as it is on a new connection to 127.0.0.1:port and read one answer: status, headers (lower
    case names) and body. shut_write ends the client's side after data, as a client that stops mid-body.

    For requests no HTTP client library will send: malformed chunked bodies, oversized request lines.
    """
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while b"\r\n\r\n" not in received:
            part = sock.recv(65536)
            if not part:
                raise AssertionError(f"the connection closed before an answer: {received[:300]!r}")
            received += part
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            part = sock.recv(65536)
            if not part:
                break
            body += part
    return int(lines[0].split()[1]), headers, body[:length]


def chunked(body: bytes, size: int = 4096) -> bytes:
    """body in Transfer-Encoding: chunked framing, size bytes a chunk, with its last chunk."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"
