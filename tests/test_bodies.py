"""app/bodies.py: a request body is whole or refused, chunked or not. In process for the reading itself,
and through real gunicorn with raw sockets for the framings no HTTP client sends (a chunk size that is
not hexadecimal, a chunk without its CRLF, a body that stops before its last chunk)."""

import io
import json
import sqlite3

import pytest

from fake_sentry import FakeSentry
from support import Gunicorn, chunked, raw_exchange, wait_until
from test_api import error_of

TOKEN = "t" * 32
LIMIT = 65536  # MAX_CONTENT_LENGTH's default


def whole_json_prefix(total: int, title: str) -> bytes:
    """A body of total bytes whose first LIMIT bytes are, on their own, a valid item."""
    item = json.dumps({"title": title, "body": "א" * 2000}, ensure_ascii=False).encode()
    return item + b" " * (LIMIT - len(item)) + b'{"title": "the rest"}' * ((total - LIMIT) // 21 + 1)


# --- in process -----------------------------------------------------------------------------------


def post_stream(client, stream, **headers):
    return client.post("/items", input_stream=stream, content_type="application/json",
                       headers={"Transfer-Encoding": "chunked", **headers},
                       environ_overrides={"wsgi.input_terminated": True})


def test_a_streamed_body_within_the_limit_is_read_whole(client):
    body = json.dumps({"title": "בזרם", "body": "ב" * 5000}, ensure_ascii=False).encode()
    created = post_stream(client, io.BytesIO(body))
    assert created.status_code == 201, created.data[:300]
    assert created.get_json()["body"] == "ב" * 5000


def test_a_streamed_body_over_the_limit_is_413_and_nothing_is_written(client):
    response = post_stream(client, io.BytesIO(whole_json_prefix(67 * 1024, "קידומת")))
    assert "65536" in error_of(response, 413)["message"]
    assert client.get("/search", query_string={"q": "קידומת"}).get_json()["count"] == 0


def test_a_content_length_over_the_limit_is_413_on_any_endpoint(client):
    response = client.get("/healthz", data=b"x" * (LIMIT + 1))
    assert error_of(response, 413)["code"] == "request_entity_too_large"


def test_a_framing_error_is_a_400_naming_it_and_one_warning(client, caplog):
    from gunicorn.http.errors import InvalidChunkSize

    class Broken(io.BytesIO):  # seekable, as the test client wants; every read meets the bad chunk
        def read(self, _size=-1):
            raise InvalidChunkSize(b"zz")

    body = error_of(post_stream(client, Broken()), 400)
    assert body["code"] == "bad_chunked_body"
    assert "chunk size is not a hexadecimal number" in body["message"] and "zz" in body["message"]
    records = [r for r in caplog.records if r.name == "app.bodies"]
    assert [(r.levelname, r.exc_info) for r in records] == [("WARNING", None)]


# --- through gunicorn -------------------------------------------------------------------------------

HEAD = (b"POST /items HTTP/1.1\r\nHost: memfit\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")


def request(head: bytes, body: bytes) -> bytes:
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + body


@pytest.fixture(scope="module")
def sentry():
    with FakeSentry() as fake:
        yield fake


@pytest.fixture(scope="module")
def served(tmp_path_factory, sentry):
    tmp = tmp_path_factory.mktemp("bodies")
    # A check-in every 5 s: the transport sends in order, so one that arrives after the bad requests
    # proves that any event they caused would have arrived before it.
    with Gunicorn(tmp, {"WRITE_TOKEN": TOKEN, "GUNICORN_THREADS": "4", "SENTRY_DSN": sentry.dsn,
                        "SENTRY_CRON_MONITOR": "memfit-alive", "SENTRY_CRON_INTERVAL": "5"}) as g:
        yield g


def items_titled(g, title: str) -> int:
    path = g.env["DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM items WHERE title = ?", (title,)).fetchone()[0]


def test_a_chunked_item_within_the_limit_is_created(served):
    body = json.dumps({"title": "מקוטע", "body": "ג" * 5000}, ensure_ascii=False).encode()
    status, _, answer = raw_exchange(served.port, request(HEAD, chunked(body, size=1000)))
    assert status == 201, answer
    assert json.loads(answer)["body"] == "ג" * 5000 and items_titled(served, "מקוטע") == 1


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_body_over_the_limit_is_413_and_writes_nothing(served, framing):
    title = f"קידומת-{framing}"
    body = whole_json_prefix(67 * 1024, title)
    if framing == "chunked":
        data = request(HEAD, chunked(body))
    else:
        data = HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
    status, _, answer = raw_exchange(served.port, data)
    assert status == 413, answer[:300]
    assert json.loads(answer)["error"]["code"] == "request_entity_too_large"
    assert items_titled(served, title) == 0


# Each a way the chunked framing breaks, with the words the answer must say.
BROKEN = {
    "chunk size not hexadecimal": (b"zz\r\n{}\r\n0\r\n\r\n", False, "chunk size is not a hexadecimal number"),
    "chunk without its CRLF": (b"2\r\n{}XX0\r\n\r\n", False, "not followed by CRLF"),
    "body stops before its last chunk": (b"10\r\n{\"title\": ", True, "ended before its last chunk"),
    "malformed trailer field": (b"2\r\n{}\r\n0\r\n\x00\r\n\r\n", False, "trailer field after the last chunk"),
}


@pytest.mark.parametrize("path", ["/healthz", "/items (no token)", "/items"])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_chunked_body_is_a_400_naming_the_problem(served, path, case):
    framing, stop, words = BROKEN[case]
    if path == "/healthz":
        head = b"GET /healthz HTTP/1.1\r\nHost: memfit\r\n"
    elif path == "/items (no token)":
        head = b"POST /items HTTP/1.1\r\nHost: memfit\r\nContent-Type: application/json\r\n"
    else:
        head = HEAD
    status, headers, answer = raw_exchange(served.port, request(head, framing), shut_write=stop)
    assert status == 400, answer
    error = json.loads(answer)["error"]
    assert error["code"] == "bad_chunked_body" and words in error["message"], error
    assert headers.get("connection") == "close"  # where the next request would start is unknown


def test_a_chunked_body_that_is_not_json_is_a_400_naming_it(served):
    status, _, answer = raw_exchange(served.port, request(HEAD, chunked(b'{"title": "x",')))
    assert status == 400
    error = json.loads(answer)["error"]
    assert error["code"] == "bad_json" and "not valid JSON" in error["message"], error


def test_a_broken_tail_past_the_limit_is_413_without_a_traceback(served):
    # Refused at the limit; gunicorn then discards what is left (well past what it reads ahead) and meets
    # the broken chunk there, after the answer.
    data = request(HEAD, chunked(whole_json_prefix(LIMIT + 20000, "זנב"))[:-5] + b"zz\r\n\r\n")
    status, _, answer = raw_exchange(served.port, data)
    assert status == 413, answer
    assert items_titled(served, "זנב") == 0


def test_client_faults_leave_no_traceback_and_no_sentry_event(served, sentry):
    # Last in the module: every broken body above has been answered by now.
    seen = len(sentry.checkins())
    wait_until(lambda: len(sentry.checkins()) > seen, "a check-in sent after the broken requests")
    log = served.log()
    assert "Traceback" not in log and "[ERROR]" not in log, log[-3000:]
    assert sentry.events() == [], [e.get("exception", e.get("logentry")) for e in sentry.events()]
