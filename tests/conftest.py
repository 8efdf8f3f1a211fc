"""Shared fixtures: an isolated app per test on SQLite and (when available) PostgreSQL, and models the
project builds itself (tiny BERT for tests; see app/semantic/synthetic.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402

IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, reason: str) -> None:
    """Skip when a heavy dependency is missing on a developer's machine; in CI that is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def make_settings(tmp_path: Path, **env: str) -> Settings:
    base = {"APP_ENV": "test", "DATABASE_URL": f"sqlite:///{tmp_path / 'test.sqlite3'}",
            "SEMANTIC_MODEL": str(tmp_path / "no-model"), "MEMORY_CHECK_INTERVAL": "3600"}
    base.update(env)
    return Settings.from_env(base, instance_path=str(tmp_path / "instance"))


def postgres_url() -> str | None:
    return os.environ.get("TEST_DATABASE_URL") or None


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer BERT in sentence-transformers format, built once per session."""
    from app.semantic.synthetic import build

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
            from app.db import db

            db.drop_all()
            db.create_all()
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def venv_bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name) or name
