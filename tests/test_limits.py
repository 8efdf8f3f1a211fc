"""app/limits.py: the write limit and the failed-token limit hold for the whole instance (every worker)
and, with REDIS_URL, for every instance; a failing store never fails a request."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app import create_app
from app.limits import LocalStorage
from support import Gunicorn, make_settings, wait_until

TOKEN = "s3cret-token-for-tests"
ITEM = {"title": "פריט לבדיקה", "tags": ["בדיקה"]}


def error_code(response) -> str:
    return response.get_json()["error"]["code"]


@pytest.fixture
def make_app(tmp_path):
    """An instance on SQLite: its own database and shared folder under tmp_path/folder."""
    def make(folder: str = "one", **env):
        app = create_app(make_settings(tmp_path / folder, **env))
        with app.app_context():
            from app.db import create_schema

            create_schema()
        return app
    return make


def test_guessing_the_token_is_limited_on_the_status_page_and_on_writes(make_app):
    # The status page asks for the token in production only.
    client = make_app(WRITE_TOKEN=TOKEN, AUTH_FAILURE_LIMIT="3 per minute", APP_ENV="production",
                      SECRET_KEY="a-production-secret-key-for-tests").test_client()
    guesser, other = {"REMOTE_ADDR": "10.0.0.1"}, {"REMOTE_ADDR": "10.0.0.2"}
    wrong = {"Authorization": "Bearer guess"}
    assert [client.get("/status", headers=wrong, environ_base=guesser).status_code for _ in range(2)] == [401, 401]
    assert client.post("/items", json=ITEM, headers=wrong, environ_base=guesser).status_code == 401
    # Three failures on any guarded path: the fourth try is refused, the right token included.
    refused = client.get("/status", headers={"Authorization": f"Bearer {TOKEN}"}, environ_base=guesser)
    assert refused.status_code == 429 and error_code(refused) == "rate_limited"
    assert "failed token checks" in refused.get_json()["error"]["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert client.post("/items", json=ITEM, headers={"Authorization": f"Bearer {TOKEN}"},
                       environ_base=guesser).status_code == 429
    # Successes cost nothing, and another address is not concerned.
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert all(client.get("/status", headers=right, environ_base=other).status_code == 200 for _ in range(5))
    assert client.post("/items", json=ITEM, headers=right, environ_base=other).status_code == 201


def test_a_write_that_is_answered_carries_no_retry_after(make_app):
    client = make_app(WRITE_RATE_LIMIT="1 per minute").test_client()
    created = client.post("/items", json=ITEM)
    assert created.status_code == 201 and "Retry-After" not in created.headers
    assert "Retry-After" in client.post("/items", json=ITEM).headers


def test_the_instance_file_counts_for_every_process(tmp_path):
    """Two storages on one file, as two workers have: one count, and a window that ends starts again."""
    path = tmp_path / "limits.sqlite3"
    one, two = LocalStorage(f"memfit-local://{path}"), LocalStorage(f"memfit-local://{path}")
    assert [one.incr("k", 60), two.incr("k", 60), one.incr("k", 60)] == [1, 2, 3]
    assert two.get("k") == 3 and 59 < two.get_expiry("k") - time.time() <= 60
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: (one if _ % 2 else two).incr("k", 60), range(40)))
    assert one.get("k") == 43
    # An ended window (expiry in the past) restarts at the amount, not at the old count plus it.
    one._one("UPDATE counters SET expires = ?", (time.time() - 1,))
    assert one.get("k") == 0 and two.incr("k", 60) == 1
    two.clear("k")
    assert one.get("k") == 0 and one.check()


def test_a_process_counts_through_one_connection_whatever_its_threads(tmp_path, monkeypatch):
    """A worker's request threads share one connection (each of its own held a page cache); a forked
    child opens its own, even when a thread of the parent held the connection's lock at the fork; a
    thread that cannot get the connection in time gets the storage's error (Flask-Limiter then counts
    in memory) instead of queueing."""
    import sqlite3
    import threading

    from app import limits

    opened, connect = [], sqlite3.connect
    monkeypatch.setattr(limits.sqlite3, "connect", lambda *a, **k: opened.append(1) or connect(*a, **k))
    storage = LocalStorage(f"memfit-local://{tmp_path / 'limits.sqlite3'}")
    together = threading.Barrier(16, timeout=30)

    def write(_):
        together.wait()  # all sixteen at once, as a worker's threads under load
        return [storage.incr("k", 60) for _ in range(5)]

    with ThreadPoolExecutor(16) as pool:
        counts = sorted(n for batch in pool.map(write, range(16)) for n in batch)
    assert counts == list(range(1, 81)) and len(opened) == 1

    blocked = ThreadPoolExecutor(1)  # a thread, so that a wait without end fails the test instead of hanging it
    storage._lock.acquire()  # as a request thread holding it when the worker forks
    try:
        pid = os.fork()
        if pid == 0:  # the child: its own lock and connection; the parent's stay the parent's
            ok = storage.incr("k", 60) == 81 and len(opened) == 2
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        monkeypatch.setattr(limits, "LOCK_WAIT_S", 0.05)
        with pytest.raises(sqlite3.OperationalError, match="busy"):
            blocked.submit(storage.incr, "k", 60).result(timeout=30)  # the lock is still held: an error, not a wait
    finally:
        storage._lock.release()
        blocked.shutdown(wait=False)
    assert storage.incr("k", 60) == 82 and len(opened) == 1  # the parent's connection, untouched


def test_under_gunicorn_two_workers_give_the_limit_once(tmp_path):
    with Gunicorn(tmp_path, {"WEB_CONCURRENCY": "2", "WRITE_RATE_LIMIT": "5 per minute"}) as g:
        wait_until(lambda: len(g.workers()) == 2, "two workers")
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(lambda _: g.post_json("/items", ITEM)[0], range(24)))
    assert sorted(statuses) == [201] * 5 + [429] * 19, statuses


# --- Redis ---------------------------------------------------------------------------------------


def test_with_redis_two_instances_share_one_limit(make_app, redis_url):
    url, _ = redis_url
    # Two instances: their own databases and shared folders, one Redis.
    first = make_app("first", REDIS_URL=url, WRITE_RATE_LIMIT="3 per minute").test_client()
    second = make_app("second", REDIS_URL=url, WRITE_RATE_LIMIT="3 per minute").test_client()
    statuses = [first.post("/items", json=ITEM).status_code, second.post("/items", json=ITEM).status_code,
                first.post("/items", json=ITEM).status_code, second.post("/items", json=ITEM).status_code]
    assert statuses == [201, 201, 201, 429]


def test_a_redis_that_goes_away_never_fails_a_request(make_app, redis_url):
    url, proc = redis_url
    client = make_app(REDIS_URL=url, WRITE_RATE_LIMIT="2 per minute").test_client()
    assert client.post("/items", json=ITEM).status_code == 201
    proc.kill()
    proc.wait()
    # Counted in the worker's memory meanwhile: still answered, still limited, never a 500.
    statuses = [client.post("/items", json=ITEM).status_code for _ in range(4)]
    assert 500 not in statuses and statuses[0] == 201 and statuses[-1] == 429, statuses
    assert client.get("/search", query_string={"q": "x"}).status_code == 200
