"""Docker helpers and the run's report, shared by the container suite's conftest and tests."""

from __future__ import annotations

import os
import shutil
import subprocess

import yaml

from support import ROOT

from deploy.generate import app_port
from devtools.http import fetch_json

DOCKER = os.environ.get("DOCKER") or shutil.which("docker") or "docker"
IMAGE = os.environ.get("MEMFIT_TEST_IMAGE", "memfit:container-test")
TIERS = yaml.safe_load((ROOT / "deploy" / "tiers.yaml").read_text())["tiers"]
# Disk, not memory: since the shared-weights artifact the image carries the model twice, the
# portable q8 weights and the optimized prepacked variant (~380 MB together for AlephBERT size), so that
# a worker can fall back when the probe fails on another CPU. The budget was 800 MB before that.
IMAGE_BUDGET_MB = 900
REPORT = {}
PUBLISH = f"127.0.0.1::{app_port()}"  # docker run -p: the image's PORT on a free loopback port
WRITE_TOKEN = "container-write-token"  # the image runs in production: writes need a token


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} failed: {out.stderr.strip()[-1500:]}")
    return out.stdout.strip()


class Running:
    def __init__(self, cid: str, tier: str):
        self.cid, self.tier = cid, tier
        self.port = docker("port", cid, f"{app_port()}/tcp").splitlines()[0].rsplit(":", 1)[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_memory_mb = int(TIERS[tier]["env"]["MAX_MEMORY_MB"])

    def request(self, path: str, data: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
        status, body, _ = fetch_json(self.url + path, data, timeout, token=WRITE_TOKEN)
        return status, body

    def exec(self, *cmd: str) -> str:
        return docker("exec", self.cid, *cmd)


