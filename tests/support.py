"""Helpers shared by the test suites (fixtures live in conftest.py)."""

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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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


class Gunicorn:
    """A real gunicorn started with the project's gunicorn.conf.py on a free loopback port."""

    def __init__(self, tmp_path: Path, env: dict[str, str], seed: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        self.env = {**os.environ, "PORT": str(self.port), "WEB_CONCURRENCY": "1",
                    "DATABASE_URL": f"sqlite:///{tmp_path / 'gunicorn.sqlite3'}",
                    "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{self.port}"),
                    "SEMANTIC_MODEL": str(tmp_path / "no-model"), **env}
        if seed:
            subprocess.run([venv_bin("flask"), "--app", "app", "seed"], cwd=ROOT, env=self.env, check=True,
                           capture_output=True)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Gunicorn":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([venv_bin("gunicorn"), "-c", "gunicorn.conf.py", "app:create_app()"],
                                     cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/healthz", timeout=60, proc=self.proc)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process(self.proc.pid).children()]

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of a Prometheus metric whose labels include the given ones."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class PgServerProcess:
    """A PostgreSQL (pgserver: 16 + pgvector) owned by a helper process, so a test can stop and
    restart it at will: closing the helper's stdin stops the server, start() brings it back."""

    SCRIPT = ("import sys, pgserver\n"
              "server = pgserver.get_server(sys.argv[1], cleanup_mode='stop')\n"
              "print(server.get_uri(), flush=True)\n"
              "sys.stdin.read()\n")

    def __init__(self, pgdata: Path):
        self.pgdata = pgdata
        self.proc: subprocess.Popen | None = None
        self.uri: str | None = None

    def start(self) -> str:
        env = {**os.environ, "XDG_RUNTIME_DIR": str(self.pgdata.parent)}
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(self.pgdata)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("postgresql://"):
            raise RuntimeError(f"pgserver did not start: {line!r}")
        self.uri = line
        return line

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
