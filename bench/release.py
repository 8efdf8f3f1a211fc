"""Release figures: how long `flask --app app release` takes on a populated database, and its backfill rate.

    python -m bench.release                 # 10,000 generated Hebrew items, AlephBERT-architecture q8
    python -m bench.release --items 2000    # a shorter run

Starts a PostgreSQL 16 + pgvector server (the pgserver package) under bench/work/release, builds (once)
the synthetic AlephBERT-architecture model and prepares it as the 512 MB tier does
(`python -m devtools.synthetic --arch alephbert`, then `flask --app app model prepare --precision q8`), loads
ITEMS generated Hebrew items into a fresh database at the current schema, then times two release runs
as a platform starts them (a separate `flask --app app release` process with the 512mb tier's
settings): the first embeds every item and tag, the second must find nothing to do. Writes
bench/results/release.json; `python -m bench.readme` copies it into docs/deploy.md.

Timings depend on the machine and on what else runs on it: the JSON records the CPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "release"
RESULTS = ROOT / "bench" / "results"
DATABASE = "memfit_bench_release"
TIER = "512mb"
WORDS = ("ספר טיול צפון מתכון עוגה מוזיקה ישראלית בריאות שינה חיות בית היסטוריה ירושלים ים מדבר גליל "
         "נחל קפה לחם גינה מרפסת ילדים קיץ חורף סרט שיר תכנות מחשב ספורט חדשות משפחה חברים עבודה "
         "לימודים אוניברסיטה שוק ירקות פירות תל אביב חיפה באר שבע אילת כנרת הר שביל אופניים ריצה").split()
TAGS = ["טיולים", "בישול", "מוזיקה", "בריאות", "היסטוריה", "טכנולוגיה", "ספורט", "משפחה", "טבע", "תרבות",
        "לימודים", "אוכל", "חדשות", "גינון", "קולנוע"]


def flask(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)


def model_dir(env: dict[str, str]) -> Path:
    """The AlephBERT-architecture q8 artifact, built once and reused by later runs."""
    source, prepared = WORK / "alephbert-src", WORK / "alephbert-q8"
    if (prepared / "memfit_model.json").exists():
        return prepared
    built = subprocess.run([sys.executable, "-m", "devtools.synthetic", str(source), "--arch", "alephbert"],
                           cwd=ROOT, capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"devtools.synthetic failed:\n{built.stderr[-2000:]}")
    out = flask("model", "prepare", str(source), str(prepared), "--precision", "q8", "--force", env=env)
    if out.returncode != 0:
        raise SystemExit(f"flask model prepare failed:\n{out.stderr[-2000:]}")
    return prepared


def fresh_database(admin_url: str) -> str:
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url.replace("postgresql://", "postgresql+psycopg2://", 1),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE}"))
        conn.execute(text(f"CREATE DATABASE {DATABASE}"))
    admin.dispose()
    return re.sub(r"/[^/?]+(\?|$)", rf"/{DATABASE}\1", admin_url, count=1)


def populate(url: str, n: int, seed: int = 13) -> int:
    """n generated items with 1-3 tags each, at the current schema; returns the tag count."""
    from app import create_app
    from app.db import Item, Tag, create_schema, db, tags_by_name
    from app.settings import Settings

    rng = random.Random(seed)
    app = create_app(Settings.from_env({"DATABASE_URL": url, "ENABLE_SEMANTIC_SEARCH": "false"}))
    with app.app_context():
        create_schema()
        for start in range(0, n, 1000):
            for i in range(start, min(n, start + 1000)):
                title = " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))
                body = " ".join(rng.choices(WORDS, k=rng.randint(12, 40)))
                db.session.add(Item(title=f"{title} {i}", body=body, tags=tags_by_name(rng.sample(TAGS, rng.randint(1, 3)))))
                db.session.flush()
            db.session.commit()
        return db.session.query(Tag).count()


def timed_release(env: dict[str, str]) -> tuple[float, str]:
    started = time.monotonic()
    out = flask("release", env=env)
    seconds = time.monotonic() - started
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise SystemExit(f"release failed ({out.returncode}):\n{text[-3000:]}")
    return seconds, text


def backfill_figures(output: str) -> dict:
    """The release's own closing progress lines: `embedding items: N/N done in Xs (R/s)`."""
    figures = {}
    for kind, done, seconds, rate in re.findall(r"embedding (\w+): (\d+)/\d+ done in ([\d.]+)s \(([\d.]+)/s\)", output):
        figures[kind] = {"rows": int(done), "seconds": float(seconds), "rows_per_second": float(rate)}
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000)
    args = parser.parse_args(argv)

    import pgserver

    WORK.mkdir(parents=True, exist_ok=True)
    tier_env = yaml.safe_load((ROOT / "deploy" / "tiers.yaml").read_text(encoding="utf-8"))["tiers"][TIER]["env"]
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "SEMANTIC_MODEL")}
    # pgserver asks platformdirs for a runtime folder, which must be private (0700).
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="memfit-release-"))
    model = model_dir(base)
    server = pgserver.get_server(str(WORK / "pg"), cleanup_mode="stop")
    try:
        url = fresh_database(server.get_uri())
        started = time.monotonic()
        tags = populate(url, args.items)
        populate_seconds = time.monotonic() - started
        env = {**base, **tier_env, "DATABASE_URL": url, "SEMANTIC_MODEL": str(model), "APP_ENV": "development"}
        first_seconds, first = timed_release(env)
        second_seconds, second = timed_release(env)
    finally:
        server.cleanup()

    result = {
        "items": args.items, "tags": tags, "tier_settings": TIER,
        "embedding_batch_size": int(tier_env["EMBEDDING_BATCH_SIZE"]),
        "max_seq_length": int(tier_env["SEMANTIC_MAX_SEQ_LENGTH"]),
        "model": "synthetic AlephBERT architecture (768-d, BERT-base), q8", "database": "PostgreSQL 16 + pgvector (pgserver)",
        "cpus": os.cpu_count(), "populate_seconds": round(populate_seconds, 1),
        "release_seconds": round(first_seconds, 1), "backfill": backfill_figures(first),
        "second_release_seconds": round(second_seconds, 1),
        "second_release_nothing_to_do": "nothing to migrate" in second and "0 tags and 0 items embedded" in second,
        "first_release_output": [line for line in first.splitlines() if not line.startswith("embedding ")][-8:],
        "second_release_output": second.splitlines()[-8:],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "release.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_output")}, indent=2, ensure_ascii=False))
    return 0 if result["second_release_nothing_to_do"] else 1


if __name__ == "__main__":
    sys.exit(main())
