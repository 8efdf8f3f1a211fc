"""deploy/serve.sh, the Docker image's command: nginx in front of gunicorn. Slow clients never reach a
request thread, the rate limits still key on the client's own address, nginx's refusals are JSON, and
the pair starts, stops and fails together."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devtools.http import free_port
from support import ROOT, require, venv_bin, wait_until

SERVE = ROOT / "deploy" / "serve.sh"


class Served:
    """deploy/serve.sh on a seeded SQLite database of tmp_path, one worker with one request thread."""

    def __init__(self, tmp_path: Path, **env: str):
        require(shutil.which("nginx") is not None, "nginx is not installed (Debian's nginx-light)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = tmp_path / "run"
        database = f"sqlite:///{tmp_path / 'serve.sqlite3'}"
        self.env = {**os.environ, "PORT": str(self.port), "MEMFIT_RUN_DIR": str(self.run_dir), "DATABASE_URL": database,
                    "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "1", "ENABLE_SEMANTIC_SEARCH": "false",
                    "SEMANTIC_MODEL": str(tmp_path / "no-model"), "APP_ENV": "test",
                    "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
                    "PATH": f"{Path(venv_bin('gunicorn')).parent}:{os.environ.get('PATH', '')}", **env}
        subprocess.run([venv_bin("flask"), "--app", "app", "seed"], cwd=ROOT, env=self.env, check=True,
                       capture_output=True)
        self.log = open(tmp_path / "serve.log", "wb")
        self.proc = subprocess.Popen([str(SERVE)], cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self.status("/healthz") == 200 or self.proc.poll() is not None, "serve.sh ready")
            assert self.proc.poll() is None, (tmp_path / "serve.log").read_text()
        except BaseException:
            self.stop()
            raise

    def status(self, path: str, **kwargs) -> int:
        return self.request(path, **kwargs)[0]

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None,
                timeout: float = 30) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return 0, {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture
def served(tmp_path):
    made = []

    def make(**env):
        made.append(Served(tmp_path, **env))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def trickle(port: int, head: bytes, stop: threading.Event) -> threading.Event:
    """A client that sends head, then one more byte a second until stop: it never finishes a request.
    Returns an event set once head is sent."""
    sent = threading.Event()

    def run():
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head)
            sent.set()
            while not stop.wait(1.0):
                try:
                    sock.sendall(b"a")
                except OSError:
                    return
    threading.Thread(target=run, daemon=True).start()
    return sent


def test_slow_clients_never_hold_the_only_request_thread(served):
    server = served()
    stop = threading.Event()
    try:
        # Headers that never end, and a body that never ends: each would hold the worker's one thread.
        sent = []
        for _ in range(3):
            sent.append(trickle(server.port, b"GET /search?q=x HTTP/1.1\r\nHost: t\r\nX-Slow: ", stop))
            sent.append(trickle(server.port, b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
                                             b"\r\nContent-Length: 5000\r\n\r\n{", stop))
        wait_until(lambda: all(e.is_set() for e in sent), "the slow clients connected and sending")
        # Answered while every slow client is still sending (they go on for as long as this takes).
        status, body = server.request("/search?q=%D7%A1%D7%A4%D7%A8", timeout=20)
        assert status == 200 and body["count"] > 0
    finally:
        stop.set()


def post_from(server: Served, source: str, forwarded: str | None = None) -> int:
    """POST an item from a loopback address of our choice (all of 127/8 is this machine)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=(source, 0))
    headers = {"Content-Type": "application/json", **({"X-Forwarded-For": forwarded} if forwarded else {})}
    try:
        connection.request("POST", "/items", body=json.dumps({"title": "פריט"}).encode(), headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_write_limit_keys_on_each_clients_own_address(served):
    server = served(WRITE_RATE_LIMIT="1 per minute")
    assert post_from(server, "127.0.0.2", forwarded="198.51.100.1") == 201
    # nginx appends the real peer and serve.sh counts nginx as a trusted proxy: a forged header moves
    # nothing, and another client has a limit of its own (not one shared by everyone behind nginx).
    assert post_from(server, "127.0.0.2", forwarded="198.51.100.2") == 429
    assert post_from(server, "127.0.0.3") == 201


def test_refusals_are_json_from_nginx_and_from_the_app(served):
    server = served()
    headers = {"Content-Type": "application/json"}
    # Over nginx's own bound: refused there, in the app's JSON shape.
    status, body = server.request("/items", data=b"{" + b" " * (2 * 2**20) + b"}", headers=headers)
    assert status == 413 and body["error"]["code"] == "request_entity_too_large"
    # Over MAX_CONTENT_LENGTH but under nginx's bound: the app answers, with its limit in the message.
    status, body = server.request("/items", data=json.dumps({"title": "x" * 70_000}).encode(), headers=headers)
    assert status == 413 and "65536" in body["error"]["message"]


def test_a_stop_signal_stops_both_and_exits_cleanly(served):
    server = served()
    nginx = int((server.run_dir / "nginx.pid").read_text())
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    assert not Path(f"/proc/{nginx}").exists()
    assert server.status("/healthz", timeout=5) == 0  # nothing listens any more


def test_when_nginx_dies_gunicorn_is_stopped_and_the_script_fails(served):
    server = served()
    nginx = int((server.run_dir / "nginx.pid").read_text())
    os.kill(nginx, signal.SIGKILL)
    assert server.proc.wait(timeout=60) != 0  # the platform restarts the container
    log = Path(server.log.name).read_text()
    assert "nginx exited" in log and "Shutting down: Master" in log


def raw_exchange(port: int, data: bytes, answers: int) -> bytes:
    """Send data as is and read until answers HTTP status lines came back (or the server closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        received = b""
        while received.count(b"HTTP/1.1 ") < answers:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def test_pipelined_requests_get_one_answer_each(served):
    server = served()
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    received = raw_exchange(server.port, request * 2 + b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", 3)
    assert received.count(b"HTTP/1.1 200") == 3, received[:300]


def test_a_request_with_bare_line_feeds_is_answered(served):
    server = served()
    received = raw_exchange(server.port, b"GET /healthz HTTP/1.1\nHost: t\nConnection: close\n\n", 1)
    assert received.startswith(b"HTTP/1.1 200"), received[:300]
