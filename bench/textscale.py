"""Text search latency, index size and write cost against the number of items, per back end.

    python -m bench.textscale                                   # SQLite, 1k / 10k / 100k items
    python -m bench.textscale --sizes 1000 10000 100000 1000000 --database-url postgresql://...
    python -m bench.textscale --plot-only                       # redraw textscale.png from the JSON

The items are generated like the relevance corpus (bench/relevance/generate.py: Hebrew topic words,
names, prefixes, niqqud, both spellings) and added in one growing database, so each size measures
the same index grown further. At each size:
  write       milliseconds per item to analyse it (Python) and to insert it with its index
              maintenance (trigger or generated columns), in batches of 1,000 rows per transaction;
              ``analyzer`` names the analysis measured (app/hebrew.py's analyzer_version())
  latency     p50 / p95 of app.textindex.search(limit=10) over the labelled queries plus random
              two- and three-word queries, after one warm-up pass; also the CPU time a query took
              (this process, plus the PostgreSQL backend's when the server runs on this machine),
              which a shared machine inflates far less than the wall clock, and the load average
  agreement   for a sample of the queries, how many of the bounded ranking's top 10 the exhaustive
              ranking (every match scored, textindex.CANDIDATES unbounded) also has in its top 10,
              and the bounded top 10's summed score as a share of the exhaustive one's
  index size  SQLite: the FTS5 table's pages; PostgreSQL: the GIN indexes plus the tsvector columns
Results are merged into bench/results/textscale.json (one entry per back end and size) and plotted
to bench/results/textscale.png. The PostgreSQL URL must name a scratch database: its tables are dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import create_engine, event, text

from app import hebrew, textindex
from app.db import Base, Item, _sqlite_pragmas
from app.settings import _database_url

from .relevance import generate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "textscale.json"
PLOT = RESULTS.with_suffix(".png")
SIZES = (1_000, 10_000, 100_000)
BATCH = 1_000
RANDOM_QUERIES = 200
AGREEMENT_QUERIES = 40  # every n-th query of the set, scored both ways (the exhaustive way is slow at 1M)
GOALS_MS = {100_000: 20, 1_000_000: 100}  # p50 goals


def items(rng: random.Random, count: int):
    """``count`` generated items as insert parameters, analysed here (timed apart from the insert)."""
    now = datetime.now(timezone.utc)
    rows = []
    for _ in range(count):
        title, body = generate.random_item(rng)
        item = generate.make_item(rng, title, body, pointed=rng.random() < 0.06)
        rows.append({"title": item["title"], "body": item["body"], "created_at": now, "updated_at": now,
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
    indexes = " + ".join(f"pg_relation_size('{name}')" for name in textindex.PG_INDEXES)
    columns = " + ".join(f"coalesce(sum(pg_column_size({name})), 0)" for name in textindex.PG_COLUMNS)
    return conn.execute(text(f"SELECT {indexes} + (SELECT {columns} FROM items)")).scalar_one()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def _server_cpu(conn):
    """A function returning the PostgreSQL backend's CPU seconds so far, when it runs on this machine."""
    if conn.dialect.name != "postgresql":
        return lambda: 0.0
    stat = Path(f"/proc/{conn.execute(text('SELECT pg_backend_pid()')).scalar_one()}/stat")
    tick = os.sysconf("SC_CLK_TCK")

    def seconds() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime (proc(5))

    try:
        seconds()
    except OSError:  # a remote server: its CPU time is not measured
        return lambda: 0.0
    return seconds


def agreement(conn, texts: list[str]) -> dict:
    """How far the bounded ranking's top 10 is from the exhaustive one's on a sample of the queries."""
    overlaps, shares = [], []
    bounded = textindex.CANDIDATES
    try:
        for query in texts[::max(1, len(texts) // AGREEMENT_QUERIES)]:
            textindex.CANDIDATES = bounded
            fast = textindex.search(conn, query, 10).hits
            textindex.CANDIDATES = 10**9  # every match is a candidate: the exhaustive ranking
            full = textindex.search(conn, query, 10).hits
            if full:
                overlaps.append(len({i for i, _ in fast} & {i for i, _ in full}) / len(full))
                shares.append(sum(s for _, s in fast) / sum(s for _, s in full))
    finally:
        textindex.CANDIDATES = bounded
    return {"top10_overlap": round(statistics.fmean(overlaps), 3), "top10_score_share": round(statistics.fmean(shares), 4),
            "agreement_queries": len(overlaps)}


def measure(engine, texts: list[str]) -> dict:
    with engine.connect() as conn:
        for query in texts:  # warm-up: caches and the statement cache, as a running worker has them
            textindex.search(conn, query, 10)
        server = _server_cpu(conn)
        load_before = os.getloadavg()[0]
        timings = []
        cpu_start, server_start = time.process_time(), server()
        for query in texts:
            start = time.perf_counter()
            textindex.search(conn, query, 10)
            timings.append((time.perf_counter() - start) * 1000)
        cpu_ms = (time.process_time() - cpu_start + server() - server_start) * 1000 / len(texts)
        load_after = os.getloadavg()[0]
        size = index_bytes(conn)
        agreed = agreement(conn, texts)
    return {"p50_ms": round(statistics.median(timings), 3), "p95_ms": round(percentile(timings, 0.95), 3),
            "max_ms": round(max(timings), 3), "queries": len(timings), "cpu_ms_per_query": round(cpu_ms, 3),
            # os.getloadavg()'s 1-minute figure before and after the timed pass: the machine is shared.
            "loadavg_1min": [round(load_before, 2), round(load_after, 2)], "cpus": os.cpu_count(),
            "candidates_per_tier": textindex.CANDIDATES, "index_bytes": int(size), **agreed}


def run(database_url: str, sizes: list[int], label: str) -> list[dict]:
    engine = create_engine(_database_url(database_url))  # the app's reading of the URL (driver named)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)  # WAL and synchronous=NORMAL, as the app runs
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    rng = random.Random(generate.SEED)
    texts = queries(random.Random(7))
    results, have = [], 0
    from tqdm import tqdm

    progress = tqdm(total=max(sizes), unit="items", desc=f"{label} items", mininterval=2)
    for size in sorted(sizes):
        analyse_s = insert_s = 0.0
        while have < size:
            count = min(BATCH, size - have)
            start = time.perf_counter()
            rows = items(rng, count)
            analyse_s += time.perf_counter() - start
            start = time.perf_counter()
            with engine.begin() as conn:  # one multi-row INSERT per batch (the driver's executemany path)
                conn.execute(Item.__table__.insert(), rows)
            insert_s += time.perf_counter() - start
            have += count
            progress.update(count)
        if engine.dialect.name == "postgresql":
            # What autovacuum does after a bulk load (PostgreSQL 13+ vacuums on inserts too): fresh
            # planner statistics, and a visibility map, so that the GIN bitmap scans skip heap pages
            # they need not read (measured at 100k items: p50 29 ms right after the load, 17 ms after).
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE items"))
        added = size - (results[-1]["items"] if results else 0)
        entry = {"backend": label, "items": size, "analyzer": hebrew.analyzer_version(),
                 "analyse_ms_per_item": round(analyse_s * 1000 / added, 4),
                 "insert_ms_per_item": round(insert_s * 1000 / added, 4), **measure(engine, texts)}
        results.append(entry)
        progress.write(json.dumps(entry))
    progress.close()
    engine.dispose()
    return results


def plot(report: dict, path: Path = PLOT) -> None:
    """p50 and p95 against the number of items, per back end, log-log, with the issue's goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = {"sqlite": "#2c7fb8", "postgresql": "#d95f0e"}
    for backend in sorted({entry["backend"] for entry in report.values()}):
        runs = sorted((e for e in report.values() if e["backend"] == backend), key=lambda e: e["items"])
        sizes = [e["items"] for e in runs]
        ax.plot(sizes, [e["p50_ms"] for e in runs], marker="o", color=colours.get(backend), label=f"{backend} p50")
        ax.plot(sizes, [e["p95_ms"] for e in runs], marker="x", linestyle="--", color=colours.get(backend),
                label=f"{backend} p95")
    for items, goal in GOALS_MS.items():
        ax.plot([items], [goal], marker="_", markersize=30, color="black")
        ax.annotate(f"goal p50 {goal} ms", (items, goal), textcoords="offset points", xytext=(-40, 8), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items")
    ax.set_ylabel("text query latency, ms (limit 10)")
    loads = sorted({tuple(e.get("loadavg_1min", [])) for e in report.values() if e.get("loadavg_1min")})
    ax.set_title("Text search at scale (shared machine; load averages "
                 f"{min(l[0] for l in loads):.0f}-{max(l[-1] for l in loads):.0f})" if loads else "Text search at scale",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--database-url", help="a scratch PostgreSQL database (its tables are dropped)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON, measure nothing")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.output.read_text()), args.output.with_suffix(".png"))
        return
    with tempfile.TemporaryDirectory() as workdir:
        url = args.database_url or f"sqlite:///{Path(workdir) / 'textscale.sqlite3'}"
        label = "postgresql" if args.database_url else "sqlite"
        results = run(url, args.sizes, label)
    report = json.loads(args.output.read_text()) if args.output.exists() else {}
    for entry in results:
        report[f"{label}/{entry['items']}"] = entry
    args.output.write_text(json.dumps(dict(sorted(report.items())), indent=2) + "\n")
    plot(report, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
