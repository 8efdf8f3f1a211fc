"""Two instances against one database, as a deployment that outgrew one runs: two gunicorn instances
behind HAProxy (Debian's), one PostgreSQL with pgvector (pgserver), Redis for the rate limits.

The release runs once however many start it; a write on one instance is found by text and by meaning
on the other (vectors live in the database; one background embedder for both, by advisory lock); the
write limit is one for the deployment; and one instance restarted under load fails no request: HAProxy
stops sending to it when it stops listening and resends what it could not deliver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import urllib.parse

import pytest

from devtools.gunicorn import GunicornServer
from devtools.http import fetch, fetch_json, free_port, wait_http
from support import ROOT, metric, require, venv_bin, wait_until

pytestmark = pytest.mark.postgres

HAPROXY = """
global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # A request that found no listener, or an instance that closed without answering, is sent again,
    # to the other instance (redispatch); the body is buffered so that a POST can be resent too.
    retries 3
    option redispatch 1
    option http-buffer-request
    retry-on conn-failure empty-response
    http-reuse never
frontend web
    bind 127.0.0.1:{port}
    default_backend app
backend app
    balance roundrobin
    option httpchk GET /readyz
    # A stopped instance is found by the requests it refuses (resent, above) before the checks mark
    # it down; a check slowed by load must not take the last instance out.
    timeout check 2s
    default-server inter 300ms fall 3 rise 2
    server a 127.0.0.1:{a} check
    server b 127.0.0.1:{b} check
"""


@pytest.fixture
def database(pgvector_url):
    """A fresh database on the session's pgvector server."""
    from sqlalchemy import create_engine, text

    name = f"memfit_two_{os.getpid()}"
    url = pgvector_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    parts = urllib.parse.urlsplit(url)
    admin.dispose()
    # Not dropped afterwards: pgserver's PostgreSQL (a session's throwaway server) closed every
    # connection on DROP DATABASE here now and then, which took the later pgvector tests down with it.
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def instance_env(tmp_path, name: str, database: str, redis: str, model) -> dict[str, str]:
    return {**os.environ, "APP_ENV": "test", "DATABASE_URL": database, "REDIS_URL": redis,
            "SEMANTIC_MODEL": str(model), "WEB_CONCURRENCY": "2", "WRITE_RATE_LIMIT": "5 per minute",
            "SEMANTIC_EMBED_INTERVAL": "0.1", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{name}")}


def text_requests(server: GunicornServer) -> float:
    """Text searches this instance answered since it started (its metrics folder starts empty)."""
    status, body = server.get("/metrics")
    return metric(body.decode(), "memfit_requests_total", mode="text") if status == 200 else 0.0


def semantic_ids(url: str, query: str) -> set[int]:
    status, body, _ = fetch_json(f"{url}/search?" + urllib.parse.urlencode({"q": query, "mode": "semantic",
                                                                             "limit": 100}))
    return {r["id"] for r in body.get("results", [])} if status == 200 else set()


def test_two_instances_behind_a_proxy_share_one_database(tmp_path, database, redis_url, tiny_onnx):
    haproxy = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None)
    require(haproxy is not None, "haproxy is not installed (Debian's haproxy)")
    redis, _ = redis_url
    envs = {name: instance_env(tmp_path, name, database, redis, tiny_onnx) for name in ("a", "b")}

    # Both instances' release steps start at once, as two deploys might: one does the work.
    releases = [subprocess.Popen([venv_bin("flask"), "--app", "app", "release"], cwd=ROOT, env=envs[name],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in envs]
    said = [proc.communicate(timeout=300)[0] for proc in releases]
    assert all(proc.returncode == 0 for proc in releases), said
    assert sum("schema: empty ->" in out for out in said) == 1, said
    assert sum("nothing to migrate" in out for out in said) == 1, said

    a = GunicornServer(envs["a"], tmp_path / "a.log", ready_timeout=120)
    b = GunicornServer(envs["b"], tmp_path / "b.log", ready_timeout=120)
    port = free_port()
    (tmp_path / "haproxy.cfg").write_text(HAPROXY.format(port=port, a=a.port, b=b.port))
    proxy = None
    with a, b:
        try:
            proxy = subprocess.Popen([haproxy, "-f", str(tmp_path / "haproxy.cfg"), "-db"], stdout=subprocess.DEVNULL,
                                     stderr=open(tmp_path / "haproxy.log", "wb"))
            front = f"http://127.0.0.1:{port}"
            wait_http(front + "/readyz", timeout=30, proc=proxy)

            # A write on one instance, found by text and by meaning on the other.
            status, item, _ = fetch_json(f"{a.url}/items", {"title": "אופניים חשמליים למכירה", "tags": ["תחבורה"]})
            assert status == 201, item
            status, found, _ = fetch_json(f"{b.url}/search?" + urllib.parse.urlencode({"q": "אופניים"}))
            assert status == 200 and item["id"] in [r["id"] for r in found["results"]]
            wait_until(lambda: item["id"] in semantic_ids(b.url, "רכיבה על אופניים"), "the item found by meaning on b")

            # The write limit is the deployment's: 5 per minute in all, whichever instance answers.
            statuses = [fetch_json(f"{url}/items", {"title": f"פריט {n}"})[0]
                        for n, url in enumerate([a.url, b.url, a.url, b.url, a.url])]
            assert statuses == [201, 201, 201, 201, 429], statuses

            # Load through the proxy while instance a stops (gracefully) and starts again.
            failures: list[tuple[int | str, str]] = []
            answered = [0]
            stop = threading.Event()

            def load():
                while not stop.is_set():
                    for query in ("אופניים", "פריט"):
                        try:
                            status, _, _ = fetch(f"{front}/search?" + urllib.parse.urlencode({"q": query}),
                                                 timeout=30)
                        except OSError as exc:  # a connection the proxy dropped: as failed as a 502
                            status = type(exc).__name__
                        answered[0] += 1
                        if status != 200:
                            failures.append((status, query))

            workers = [threading.Thread(target=load) for _ in range(4)]
            for worker in workers:
                worker.start()
            try:
                wait_until(lambda: answered[0] >= 50, "load flowing through the proxy")
                a.stop(timeout=60)
                before = answered[0]
                wait_until(lambda: answered[0] >= before + 50, "load served by b alone")
                a.start()
                a.wait_ready()
                wait_until(lambda: text_requests(a) > 0, "a answering the proxy's requests again")
                after = answered[0]
                wait_until(lambda: answered[0] >= after + 50, "load after the restart")
            finally:
                stop.set()
                for worker in workers:
                    worker.join(timeout=60)
            assert failures == [], failures[:10]
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait(timeout=30)
