"""The fully lazy model, checked in fresh processes (the test process itself has torch loaded)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from support import ROOT, Gunicorn

HEAVY = ("torch", "transformers", "sentence_transformers", "onnxruntime", "numpy", "sklearn", "scipy")

SCRIPT = textwrap.dedent("""
    import json, sys
    from app import create_app
    app = create_app()
    client = app.test_client()
    app.test_cli_runner().invoke(args=["seed"])
    statuses = []
    for q, mode in {requests!r}:
        statuses.append(client.get("/search", query_string={{"q": q, "mode": mode}}).status_code)
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
    print(json.dumps({{"statuses": statuses, "loaded": loaded,
                      "semantic": client.get("/readyz").get_json()["semantic"]["state"]}}))
""")


def run_app(tmp_path, requests, **env):
    # The child runs in tmp_path (its instance folder lands there) and imports this tree's app.
    full_env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'lazy.sqlite3'}", "PYTHONPATH": str(ROOT), **env}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(requests=requests, heavy=HEAVY)],
                         env=full_env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_text_and_tag_search_import_no_model_library(tmp_path):
    result = run_app(tmp_path, [("ספר", "text"), ("ספרים", "tags")])
    assert result["statuses"] == [200, 200]
    assert result["loaded"] == [], f"imported before any semantic request: {result['loaded']}"
    assert result["semantic"] == "not_loaded"


def test_disabled_semantic_search_is_503_and_never_imports_torch(tmp_path):
    result = run_app(tmp_path, [("ספר", "semantic"), ("ספר", "text")], ENABLE_SEMANTIC_SEARCH="false")
    assert result["statuses"] == [503, 200]
    assert "torch" not in result["loaded"] and result["semantic"] == "disabled"


def test_the_unprepared_default_model_is_503_and_imports_no_model_library(tmp_path):
    from app.settings import DEFAULT_MODEL

    result = run_app(tmp_path, [("ספר", "semantic"), ("ספר", "text")], SEMANTIC_MODEL=DEFAULT_MODEL)
    assert result["statuses"] == [503, 200] and result["semantic"] == "failed"
    assert result["loaded"] == [], f"imported to refuse an unprepared model: {result['loaded']}"


def test_onnx_artifact_serves_without_torch(tmp_path, tiny_onnx):
    result = run_app(tmp_path, [("ספר", "semantic")], SEMANTIC_MODEL=str(tiny_onnx))
    assert result["statuses"] == [200] and result["semantic"] == "loaded"
    assert "onnxruntime" in result["loaded"]
    assert not {"torch", "transformers", "sentence_transformers"} & set(result["loaded"]), result["loaded"]


def test_torch_folder_serves_without_sentence_transformers(tmp_path, tiny_model):
    result = run_app(tmp_path, [("ספר", "semantic")], SEMANTIC_MODEL=str(tiny_model))
    assert result["statuses"] == [200] and "torch" in result["loaded"]
    assert not {"sentence_transformers", "sklearn"} & set(result["loaded"]), result["loaded"]


def test_gunicorn_worker_after_text_and_tag_search_stays_small(tmp_path):
    import psutil

    with Gunicorn(tmp_path, {}) as g:
        for query in ("/search?q=%D7%A1%D7%A4%D7%A8&mode=text", "/search?q=%D7%A1%D7%A4%D7%A8%D7%99%D7%9D&mode=tags"):
            status, body = g.get(query)
            assert status == 200 and json.loads(body)["count"] > 0
        (worker,) = g.workers()
        maps = open(f"/proc/{worker}/maps").read()
        rss = psutil.Process(worker).memory_info().rss
    assert "libtorch" not in maps and "onnxruntime" not in maps
    assert rss < 100 * 1024 * 1024, rss
