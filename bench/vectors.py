"""Semantic query latency and web-process memory against the number of stored vectors, per back end.

    python -m bench.vectors            # 100, 1,000, 10,000, 100,000 vectors of 768 dims

Each (back end, size) runs in a fresh process, so RSS is that of a worker that has done only this:
  sqlite    the in-process float16 matrix, bounded by SEMANTIC_INDEX_MAX_MB (64 by default); past the
            bound it streams the rows from the database in chunks
  pgvector  PostgreSQL 16 + pgvector 0.6 from the pgserver package: the search runs in the database
The measured call is the vector store's top-50 search, as semantic search makes it (twice per query:
items and tags), with a random unit query vector.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "vectors"
RESULTS = ROOT / "bench" / "results"
SIZES = (100, 1_000, 10_000, 100_000)
DIM = 768
MB = 1024 * 1024


def one(backend: str, n: int, url: str, step: str) -> dict:
    """step "fill": a fresh database with n vectors; step "search": time the search in a fresh
    process, so its RSS is a worker's that has done nothing else."""
    import numpy as np
    import psutil
    from sqlalchemy import text

    sys.path.insert(0, str(ROOT))
    from app import create_app
    from app.db import db
    from app.semantic import index
    from app.settings import Settings

    app = create_app(Settings.from_env({"DATABASE_URL": url, "MEMORY_CHECK_INTERVAL": "3600"}))
    rng = np.random.default_rng(0)
    if step == "search":
        return search(app, backend, n, rng)
    with app.app_context():
        db.drop_all()
        db.create_all()
        if backend == "pgvector":
            assert index.enable_pgvector(), "pgvector is not available on this server"
            # Random unit vectors generated inside the database: fast, and nothing in this process.
            db.session.execute(text(
                "INSERT INTO embeddings (model_fp, kind, ref_id, text_hash, dim, vector, created_at, vec) "
                "SELECT 'bench', 'item', g, 'h', :dim, '\\x00'::bytea, now(), "
                "(SELECT array_agg(random() - 0.5) FROM generate_series(1, :dim) d WHERE g > 0)::vector "
                "FROM generate_series(1, :n) g"), {"n": n, "dim": DIM})
        else:
            for start in range(0, n, 10_000):
                block = rng.standard_normal((min(10_000, n - start), DIM)).astype(np.float32)
                block /= np.linalg.norm(block, axis=1, keepdims=True)
                db.session.execute(index.Embedding.__table__.insert(), [
                    {"model_fp": "bench", "kind": "item", "ref_id": start + i + 1, "text_hash": "h", "dim": DIM,
                     "vector": index.to_blob(v)} for i, v in enumerate(block)])
        db.session.commit()
    return {}


def search(app, backend: str, n: int, rng) -> dict:
    import numpy as np
    import psutil

    from app.semantic import index

    store = index.PgVectorIndex() if backend == "pgvector" else index.VectorIndex(64 * MB)
    with app.app_context():
        process = psutil.Process()
        before = process.memory_info().rss
        timings = []
        for _ in range(21):
            query = rng.standard_normal(DIM).astype(np.float32)
            query /= np.linalg.norm(query)
            started = time.perf_counter()
            hits = store.top("bench", "item", query, 50)
            timings.append((time.perf_counter() - started) * 1000)
        assert len(hits) == min(50, n)
        after = process.memory_info().rss
        mode = store.kind if backend == "pgvector" else ("matrix" if store.memory_bytes() else "streamed")
        return {"backend": backend, "vectors": n, "mode": mode, "first_ms": round(timings[0], 1),
                "median_ms": round(statistics.median(timings[1:]), 1), "rss_mb": round(after / MB, 1),
                "rss_growth_mb": round((after - before) / MB, 1), "index_mb": round(store.memory_bytes() / MB, 1)}


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] in ("sqlite", "pgvector"):
        print(json.dumps(one(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(WORK))
    import pgserver

    server = pgserver.get_server(str(WORK / "pg"), cleanup_mode="stop")
    rows = []
    try:
        for backend in ("sqlite", "pgvector"):
            for n in SIZES:
                url = f"sqlite:///{WORK / f'v{n}.sqlite3'}" if backend == "sqlite" else server.get_uri()
                for step in ("fill", "search"):
                    out = subprocess.run([sys.executable, "-m", "bench.vectors", backend, str(n), url, step],
                                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
                    if out.returncode != 0:
                        raise SystemExit(out.stderr[-3000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    finally:
        server.cleanup()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vectors.json").write_text(json.dumps(rows, indent=1))
    lines = ["| back end | vectors | search | top-50 median | worker RSS after 21 searches | RSS growth for the searches | index held |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['backend']} | {r['vectors']:,} | {r['mode']} | {r['median_ms']} ms | {r['rss_mb']} MB | "
              f"{r['rss_growth_mb']} MB | {r['index_mb']} MB |" for r in rows]
    table = "\n".join(lines)
    (RESULTS / "vectors.md").write_text(table + "\n")
    from devtools.markers import write_section

    write_section("vector-results", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
