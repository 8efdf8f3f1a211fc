"""deploy/: every manifest generated from deploy/tiers.yaml, the rules Render enforces, the
Dockerfile's defaults in step with the 512mb tier, and the facts copied outside tiers.yaml (the image's
model, settings.TIERS) in step with their one source."""

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from deploy import generate
from support import ROOT, require

DATA = generate.load_tiers()
RENDER_WEB_PLANS = {"free", "starter", "standard", "pro", "pro plus", "pro max", "pro ultra"}
SCHEMA = ROOT.parent / "shared" / "schemas" / "render.yaml.schema.json"


@pytest.mark.parametrize("rel", sorted(generate.render_all()))
def test_committed_manifest_matches_the_tier_table(rel):
    path = ROOT / rel
    assert path.exists(), f"{rel} is missing: run `make manifests`"
    assert path.read_text(encoding="utf-8") == generate.render_all()[rel], f"{rel} drifted: run `make manifests`"


def test_drift_is_detected(tmp_path, monkeypatch):
    changed = yaml.safe_load(generate.TIERS_FILE.read_text())
    changed["tiers"]["512mb"]["env"]["MAX_MEMORY_MB"] = "460"
    assert generate.render_all(changed)["render.yaml"] != (ROOT / "render.yaml").read_text()


def test_unquoted_values_are_refused(tmp_path):
    bad = tmp_path / "tiers.yaml"
    bad.write_text(generate.TIERS_FILE.read_text().replace('ENABLE_SEMANTIC_SEARCH: "true"', "ENABLE_SEMANTIC_SEARCH: on", 1))
    with pytest.raises(SystemExit, match="quoted strings"):
        generate.load_tiers(bad)


@pytest.mark.parametrize("tier", sorted(DATA["tiers"]))
def test_render_blueprint_rules(tier):
    raw = (ROOT / generate.paths(tier)["render"]).read_text()
    blueprint = yaml.safe_load(raw)
    (service,) = blueprint["services"]
    (database,) = blueprint["databases"]
    assert service["runtime"] == "docker" and "env" not in service
    assert service["plan"] in RENDER_WEB_PLANS and "_" not in service["plan"]
    assert service["healthCheckPath"] == "/healthz" and service["maxShutdownDelaySeconds"] > 25
    assert isinstance(database["postgresMajorVersion"], str)
    env = {e["key"]: e for e in service["envVars"]}
    assert env["DATABASE_URL"]["fromDatabase"] == {"name": database["name"], "property": "connectionString"}
    assert env["SECRET_KEY"] == {"key": "SECRET_KEY", "generateValue": True}
    assert env["SENTRY_DSN"] == {"key": "SENTRY_DSN", "sync": False}
    for entry in service["envVars"]:
        if "value" in entry:
            assert isinstance(entry["value"], str), f"{entry['key']} must be a quoted string"
    # YAML 1.1 reads unquoted off/on/yes/no as booleans: every such value must be quoted in the file.
    assert not re.search(r"^\s*value: (off|on|yes|no|true|false)\s*$", raw, re.M | re.I)
    assert env["MAX_MEMORY_MB"]["value"] == DATA["tiers"][tier]["env"]["MAX_MEMORY_MB"]


def test_render_1gb_tier_uses_the_smallest_plan_above_and_says_so():
    raw = (ROOT / "deploy/render/1gb.yaml").read_text()
    assert yaml.safe_load(raw)["services"][0]["plan"] == "standard"
    assert "Render has no 1024 MB web plan" in raw


def test_blueprints_validate_against_renders_schema():
    require(SCHEMA.exists(), f"{SCHEMA} (shared/ beside the clone) is missing")
    assert generate.validate_schema(SCHEMA) == []


@pytest.mark.parametrize("tier, size", [("512mb", "standard-1x"), ("1gb", "standard-2x")])
def test_heroku_app_json(tier, size):
    app = json.loads((ROOT / generate.paths(tier)["heroku"]).read_text())
    assert app["formation"]["web"]["size"] == size and app["stack"] == "container"
    assert app["env"]["SECRET_KEY"]["generator"] == "secret"
    assert (ROOT / "Procfile").read_text().count("gunicorn -c gunicorn.conf.py") == 1


@pytest.mark.parametrize("tier, memory", [("512mb", "512mb"), ("1gb", "1gb")])
def test_fly_toml(tier, memory):
    fly = tomllib.loads((ROOT / generate.paths(tier)["fly"]).read_text())
    assert fly["vm"][0]["memory"] == memory
    assert fly["http_service"]["checks"][0]["path"] == "/healthz"
    assert fly["env"]["MAX_MEMORY_MB"] == DATA["tiers"][tier]["env"]["MAX_MEMORY_MB"]


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    runtime = text[text.index("AS runtime"):]
    block = runtime[runtime.index("ENV "):runtime.index("COPY --from")]
    return dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z_]+)=(\S+?)\s*\\?$", block, re.M))


@pytest.mark.parametrize("key", ["MEMORY_TIER", "MAX_MEMORY_MB", "MAX_WORKER_MEMORY_MB", "WEB_CONCURRENCY",
                                 "SEMANTIC_MAX_SEQ_LENGTH", "SEMANTIC_THREADS", "OMP_NUM_THREADS",
                                 "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_"])
def test_dockerfile_defaults_are_the_512mb_tier(key):
    assert dockerfile_env()[key] == DATA["tiers"]["512mb"]["env"][key]


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text and "torch==2.13.0" in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r'^CMD \["gunicorn", "-c", "gunicorn.conf.py"', text, re.M)
    assert "HEALTHCHECK" in text and "urllib.request" in text
    assert dockerfile_env()["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("pattern", [".env", ".git", ".venv", "**/*.sqlite3*", "instance"])
def test_dockerignore_keeps_secrets_and_state_out(pattern):
    assert pattern in (ROOT / ".dockerignore").read_text().splitlines()


def test_copied_facts_agree_with_their_source():
    assert generate.copies_drift() == []


@pytest.mark.parametrize("dockerfile", ["ARG MODEL_SOURCE=someone/else\n", "# no MODEL_SOURCE argument\n"])
def test_dockerfile_model_drift_is_detected(dockerfile):
    (problem,) = generate.copies_drift(dockerfile=dockerfile)
    assert "MODEL_SOURCE" in problem and "DEFAULT_MODEL" in problem


def test_tier_names_drift_is_detected():
    changed = yaml.safe_load(generate.TIERS_FILE.read_text())
    changed["tiers"]["2gb"] = changed["tiers"]["1gb"]
    (problem,) = generate.copies_drift(changed)
    assert "TIERS" in problem and "2gb" in problem


def test_makefile_takes_the_model_from_settings():
    from app.settings import DEFAULT_MODEL

    require(shutil.which("make") is not None, "make is not installed")
    show = "show:\n\t@echo $(MODEL_SOURCE)\n"
    out = subprocess.run(["make", "-s", "-f", "Makefile", "-f", "-", "show"], cwd=ROOT, input=show, text=True,
                         capture_output=True, check=True)
    assert out.stdout.strip() == DEFAULT_MODEL
