"""The real image under each tier's memory limit: non-root, no secrets, healthy, semantic search with
the baked model, and peak memory under the tier's MAX_MEMORY_MB after a burst (no OOM kill)."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from dockertools import IMAGE_BUDGET_MB, REPORT, TIERS, docker

QUERIES = ["ספר", "טיול בצפון", "מתכון לעוגה", "מוזיקה ישראלית", "בריאות ושינה", "חיות בית", "היסטוריה של ירושלים"]
SECRET_WORDS = ("SECRET_KEY=", "SENTRY_DSN=", "PASSWORD", "TOKEN=", "AWS_")


def test_image_size_is_reported_and_under_budget(image):
    assert REPORT["image_size_mb"] < IMAGE_BUDGET_MB, REPORT["image_size_mb"]


def test_runs_as_the_fixed_non_root_user(container, host):
    assert host.user().uid == 10001 and host.user().name == "memfit"
    status = host.file("/proc/1/status").content_string
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["10001"] * 4, uid_line  # gunicorn's master: real, effective, saved, fs
    assert host.run("touch /app/app/x").rc != 0  # code is read-only to the app user


@pytest.mark.parametrize("path", ["/app/.env", "/app/.git", "/app/tests", "/app/.venv", "/app/instance",
                                  "/app/devtools", "/app/bench"])
def test_no_development_files_in_the_image(host, path):
    assert not host.file(path).exists, f"{path} is in the image"


def test_no_secret_in_the_image_environment_or_history(image):
    env = json.loads(docker("image", "inspect", image, "--format", "{{json .Config.Env}}"))
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    for word in SECRET_WORDS:
        assert not [e for e in env if word in e.upper()], env
        assert word not in history.upper(), f"{word} appears in a layer's command"


def test_model_is_baked_in_and_nothing_is_fetched_at_run_time(host, image):
    manifest = json.loads(host.file("/models/semantic/memfit_model.json").content_string)
    assert manifest["precision"] == "q8" and manifest["dim"] == 768
    env = json.loads(docker("image", "inspect", image, "--format", "{{json .Config.Env}}"))
    assert "HF_HUB_OFFLINE=1" in env and "SEMANTIC_MODEL=/models/semantic" in env
    assert host.run("python3 -c 'import torch'").rc != 0  # the serving image has no torch at all


def test_healthcheck_is_declared(image):
    health = json.loads(docker("image", "inspect", image, "--format", "{{json .Config.Healthcheck}}"))
    assert "urllib.request" in " ".join(health["Test"]) and health["StartPeriod"] > 0


def test_health_and_readiness(container):
    assert container.request("/healthz") == (200, {"status": "ok"})
    status, body = container.request("/readyz")
    assert status == 200 and body["database"] == "ok" and body["semantic"]["state"] in ("not_loaded", "loaded")


def test_semantic_search_with_the_baked_model(container):
    container.exec("flask", "--app", "app", "seed")
    status, body = container.request("/search?q=%D7%98%D7%99%D7%95%D7%9C&mode=semantic&limit=5", timeout=120)
    assert status == 200 and body["count"] == 5, body
    # Readiness is per worker; with two workers, ask until the one that served the search answers.
    states = [container.request("/readyz")[1]["semantic"] for _ in range(20)]
    loaded = [s for s in states if s["state"] == "loaded"]
    assert loaded and loaded[0]["backend"] == "onnxruntime" and loaded[0]["precision"] == "q8", states


def read_memory(container) -> dict:
    script = (
        "import glob, os\n"
        "def read(p):\n"
        "    try: return open(p).read()\n"
        "    except OSError: return ''\n"
        "rss = 0\n"
        "for status in glob.glob('/proc/[0-9]*/status'):\n"
        "    for line in read(status).splitlines():\n"
        "        if line.startswith('VmRSS:'): rss += int(line.split()[1]) * 1024\n"
        "v1 = '/sys/fs/cgroup/memory/'\n"
        "if os.path.exists(v1 + 'memory.max_usage_in_bytes'):\n"
        "    peak = int(read(v1 + 'memory.max_usage_in_bytes')); limit = int(read(v1 + 'memory.limit_in_bytes'))\n"
        "    oom = dict(l.split() for l in read(v1 + 'memory.oom_control').splitlines()).get('oom_kill', '0')\n"
        "else:\n"
        "    peak = int(read('/sys/fs/cgroup/memory.peak') or 0); limit = int(read('/sys/fs/cgroup/memory.max'))\n"
        "    oom = dict(l.split() for l in read('/sys/fs/cgroup/memory.events').splitlines()).get('oom_kill', '0')\n"
        "print(peak, limit, int(oom), rss)\n"
    )
    peak, limit, oom, rss = map(int, container.exec("python3", "-c", script).split())
    return {"cgroup_peak_mb": round(peak / 2**20, 1), "limit_mb": round(limit / 2**20), "oom_kills": oom,
            "processes_rss_mb": round(rss / 2**20, 1)}


def test_memory_stays_under_budget_after_a_burst(container):
    container.exec("flask", "--app", "app", "seed")
    rng = random.Random(7)

    def one(i: int):
        kind = i % 5
        q = rng.choice(QUERIES)
        if kind == 0:
            return container.request("/items", {"title": f"פריט בדיקה {i}", "body": q * 5,
                                                "tags": [f"תגית-{i}", f"עומס-{i % 7}"]})[0]
        mode = ("semantic", "semantic", "text", "tags")[kind - 1]
        from urllib.parse import quote

        return container.request(f"/search?q={quote(q)}&mode={mode}", timeout=120)[0]

    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(one, range(300)))
    failures = [s for s in statuses if s >= 500]
    figures = read_memory(container)
    REPORT.setdefault("memory", {})[container.tier] = {**figures, "requests": len(statuses),
                                                       "max_memory_mb": container.max_memory_mb}
    assert not failures, f"{len(failures)} server errors during the burst"
    assert figures["limit_mb"] == TIERS[container.tier]["memory_mb"]
    assert figures["oom_kills"] == 0
    assert figures["cgroup_peak_mb"] < container.max_memory_mb, figures
    assert figures["processes_rss_mb"] < container.max_memory_mb, figures
