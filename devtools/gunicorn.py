"""The one way tests and bench start memfit: real gunicorn with the project's gunicorn.conf.py, ready
once /healthz answers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from devtools.http import fetch, fetch_json, free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
APP = "app:create_app()"


class GunicornServer:
    """gunicorn -c gunicorn.conf.py APP on a loopback port, its output in log_path.

    env is the whole environment of the server (PORT is set from port). wrap turns the command line
    into another (bench runs it inside a memory cgroup); the master keeps the pid either way.
    """

    def __init__(self, env: dict[str, str], log_path: Path, app: str = APP, port: int | None = None,
                 wrap: Callable[[list[str]], list[str]] = lambda argv: argv, ready_timeout: float = 60.0):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "PORT": str(self.port)}
        self.log_path = log_path
        self.argv = wrap([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", app])
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._log = None

    def start(self) -> subprocess.Popen:
        """Launch without waiting (a caller may attach a sampler to the pid first), then call wait_ready()."""
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self._started = time.monotonic()
        return self.proc

    def wait_ready(self) -> float:
        """Seconds from launch until /healthz answered; raises if gunicorn exits or never answers."""
        try:
            wait_http(self.url + "/healthz", timeout=self.ready_timeout, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"gunicorn did not start ({exc}); see {self.log_path}") from None
        self.startup_seconds = time.monotonic() - self._started
        return self.startup_seconds

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (gunicorn's graceful stop), SIGKILL if it has not exited within timeout seconds."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> "GunicornServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        status, body, _ = fetch(self.url + path, timeout=timeout)
        return status, body

    def post_json(self, path: str, data: dict, timeout: float = 30.0) -> tuple[int, dict]:
        status, body, _ = fetch_json(self.url + path, data, timeout)
        return status, body

