"""app/preload.py: the master imports the app's modules before forking (PRELOAD_MODULES) and the workers
share those pages; no thread and no model runtime is created before fork."""

import json
import os
import re
import subprocess
import sys

from monitoring import memory
from support import ROOT, Gunicorn, metric, venv_bin
from test_gunicorn import SEARCH, wait_until


def clean_env() -> dict[str, str]:
    """This environment without a metrics folder: prometheus_client would write its files wherever the
    variable points (an empty value: the working directory)."""
    return {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}


def test_preloading_imports_no_runtime_and_starts_no_thread():
    script = ("import json, os, sys\n"
              "from app.preload import FORBIDDEN, preload\n"
              "preload()\n"
              "print(json.dumps({'runtime': [m for m in FORBIDDEN if m in sys.modules],\n"
              "                  'threads': len(os.listdir('/proc/self/task')), 'flask': 'flask' in sys.modules,\n"
              "                  'alembic': 'alembic.script' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=clean_env())
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen == {"runtime": [], "threads": 1, "flask": True, "alembic": True}


def test_the_master_reads_the_model_folders_tokenizer_for_the_workers(tiny_onnx):
    """A large vocabulary's tokenizer is ~88 MB of heap: read before fork, the workers share it, and the
    encoder a worker loads takes that one rather than reading its own."""
    script = ("import json, os, sys\n"
              "from pathlib import Path\n"
              "from app.preload import FORBIDDEN, preload\n"
              "preload(sys.argv[1])\n"
              "threads = len(os.listdir('/proc/self/task'))\n"
              "from app.semantic import encoders\n"
              "read = encoders._PRELOADED_TOKENIZERS.get(str(Path(sys.argv[1], 'tokenizer.json').resolve()))\n"
              "given = encoders.load_tokenizer(Path(sys.argv[1], 'tokenizer.json'), 16)\n"
              "print(json.dumps({'runtime': [m for m in FORBIDDEN if m in sys.modules], 'threads': threads,\n"
              "                  'same': read is given, 'ids': len(given.encode('שלום עולם').ids) > 0}))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tiny_onnx)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=clean_env())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"runtime": [], "threads": 1, "same": True, "ids": True}


def test_preloading_refuses_a_module_that_brings_a_runtime():
    # numpy may already be imported by this test process; a fresh interpreter shows the refusal.
    script = ("import app.preload as p\n"
              "p.MODULES = p.MODULES + ('onnxruntime',)\n"
              "p.preload()\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=clean_env())
    assert out.returncode != 0
    assert "must not start threads or import onnxruntime" in out.stderr


def workers_private_mb(g: Gunicorn) -> list[float]:
    """Each worker's private memory as recycling reads it (monitoring/memory.py)."""
    return [memory.read_process(pid).private / memory.MB for pid in g.workers()]


def idle_workers(tmp_path, preload: str) -> tuple[list[float], str]:
    with Gunicorn(tmp_path / preload, {"WEB_CONCURRENCY": "2", "PRELOAD_MODULES": preload}) as g:
        wait_until(lambda: len(g.workers()) == 2, "two workers")
        for _ in range(4):  # every worker has served (both accept on the same socket)
            assert g.get(SEARCH)[0] == 200
        private = workers_private_mb(g)
        _, body = g.get("/metrics")
        master = g.proc.pid
        children = g.workers()
    pids = {line.split('pid="')[1].split('"')[0] for line in body.decode().splitlines()
            if line.startswith("memfit_worker_private_bytes{")}
    assert str(master) not in pids, "the master shows in /metrics as a worker"
    assert pids <= {str(pid) for pid in children}
    return private, body.decode()


def test_workers_share_the_preloaded_modules(tmp_path):
    (tmp_path / "true").mkdir()
    (tmp_path / "false").mkdir()
    shared, text = idle_workers(tmp_path, "true")
    alone, _ = idle_workers(tmp_path, "false")
    # Each worker imports ~40-50 MB of code on its own (the less, the fewer kinds of request it has
    # served yet: both share one socket, so one may have served none); preloaded, ~24 MB of it stays
    # the master's pages.
    assert max(shared) < min(alone) - 10, (shared, alone)
    assert metric(text, "memfit_requests_total", mode="text", status="200") == 4


def test_a_recycled_worker_leaves_without_tearing_the_interpreter_down(tmp_path):
    """Teardown would copy every page shared with the master into the exiting worker (and has hung in
    ONNX Runtime's cleanup): a worker that ends normally leaves with os._exit(0). An atexit handler,
    inherited from the master through sitecustomize, marks every process whose interpreter tore down."""
    site, marks = tmp_path / "site", tmp_path / "teardowns"
    site.mkdir()
    marks.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "_marks = os.environ.get('TEARDOWN_MARKS')\n"
        "if _marks:\n"
        "    atexit.register(lambda: open(os.path.join(_marks, str(os.getpid())), 'w').close())\n")
    env = {"GUNICORN_MAX_REQUESTS": "2", "GUNICORN_MAX_REQUESTS_JITTER": "0", "TEARDOWN_MARKS": str(marks),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    with Gunicorn(tmp_path, env) as g:
        (first,) = g.workers()
        assert [g.get(SEARCH)[0] for _ in range(5)] == [200] * 5
        wait_until(lambda: f"memfit exit: worker pid={first}" in g.log() and first not in g.workers(),
                   "the first worker to be recycled")
        master = g.proc.pid
    log = g.log()
    workers = set(re.findall(r"Booting worker with pid: (\d+)", log))
    torn_down = {p.name for p in marks.iterdir()}
    assert len(workers) >= 3 and log.count("Autorestarting worker") >= 2
    # The master tore down normally (the handler works there); no worker did.
    assert str(master) in torn_down, log
    assert not workers & torn_down, log


def test_a_worker_that_cannot_load_the_app_still_stops_the_master(tmp_path):
    """A worker that fails to boot must exit with gunicorn's own code (APP_LOAD_ERROR), not with the fast
    exit's 0: the master then stops instead of forking replacements for ever."""
    out = subprocess.run([venv_bin("gunicorn"), "-c", "gunicorn.conf.py", "app:no_such_factory()"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**clean_env(), "PORT": "0", "DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite3'}",
                              "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")})
    assert out.returncode != 0, out.stdout + out.stderr
    assert "App failed to load" in out.stdout + out.stderr
    assert (out.stdout + out.stderr).count("Booting worker with pid") == 1
