"""Score ranking functions on the labelled set: ``python -m bench.relevance.evaluate [--database-url URL]``.

Loads bench/relevance/corpus.json into a fresh database (item ids 1..N in corpus order), runs each
engine over bench/relevance/queries.json and writes bench/results/relevance.json with nDCG@10 and
recall@10, overall and per category. ``evaluate(rank, queries)`` takes any ranking function (query
text -> item ids, best first), so semantic and hybrid search can be scored the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from .generate import CORPUS, QUERIES

K = 10
RESULTS = Path(__file__).resolve().parents[1] / "results" / "relevance.json"


def ndcg_at_k(ranked: list[int], relevant: dict[int, int], k: int = K) -> float:
    """Normalised discounted cumulative gain of the first k results with graded gains 2^g - 1."""
    dcg = sum((2 ** relevant.get(item, 0) - 1) / math.log2(i + 2) for i, item in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    best = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / best if best else 0.0


def recall_at_k(ranked: list[int], relevant: dict[int, int], k: int = K) -> float:
    """Share of the k most relevant slots filled with relevant items: |relevant ∩ top k| / min(k, R)."""
    if not relevant:
        return 0.0
    return len(set(ranked[:k]) & set(relevant)) / min(k, len(relevant))


def evaluate(rank: Callable[[str], list[int]], queries: list[dict], k: int = K) -> dict:
    """Mean nDCG@k and recall@k of a ranking function, overall and per query category."""
    per_category: dict[str, list[tuple[float, float]]] = {}
    for query in queries:
        relevant = {int(i): g for i, g in query["relevant"].items()}
        ranked = rank(query["q"])
        per_category.setdefault(query["category"], []).append(
            (ndcg_at_k(ranked, relevant, k), recall_at_k(ranked, relevant, k)))
    every = [pair for pairs in per_category.values() for pair in pairs]

    def summary(pairs):
        return {"ndcg@10": round(statistics.fmean(p[0] for p in pairs), 4),
                "recall@10": round(statistics.fmean(p[1] for p in pairs), 4), "queries": len(pairs)}

    return {**summary(every), "by_category": {c: summary(p) for c, p in sorted(per_category.items())}}


def load_app(database_url: str | None, workdir: Path):
    """A fresh app over the relevance corpus (the schema is dropped and made anew)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from support import make_settings

    from app import create_app
    from app.db import Item, db

    env = {"DATABASE_URL": database_url} if database_url else {}
    app = create_app(make_settings(workdir, **env))
    corpus = json.loads(CORPUS.read_text(encoding="utf-8"))
    with app.app_context():
        db.drop_all()
        db.create_all()
        db.session.add_all(Item(title=i["title"], body=i["body"]) for i in corpus)
        db.session.commit()
    return app


def engines(app) -> dict[str, Callable[[str], list[int]]]:
    """The text engines to compare: the index (issue 12) and the LIKE engine it replaces."""
    from app import textindex
    from app.db import db

    def indexed(query: str) -> list[int]:
        return [i for i, _ in textindex.search(db.session, query, K).hits]

    found = {"text-index": indexed}
    try:
        from app.search import text_search  # the LIKE engine, while it still exists
    except ImportError:
        try:
            from app.search.text import text_search
        except ImportError:
            text_search = None
    if text_search is not None:
        found["text-legacy"] = lambda query: [r["id"] for r in text_search(query, K)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="PostgreSQL URL (a scratch database: its tables are dropped)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    queries = json.loads(QUERIES.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as workdir:
        app = load_app(args.database_url, Path(workdir))
        backend = "postgresql" if args.database_url else "sqlite"
        with app.app_context():
            scores = {name: evaluate(rank, queries) for name, rank in engines(app).items()}
    report = json.loads(args.output.read_text()) if args.output.exists() else {}
    report[backend] = {"items": len(json.loads(CORPUS.read_text(encoding="utf-8"))), "queries": len(queries),
                       "engines": scores}
    args.output.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    for name, score in scores.items():
        print(f"{backend:10} {name:12} nDCG@10 {score['ndcg@10']:.3f}  recall@10 {score['recall@10']:.3f}")
        for category, s in score["by_category"].items():
            print(f"{'':24}{category:12} nDCG@10 {s['ndcg@10']:.3f}  recall@10 {s['recall@10']:.3f}")


if __name__ == "__main__":
    main()
