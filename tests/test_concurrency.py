"""Turns to run (app/concurrency.py): at most N requests of a worker compute at once; a body is read,
and a semantic query waits for the model, without holding one."""

from __future__ import annotations

import io
import threading
import time

import pytest

from app.concurrency import Gate, released
from app.semantic.queue import ModelQueue

WAIT = 30  # seconds: a bound for waits on conditions that hold within milliseconds when the code is right


class Probe:
    """A WSGI app that records how many requests run in it at once and holds each until let go."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.entered = threading.Semaphore(0)
        self.go = threading.Event()
        self.bodies: list[bytes] = []

    def __call__(self, environ, start_response):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.entered.release()
        try:
            self.bodies.append(environ["wsgi.input"].read())
            assert self.go.wait(WAIT)
        finally:
            with self.lock:
                self.running -= 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]


def waiting() -> float:
    from monitoring import metrics

    return metrics.requests_waiting_turn._value.get()


def wait_for(condition, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def call(app, body: bytes = b"", stream=None) -> threading.Thread:
    environ = {"REQUEST_METHOD": "POST" if body or stream else "GET", "CONTENT_LENGTH": str(len(body)) if body else "",
               "wsgi.input": stream or io.BytesIO(body)}
    if stream is not None:
        environ["CONTENT_LENGTH"] = str(stream.length)
    thread = threading.Thread(target=lambda: list(app(environ, lambda *a: None)), daemon=True)
    thread.start()
    return thread


def test_at_most_the_turns_run_at_once_and_the_others_follow():
    probe = Probe()
    gate = Gate(probe, turns=2, max_body=1024)
    threads = [call(gate, f"body {i}".encode()) for i in range(5)]
    for _ in range(2):
        assert probe.entered.acquire(timeout=WAIT)
    assert wait_for(lambda: waiting() == 3), waiting()  # the three others wait, counted for /metrics
    assert probe.running == 2
    probe.go.set()
    for thread in threads:
        thread.join(WAIT)
        assert not thread.is_alive()
    assert probe.most == 2 and waiting() == 0
    assert sorted(probe.bodies) == sorted(f"body {i}".encode() for i in range(5))  # every body whole


class SlowBody(io.RawIOBase):
    """A client sending its body slowly: the first bytes, then nothing until released."""

    def __init__(self, data: bytes):
        self.data, self.length, self.sent = data, len(data), 0
        self.more = threading.Event()
        self.reading = threading.Event()

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.sent == 0:
            n = 3
        else:
            self.reading.set()
            assert self.more.wait(WAIT)
            n = len(buffer)
        chunk = self.data[self.sent : self.sent + min(n, len(buffer))]
        buffer[: len(chunk)] = chunk
        self.sent += len(chunk)
        return len(chunk)


def test_a_slow_upload_holds_no_turn():
    probe = Probe()
    probe.go.set()
    gate = Gate(probe, turns=1, max_body=1024)
    slow = SlowBody(b'{"title": "slow"}')
    uploader = call(gate, stream=slow)
    assert slow.reading.wait(WAIT)  # stuck in its body
    quick = call(gate)
    quick.join(WAIT)
    assert not quick.is_alive(), "a request waited for a client still sending its body"
    slow.more.set()
    uploader.join(WAIT)
    assert not uploader.is_alive()
    assert b'{"title": "slow"}' in probe.bodies


def test_a_body_cut_short_reaches_the_app_with_its_error():
    class Broken(io.RawIOBase):
        length = 100

        def readable(self):
            return True

        def readinto(self, buffer):
            raise ConnectionResetError("the client went away")

    seen = {}

    def app(environ, start_response):
        try:
            environ["wsgi.input"].read()
        except ConnectionResetError as exc:
            seen["error"] = str(exc)
        start_response("400 Bad Request", [])
        return [b""]

    call(Gate(app, turns=1, max_body=1024), stream=Broken()).join(WAIT)
    assert seen == {"error": "the client went away"}


def test_a_body_over_the_limit_is_left_for_the_app_to_refuse():
    read = []

    class Counting(io.BytesIO):
        length = 4096

        def read(self, *args):
            read.append(args)
            return super().read(*args)

    def app(environ, start_response):
        start_response("413 Request Entity Too Large", [])
        return [b""]

    call(Gate(app, turns=1, max_body=1024), stream=Counting(b"x" * 4096)).join(WAIT)
    assert read == []


def test_a_query_waiting_for_the_model_gives_its_turn_to_others():
    model_busy, model_go = threading.Event(), threading.Event()

    def encode(texts, batch_size, kind="query"):
        model_busy.set()
        assert model_go.wait(WAIT)
        return [[1.0] for _ in texts]

    queue = ModelQueue(encode, slots=None, max_batch=4, deadline_s=60.0)
    answered = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/semantic":
            queue.encode_query("שאלה")
        answered.set() if environ["PATH_INFO"] == "/text" else None
        start_response("200 OK", [])
        return [b""]

    gate = Gate(app, turns=1, max_body=1024)
    semantic = threading.Thread(target=lambda: list(gate({"PATH_INFO": "/semantic", "wsgi.input": io.BytesIO()},
                                                         lambda *a: None)), daemon=True)
    semantic.start()
    assert model_busy.wait(WAIT)
    text = threading.Thread(target=lambda: list(gate({"PATH_INFO": "/text", "wsgi.input": io.BytesIO()},
                                                     lambda *a: None)), daemon=True)
    text.start()
    assert answered.wait(WAIT), "a text request waited for a semantic query's model run"
    model_go.set()
    semantic.join(WAIT)
    assert not semantic.is_alive()


def test_released_without_a_turn_is_a_no_op():
    with released():
        pass


@pytest.mark.parametrize("value, turns", [("0", 0), ("4", 4)])
def test_the_setting_puts_the_gate_in_front_of_the_app(value, turns, tmp_path):
    from app import create_app
    from app.settings import Settings

    settings = Settings.from_env({"REQUEST_CONCURRENCY": value, "DATABASE_URL": f"sqlite:///{tmp_path}/t.sqlite3",
                                  "ENABLE_SEMANTIC_SEARCH": "false"}, instance_path=str(tmp_path))
    app = create_app(settings)
    assert (app.wsgi_app.turns if isinstance(app.wsgi_app, Gate) else 0) == turns


def queued(turns) -> int:
    return len(turns._quick) + len(turns._slow)


def waiter(turns, quick: bool, order: list, name: str) -> threading.Thread:
    def run():
        turns.take(quick)
        order.append(name)
        turns.give()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_quick_reads_pass_slower_requests_waiting_for_a_turn():
    from app.concurrency import Turns

    turns, order = Turns(1), []
    turns.take(quick=False)  # the one turn, held
    threads = [waiter(turns, False, order, "create")]
    assert wait_for(lambda: queued(turns) == 1)
    threads.append(waiter(turns, True, order, "text"))
    assert wait_for(lambda: queued(turns) == 2)
    turns.give()
    for thread in threads:
        thread.join(WAIT)
    assert order == ["text", "create"]


def test_a_slower_request_passed_for_long_enough_goes_next():
    from app import concurrency
    from app.concurrency import Turns

    now = [100.0]
    turns, order = Turns(1, clock=lambda: now[0]), []
    turns.take(quick=False)
    threads = [waiter(turns, False, order, "create")]
    assert wait_for(lambda: queued(turns) == 1)
    threads.append(waiter(turns, True, order, "text"))
    assert wait_for(lambda: queued(turns) == 2)
    now[0] += concurrency.PASS_LIMIT_S
    turns.give()
    for thread in threads:
        thread.join(WAIT)
    assert order == ["create", "text"]


@pytest.mark.parametrize("method, path, query, quick", [
    ("GET", "/search", "q=x&mode=text", True), ("GET", "/search", "q=x", True), ("GET", "/search", "mode=tags&q=x", True),
    ("GET", "/search", "q=x&mode=semantic", False), ("GET", "/search", "q=x&mode=hybrid", False),
    ("POST", "/items", "", False), ("GET", "/items/3", "", True), ("GET", "/healthz", "", True)])
def test_which_requests_are_quick_reads(method, path, query, quick):
    from app.concurrency import _quick

    assert _quick({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query}) is quick


def test_a_query_back_from_the_model_passes_slower_requests():
    """Its first turn was a slow one; the one it asks for after the model wait is a quick one."""
    model_go = threading.Event()
    order: list[str] = []

    def encode(texts, batch_size, kind="query"):
        assert model_go.wait(WAIT)
        return [[1.0] for _ in texts]

    queue = ModelQueue(encode, slots=None, max_batch=4, deadline_s=60.0)
    gate = Gate(lambda environ, start_response: [b""], turns=1, max_body=1024)
    gate._take(quick=False)  # the one turn, held by a request computing
    semantic = threading.Thread(target=lambda: (gate._take(quick=False), queue.encode_query("שאלה"),
                                                order.append("semantic"), gate._give()), daemon=True)
    semantic.start()
    assert wait_for(lambda: queued(gate._turns) == 1)
    gate._give()  # the semantic request gets the turn, then gives it back while the model runs
    assert wait_for(lambda: queue.depth() == 0 and queued(gate._turns) == 0)
    gate._take(quick=False)  # a computing request holds the turn again
    create = waiter(gate._turns, False, order, "create")
    assert wait_for(lambda: queued(gate._turns) == 1)
    model_go.set()  # the query comes back from the model and asks for a turn
    assert wait_for(lambda: queued(gate._turns) == 2)
    gate._give()
    semantic.join(WAIT)
    create.join(WAIT)
    assert order == ["semantic", "create"]
