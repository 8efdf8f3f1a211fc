"""Container suite: build the real image once, run it under each tier's memory limit, inspect it with
pytest-testinfra's docker backend. Needs a Docker daemon; in CI (.ci/run) it is always there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dockertools import DOCKER, IMAGE, IMAGE_BUDGET_MB, PUBLISH, REPORT, TIERS, WRITE_TOKEN, Running, docker
from support import ROOT, require, wait_http

def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/container" in str(item.fspath):
            item.add_marker(pytest.mark.container)


@pytest.fixture(scope="session")
def image() -> str:
    """Build the image (offline from deploy/wheelhouse when MEMFIT_OFFLINE_BUILD=1, as in CI)."""
    available = shutil.which(DOCKER) is not None and subprocess.run(
        [DOCKER, "info"], capture_output=True, timeout=30).returncode == 0
    require(available, f"no reachable Docker daemon for {DOCKER}")
    args = ["build", "-t", IMAGE,
            "--build-arg", f"BASE_IMAGE={os.environ.get('MEMFIT_BASE_IMAGE', 'python:3.11-slim')}",
            "--build-arg", f"MODEL_SOURCE={os.environ.get('MEMFIT_MODEL_SOURCE', 'synthetic:alephbert')}",
            "--build-arg", f"OFFLINE={os.environ.get('MEMFIT_OFFLINE_BUILD', '0')}", str(ROOT)]
    started = time.monotonic()
    out = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "DOCKER_BUILDKIT": "1"})
    assert out.returncode == 0, f"docker build failed:\n{(out.stdout + out.stderr)[-4000:]}"
    REPORT["build_seconds"] = round(time.monotonic() - started, 1)
    REPORT["image_size_mb"] = round(int(docker("image", "inspect", IMAGE, "--format", "{{.Size}}")) / 2**20, 1)
    REPORT["image_budget_mb"] = IMAGE_BUDGET_MB
    return IMAGE


# A tier whose deployer must name an outside service (tiers.yaml `ask`: the remote embedding service) cannot
# start here without one; SEMANTIC_BACKEND=remote is tested against a real server in tests/test_remote.py.
@pytest.fixture(scope="session", params=sorted(tier for tier, spec in TIERS.items() if not spec.get("ask")))
def container(request, image):
    """The image running under its tier's memory limit, settings and (512mb) a read-only root."""
    tier = request.param
    memory = f"{TIERS[tier]['memory_mb']}m"
    env = ["--env-file", str(ROOT / "deploy" / "env" / f"{tier}.env"), "-e", "SECRET_KEY=container-test-secret",
           "-e", f"WRITE_TOKEN={WRITE_TOKEN}", "-e", "WRITE_RATE_LIMIT=1000000 per minute"]
    # The image serves only; like a platform, run the release step first, in a container of its own on
    # the same /data volume (a named volume the image's /data initialises, owned by uid 10001).
    volume = docker("volume", "create", f"memfit-container-test-{tier}-{os.getpid()}")
    cid = None
    try:
        docker("run", "--rm", *env, "-v", f"{volume}:/data", image, "flask", "--app", "app", "release", timeout=600)
        args = ["run", "-d", "--memory", memory, "--memory-swap", memory, "-p", PUBLISH, *env,
                "-v", f"{volume}:/data"]
        if tier == "512mb":
            # Read-only root: the app writes only to tmpfs /tmp and the /data volume.
            args += ["--read-only", "--tmpfs", "/tmp"]
        cid = docker(*args, image)
        running = Running(cid, tier)
        wait_http(running.url + "/healthz", timeout=60)
        yield running
    finally:
        if cid:
            REPORT.setdefault("logs", {})[tier] = docker("logs", "--tail", "20", cid, check=False)
            docker("rm", "-f", cid, check=False)
        docker("volume", "rm", "-f", volume, check=False)


@pytest.fixture(scope="session")
def host(container):
    import testinfra

    return testinfra.get_host(f"docker://{container.cid}")


def pytest_terminal_summary(terminalreporter):
    if "image_size_mb" in REPORT:
        terminalreporter.write_line(
            f"memfit image: {REPORT['image_size_mb']} MB (budget {IMAGE_BUDGET_MB} MB), built in "
            f"{REPORT['build_seconds']} s")
    for tier, figures in REPORT.get("memory", {}).items():
        terminalreporter.write_line(f"memfit {tier} container after the burst: {figures}")
    results = ROOT / "bench" / "results"
    if REPORT.get("memory"):
        results.mkdir(parents=True, exist_ok=True)
        (results / "container.json").write_text(json.dumps(
            {k: v for k, v in REPORT.items() if k != "logs"}, indent=2))
