"""app/semantic/slots.py and its use by the semantic service: each model run holds one of the instance's
N slots (flocks on lock files every worker shares). A query whose run waits for a slot waits in its
worker's queue (answered once a slot frees, or shed by the deadline), while text and tag search never wait.

"Another worker" is played by a second Python process that takes slots with the same code."""

from __future__ import annotations

import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

from app.semantic import encoders
from app.semantic.slots import Slots
from app.state import get_service
from support import ROOT, embed_all, make_settings, metric, wait_until

SHED = "memfit_semantic_shed_total"
SEMANTIC = {"q": "ספרים לילדים", "mode": "semantic"}
# Takes every slot of a folder with the app's own code, says so, and holds them until stdin closes.
HOLDER = """
import sys
from app.semantic.slots import Slots
slots = Slots(sys.argv[1], int(sys.argv[2]), 30.0)
held = [slots.acquire() for _ in range(slots.count)]
if not all(slot is not None and slot.fd is not None for slot in held):
    sys.exit("the holder could not take every slot")
print("holding", flush=True)
sys.stdin.read()
"""


@contextmanager
def holder(slots: Slots):
    """Another process holding every one of ``slots``' lock files while the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(slots.directory.parent), str(slots.count)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()  # blocks until the flocks are taken (or the holder died)
        if line.strip() != "holding":
            proc.stdin.close()
            pytest.fail(f"the holder process could not take the slots: {proc.stderr.read()[-500:]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=30)


def shed_count(client, reason: str) -> float:
    return metric(client.get("/metrics").get_data(as_text=True), SHED, reason=reason)


def test_a_query_waits_for_a_slot_held_by_another_process_while_text_answers(make_app, tiny_onnx):
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), SEMANTIC_MAX_INFLIGHT="1", SEMANTIC_DEADLINE_MS="60000")
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    client = app.test_client()
    assert client.get("/search", query_string=SEMANTIC).status_code == 200  # model and queue ready
    answered: dict = {}
    with holder(get_service(app).slots()):
        waiting = threading.Thread(target=lambda: answered.update(
            response=app.test_client().get("/search", query_string=SEMANTIC)))
        waiting.start()
        wait_until(get_service(app).slots().others_waiting, "the query's model thread to wait for a slot")
        # Text and tag search take no slot: they answer while the model's slots are all busy.
        for mode in ("text", "tags"):
            response = client.get("/search", query_string={"q": "ספר", "mode": mode})
            assert response.status_code == 200, (mode, response.get_data(as_text=True)[:300])
        assert waiting.is_alive() and not answered, "the query did not wait for its slot"
    waiting.join(timeout=60)  # the holder let go: the query gets the slot and is answered, not shed
    assert answered["response"].status_code == 200, answered["response"].get_data(as_text=True)[:300]


def test_past_its_handler_share_a_worker_sheds_semantic_search_at_once_and_keeps_threads_for_text(make_app, tiny_onnx):
    # Two request threads, one of which semantic search may hold (SEMANTIC_HANDLERS=1). The first search
    # waits for a slot (held by another process) for up to a minute; the second must not wait too.
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), SEMANTIC_MAX_INFLIGHT="1", SEMANTIC_DEADLINE_MS="60000",
                   GUNICORN_THREADS="2", SEMANTIC_HANDLERS="1")
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    service = get_service(app)
    assert app.test_client().get("/search", query_string=SEMANTIC).status_code == 200  # model loaded
    first: dict = {}
    with holder(service.slots()):
        waiting = threading.Thread(target=lambda: first.update(
            response=app.test_client().get("/search", query_string=SEMANTIC)))
        waiting.start()
        # The first search holds the worker's one semantic handler once the semaphore reads zero.
        wait_until(lambda: service._handlers._value == 0, "the first search to hold the handler")
        before = shed_count(app.test_client(), "handlers")
        response = app.test_client().get("/search", query_string=SEMANTIC)
        assert response.status_code == 503, response.get_data(as_text=True)[:300]
        assert response.get_json()["error"]["code"] == "overloaded"
        assert "in this worker" in response.get_json()["error"]["message"]
        assert shed_count(app.test_client(), "handlers") == before + 1
        assert response.headers.get("Retry-After", "").isdigit()
        assert waiting.is_alive(), "the first search was not waiting for its slot"
        assert app.test_client().get("/search", query_string={"q": "ספר", "mode": "text"}).status_code == 200
    waiting.join(timeout=60)  # the holder let go: the first search gets its slot and answers
    assert first["response"].status_code == 200, first["response"].get_data(as_text=True)[:300]
    assert app.test_client().get("/search", query_string=SEMANTIC).status_code == 200  # the handler is back


def test_a_slot_held_by_a_killed_process_is_free_again(make_app, tiny_onnx):
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), SEMANTIC_MAX_INFLIGHT="1", SEMANTIC_DEADLINE_MS="60000")
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    assert app.test_client().get("/search", query_string=SEMANTIC).status_code == 200
    answered: dict = {}
    with holder(get_service(app).slots()) as proc:
        waiting = threading.Thread(target=lambda: answered.update(
            response=app.test_client().get("/search", query_string=SEMANTIC)))
        waiting.start()
        wait_until(get_service(app).slots().others_waiting, "the query's model thread to wait for a slot")
        proc.kill()  # SIGKILL: no cleanup code of the holder runs; only the kernel can free the slot
        proc.wait(timeout=30)
        waiting.join(timeout=60)
    assert answered["response"].status_code == 200, answered["response"].get_data(as_text=True)[:300]


def test_with_free_slots_semantic_search_works_and_gives_its_slot_back(make_app, tiny_onnx):
    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), SEMANTIC_MAX_INFLIGHT="1")
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    embed_all(app)
    client = app.test_client()
    for query in ("ספרים לילדים", "טיול בצפון", "מתכון לעוגה"):  # one slot: each must release it
        body = client.get("/search", query_string={"q": query, "mode": "semantic"}).get_json()
        assert body.get("count") == 10, body
    slot = get_service(app).slots().acquire(timeout=0)
    assert slot is not None and slot.fd is not None, "a search kept its slot"
    slot.release()


def test_threads_of_one_process_never_hold_more_slots_than_the_bound(tmp_path):
    bound, threads = 2, 6
    slots = Slots(tmp_path, bound, timeout=60.0)
    cond = threading.Condition()
    seen = {"inside": 0, "most": 0, "missed": 0}
    holding: list[threading.Event] = []  # one gate per thread inside, opened by the main thread

    def work():
        slot = slots.acquire()
        if slot is None:
            with cond:
                seen["missed"] += 1
                cond.notify_all()
            return
        gate = threading.Event()
        with cond:
            seen["inside"] += 1
            seen["most"] = max(seen["most"], seen["inside"])
            holding.append(gate)
            cond.notify_all()
        gate.wait(60)
        with cond:
            seen["inside"] -= 1  # before the release, so a successor never overlaps in the count
        slot.release()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    # Let the threads through one at a time, each time once `bound` of them hold a slot together.
    for released in range(threads):
        with cond:
            assert cond.wait_for(lambda: len(holding) >= min(bound, threads - released) or seen["missed"], 60)
            assert not seen["missed"], "a thread got no slot within the wait"
            gate = holding.pop(0)
        gate.set()
    for thread in pool:
        thread.join(60)
    assert seen["most"] == bound, f"{seen['most']} threads held a slot at once; the bound is {bound}"


def test_slot_count_is_the_runtime_cpu_count_unless_set(tmp_path, monkeypatch):
    monkeypatch.setattr(encoders, "available_cpus", lambda: 7)
    auto = Slots.from_settings(make_settings(tmp_path))
    assert auto.count == 7 and auto.directory.parent == tmp_path / "instance"
    shared = Slots.from_settings(make_settings(tmp_path, SEMANTIC_MAX_INFLIGHT="3",
                                               PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics")))
    assert shared.count == 3 and shared.directory.parent == tmp_path / "metrics"


def test_unusable_lock_folder_leaves_semantic_work_unbounded_and_says_so(tmp_path, caplog):
    (tmp_path / "not-a-folder").write_text("")
    slots = Slots(tmp_path / "not-a-folder", 1, timeout=0)
    first, second = slots.acquire(), slots.acquire()
    assert first is not None and second is not None  # both run: no bound, but search still answers
    errors = [r for r in caplog.records if "semantic slots" in r.getMessage()]
    assert len(errors) == 1 and errors[0].levelname == "ERROR", caplog.text


def test_the_api_description_documents_the_overloaded_503(app):
    with app.test_request_context():
        from app.openapi import spec

        unavailable = spec()["paths"]["/search"]["get"]["responses"]["503"]
    assert "overloaded" in unavailable["description"] and "Retry-After" in unavailable["headers"]


@pytest.mark.parametrize("nice", [10, 0])
def test_the_model_runs_on_threads_below_request_handling(make_app, tiny_onnx, monkeypatch, nice):
    # A query's and the embedder's model runs happen on a thread SEMANTIC_NICE steps below the
    # request's own priority, so request threads pass them on a busy CPU.
    import os

    app = make_app(SEMANTIC_MODEL=str(tiny_onnx), SEMANTIC_NICE=str(nice))
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    service = get_service(app)
    with app.app_context():
        encoder = service.encoder()
    seen: list[tuple[str, int]] = []
    plain = type(encoder).encode

    def recording(self, texts, batch_size, kind="passage"):
        seen.append((kind, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return plain(self, texts, batch_size, kind=kind)

    monkeypatch.setattr(type(encoder), "encode", recording)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert embed_all(app) > 0
    assert app.test_client().get("/search", query_string=SEMANTIC).status_code == 200
    kinds = {kind for kind, _ in seen}
    assert kinds == {"query", "passage"}, seen  # the seed's vectors were embedded, then the query ran
    assert {priority for _, priority in seen} == {min(base + nice, 19)}, (base, seen)
