"""Generate every deployment manifest from deploy/tiers.yaml (the one source of deployment facts).

    python -m deploy.generate            # write the manifests (make manifests)
    python -m deploy.generate --check    # exit 1 and name the files that drifted from tiers.yaml

Either way it exits 1 when a fact copied outside tiers.yaml disagrees with its source (copies_drift()).
    python -m deploy.generate --schema      # also validate Blueprints against Render's schema in ../shared
    python -m deploy.generate --schema PATH # ... against that schema file

The 512mb tier's files sit where each platform's one-click flow looks for them (render.yaml and
app.json at the root); the 1gb tier's beside them under deploy/.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TIERS_FILE = ROOT / "deploy" / "tiers.yaml"
DOCKERFILE = ROOT / "Dockerfile"
HEADER = "Generated from deploy/tiers.yaml by `make manifests`: edit that file, not this one."
SERVICE = "memfit"
FLY_REGION = "fra"
# Render, Heroku and Fly each put one proxy in front of the app, which appends the client's address
# to X-Forwarded-For: the write rate limit keys on that address (app.limits.client_address).
PLATFORM_PROXIES = "1"
METRICS_PATH = "/metrics"


def release_command() -> str:
    """The release step every platform runs before new code takes traffic; its one written place is
    app/release.py (imported here, not copied, so a renamed command cannot leave a manifest behind)."""
    from app.release import RELEASE_COMMAND

    return RELEASE_COMMAND


def app_port() -> int:
    """The port the image serves on ($PORT, where Fly routes traffic and scrapes /metrics): PORT's
    default in app/settings.py, its one written place."""
    from app.settings import FIELDS_BY_ENV

    return int(FIELDS_BY_ENV["PORT"].default)


def load_tiers(path: Path = TIERS_FILE) -> dict:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name, tier in data["tiers"].items():
        bad = {k: v for k, v in tier["env"].items() if not isinstance(v, str)}
        if bad:
            raise SystemExit(f"{path}: tier {name}: env values must be quoted strings: {sorted(bad)}")
        if tier["env"]["MEMORY_TIER"] != name:
            raise SystemExit(f"{path}: tier {name}: MEMORY_TIER must be {name!r}")
    return data


def service_name(tier: str) -> str:
    return SERVICE if tier == "512mb" else f"{SERVICE}-{tier}"


def paths(tier: str) -> dict[str, str]:
    """Where each manifest of a tier lives, relative to the repository root."""
    first = tier == "512mb"
    return {
        "render": "render.yaml" if first else f"deploy/render/{tier}.yaml",
        "heroku": "app.json" if first else f"deploy/heroku/{tier}/app.json",
        "fly": f"deploy/fly/{tier}/fly.toml",
        "env": f"deploy/env/{tier}.env",
    }


def render_blueprint(data: dict, tier: str) -> str:
    spec, render = data["tiers"][tier], data["render"]
    database = f"{service_name(tier)}-db"
    env_vars = [
        {"key": "APP_ENV", "value": "production"},
        {"key": "DATABASE_URL", "fromDatabase": {"name": database, "property": "connectionString"}},
        {"key": "SECRET_KEY", "generateValue": True},
        # Writes (POST /items) need this bearer token in production; read it in the dashboard to write.
        {"key": "WRITE_TOKEN", "generateValue": True},
        {"key": "TRUSTED_PROXIES", "value": PLATFORM_PROXIES},
        {"key": "SENTRY_DSN", "sync": False},  # entered by the user in the dashboard, never committed
        {"key": "SENTRY_CRON_MONITOR", "sync": False},
    ] + [{"key": k, "sync": False} for k in spec.get("ask", {})] + [{"key": k, "value": v} for k, v in spec["env"].items()]
    key_value = spec["platforms"]["render"].get("key_value")
    if key_value:
        env_vars.append({"key": "REDIS_URL", "fromService": {"type": "keyvalue", "name": f"{service_name(tier)}-limits",
                                                              "property": "connectionString"}})
    blueprint = {
        "services": [{
            "type": "web",
            "name": service_name(tier),
            "runtime": "docker",
            "plan": spec["platforms"]["render"]["plan"],
            "region": render["region"],
            "dockerfilePath": "./Dockerfile",
            "dockerContext": ".",
            "healthCheckPath": "/healthz",
            "maxShutdownDelaySeconds": render["max_shutdown_delay_seconds"],
            # Migrations, pgvector and the embedding backfill, before the new image takes traffic
            # (a pre-deploy command exists on paid plans; every tier's plan is one).
            "preDeployCommand": release_command(),
            "envVars": env_vars,
        }],
        "databases": [{
            "name": database,
            "plan": render["database_plan"],
            "region": render["region"],
            "postgresMajorVersion": render["postgres_major_version"],
            # No outside address may connect: only services of this account, over Render's private network.
            "ipAllowList": [],
        }],
    }
    if key_value:
        blueprint["services"].append({
            "type": "keyvalue",
            "name": f"{service_name(tier)}-limits",
            "plan": key_value,
            "region": render["region"],
            # Rate-limit counters only, each with its window as its expiry: the first to go when full.
            "maxmemoryPolicy": "volatile-ttl",
            "ipAllowList": [],  # only this account's services, over Render's private network
        })
    note = (f"# Tier {tier}: {spec['summary']}\n"
            f"# Render plan {spec['platforms']['render']['plan']}")
    if spec["memory_mb"] != 512:
        note += (f" (Render has no {spec['memory_mb']} MB web plan; this is the smallest above it, and the app"
                 f" keeps its {spec['memory_mb']} MB budget: MAX_MEMORY_MB and the tier settings below)")
    note += ".\n" + "\n".join(f"# {line}" for line in database_plan_lines(render))
    return f"# {HEADER}\n{note}\n" + yaml.safe_dump(blueprint, sort_keys=False, allow_unicode=True, width=120)


def database_plan_steps(render: dict) -> list[tuple[int, dict]]:
    """(smallest corpus, step) for each database plan of tiers.yaml, smallest corpus first."""
    lows = [0] + [step["up_to_vectors"] for step in render["database_plans"]][:-1]
    return list(zip(lows, render["database_plans"]))


def database_plan_lines(render: dict) -> list[str]:
    """The database plan by corpus size, as the Blueprints' header says it."""
    lines = [f"Database plan {render['database_plan']} is for the sample data; choose it by the corpus's vectors:"]
    lines += [f"  {low:,} to {step['up_to_vectors']:,} vectors: {step['plan']} ({step['why']})"
              for low, step in database_plan_steps(render)]
    return lines


def database_plan_table(data: dict) -> str:
    """docs/vectors.md's table of Render database plans by corpus size."""
    rows = ["| vectors in the corpus | Render database plan | why |", "| --- | --- | --- |"]
    rows += [f"| {low:,} to {step['up_to_vectors']:,} | `{step['plan']}` | {step['why']} |"
             for low, step in database_plan_steps(data["render"])]
    return "\n".join(rows) + "\n"


def heroku_app(data: dict, tier: str) -> str:
    spec = data["tiers"][tier]
    env = {
        "APP_ENV": {"value": "production"},
        "SECRET_KEY": {"description": "Flask secret key", "generator": "secret"},
        "WRITE_TOKEN": {"description": "Bearer token that writes (POST /items) require", "generator": "secret"},
        "TRUSTED_PROXIES": {"value": PLATFORM_PROXIES},
        "SENTRY_DSN": {"description": "Sentry DSN for errors and memory alerts (optional)", "required": False},
        "SENTRY_CRON_MONITOR": {"description": "Sentry Crons monitor slug (optional)", "required": False},
    }
    env.update({k: {"description": why, "required": not k.endswith("_TOKEN")} for k, why in spec.get("ask", {}).items()})
    env.update({k: {"value": v} for k, v in spec["env"].items()})
    app = {
        "name": f"memfit ({tier})",
        "description": f"Hebrew text, tag and semantic search. {spec['summary']}",
        "stack": "container",  # built from the Dockerfile by heroku.yml, model baked in
        "formation": {"web": {"quantity": 1, "size": spec["platforms"]["heroku"]["size"]}},
        "addons": [{"plan": "heroku-postgresql:essential-0", "as": "DATABASE"}],
        "env": env,
        "_comment": HEADER,
    }
    return json.dumps(app, indent=2, ensure_ascii=False) + "\n"


def fly_toml(data: dict, tier: str) -> str:
    spec = data["tiers"][tier]
    env = {"APP_ENV": "production", "PORT": str(app_port()), "TRUSTED_PROXIES": PLATFORM_PROXIES, **spec["env"]}
    lines = [
        f"# {HEADER}",
        f"# Tier {tier}: {spec['summary']}",
        "# Deploy from the repository root: fly deploy --config " + paths(tier)["fly"] + " --dockerfile Dockerfile",
        "# Secrets (never here): fly secrets set SECRET_KEY=... WRITE_TOKEN=... DATABASE_URL=... SENTRY_DSN=..."
        + "".join(f" {k}=..." for k in spec.get("ask", {})),
        f'app = "{service_name(tier)}"',
        f'primary_region = "{FLY_REGION}"',
        'kill_signal = "SIGTERM"',
        f"kill_timeout = {data['render']['max_shutdown_delay_seconds']}",
        "",
        # Why release_command and not a migration at start: written into the file for whoever edits it.
        "# The release step runs once per deploy, in a temporary machine of the new image, before any",
        "# machine is replaced. It suits PostgreSQL (DATABASE_URL, a secret), the database of these tiers:",
        "# there is no [mounts] here, and the release machine never has a volume, so a SQLite set-up would",
        '# have to migrate at start instead (sh -c "flask --app app release && exec gunicorn ...").',
        "[deploy]",
        f'  release_command = "{release_command()}"',
        "",
        "[env]",
        *(f'  {k} = "{v}"' for k, v in env.items()),
        "",
        "# Fly's Prometheus scrapes each machine's /metrics (every gunicorn worker merged) on the app port.",
        "[metrics]",
        f"  port = {app_port()}",
        f'  path = "{METRICS_PATH}"',
        "",
        "[http_service]",
        f"  internal_port = {app_port()}",
        "  force_https = true",
        '  auto_stop_machines = "off"',
        "  min_machines_running = 1",
        "",
        "  [[http_service.checks]]",
        '    grace_period = "60s"',
        '    interval = "30s"',
        '    method = "GET"',
        '    timeout = "5s"',
        '    path = "/healthz"',
        "",
        "[[vm]]",
        f'  memory = "{spec["platforms"]["fly"]["memory"]}"',
        '  cpu_kind = "shared"',
        f"  cpus = {spec['platforms']['fly']['cpus']}",
    ]
    return "\n".join(lines) + "\n"


def env_file(data: dict, tier: str) -> str:
    spec = data["tiers"][tier]
    lines = [f"# {HEADER}", f"# Tier {tier} ({spec['memory_mb']} MB): docker run --env-file {paths(tier)['env']} "
             f"--memory {spec['memory_mb']}m ...", "APP_ENV=production"]
    lines += [f"# {k}= ({why}; set it yourself)" for k, why in spec.get("ask", {}).items()]
    lines += [f"{k}={v}" for k, v in spec["env"].items()]
    return "\n".join(lines) + "\n"


def render_all(data: dict | None = None) -> dict[str, str]:
    """Every generated file: path relative to the root -> content."""
    data = data or load_tiers()
    release = release_command()
    # Heroku's release phase runs before every deploy, the first one of an app.json button included:
    # app.json needs no postdeploy script of its own.
    files = {
        "Procfile": ("# " + HEADER + "\n"
                     "web: gunicorn -c gunicorn.conf.py \"app:create_app()\"\n"
                     f"release: {release}\n"),
        "heroku.yml": ("# " + HEADER + "\nbuild:\n  docker:\n    web: Dockerfile\n"
                       f"release:\n  image: web\n  command:\n    - {release}\n"),
    }
    # Two files that are mostly written by hand carry a generated part between marker lines.
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    files["Dockerfile"] = between(dockerfile, "# tier-env:start", "# tier-env:end", dockerfile_env(data), "Dockerfile")
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    files["docs/deploy.md"] = between(deploy_doc, "<!-- tier-table:start -->", "<!-- tier-table:end -->",
                                      tier_table(data), "docs/deploy.md")
    vectors_doc = (ROOT / "docs" / "vectors.md").read_text(encoding="utf-8")
    files["docs/vectors.md"] = between(vectors_doc, "<!-- database-plans:start -->", "<!-- database-plans:end -->",
                                       database_plan_table(data), "docs/vectors.md")
    for tier in data["tiers"]:
        where = paths(tier)
        files[where["render"]] = render_blueprint(data, tier)
        files[where["heroku"]] = heroku_app(data, tier)
        files[where["fly"]] = fly_toml(data, tier)
        files[where["env"]] = env_file(data, tier)
    return files


IMAGE_TIER = "512mb"  # the tier whose settings the Docker image carries as its defaults


def between(text: str, start: str, end: str, body: str, where: str) -> str:
    """text with the lines between the marker lines start and end replaced by body."""
    if start not in text or end not in text:
        raise SystemExit(f"{where}: no {start!r} ... {end!r} lines to write between")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{body}{end}{tail}"


def dockerfile_env(data: dict) -> str:
    """The runtime stage's ENV of the image's tier, one variable a line."""
    items = list(data["tiers"][IMAGE_TIER]["env"].items())
    lines = [f"{'ENV' if i == 0 else '   '} {k}={v}" for i, (k, v) in enumerate(items)]
    return " \\\n".join(lines) + "\n"


def tier_table(data: dict) -> str:
    """docs/deploy.md's table of the tiers."""
    rows = ["| tier | memory budget | workers | semantic search | Render | Heroku | Fly |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, spec in data["tiers"].items():
        env, platforms = spec["env"], spec["platforms"]
        turns = f", {env['REQUEST_CONCURRENCY']} computing at once" if env.get("REQUEST_CONCURRENCY", "0") != "0" else ""
        rows.append(f"| `{name}` | {spec['memory_mb']} MB, alert at {env['MAX_MEMORY_MB']}, recycle a worker past "
                    f"{env['MAX_WORKER_MEMORY_MB']} MB of private memory | {env['WEB_CONCURRENCY']} × "
                    f"{env['GUNICORN_THREADS']} threads{turns} | {spec['semantic']} | `{platforms['render']['plan']}` | "
                    f"`{platforms['heroku']['size']}` | `memory = \"{platforms['fly']['memory']}\"` |")
    return "\n".join(rows) + "\n"


def drifted(files: dict[str, str], root: Path = ROOT) -> list[str]:
    """The generated files whose committed copy under root is missing or differs."""
    stale = []
    for rel, content in files.items():
        target = root / rel
        if not target.exists() or target.read_text(encoding="utf-8") != content:
            stale.append(rel)
    return stale


def blueprints(data: dict | None = None) -> list[str]:
    data = data or load_tiers()
    return [paths(tier)["render"] for tier in data["tiers"]]


def find_shared_schema(root: Path = ROOT) -> Path | None:
    """Render's Blueprint schema in the shared folder beside the project (../shared/schemas), or, for a
    clone made elsewhere (a clean clone in a temporary folder), beside the local repository it was
    cloned from; None where neither has it."""
    rel = Path("shared") / "schemas" / "render.yaml.schema.json"
    places = [root.parent]
    origin = subprocess.run(["git", "-C", str(root), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip().removeprefix("file://")
    if origin and Path(origin).is_dir():
        places.append(Path(origin).resolve().parent)
    return next((place / rel for place in places if (place / rel).is_file()), None)


def validate_schema(schema_path: Path, data: dict | None = None) -> list[str]:
    """Errors of every generated Blueprint against Render's JSON Schema (empty: all valid)."""
    import jsonschema

    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = []
    for rel in blueprints(data):
        document = yaml.safe_load((ROOT / rel).read_text(encoding="utf-8"))
        for error in validator.iter_errors(document):
            errors.append(f"{rel}: {'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}")
    return errors


def dockerfile_model(text: str) -> str | None:
    """The default of the Dockerfile's `ARG MODEL_SOURCE=` (None when the line is missing)."""
    match = re.search(r"^ARG MODEL_SOURCE=(\S+)\s*$", text, re.M)
    return match.group(1) if match else None


def torch_pin(constraints: str) -> str:
    """constraints.txt's torch line (torch==version), the one place torch's version is written: the
    Dockerfile and requirements-model.txt read it there. Empty unless there is exactly one."""
    lines = re.findall(r"^torch==\S+$", constraints, re.M)
    return lines[0] if len(lines) == 1 else ""


# Where a copy of a fact sits, the pattern that finds it (its group: the copied value), and why it is a copy.
PORT_COPIES = {
    "Dockerfile": (r"^\s*(?:ENV\s+)?PORT=(\S+?)\s*\\?$", "the image's ENV PORT (EXPOSE and HEALTHCHECK read it)"),
    "deploy/serve.sh": (r"^port=\$\{PORT:-(\S+?)\}$", "serve.sh's PORT when none is set"),
}
TORCH_INSTALL = "\"$(grep '^torch==' constraints.txt)\""  # how the Dockerfile installs torch at the pin
# requirements-infinity.txt is a venv of its own whose pins (numpy<2, sentence-transformers<4) cannot
# take constraints.txt: its torch pin is a copy.
TORCH_COPY = "requirements-infinity.txt"


def copies_drift(data: dict | None = None, files: dict[str, str] | None = None) -> list[str]:
    """Facts written elsewhere that must agree with their one source: the image's default model with
    app/settings.py's DEFAULT_MODEL (a Dockerfile ARG cannot import it), settings.TIERS with the tier
    names of tiers.yaml (the app reads no deploy file at run time: the image ships app/ alone), the
    image's and serve.sh's port with PORT's default, and torch's version with constraints.txt's pin.
    files: texts to check instead of the committed files (path relative to the root -> text)."""
    from app import settings

    data = data or load_tiers()
    files = files or {}

    def text(rel: str) -> str:
        return files[rel] if rel in files else (ROOT / rel).read_text(encoding="utf-8")

    dockerfile = text("Dockerfile")
    problems = []
    if dockerfile_model(dockerfile) != settings.DEFAULT_MODEL:
        problems.append(f"Dockerfile: ARG MODEL_SOURCE={dockerfile_model(dockerfile)} is not app/settings.py's "
                        f"DEFAULT_MODEL ({settings.DEFAULT_MODEL})")
    expected = (*data["tiers"], "custom")
    if settings.TIERS != expected:
        problems.append(f"app/settings.py: TIERS={settings.TIERS} is not the tiers of {TIERS_FILE.name} "
                        f"plus 'custom' {expected}")
    for rel, (pattern, what) in PORT_COPIES.items():
        found = re.findall(pattern, text(rel), re.M)
        if found != [str(app_port())]:
            problems.append(f"{rel}: {what} is {', '.join(found) or 'missing'}, not app/settings.py's "
                            f"PORT default ({app_port()})")
    pin = torch_pin(text("constraints.txt"))
    if not pin:
        problems.append("constraints.txt: no single torch== line (the one pin of torch's version)")
    if TORCH_INSTALL not in dockerfile or "torch==" in dockerfile.replace(TORCH_INSTALL, ""):
        problems.append(f"Dockerfile: torch is not installed at constraints.txt's pin ({TORCH_INSTALL})")
    public = pin.partition("+")[0]  # the copy names the version, without PyTorch's build label (+cpu)
    copied = re.findall(r"^torch==(\S+)$", text(TORCH_COPY), re.M)
    if pin and [f"torch=={v}" for v in copied] != [public]:
        problems.append(f"{TORCH_COPY}: torch=={', '.join(copied) or '(none)'} is not constraints.txt's {pin}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail on drift instead of writing")
    parser.add_argument("--schema", type=Path, nargs="?", const="shared",
                        help="validate every Blueprint against this JSON Schema (no path: Render's, in ../shared)")
    args = parser.parse_args(argv)
    files = render_all(load_tiers())
    stale = drifted(files)
    if not args.check:
        for rel in stale:
            target = ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(files[rel], encoding="utf-8")
            print(f"wrote {rel}")
        stale = []
    if stale:
        print("out of date with deploy/tiers.yaml (run `make manifests`): " + ", ".join(stale), file=sys.stderr)
        return 1
    problems = copies_drift()
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    if args.schema == Path("shared"):
        args.schema = find_shared_schema()
        if args.schema is None:
            print("Render's Blueprint schema (shared/schemas/render.yaml.schema.json) is neither beside the "
                  "project nor beside the repository it was cloned from: pass --schema PATH", file=sys.stderr)
            return 2
    if args.schema:
        errors = validate_schema(args.schema)
        for error in errors:
            print(error, file=sys.stderr)
        if errors:
            return 1
        print(f"{len(blueprints())} Blueprints valid against {args.schema}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
