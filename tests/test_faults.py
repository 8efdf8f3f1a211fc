"""Faults survived, each against real processes: a database that goes away and comes back, model files
missing, a Sentry that refuses or hangs, a request body cut off while the server reads it, chunked bodies
over the limit or with a broken framing, a worker SIGKILLed between the item row and its tags. The
mid-request faults land where they are meant to through the test-only pause point of app/api.py
(devtools/faultpoints.py), never by timing.

Every test waits on conditions, never on the clock. The figures of a passing run (faults injected and
survived, requests sent, acknowledged items lost) go to bench/results/faults.json.
"""

import json
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from devtools import faultpoints

from support import ROOT, Gunicorn, PgServerProcess, free_port, make_settings, metric, postgres_url, require

SEARCH = "/search?q=%D7%A1%D7%A4%D7%A8&mode=text"
RESULTS = ROOT / "bench" / "results" / "faults.json"
FIGURES = Counter()  # faults_injected, faults_survived, requests_sent, items_acknowledged, items_lost
BY_FAULT = Counter()  # faults survived, per kind, so that a partial run (-k) says what it counted


@pytest.fixture(scope="module", autouse=True)
def record_figures(request):
    """Write the figures after the module's tests pass; a run with a failure, or one that selected part of
    the module (-k, node ids), writes nothing: docs/reliability.md quotes the whole set's figures."""
    failed_before = request.session.testsfailed
    partial = bool(request.config.getoption("keyword")) or any("::" in arg for arg in request.config.args)
    yield
    if partial or not FIGURES["faults_injected"] or request.session.testsfailed > failed_before:
        return
    RESULTS.write_text(json.dumps({
        "faults_injected": FIGURES["faults_injected"],
        "faults_survived": FIGURES["faults_survived"],
        "by_fault": dict(sorted(BY_FAULT.items())),
        "requests_sent": FIGURES["requests_sent"],
        "items_acknowledged": FIGURES["items_acknowledged"],
        # A 201 whose item is later missing fails its test, so a written file means none was lost.
        "data_lost": FIGURES["items_lost"],
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=2) + "\n", encoding="utf-8")


# --- helpers ------------------------------------------------------------------------------------


def wait_for(condition, what: str, timeout: float = 60.0, interval: float = 0.05):
    """Poll condition until it returns something true (returned), or fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)  # poll interval between checks of the condition


def get(g, path: str, timeout: float = 30):
    FIGURES["requests_sent"] += 1
    return g.get(path, timeout)


def post_item(g, title: str, tags: list[str] | None = None, timeout: float = 30):
    FIGURES["requests_sent"] += 1
    return g.post_json("/items", {"title": title, "tags": tags if tags is not None else ["תקלה", title]}, timeout)


def safe_post(g, title: str, tags: list[str]):
    try:
        return post_item(g, title, tags, timeout=60)
    except OSError as exc:  # the connection dies with the worker
        return (None, str(exc))


class Acknowledged:
    """Items the server answered 201 for: each must still be there, whatever happened after."""

    def __init__(self):
        self.items: dict[int, str] = {}

    def add(self, answer) -> dict:
        status, body = answer
        assert status == 201, (status, body)
        self.items[body["id"]] = body["title"]
        FIGURES["items_acknowledged"] += 1
        return body

    def assert_none_lost(self, g) -> None:
        lost = []
        for item_id, title in self.items.items():
            status, body = get(g, f"/items/{item_id}")
            if status != 200 or json.loads(body)["title"] != title:
                lost.append((item_id, title, status))
        FIGURES["items_lost"] += len(lost)
        assert not lost, f"acknowledged items missing: {lost}"


def no_server_errors(log: str) -> None:
    """Neither a 5xx but the documented 503 in gunicorn's access log, nor a stack trace from the app."""
    errors = re.findall(r'"[A-Z]+ [^"]*" 5(?!03)\d\d ', log)
    assert not errors and "Traceback" not in log, errors or log[-3000:]


class FaultPoint:
    """Arms the app's fault points in a folder the server was started with (devtools/faultpoints.py)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(exist_ok=True)

    def env(self) -> dict[str, str]:
        return {faultpoints.FAULT_DIR_ENV: str(self.folder)}

    def arm(self, name: str) -> None:
        (self.folder / name).touch()

    def wait_reached(self, name: str, g) -> int:
        """The pid of the worker now paused at the point."""
        reached = self.folder / f"{name}.reached"
        wait_for(lambda: reached.exists() or g.proc.poll() is not None, f"a worker reaching {name}")
        assert g.proc.poll() is None, g.log()[-3000:]
        return int(reached.read_text())

    def release(self, name: str) -> None:
        (self.folder / f"{name}.release").touch()


def query(tmp_path: Path, database_url: str, sql: str, **params):
    """Rows of one statement against the server's database, from this process."""
    from app import create_app
    from app.db import db

    app = create_app(make_settings(tmp_path / "checker", DATABASE_URL=database_url))
    with app.app_context():
        try:
            result = db.session.execute(db.text(sql), params)
            return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            db.session.remove()
            db.engine.dispose()


def clean_postgresql(tmp_path: Path, url: str) -> None:
    """An empty database; the server's seed then migrates and loads the sample."""
    from app import create_app
    from app.db import db

    app = create_app(make_settings(tmp_path / "cleaner", DATABASE_URL=url))
    with app.app_context():
        db.drop_all()
        db.session.execute(db.text("DROP TABLE IF EXISTS alembic_version"))
        db.session.commit()
        db.session.remove()
        db.engine.dispose()


# --- the pause point itself --------------------------------------------------------------------


def test_fault_points_act_only_where_the_harness_armed_them(tmp_path):
    from app import api, create_app
    from devtools import faultpoints

    folder = tmp_path / "faults"
    folder.mkdir()
    (folder / "p").touch()  # armed
    (folder / "p.release").touch()  # so that a pause, when it happens, ends at once
    with create_app(make_settings(tmp_path)).app_context():
        api.fault_point("p")
    assert (folder / "p").exists(), "a point acted in an app the harness did not arm"
    production = create_app(make_settings(tmp_path, APP_ENV="production", SECRET_KEY="a-real-secret", WRITE_TOKEN="t"))
    with pytest.raises(RuntimeError, match="production"):
        faultpoints.install(production, folder)
    armed = faultpoints.install(create_app(make_settings(tmp_path)), folder)
    with armed.app_context():
        api.fault_point("p")
    assert not (folder / "p").exists() and (folder / "p.reached").read_text() == str(os.getpid())


# --- the database goes away and comes back -----------------------------------------------------


@pytest.mark.postgres
def test_postgres_stopped_mid_run_then_recovers_without_restart(tmp_path):
    try:
        import pgserver  # noqa: F401
    except ImportError:
        require(False, "the pgserver package is not installed")
    pg = PgServerProcess(tmp_path / "pgdata")
    uri = pg.start()
    acknowledged = Acknowledged()
    try:
        with Gunicorn(tmp_path, {"DATABASE_URL": uri}) as g:
            assert get(g, SEARCH)[0] == 200
            acknowledged.add(post_item(g, "לפני"))
            workers = g.workers()
            pg.stop()
            FIGURES["faults_injected"] += 1
            status, body = get(g, SEARCH)
            assert status == 503 and json.loads(body)["error"]["code"] == "database_unavailable"
            status, body = post_item(g, "בזמן התקלה")
            assert status == 503 and body["error"]["code"] == "database_unavailable"
            assert get(g, "/readyz")[0] == 503
            assert get(g, "/healthz")[0] == 200
            assert pg.start() == uri
            wait_for(lambda: get(g, "/readyz")[0] == 200, "/readyz answering 200 after PostgreSQL came back")
            assert get(g, SEARCH)[0] == 200
            # Recovered by itself: the same master and the same workers, their pools reconnected.
            assert g.proc.poll() is None and g.workers() == workers, (workers, g.workers())
            acknowledged.add(post_item(g, "אחרי"))
            titles = json.loads(get(g, "/search?q=%D7%AA%D7%A7%D7%9C%D7%94&mode=tags&limit=100")[1])["results"]
            assert {r["title"] for r in titles} == {"לפני", "אחרי"}  # the failed write left nothing behind
            acknowledged.assert_none_lost(g)
            no_server_errors(g.log())
            FIGURES["faults_survived"] += 1
            BY_FAULT["postgresql_stopped"] += 1
    finally:
        pg.stop()


# --- model files missing ------------------------------------------------------------------------


def test_missing_model_files_503_with_reason_other_modes_work(tmp_path):
    with Gunicorn(tmp_path, {"SEMANTIC_MODEL": str(tmp_path / "gone" / "model")}) as g:
        FIGURES["faults_injected"] += 1
        status, body = get(g, "/search?q=%D7%A1%D7%A4%D7%A8&mode=semantic")
        assert status == 503 and "neither a model folder" in json.loads(body)["error"]["message"]
        assert get(g, SEARCH)[0] == 200
        assert get(g, "/search?q=%D7%A1%D7%A4%D7%A8%D7%99%D7%9D&mode=tags")[0] == 200
        assert json.loads(get(g, "/readyz")[1])["semantic"]["state"] == "failed"
        FIGURES["faults_survived"] += 1
        BY_FAULT["model_files_missing"] += 1


# --- a Sentry that refuses connections or never answers -----------------------------------------


class HangingSentry:
    """Accepts connections and reads requests but never answers; counts the requests that reached it."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[bytes] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.held.append(conn)  # kept open, unanswered
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            head += chunk
        self.requests.append(head.split(b"\r\n", 1)[0])

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("sentry", ["refusing", "hanging"])
def test_a_failing_sentry_neither_blocks_nor_kills_and_the_watchdog_runs(tmp_path, sentry):
    hanging = HangingSentry() if sentry == "hanging" else None
    port = hanging.port if hanging else free_port()  # refusing: nothing listens there
    try:
        with Gunicorn(tmp_path, {"SENTRY_DSN": f"http://key@127.0.0.1:{port}/1", "MAX_MEMORY_MB": "16",
                                 "MEMORY_CHECK_INTERVAL": "0.2", "MEMORY_ALERT_COOLDOWN": "0"}) as g:
            workers = g.workers()
            # The watchdog sampled (its gauge) and alerted (its counter and log line): the alert is the
            # event that meets the broken Sentry, so without it this test would test nothing.
            wait_for(lambda: metric(get(g, "/metrics")[1].decode(), "memfit_memory_alerts_total") >= 1,
                     "the watchdog's memory alert")
            assert metric(get(g, "/metrics")[1].decode(), "memfit_worker_rss_bytes", pid=str(workers[0])) > 16 * 2**20
            assert "memory high: instance at" in g.log()
            FIGURES["faults_injected"] += 1
            if hanging:
                wait_for(lambda: any(b"/envelope/" in r for r in hanging.requests),
                         "the alert reaching the hanging Sentry")
            # Requests are answered while the transport is stuck (the timeout only stops a hung test).
            assert [get(g, SEARCH, timeout=30)[0] for _ in range(10)] == [200] * 10
            assert g.proc.poll() is None and g.workers() == workers, (workers, g.workers())  # no worker died
            no_server_errors(g.log())
            FIGURES["faults_survived"] += 1
            BY_FAULT[f"sentry_{sentry}"] += 1
    finally:
        if hanging:
            hanging.close()


def test_no_pii_reaches_sentry_from_a_request_or_a_thread_without_one(tmp_path):
    """An error inside a request that carries an address, a cookie and a token, and an alert sent from a
    thread (no request of its own, like the watchdog's) while that request runs: none of them in Sentry.

    The events are taken from the SDK's transport in this process (what would go over the network),
    so no network hiccup can drop one and let the check pass on fewer events."""
    import logging

    import sentry_sdk
    from sentry_sdk.transport import Transport

    from app import create_app
    from app.db import create_schema
    from monitoring import sentry as ops_sentry

    class Recording(Transport):
        def __init__(self):
            super().__init__()
            self.events: list[dict] = []

        def capture_envelope(self, envelope) -> None:
            self.events += [item.get_event() for item in envelope.items if item.get_event() is not None]

    secrets = {"ip": "198.51.100.23", "forwarded": "203.0.113.77", "cookie": "cookie-secret-7f3a",
               "token": "token-secret-91c2", "body": "item-text-secret-55ab"}
    settings = make_settings(tmp_path, SENTRY_DSN="http://publickey@127.0.0.1:9/1")  # nothing is sent there
    app = create_app(settings)
    with app.app_context():
        create_schema()

    def probe():
        thread = threading.Thread(target=ops_sentry.capture_memory_alert, name="no-request",
                                  args=("process", "memory high: probe from a thread", {"rss": 1}, settings, 1))
        thread.start()
        thread.join()
        try:
            raise RuntimeError("probe error inside a request")
        except RuntimeError:
            logging.getLogger("app.errors").exception("probe")  # how app/errors.py reports a bug
        return "ok"

    app.add_url_rule("/pii-probe", "pii_probe", probe, methods=["POST"])
    recording = Recording()
    client = sentry_sdk.get_client()
    assert client.is_active(), "SENTRY_DSN did not turn Sentry on"
    client.transport = recording
    try:
        response = app.test_client().post(  # a body like an item's: its text is the user's, not Sentry's
            "/pii-probe", json={"title": secrets["body"]}, environ_base={"REMOTE_ADDR": secrets["ip"]},
            headers={"X-Forwarded-For": secrets["forwarded"], "Cookie": f"session={secrets['cookie']}",
                     "Authorization": f"Bearer {secrets['token']}"})
    finally:
        client.close(timeout=0)
        sentry_sdk.init()  # an inactive client, so no later test reports through this one
    assert response.status_code == 200
    messages = {e.get("message") or e.get("logentry", {}).get("message") for e in recording.events}
    assert {"memory high: probe from a thread", "probe"} <= messages, messages
    sent = json.dumps(recording.events)
    leaked = [name for name, value in secrets.items() if value in sent]
    assert not leaked, f"sent to Sentry: {leaked}"


# --- a request body cut off while the server reads it -------------------------------------------


def test_body_cut_off_mid_read_writes_nothing(tmp_path):
    point = FaultPoint(tmp_path / "faults")
    acknowledged = Acknowledged()
    with Gunicorn(tmp_path, point.env(), app=faultpoints.APP) as g:
        acknowledged.add(post_item(g, "ראשון"))
        (worker,) = g.workers()
        # A body the server could parse: a whole JSON object; but the request promises 64 bytes more.
        body = json.dumps({"title": "חצי", "tags": ["א"]}).encode()
        point.arm("request-body")
        sock = socket.create_connection(("127.0.0.1", g.port))
        FIGURES["requests_sent"] += 1
        sock.sendall(b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body) + 64).encode() + b"\r\n\r\n" + body)
        assert point.wait_reached("request-body", g) == worker  # the worker is in the view, about to read
        sock.close()  # the client goes away mid-body
        FIGURES["faults_injected"] += 1
        point.release("request-body")
        # One sync worker: this request is served only once the cut one is finished.
        acknowledged.add(post_item(g, "שני"))
        assert g.workers() == [worker]  # the worker is fine: not replaced
        assert get(g, SEARCH)[0] == 200
        assert query(tmp_path, g.env["DATABASE_URL"], "SELECT id FROM items WHERE title = 'חצי'") == []
        assert re.search(r'"POST /items HTTP/1.1" 400 ', g.log()), g.log()[-3000:]  # refused, as a short body
        no_server_errors(g.log())
        acknowledged.assert_none_lost(g)
        FIGURES["faults_survived"] += 1
        BY_FAULT["body_cut_off"] += 1


# --- chunked bodies over the limit or with a broken framing --------------------------------------

# Each: the chunked body sent after the head, whether the client then stops sending, and the status.
CHUNKED_FAULTS = {
    "chunked_over_limit": (None, False, 413),  # 67 KB whose first 64 KB are, on their own, a valid item
    "chunked_bad_size": (b"zz\r\n{}\r\n0\r\n\r\n", False, 400),
    "chunked_missing_crlf": (b"2\r\n{}XX0\r\n\r\n", False, 400),
    "chunked_cut_short": (b"40\r\n{\"title\": ", True, 400),
}


def test_chunked_bodies_over_the_limit_or_broken_write_nothing_and_report_nothing(tmp_path):
    from fake_sentry import FakeSentry
    from support import chunked, raw_exchange

    title = "קטוע"
    prefix = json.dumps({"title": title, "tags": ["א"]}, ensure_ascii=False).encode()
    over = chunked(prefix + b" " * (65536 - len(prefix)) + b"x" * 3000)
    acknowledged = Acknowledged()
    with FakeSentry() as sentry, Gunicorn(tmp_path, {"GUNICORN_THREADS": "4", "SENTRY_DSN": sentry.dsn,
                                                     "SENTRY_CRON_MONITOR": "memfit-alive",
                                                     "SENTRY_CRON_INTERVAL": "5"}) as g:
        acknowledged.add(post_item(g, "לפני"))
        for fault, (body, stop, status) in CHUNKED_FAULTS.items():
            FIGURES["requests_sent"] += 1
            FIGURES["faults_injected"] += 1
            answered, _, answer = raw_exchange(g.port, b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                               b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                               + (over if body is None else body), shut_write=stop)
            assert answered == status, (fault, answered, answer)
            assert json.loads(answer)["error"]["code"] in ("request_entity_too_large", "bad_chunked_body")
            BY_FAULT[fault] += 1
        acknowledged.add(post_item(g, "אחרי"))
        # A check-in sent after the faults: an event they caused would have reached the receiver first.
        seen = len(sentry.checkins())
        wait_for(lambda: len(sentry.checkins()) > seen, "a check-in sent after the faults")
        assert query(tmp_path, g.env["DATABASE_URL"], "SELECT id FROM items WHERE title = :t", t=title) == []
        assert sentry.events() == [], sentry.events()
        no_server_errors(g.log())
        acknowledged.assert_none_lost(g)
        FIGURES["faults_survived"] += len(CHUNKED_FAULTS)


# --- a worker SIGKILLed between the item row and its tags ---------------------------------------


def test_worker_killed_mid_write_leaves_no_half_item(tmp_path, backend):
    point = FaultPoint(tmp_path / "faults")
    env = point.env()
    if backend == "postgresql":
        clean_postgresql(tmp_path, postgres_url())
        env["DATABASE_URL"] = postgres_url()
    acknowledged = Acknowledged()
    half, half_tag = "חצי-כתוב", "תג-חדש-של-חצי"
    with Gunicorn(tmp_path, env, app=faultpoints.APP) as g:
        url = g.env["DATABASE_URL"]
        acknowledged.add(post_item(g, "לפני"))
        (worker,) = g.workers()
        point.arm("item-inserted")
        answer = {}
        writer = threading.Thread(target=lambda: answer.update(r=safe_post(g, half, ["תקלה", half_tag])))
        writer.start()
        # The item row is written and its tags are not: kill there, as the OOM killer would.
        assert point.wait_reached("item-inserted", g) == worker
        os.kill(worker, signal.SIGKILL)
        FIGURES["faults_injected"] += 1
        writer.join(timeout=60)
        assert answer["r"][0] is None, answer  # the client saw the connection die: neither a 201 nor a 500
        wait_for(lambda: (w := g.workers()) and worker not in w and get(g, "/healthz")[0] == 200,
                 "a new worker serving after the kill")

        assert query(tmp_path, url, "SELECT id FROM items WHERE title = :t", t=half) == [], "half-written item"
        assert query(tmp_path, url, "SELECT id FROM tags WHERE name = :t", t=half_tag) == []
        untagged = "SELECT i.title FROM items i WHERE NOT EXISTS (SELECT 1 FROM item_tags l WHERE l.item_id = i.id)"
        assert query(tmp_path, url, untagged) == [], "items without their tags"
        orphans = "SELECT count(*) FROM item_tags WHERE item_id NOT IN (SELECT id FROM items)"
        assert query(tmp_path, url, orphans) == [(0,)]
        if backend == "sqlite":  # FTS5 compares its index with the items it was built from
            query(tmp_path, url, "INSERT INTO items_fts(items_fts) VALUES ('integrity-check')")
        else:
            assert query(tmp_path, url, "SELECT count(*) FROM items WHERE index_tsv IS NULL") == [(0,)]

        after = acknowledged.add(post_item(g, "אחרי", ["תקלה", half_tag]))
        assert after["tags"] == sorted(["תקלה", half_tag])
        results = json.loads(get(g, "/search?q=%D7%AA%D7%A7%D7%9C%D7%94&mode=tags&limit=100")[1])["results"]
        assert {r["title"] for r in results} == {"לפני", "אחרי"}
        acknowledged.assert_none_lost(g)
        no_server_errors(g.log())
        FIGURES["faults_survived"] += 1
        BY_FAULT[f"sigkill_mid_write_{backend}"] += 1


KILL_ROUNDS = 5


def test_repeated_kills_mid_write_lose_no_acknowledged_item(tmp_path, backend):
    """Two workers; round after round, writes are acknowledged, then one worker is killed mid-write: the
    other keeps answering, and at the end every acknowledged item is there and no half item is."""
    point = FaultPoint(tmp_path / "faults")
    env = {**point.env(), "WEB_CONCURRENCY": "2"}
    if backend == "postgresql":
        clean_postgresql(tmp_path, postgres_url())
        env["DATABASE_URL"] = postgres_url()
    acknowledged = Acknowledged()
    with Gunicorn(tmp_path, env, app=faultpoints.APP) as g:
        url = g.env["DATABASE_URL"]
        (seeded,) = query(tmp_path, url, "SELECT count(*) FROM items")[0]
        for round_ in range(KILL_ROUNDS):
            for n in range(3):
                acknowledged.add(post_item(g, f"נשמר {round_}-{n}"))
            workers = g.workers()
            (point.folder / "item-inserted.reached").unlink(missing_ok=True)
            (point.folder / "item-inserted.release").unlink(missing_ok=True)
            point.arm("item-inserted")
            answer = {}
            writer = threading.Thread(target=lambda: answer.update(r=safe_post(g, f"נהרג {round_}", ["נהרג"])))
            writer.start()
            victim = point.wait_reached("item-inserted", g)
            assert victim in workers
            os.kill(victim, signal.SIGKILL)
            FIGURES["faults_injected"] += 1
            writer.join(timeout=60)
            assert answer["r"][0] is None, answer
            assert get(g, SEARCH)[0] == 200  # the other worker (or the new one) answers meanwhile
            wait_for(lambda: len(w := g.workers()) == 2 and victim not in w, "the killed worker replaced")
            FIGURES["faults_survived"] += 1
            BY_FAULT[f"sigkill_mid_write_{backend}_repeated"] += 1
        acknowledged.assert_none_lost(g)
        assert query(tmp_path, url, "SELECT count(*) FROM items WHERE title LIKE 'נהרג%'") == [(0,)]
        assert query(tmp_path, url, "SELECT count(*) FROM tags WHERE name = 'נהרג'") == [(0,)]
        assert query(tmp_path, url, "SELECT count(*) FROM items") == [(seeded + len(acknowledged.items),)]
        no_server_errors(g.log())
