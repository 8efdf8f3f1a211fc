"""Vector search at scale, side by side: the per-worker matrix (the design before the shared index), the
instance's shared USearch index, and pgvector (exact, and HNSW as the release builds it).

    python -m bench.vectors                      # 10,000 and 100,000 vectors; 384-d (e5) and 768-d (random)
    python -m bench.vectors --sizes 10000 --dims 384 --quick

Vectors:
  384-d  real multilingual-e5-small vectors (bench/e5.py's prepared q8 artifact) of Hebrew passages made
         from the bundled sample and the relevance corpus: windows of 6-14 consecutive words of one
         item's title and body, joined with another's (real words and phrases, not natural prose);
         queries are 2-5 word windows encoded as queries. Cached in bench/work/vectors/. HNSW recall on
         random vectors is a worst case; this is the case that matters.
  768-d  random unit vectors (AlephBERT's size; no Hebrew 768-d model here): latency and memory only.

Back ends (each size and dimension on a fresh database; searches are the vector store's top-50, as
semantic search asks for items):
  matrix       VectorIndex alone (VECTOR_INDEX_DIR=off) bounded as the 512 MB tier (SEMANTIC_INDEX_MAX_MB=32):
               past the bound every query streams the rows from SQLite
  shared       SharedIndex: `shared.publish` builds the generation (timed) and probes its graph, searched
               through a view (the graph, or every vector where the probe found the graph short)
  pgvector     PostgreSQL 16 + pgvector 0.6 (PyPI pgserver): exact scan, then HNSW built as the release
               does (release.ensure_hnsw, HNSW_BUILD_MEMORY 256MB, timed) at PGVECTOR_EF_SEARCH 200; 384-d only

Figures per (back end, size, dim): top-50 p50 and p95 over 50 queries after 5 warm-ups, recall@10 against
the exact float32 ranking, build seconds, bytes on disk, and for matrix and shared the PSS sum of 2 and
of 6 processes that opened the store and searched (each a worker's view: the shared file counted once).
Results: bench/results/vectors.json and vectors.md, copied into docs/vectors.md (its vector-results markers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from devtools.project import remove_database

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "vectors"
RESULTS = ROOT / "bench" / "results"
MB = 1024 * 1024
K = 50
QUERIES = 50
WARMUP = 5
MATRIX_MB = 32  # SEMANTIC_INDEX_MAX_MB of the 512 MB tier


# --- vectors -------------------------------------------------------------------------------------

def hebrew_texts(n: int, words: tuple[int, int], seed: int) -> list[str]:
    from app.data import load_sample

    items = load_sample()
    corpus = ROOT / "bench" / "relevance" / "corpus.json"
    if corpus.exists():
        data = json.loads(corpus.read_text(encoding="utf-8"))
        items += data if isinstance(data, list) else data.get("items", [])
    sources = [f"{i.get('title', '')} {i.get('body', '')}".split() for i in items if isinstance(i, dict)]
    sources = [s for s in sources if len(s) >= 4]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.choice(sources), rng.choice(sources)
        joined = a + b
        length = rng.randint(*words)
        start = rng.randrange(max(1, len(joined) - length))
        texts.append(" ".join(joined[start:start + length]))
    return texts


def e5_vectors(n: int):
    """(passages n x 384, queries QUERIES x 384) float32, L2-normalised, from the e5 artifact; cached."""
    import numpy as np

    WORK.mkdir(parents=True, exist_ok=True)
    cache = WORK / f"e5-{n}.npz"
    if cache.exists():
        data = np.load(cache)
        return data["passages"], data["queries"]
    from app.semantic.encoders import load_encoder
    from app.settings import Settings
    from bench.e5 import prepared_artifact

    encoder = load_encoder(Settings.from_env({"SEMANTIC_MODEL": str(prepared_artifact()),
                                              "SEMANTIC_MAX_SEQ_LENGTH": "128", "SEMANTIC_THREADS": "2"}))
    texts = hebrew_texts(n, (6, 14), seed=1)
    started = time.monotonic()
    passages = np.concatenate([encoder.encode(texts[i:i + 256], 64, kind="passage")
                               for i in range(0, n, 256)]).astype(np.float32)
    queries = encoder.encode(hebrew_texts(QUERIES + WARMUP, (2, 5), seed=2), 32, kind="query").astype(np.float32)
    print(f"[vectors] encoded {n} passages with e5 in {time.monotonic() - started:.0f} s", flush=True)
    np.savez(cache, passages=passages, queries=queries)
    return passages, queries


def random_vectors(n: int, dim: int):
    import numpy as np

    rng = np.random.default_rng(n + dim)
    out = []
    for count in (n, QUERIES + WARMUP):
        v = rng.standard_normal((count, dim)).astype(np.float32)
        out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return out


def exact_top(passages, queries, k: int = 10):
    import numpy as np

    stored = passages.astype(np.float16).astype(np.float32)  # what every back end holds
    return [list(np.argsort(-(stored @ q))[:k] + 1) for q in queries]


# --- one back end --------------------------------------------------------------------------------

def app_for(url: str, extra: dict | None = None):
    from app import create_app
    from app.settings import Settings

    env = {"DATABASE_URL": url, "MEMORY_CHECK_INTERVAL": "3600", "SEMANTIC_INDEX_MAX_MB": str(MATRIX_MB),
           **(extra or {})}
    return create_app(Settings.from_env(env, instance_path=str(WORK / "instance")))


def fill(app, passages, pgvector: bool) -> None:
    from app.db import Embedding, create_schema, db
    from app.semantic import index

    with app.app_context():
        db.drop_all()
        db.session.execute(db.text("DROP TABLE IF EXISTS alembic_version"))
        db.session.commit()
        create_schema()
        if pgvector:
            assert index.enable_pgvector(), "pgvector is not available on this server"
        dim = passages.shape[1]
        db.session.commit()
        if pgvector:  # psycopg2's execute_values: one statement per thousand rows, vec set as it goes in
            from psycopg2.extras import execute_values

            raw = db.engine.raw_connection()
            try:
                cursor = raw.cursor()
                execute_values(cursor, "INSERT INTO embeddings (model_fp, kind, ref_id, text_hash, dim, vector, "
                               "created_at, vec) VALUES %s",
                               (("bench", "item", i + 1, "h", dim, index.to_blob(v), index._literal(v))
                                for i, v in enumerate(passages)),
                               template="(%s, %s, %s, %s, %s, %s, now(), %s::vector)", page_size=1000)
                raw.commit()
            finally:
                raw.close()
            return
        for start in range(0, len(passages), 5000):
            block = passages[start:start + 5000]
            db.session.execute(Embedding.__table__.insert(), [
                {"model_fp": "bench", "kind": "item", "ref_id": start + i + 1, "text_hash": "h", "dim": dim,
                 "vector": index.to_blob(v)} for i, v in enumerate(block)])
            db.session.commit()


def store_for(app, backend: str):
    from app.semantic import index, shared

    if backend.startswith("pgvector"):
        return index.PgVectorIndex(200)
    matrix = index.VectorIndex(MATRIX_MB * MB)
    return matrix if backend == "matrix" else shared.SharedIndex(WORK / "shared", matrix)


def timed_searches(app, store, queries) -> tuple[list[float], list[list[int]]]:
    import numpy as np

    timings, found = [], []
    with app.app_context():
        for i, q in enumerate(queries):
            started = time.perf_counter()
            hits = store.top("bench", "item", np.asarray(q), K)
            if i >= WARMUP:
                timings.append((time.perf_counter() - started) * 1000)
                found.append([r for r, _ in hits[:10]])
            from app.db import db

            db.session.commit()
    return timings, found


def pct(values, p):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))], 2)


def child(url: str, backend: str, queries_file: str) -> None:
    """A worker's view: open the store, search, report PSS, then wait until told to go."""
    import numpy as np

    app = app_for(url, {"VECTOR_INDEX_DIR": "off"} if backend == "matrix" else None)
    store = store_for(app, backend)
    timed_searches(app, store, np.load(queries_file)[:20])
    print("ready", flush=True)
    sys.stdin.readline()


def pss_of(url: str, backend: str, queries_file: Path, processes: int) -> float:
    procs = [subprocess.Popen([sys.executable, "-m", "bench.vectors", "--child", url, backend, str(queries_file)],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"a {backend} child failed")
        total = 0
        for p in procs:
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        return round(total / MB, 1)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)


def measure(backend: str, n: int, dim: int, passages, queries, truth, url: str) -> dict:
    import numpy as np

    from app.semantic import shared

    row = {"backend": backend, "vectors": n, "dim": dim}
    app = app_for(url, {"VECTOR_INDEX_DIR": "off"} if backend == "matrix" else None)
    store = store_for(app, backend)
    disk = 0
    if backend == "shared":
        with app.app_context():
            manifest = shared.publish(WORK / "shared", "bench", "item")
        row["build_s"] = manifest["built_seconds"]
        row["mode"] = f"{manifest['search']}, probe {manifest['probe_recall']}"
        disk = (WORK / "shared" / manifest["file"]).stat().st_size
    elif backend == "pgvector-hnsw":
        from app import release
        from app.semantic import hnsw

        with app.app_context():
            started = time.monotonic()
            outcome = release.ensure_hnsw("bench", dim, min_rows=1, build_memory="256MB")
            row["build_s"] = round(time.monotonic() - started, 1)
            from app.db import db

            name = hnsw.kind_for(hnsw.pgvector_version()).name(dim)
            disk = db.session.scalar(db.text("SELECT pg_relation_size(:n)"), {"n": name})
            db.session.execute(db.text("ANALYZE embeddings"))
            db.session.commit()
        row["build"] = outcome
    elif backend == "matrix":
        row["mode"] = "matrix" if n * (dim * 2 + 8) <= MATRIX_MB * MB else "streamed"
    timings, found = timed_searches(app, store, queries)
    row.update({"p50_ms": pct(timings, 50), "p95_ms": pct(timings, 95), "disk_mb": round(disk / MB, 1),
                "recall_at_10": round(statistics.mean(len(set(f) & set(t)) / 10 for f, t in zip(found, truth)), 3)})
    if backend in ("matrix", "shared"):
        qfile = WORK / f"queries-{dim}.npy"
        np.save(qfile, queries)
        row["pss_2_mb"] = pss_of(url, backend, qfile, 2)
        row["pss_6_mb"] = pss_of(url, backend, qfile, 6)
    with app.app_context():
        from app.db import db

        db.session.remove()
        db.engine.dispose()
    print(f"[vectors] {row}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(*argv[1:4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--dims", default="384,768")
    parser.add_argument("--no-pgvector", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(WORK))
    server = None
    if not args.no_pgvector:
        import pgserver

        server = pgserver.get_server(str(WORK / "pg"), cleanup_mode="stop")
    rows = []
    started = time.monotonic()
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        for dim in (int(d) for d in args.dims.split(",")):
            for n in sizes:
                if dim == 384:  # the smaller sizes are prefixes of the largest: encoded once
                    passages, queries = e5_vectors(max(sizes))
                    passages = passages[:n]
                else:
                    passages, queries = random_vectors(n, dim)
                truth = exact_top(passages, queries[WARMUP:])
                sqlite_url = f"sqlite:///{WORK / f'v{n}-{dim}.sqlite3'}"
                remove_database(WORK / f'v{n}-{dim}.sqlite3')
                fill(app_for(sqlite_url), passages, pgvector=False)
                for backend in ("matrix", "shared"):
                    rows.append(measure(backend, n, dim, passages, queries, truth, sqlite_url))
                if server is not None and dim == 384:
                    fill(app_for(server.get_uri()), passages, pgvector=True)
                    for backend in ("pgvector-exact", "pgvector-hnsw"):
                        rows.append(measure(backend, n, dim, passages, queries, truth, server.get_uri()))
    finally:
        if server is not None:
            server.cleanup()
    data = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
            "wall_seconds": round(time.monotonic() - started), "k": K, "queries": QUERIES, "rows": rows}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "vectors.json").write_text(json.dumps(data, indent=1))
    table = report(data)
    (args.results / "vectors.md").write_text(table + "\n")
    if args.results == RESULTS:
        from devtools.markers import write_section

        write_section("vector-results", table)
    print(table)
    return 0


def report(data: dict) -> str:
    def v(x, unit=""):
        return "–" if x is None else f"{x}{unit}"

    lines = [f"Measured {data['measured_at']}, {data['cores']} cores; top-{data['k']} searches, {data['queries']} "
             "queries after warm-up. 384-d: multilingual-e5-small vectors of Hebrew passages; 768-d: random.", "",
             "| back end | vectors | dim | p50 | p95 | recall@10 | build | on disk | PSS, 2 processes | PSS, 6 processes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        name = r["backend"] + (f" ({r['mode']})" if r.get("mode") else "")
        lines.append(f"| {name} | {r['vectors']:,} | {r['dim']} | {r['p50_ms']} ms | {r['p95_ms']} ms | "
                     f"{r['recall_at_10']} | {v(r.get('build_s'), ' s')} | {v(r['disk_mb'] or None, ' MB')} | "
                     f"{v(r.get('pss_2_mb'), ' MB')} | {v(r.get('pss_6_mb'), ' MB')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
