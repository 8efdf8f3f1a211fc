"""SEMANTIC_WARM: a new gunicorn worker loads the model and answers one query before it takes requests,
so a recycled worker's first semantic user pays no model load. Real gunicorn, tiny
ONNX model; the lazy default is tests/test_lazy.py's."""

import json

from support import Gunicorn, wait_until


def readyz_state(g: Gunicorn) -> str:
    status, body = g.get("/readyz")
    return json.loads(body)["semantic"]["state"]


def test_every_new_worker_has_the_model_before_its_first_request(tmp_path, tiny_onnx):
    # max_requests 2: requests 1-2 reach the first worker, request 3 its replacement (one worker).
    env = {"SEMANTIC_MODEL": str(tiny_onnx), "SEMANTIC_WARM": "true",
           "GUNICORN_MAX_REQUESTS": "2", "GUNICORN_MAX_REQUESTS_JITTER": "0"}
    with Gunicorn(tmp_path, env) as g:
        first = g.workers()
        states = [readyz_state(g) for _ in range(3)]
        replacement = g.workers()
        log = g.log()
    assert replacement != first, "the first worker was not recycled"
    # /readyz never loads the model itself: "loaded" on a worker's first request means the warm-up did.
    assert states == ["loaded"] * 3
    assert log.count("semantic model loaded") >= 2


def test_warm_is_off_by_default_so_the_model_stays_lazy(tmp_path, tiny_onnx):
    with Gunicorn(tmp_path, {"SEMANTIC_MODEL": str(tiny_onnx)}) as g:
        assert readyz_state(g) == "not_loaded"


def test_warm_with_semantic_search_disabled_loads_nothing(tmp_path, tiny_onnx):
    env = {"SEMANTIC_MODEL": str(tiny_onnx), "SEMANTIC_WARM": "true", "ENABLE_SEMANTIC_SEARCH": "false"}
    with Gunicorn(tmp_path, env) as g:
        assert readyz_state(g) == "disabled"
        (worker,) = g.workers()
        maps = open(f"/proc/{worker}/maps").read()
    assert "onnxruntime" not in maps


def test_a_model_that_cannot_load_does_not_stop_the_worker(tmp_path):
    # Gunicorn's default SEMANTIC_MODEL is a folder that does not exist.
    with Gunicorn(tmp_path, {"SEMANTIC_WARM": "true"}) as g:
        status, body = g.get("/search?q=%D7%A1%D7%A4%D7%A8&mode=text")
        state = readyz_state(g)
        log = g.log()
    assert status == 200 and json.loads(body)["count"] > 0
    assert state == "failed"
    assert "semantic warm-up did not complete" in log


def test_the_first_scrape_counts_every_worker_that_has_the_model(tmp_path, tiny_onnx):
    from support import metric

    with Gunicorn(tmp_path, {"SEMANTIC_MODEL": str(tiny_onnx), "SEMANTIC_WARM": "true", "WEB_CONCURRENCY": "2"}) as g:
        workers = g.workers()
        # Each worker warms before it accepts: the second may still be loading when the first answers.
        # Health checks until both have answered one (the access log names the pid), then the first scrape.
        wait_until(lambda: g.get("/healthz")[0] == 200 and all(f"pid=<{pid}>" in g.log() for pid in workers),
                   "both workers warm and answering")
        status, body = g.get("/metrics")  # the first scrape: it lands on one of the two workers
    assert status == 200
    text = body.decode()
    loaded = {pid: metric(text, "memfit_semantic_model_loaded", pid=str(pid)) for pid in workers}
    assert loaded == {pid: 1.0 for pid in workers}, loaded
