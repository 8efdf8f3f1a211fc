"""Text search latency, index size and write cost against the number of items, per back end (issue 12).

    python -m bench.textscale                                   # SQLite, 1k / 10k / 100k items
    python -m bench.textscale --sizes 1000 10000 100000 1000000 --database-url postgresql://...

The items are generated like the relevance corpus (bench/relevance/generate.py: Hebrew topic words,
names, prefixes, niqqud, both spellings) and added in one growing database, so each size measures
the same index grown further. At each size:
  write       milliseconds per item to analyse it (Python) and to insert it with its index
              maintenance (trigger or generated column), in batches of 1,000 rows per transaction
  latency     p50 / p95 of app.textindex.search(limit=10) over the labelled queries plus random
              two- and three-word queries, after one warm-up pass
  index size  SQLite: the FTS5 table's pages; PostgreSQL: the GIN index plus the tsvector column
Results are merged into bench/results/textscale.json (one entry per back end and size). The
PostgreSQL URL must name a scratch database: its tables are dropped.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, event, text

from app import textindex
from app.db import Base, _sqlite_pragmas
from app.settings import _database_url

from .relevance import generate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "textscale.json"
SIZES = (1_000, 10_000, 100_000)
BATCH = 1_000
RANDOM_QUERIES = 200
INSERT = text("INSERT INTO items (title, body, search_text, index_text, created_at, updated_at) "
              "VALUES (:title, :body, :search_text, :index_text, :now, :now)")


def items(rng: random.Random, count: int):
    """``count`` generated items as insert parameters, analysed here (timed apart from the insert)."""
    from app import hebrew

    now = datetime.now(timezone.utc)
    rows = []
    for _ in range(count):
        title, body = generate.random_item(rng)
        item = generate.make_item(rng, title, body, pointed=rng.random() < 0.06)
        rows.append({"title": item["title"], "body": item["body"], "now": now,
                     "search_text": hebrew.normalize(f"{item['title']} {item['body']}"),
                     "index_text": textindex.document(item["title"], item["body"])})
    return rows


def queries(rng: random.Random) -> list[str]:
    labelled = [q["q"] for q in json.loads(generate.QUERIES.read_text(encoding="utf-8"))]
    vocabulary = [w for ws in generate.TOPIC_WORDS.values() for w in ws] + generate.W.FIRST_NAMES
    made = [" ".join(rng.sample(vocabulary, rng.choice((2, 3)))) for _ in range(RANDOM_QUERIES)]
    return labelled + made


def index_bytes(conn) -> int:
    if conn.dialect.name == "sqlite":
        # The FTS5 index lives in its shadow tables; %_data holds the segments, %_idx their keys.
        return conn.execute(text(
            f"SELECT (SELECT coalesce(sum(length(block)), 0) FROM {textindex.FTS}_data) + "
            f"(SELECT coalesce(sum(length(term)) + 16 * count(*), 0) FROM {textindex.FTS}_idx)")).scalar_one()
    return conn.execute(text(
        f"SELECT pg_relation_size('ix_items_{textindex.TSV}') + "
        f"(SELECT coalesce(sum(pg_column_size({textindex.TSV})), 0) FROM items)")).scalar_one()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def measure(engine, texts: list[str]) -> dict:
    with engine.connect() as conn:
        for query in texts:  # warm-up: caches and the statement cache, as a running worker has them
            textindex.search(conn, query, 10)
        timings = []
        for query in texts:
            start = time.perf_counter()
            textindex.search(conn, query, 10)
            timings.append((time.perf_counter() - start) * 1000)
        size = index_bytes(conn)
    return {"p50_ms": round(statistics.median(timings), 3), "p95_ms": round(percentile(timings, 0.95), 3),
            "max_ms": round(max(timings), 3), "queries": len(timings), "index_bytes": int(size)}


def run(database_url: str, sizes: list[int], label: str) -> list[dict]:
    engine = create_engine(_database_url(database_url))  # the app's reading of the URL (driver named)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)  # WAL and synchronous=NORMAL, as the app runs
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    rng = random.Random(generate.SEED)
    texts = queries(random.Random(7))
    results, have = [], 0
    for size in sorted(sizes):
        analyse_s = insert_s = 0.0
        while have < size:
            count = min(BATCH, size - have)
            start = time.perf_counter()
            rows = items(rng, count)
            analyse_s += time.perf_counter() - start
            start = time.perf_counter()
            with engine.begin() as conn:
                conn.execute(INSERT, rows)
            insert_s += time.perf_counter() - start
            have += count
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:  # what autovacuum does after a bulk load: fresh planner statistics
                conn.execute(text("ANALYZE items"))
        added = size - (results[-1]["items"] if results else 0)
        entry = {"backend": label, "items": size,
                 "analyse_ms_per_item": round(analyse_s * 1000 / added, 4),
                 "insert_ms_per_item": round(insert_s * 1000 / added, 4), **measure(engine, texts)}
        results.append(entry)
        print(json.dumps(entry), flush=True)
    engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--database-url", help="a scratch PostgreSQL database (its tables are dropped)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        url = args.database_url or f"sqlite:///{Path(workdir) / 'textscale.sqlite3'}"
        label = "postgresql" if args.database_url else "sqlite"
        results = run(url, args.sizes, label)
    report = json.loads(args.output.read_text()) if args.output.exists() else {}
    for entry in results:
        report[f"{label}/{entry['items']}"] = entry
    args.output.write_text(json.dumps(dict(sorted(report.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
