"""pgvector at a million vectors, where no in-process index fits the tiers: the HNSW build as the release
does it, top-50 latency and recall, and inserts once the index exists.

    python -m bench.vectors_scale                      # 1,000,000 vectors, 384-d
    python -m bench.vectors_scale --vectors 200000 --build-memory 512MB
    python -m bench.vectors_scale --dim 768 --build-memory 4GB   # AlephBERT's width

Vectors: the 100,000 real multilingual-e5-small vectors of Hebrew passages of bench/vectors.py, and as
many more as asked made from them: each a random convex mix of two real vectors plus a little noise,
L2-normalised (there is no million-passage Hebrew corpus here, and encoding a million passages takes
longer than this machine's run allows). They stay near the real vectors' distribution, where HNSW
recall on random vectors would be a worst case, but they are not real embeddings: the recall below is
an estimate, measured against the exact float16 ranking of the same vectors. Queries are real e5
queries.

On PostgreSQL 16 + pgvector 0.6 (PyPI pgserver): the rows are loaded, `release.ensure_hnsw` builds the
index with HNSW_BUILD_MEMORY (--build-memory, 2GB by default: at a million 384-d vectors the graph
needs about that much; with less pgvector builds on disk, several times slower) and two parallel
workers, then the vector store's top-50 is timed at PGVECTOR_EF_SEARCH 200, and 2,000 more vectors are
inserted one transaction each (the rate a write sees with the index there). Nothing is asserted.
At --dim 768 each vector (and query) is its 384-d self followed by a fixed permutation of itself, over
√2: a permutation keeps dot products, so the cosine neighbours are exactly the 384-d set's, while
every distance the index computes has 768 dimensions (the build, the index's size and a query's cost
are a 768-d model's; the recall is the 384-d set's structure, measured again).
Results: bench/results/vectors-scale.json (vectors-scale-768.json at 768-d), shown in docs/vectors.md by
bench/readme.py.
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


def mixed_vectors(real, n: int, seed: int = 7):
    """real, then n - len(real) convex mixes of two real vectors with a little noise, normalised."""
    import numpy as np

    rng = np.random.default_rng(seed)
    extra = n - len(real)
    if extra <= 0:
        return real[:n]
    out = [real]
    for start in range(0, extra, 100_000):
        m = min(100_000, extra - start)
        a, b = rng.integers(0, len(real), m), rng.integers(0, len(real), m)
        w = rng.uniform(0.2, 0.8, (m, 1)).astype(np.float32)
        v = w * real[a] + (1 - w) * real[b] + rng.normal(0, 0.01, (m, real.shape[1])).astype(np.float32)
        out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    return np.concatenate(out).astype(np.float32)


def widened(vectors, dim: int):
    """vectors at dim (a multiple of their own): each followed by fixed permutations of itself, normalised."""
    import numpy as np

    copies = dim // vectors.shape[1]
    if copies * vectors.shape[1] != dim:
        raise SystemExit(f"--dim {dim} is not a multiple of the vectors' {vectors.shape[1]} dimensions")
    rng = np.random.default_rng(768)
    perms = [np.arange(vectors.shape[1])] + [rng.permutation(vectors.shape[1]) for _ in range(copies - 1)]
    return (np.concatenate([vectors[:, p] for p in perms], axis=1) / np.sqrt(copies)).astype(np.float32)


def exact_top(passages, queries, k: int = 10):
    """The exact top k of each query over the float16 vectors every back end stores, in blocks."""
    import numpy as np

    best = []
    for q in queries:
        scores = np.empty(len(passages), dtype=np.float32)
        for start in range(0, len(passages), 200_000):
            block = passages[start:start + 200_000].astype(np.float16).astype(np.float32)
            scores[start:start + len(block)] = block @ q
        best.append(list(np.argsort(-scores)[:k] + 1))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--build-memory", default="2GB")
    parser.add_argument("--inserts", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=384, help="384 (e5's own) or a multiple of it, e.g. 768")
    args = parser.parse_args(argv)
    import pgserver

    from app import release
    from app.db import db
    from app.semantic import hnsw, index
    from bench.vectors import WARMUP, WORK, app_for, e5_vectors, fill, pct, store_for, timed_searches

    real, queries = e5_vectors(100_000)
    passages = widened(mixed_vectors(real, args.vectors), args.dim)
    queries = widened(queries, args.dim)
    truth = exact_top(passages, queries[WARMUP:])
    os.environ.setdefault("XDG_RUNTIME_DIR", str(WORK))
    server = pgserver.get_server(str(WORK / "pg-scale"), cleanup_mode="stop")
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
              "vectors": args.vectors, "real_vectors": min(len(real), args.vectors), "dim": passages.shape[1],
              "build_memory": args.build_memory}
    try:
        url = server.get_uri()
        app = app_for(url)
        started = time.monotonic()
        fill(app, passages, pgvector=True)
        result["load_s"] = round(time.monotonic() - started, 1)
        with app.app_context():
            started = time.monotonic()
            result["build"] = release.ensure_hnsw("bench", passages.shape[1], min_rows=1,
                                                  build_memory=args.build_memory)
            result["build_s"] = round(time.monotonic() - started, 1)
            name = hnsw.kind_for(hnsw.pgvector_version()).name(passages.shape[1])
            result["index_mb"] = round(db.session.scalar(db.text("SELECT pg_relation_size(:n)"), {"n": name}) / 2**20, 1)
            result["table_mb"] = round(db.session.scalar(db.text(
                "SELECT pg_total_relation_size('embeddings') - pg_relation_size(:n)"), {"n": name}) / 2**20, 1)
            db.session.execute(db.text("ANALYZE embeddings"))
            db.session.commit()
        store = store_for(app, "pgvector-hnsw")
        timings, found = timed_searches(app, store, queries)
        result.update({"p50_ms": pct(timings, 50), "p95_ms": pct(timings, 95),
                       "recall_at_10": round(statistics.mean(len(set(f) & set(t)) / 10 for f, t in zip(found, truth)), 3)})
        # Inserts with the index there: one row per transaction, as the embedder's writes land.
        extra = widened(mixed_vectors(real, len(real) + args.inserts, seed=13)[len(real):], args.dim)
        with app.app_context():
            started = time.monotonic()
            for i, v in enumerate(extra):
                db.session.execute(db.text(
                    "INSERT INTO embeddings (model_fp, kind, ref_id, text_hash, dim, vector, created_at, vec) "
                    "VALUES ('bench', 'item', :ref, 'h', :dim, :blob, now(), CAST(:lit AS vector))"),
                    {"ref": args.vectors + i + 1, "dim": len(v), "blob": index.to_blob(v), "lit": index._literal(v)})
                db.session.commit()
            result["inserts_per_s"] = round(len(extra) / (time.monotonic() - started), 1)
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
    finally:
        server.cleanup()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / results_name(args.dim)).write_text(json.dumps(result, indent=1))
    print(section(result))
    return 0


def results_name(dim: int) -> str:
    return "vectors-scale.json" if dim == 384 else f"vectors-scale-{dim}.json"


def section(data: dict) -> str:
    """The run in a few sentences, for docs/vectors.md (bench/readme.py copies it there)."""
    made = (f"{data['real_vectors']:,} real multilingual-e5-small vectors, the rest mixes of two of them"
            + ("" if data["dim"] == 384 else f"; each widened to {data['dim']} dimensions by permuted copies "
               "of itself, which keeps its neighbours"))
    return (f"Measured {data['measured_at']}, {data['cores']} cores: pgvector 0.6 (PostgreSQL 16) with "
            f"{data['vectors']:,} vectors of {data['dim']} dimensions ({made}). Loaded in {data['load_s']} s; HNSW "
            f"built by the release's `ensure_hnsw` in **{data['build_s']} s** with maintenance_work_mem "
            f"{data['build_memory']} ({data['index_mb']} MB index beside a {data['table_mb']} MB table). Top-50 "
            f"at ef_search 200: p50 **{data['p50_ms']} ms**, p95 {data['p95_ms']} ms, recall@10 "
            f"**{data['recall_at_10']}** against the exact ranking; inserts with the index there: "
            f"{data['inserts_per_s']} rows/s, one transaction each.")


if __name__ == "__main__":
    sys.exit(main())
