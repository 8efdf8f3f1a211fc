"""deploy/: every manifest generated from deploy/tiers.yaml, the rules Render enforces, the
Dockerfile's defaults in step with the 512mb tier, and the facts copied outside tiers.yaml (the image's
model, settings.TIERS, the port, torch's pin) in step with their one source."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

from app.release import RELEASE_COMMAND
from deploy import generate
from support import ROOT, require

DATA = generate.load_tiers()
RENDER_WEB_PLANS = {"free", "starter", "standard", "pro", "pro plus", "pro max", "pro ultra"}
SCHEMA = generate.find_shared_schema()


@pytest.mark.parametrize("rel", sorted(generate.render_all()))
def test_committed_manifest_matches_the_tier_table(rel):
    path = ROOT / rel
    assert path.exists(), f"{rel} is missing: run `make manifests`"
    assert path.read_text(encoding="utf-8") == generate.render_all()[rel], f"{rel} drifted: run `make manifests`"


def test_drift_check_fails_and_names_the_files(monkeypatch, capsys):
    # The committed files are what `--check` compares against: a changed table must make it exit 1.
    changed = yaml.safe_load(generate.TIERS_FILE.read_text())
    changed["tiers"]["512mb"]["env"]["MAX_MEMORY_MB"] = "460"
    monkeypatch.setattr(generate, "load_tiers", lambda path=generate.TIERS_FILE: changed)
    assert generate.main(["--check"]) == 1
    err = capsys.readouterr().err
    for rel in ("render.yaml", "app.json", "deploy/fly/512mb/fly.toml", "deploy/env/512mb.env"):
        assert rel in err, err
    assert "deploy/render/1gb.yaml" not in err  # only the tier that changed


def test_drift_check_passes_on_the_committed_files():
    assert generate.main(["--check"]) == 0


def release_lines(rel: str) -> list[str]:
    return [line for line in generate.render_all()[rel].splitlines() if RELEASE_COMMAND in line]


@pytest.mark.parametrize("rel", sorted(r for r in generate.render_all() if release_lines(r)))
def test_drift_check_catches_a_manifest_without_the_release_step(rel, tmp_path):
    files = generate.render_all()
    for other, content in files.items():
        (tmp_path / other).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / other).write_text(content, encoding="utf-8")
    (tmp_path / rel).write_text(files[rel].replace(RELEASE_COMMAND, "flask --app app init-db"), encoding="utf-8")
    assert generate.drifted(files, tmp_path) == [rel]


def test_unquoted_values_are_refused(tmp_path):
    bad = tmp_path / "tiers.yaml"
    bad.write_text(generate.TIERS_FILE.read_text().replace('ENABLE_SEMANTIC_SEARCH: "true"', "ENABLE_SEMANTIC_SEARCH: on", 1))
    with pytest.raises(SystemExit, match="quoted strings"):
        generate.load_tiers(bad)


@pytest.mark.parametrize("tier", sorted(DATA["tiers"]))
def test_render_blueprint_rules(tier):
    raw = (ROOT / generate.paths(tier)["render"]).read_text()
    blueprint = yaml.safe_load(raw)
    service, *others = blueprint["services"]
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


@pytest.mark.parametrize("tier", sorted(DATA["tiers"]))
def test_the_tier_that_scales_out_gets_a_key_value_for_its_rate_limits(tier):
    blueprint = yaml.safe_load((ROOT / generate.paths(tier)["render"]).read_text())
    web, *others = blueprint["services"]
    env = {e["key"]: e for e in web["envVars"]}
    plan = DATA["tiers"][tier]["platforms"]["render"].get("key_value")
    if not plan:
        assert others == [] and "REDIS_URL" not in env
        return
    (key_value,) = others
    assert key_value["type"] == "keyvalue" and key_value["plan"] == plan and key_value["ipAllowList"] == []
    assert env["REDIS_URL"]["fromService"] == {"type": "keyvalue", "name": key_value["name"],
                                               "property": "connectionString"}


def test_at_least_one_tier_scales_out_with_a_key_value():
    assert any(t["platforms"]["render"].get("key_value") for t in DATA["tiers"].values())


def test_render_1gb_tier_uses_the_smallest_plan_above_and_says_so():
    raw = (ROOT / "deploy/render/1gb.yaml").read_text()
    assert yaml.safe_load(raw)["services"][0]["plan"] == "standard"
    assert "Render has no 1024 MB web plan" in raw


def test_blueprints_validate_against_renders_schema():
    require(SCHEMA is not None, "Render's schema (shared/ beside the clone, or beside its origin) is missing")
    assert generate.validate_schema(SCHEMA) == []


def test_a_clone_made_elsewhere_finds_the_schema_beside_its_origin(tmp_path):
    def git(*args, cwd=tmp_path):
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)

    origin = tmp_path / "work" / "project"
    origin.mkdir(parents=True)
    git("init", "-q", str(origin))
    git("clone", "-q", str(origin), str(tmp_path / "tmp" / "clone"))
    assert generate.find_shared_schema(tmp_path / "tmp" / "clone") is None  # nowhere yet: --schema says so
    schema = tmp_path / "work" / "shared" / "schemas" / "render.yaml.schema.json"
    schema.parent.mkdir(parents=True)
    schema.write_text("{}")
    assert generate.find_shared_schema(tmp_path / "tmp" / "clone") == schema
    beside = tmp_path / "tmp" / "shared" / "schemas" / "render.yaml.schema.json"
    beside.parent.mkdir(parents=True)
    beside.write_text("{}")
    assert generate.find_shared_schema(tmp_path / "tmp" / "clone") == beside  # ../shared goes first


def test_schema_flag_without_a_schema_anywhere_names_the_problem(monkeypatch, capsys):
    monkeypatch.setattr(generate, "find_shared_schema", lambda root=generate.ROOT: None)
    assert generate.main(["--check", "--schema"]) == 2
    assert "pass --schema PATH" in capsys.readouterr().err


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
    ports = (fly["http_service"]["internal_port"], fly["metrics"]["port"], int(fly["env"]["PORT"]))
    assert ports == (generate.app_port(),) * 3


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    runtime = text[text.index("AS runtime"):]
    block = runtime[runtime.index("ENV "):runtime.index("COPY --from")]
    return dict(re.findall(r"^\s*(?:ENV\s+)?([A-Z_]+)=(\S+?)\s*\\?$", block, re.M))


@pytest.mark.parametrize("key", sorted(DATA["tiers"][generate.IMAGE_TIER]["env"]))
def test_dockerfile_defaults_are_the_512mb_tier(key):
    """Every variable of the image's tier, looped over tiers.yaml's keys (not a hand-kept list)."""
    assert dockerfile_env()[key] == DATA["tiers"][generate.IMAGE_TIER]["env"][key]


def test_dockerfile_essentials():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text and generate.TORCH_INSTALL in text
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r'^CMD \["deploy/serve.sh"\]', text, re.M)
    assert "HEALTHCHECK" in text and "urllib.request" in text
    assert dockerfile_env()["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("pattern", [".env", ".git", ".venv", "**/*.sqlite3*", "instance"])
def test_dockerignore_keeps_secrets_and_state_out(pattern):
    assert pattern in (ROOT / ".dockerignore").read_text().splitlines()


def test_copied_facts_agree_with_their_source():
    assert generate.copies_drift() == []


@pytest.mark.parametrize("rel, pattern, new, words", [
    ("Dockerfile", r"^ARG MODEL_SOURCE=\S+$", "ARG MODEL_SOURCE=someone/else", ["MODEL_SOURCE", "DEFAULT_MODEL"]),
    ("Dockerfile", r"^ARG MODEL_SOURCE=\S+\n", "", ["MODEL_SOURCE=None", "DEFAULT_MODEL"]),
    ("Dockerfile", r"^(\s*)PORT=\d+", r"\1PORT=8080", ["ENV PORT", "is 8080", "PORT default"]),
    ("deploy/serve.sh", r"\$\{PORT:-\d+\}", "${PORT:-8080}", ["PORT when none is set is 8080", "PORT default"]),
    ("deploy/serve.sh", r"^port=.*\n", "", ["is missing", "PORT default"]),
    ("constraints.txt", r"^(torch==\S+)$", r"\1\n\1", ["no single torch== line"]),
    ("Dockerfile", re.escape(generate.TORCH_INSTALL), "torch==2.0.0", ["torch is not installed at"]),
    ("requirements-infinity.txt", r"^torch==\S+$", "torch==2.0.0", ["torch==2.0.0 is not constraints.txt's"]),
])
def test_a_copy_that_disagrees_with_its_source_is_named(rel, pattern, new, words):
    """Each copied fact, changed in its file alone: copies_drift names that file and that fact."""
    text, count = re.subn(pattern, new, (ROOT / rel).read_text(encoding="utf-8"), flags=re.M)
    assert count == 1, f"the test's pattern {pattern!r} no longer finds the copy in {rel}"
    (problem,) = generate.copies_drift(files={rel: text})
    assert problem.startswith(f"{rel}: ") and all(word in problem for word in words), problem


def test_the_torch_version_is_written_in_constraints_txt_alone():
    """Every tracked file but constraints.txt and the checked copy: no line names torch with its version."""
    version = generate.torch_pin((ROOT / "constraints.txt").read_text()).removeprefix("torch==").partition("+")[0]
    assert version
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    mentions = []
    for rel in filter(None, tracked.split("\0")):
        if rel in ("constraints.txt", generate.TORCH_COPY) or not (ROOT / rel).is_file():
            continue
        try:
            lines = (ROOT / rel).read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:  # not text
            continue
        mentions += [f"{rel}: {line.strip()}" for line in lines if "torch" in line.lower() and version in line]
    assert mentions == [], "say 'the version pinned in constraints.txt' instead:\n" + "\n".join(mentions)


@pytest.mark.parametrize("rel", sorted(p.name for p in ROOT.glob("requirements*.txt")))
def test_no_requirements_file_lets_pip_choose_torch(rel):
    lines = [line.strip() for line in (ROOT / rel).read_text().splitlines()]
    named = [line for line in lines if re.match(r"torch\b", line)]
    assert all(line.startswith("torch==") for line in named) or "-c constraints.txt" in lines, named


# The main venv's and the image's requirement files: names only, each pinned once in constraints.txt,
# which every install reads with -c. (requirements-infinity.txt and requirements-pgvector.txt pin the
# separate venvs of two test servers, whose pins cannot be constraints.txt's.)
MAIN_REQUIREMENTS = ("requirements.txt", "requirements-model.txt", "requirements-dev.txt")


def requirement_names(rel: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / rel).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def constraint_pins() -> dict[str, str]:
    lines = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = [line.split("==", 1) for line in lines if "==" in line and not line.startswith("#")]
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins}


@pytest.mark.parametrize("rel", MAIN_REQUIREMENTS)
def test_requirement_files_name_packages_and_constraints_txt_pins_each(rel):
    names = requirement_names(rel)
    assert names and not [n for n in names if re.search(r"[=<>~!]", n)], f"{rel} pins a version itself"
    pins = constraint_pins()
    unpinned = [n for n in names if re.sub(r"[-_.]+", "-", re.sub(r"\[.*\]", "", n)).lower() not in pins]
    assert unpinned == [], f"{rel}: {unpinned} have no pin in constraints.txt (make constraints)"


@pytest.mark.parametrize("rel", ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))])
def test_the_ports_the_docs_show_are_settings_port(rel):
    text = (ROOT / rel).read_text(encoding="utf-8")
    shown = set(re.findall(r"localhost:(\d+)|`PORT`\s+\(default (\d+)", text)) | set(re.findall(r"-p (\d+):(\d+)", text))
    shown = {port for ports in shown for port in ports if port}
    assert shown <= {str(generate.app_port())}, \
        f"{rel} shows port(s) {sorted(shown)}: app/settings.py's PORT default is {generate.app_port()}"


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


@pytest.fixture
def dry_make(tmp_path):
    """`make -n TARGET` against a stand-in venv (the test's Python, installed), so that nothing runs."""
    require(shutil.which("make") is not None, "make is not installed")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".installed").touch()

    def run(target: str, *args: str, env: dict | None = None) -> str:
        # Under `make test` the parent's MAKELEVEL would make this make print directory lines around its commands.
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("SEMANTIC_MODEL", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")} | (env or {})
        out = subprocess.run(["make", "-n", "--no-print-directory", target, f"VENV={venv}",
                              f"MODEL_DIR={tmp_path / 'model'}", *args],
                             cwd=ROOT, env=environ, text=True, capture_output=True, check=True)
        return out.stdout

    return run


@pytest.mark.parametrize("target", ["run", "release"])
def test_run_and_release_build_the_default_model_when_missing_and_serve_it(dry_make, tmp_path, target):
    from app.settings import DEFAULT_MODEL

    commands = dry_make(target)
    assert f"model prepare {DEFAULT_MODEL} {tmp_path / 'model'} --precision q8" in commands, commands
    assert f"SEMANTIC_MODEL='{tmp_path / 'model'}'" in commands.splitlines()[-1]


def test_run_reuses_the_model_once_built(dry_make, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "memfit_model.json").write_text("{}")
    commands = dry_make("run")
    assert "model prepare" not in commands
    assert f"SEMANTIC_MODEL='{tmp_path / 'model'}'" in commands.splitlines()[-1]


@pytest.mark.parametrize("how", ["environment", "command line"])
def test_run_serves_semantic_model_as_set_and_builds_nothing(dry_make, how):
    commands = (dry_make("run", env={"SEMANTIC_MODEL": "/elsewhere/model"}) if how == "environment"
                else dry_make("run", "SEMANTIC_MODEL=/elsewhere/model"))
    assert "model prepare" not in commands
    assert "SEMANTIC_MODEL='/elsewhere/model'" in commands.splitlines()[-1]


# --- The release step on every platform ---------------------------------------------

@pytest.mark.parametrize("tier", sorted(DATA["tiers"]))
def test_render_runs_the_release_before_traffic(tier):
    service, *_ = yaml.safe_load((ROOT / generate.paths(tier)["render"]).read_text())["services"]
    assert service.get("preDeployCommand") == RELEASE_COMMAND
    # Render runs a pre-deploy command on paid plans only.
    assert service["plan"] != "free"


def test_heroku_release_phase_runs_the_release():
    heroku = yaml.safe_load((ROOT / "heroku.yml").read_text())
    assert heroku["release"] == {"image": "web", "command": [RELEASE_COMMAND]}
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines()
                    if not line.startswith("#"))
    assert procfile["release"] == RELEASE_COMMAND


@pytest.mark.parametrize("tier", sorted(DATA["tiers"]))
def test_fly_release_command_and_no_volume(tier):
    fly = tomllib.loads((ROOT / generate.paths(tier)["fly"]).read_text())
    assert fly["deploy"]["release_command"] == RELEASE_COMMAND
    # release_command suits PostgreSQL only: Fly's release machine has no volume. A [mounts] section
    # would mean SQLite on a volume, which must migrate at start instead (see the file's comment).
    assert "mounts" not in fly
    assert "DATABASE_URL" not in fly["env"]  # a secret, pointing at PostgreSQL


def test_release_command_is_the_apps_command():
    from flask.testing import FlaskCliRunner

    from app import create_app
    from app.settings import Settings

    app = create_app(Settings.from_env({"DATABASE_URL": "sqlite:///:memory:", "ENABLE_SEMANTIC_SEARCH": "false"}))
    command = RELEASE_COMMAND.split()[-1]
    result = FlaskCliRunner(app).invoke(args=[command, "--help"])
    assert result.exit_code == 0 and "Migrate the schema" in result.output, result.output


# --- Platform conventions ----------------------------------------------------

@pytest.mark.parametrize("tier", sorted(DATA["tiers"]))
def test_fly_metrics_point_at_the_apps_metrics(tier):
    fly = tomllib.loads((ROOT / generate.paths(tier)["fly"]).read_text())
    assert fly["metrics"] == {"port": fly["http_service"]["internal_port"], "path": "/metrics"}
    assert int(fly["env"]["PORT"]) == fly["metrics"]["port"]  # gunicorn binds $PORT


def test_the_app_serves_the_metrics_path():
    from app import create_app
    from app.settings import Settings

    app = create_app(Settings.from_env({"DATABASE_URL": "sqlite:///:memory:", "ENABLE_SEMANTIC_SEARCH": "false"}))
    assert generate.METRICS_PATH in {rule.rule for rule in app.url_map.iter_rules()}


@pytest.mark.parametrize("tier", sorted(DATA["tiers"]))
def test_render_database_reachable_only_from_the_service(tier):
    (database,) = yaml.safe_load((ROOT / generate.paths(tier)["render"]).read_text())["databases"]
    assert database["ipAllowList"] == []


@pytest.mark.parametrize("tier", sorted(DATA["tiers"]))
def test_every_blueprint_states_the_database_plan_by_corpus_size(tier):
    text = (ROOT / generate.paths(tier)["render"]).read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for step in DATA["render"]["database_plans"]:
        assert f"{step['up_to_vectors']:,} vectors: {step['plan']}" in header


def test_database_plans_grow_with_the_corpus_and_are_renders():
    plans = DATA["render"]["database_plans"]
    sizes = [step["up_to_vectors"] for step in plans]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert plans[0]["plan"] == DATA["render"]["database_plan"]  # the Blueprints' own plan is the first step
    schema_plans = set(json.loads(SCHEMA.read_text())["definitions"]["plan"]["enum"]) if SCHEMA else None
    if schema_plans is not None:
        assert {step["plan"] for step in plans} <= schema_plans


def load_gunicorn_conf(monkeypatch, tmp_path, database_url: str):
    """gunicorn.conf.py as a module, with its environment pointed at tmp_path."""
    import importlib.util

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("ENABLE_SEMANTIC_SEARCH", "false")
    spec = importlib.util.spec_from_file_location("memfit_gunicorn_conf", ROOT / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_startup_report_names_the_schema_revision(monkeypatch, tmp_path, caplog):
    import logging
    from types import SimpleNamespace

    from app import create_app
    from app.db import create_schema
    from app.settings import Settings
    from monitoring import hooks

    path = tmp_path / "memfit.sqlite3"
    conf = load_gunicorn_conf(monkeypatch, tmp_path, f"sqlite:///{path}")
    before = conf.schema_revision()
    assert before.startswith("none (code needs ") and RELEASE_COMMAND in before, before
    assert not path.exists()  # reading the revision must not create the database

    app = create_app(Settings.from_env({"DATABASE_URL": f"sqlite:///{path}", "ENABLE_SEMANTIC_SEARCH": "false"}))
    with app.app_context():
        create_schema()
    from alembic.script import ScriptDirectory
    from app.db import MIGRATIONS_DIR

    (head,) = ScriptDirectory(MIGRATIONS_DIR).get_heads()
    assert conf.schema_revision() == head

    server = SimpleNamespace(log=logging.getLogger("test.startup"), cfg=SimpleNamespace(worker_class_str="sync"))
    with caplog.at_level(logging.INFO, logger="test.startup"):
        hooks.startup_report(server, conf.settings, conf.startup_facts(server))
    assert f"schema={head}" in caplog.text, caplog.text
    # The app's facts reach the line through gunicorn.conf.py (monitoring does not import the app).
    assert "semantic=off" in caplog.text and "database=sqlite" in caplog.text and "worker_class=sync" in caplog.text


def test_startup_revision_of_an_unreachable_database_does_not_stop_the_start(monkeypatch, tmp_path):
    conf = load_gunicorn_conf(monkeypatch, tmp_path, "postgresql://nobody:x@127.0.0.1:9/none")
    assert conf.schema_revision().startswith("unknown ("), conf.schema_revision()


def test_reading_the_revision_leaves_the_masters_memory_alone(tmp_path):
    # The revision is read in a forked child: the master, which lives as long as the instance, must not
    # keep SQLAlchemy, Alembic and the app (~30 MB) that reading it imports. A fresh process, since this
    # one has imported them all.
    script = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("conf", {str(ROOT / "gunicorn.conf.py")!r})
        conf = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conf)
        print(conf.schema_revision())
        print(sorted(m for m in ("alembic", "sqlalchemy", "flask_sqlalchemy", "app.db") if m in sys.modules))
    """)
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'm.sqlite3'}", "ENABLE_SEMANTIC_SEARCH": "false",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    revision, loaded = out.stdout.strip().splitlines()[-2:]
    assert revision.startswith("none (code needs "), out.stdout + out.stderr
    assert loaded == "[]"
