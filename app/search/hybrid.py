"""Hybrid search: the text and the semantic rankings fused by reciprocal rank fusion (RRF).

RRF (Cormack, Clarke and Büttcher, SIGIR 2009) scores an item by the sum of 1 / (k + rank) over the
rankings that found it. It reads only ranks, so BM25 scores and cosines, which have nothing in
common, never need to be put on one scale; an item both rankings found beats one found by either alone.
When semantic search cannot answer (off, its model failed to load, or shed under load) the answer is
the text ranking alone, and says so: hybrid never answers 503 for the model's sake.
"""

from __future__ import annotations

from sqlalchemy import select

from .. import textindex
from ..db import Item, db
from ..semantic.service import SemanticUnavailable
from ..state import get_service
from .results import Answer, result

# The k of RRF: 60, the paper's value and the usual default; a larger k flattens the gap between ranks.
RRF_K = 60
# Each ranking is read this far down, so an item ranked modestly by both can still rise into the limit,
# while a query's cost stays bounded by the limit, not by the table.
DEPTH_PER_RESULT, DEPTH_MIN = 3, 30
RANKINGS = ("text", "semantic")  # the order a result's "ranks" lists them in


def depth(limit: int) -> int:
    """How many ids each ranking contributes for a query asking for limit results."""
    return max(limit * DEPTH_PER_RESULT, DEPTH_MIN)


def fuse(rankings: dict[str, list[int]], limit: int) -> list[tuple[float, int, dict[str, int]]]:
    """(RRF score, item id, {ranking: 1-based rank}) of the best limit ids, best first; ties: newer id first.

    An id listed twice in one ranking counts once, at its better rank.
    """
    scores: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    for name, ids in rankings.items():
        for rank, item_id in enumerate(ids, start=1):
            if name in ranks.setdefault(item_id, {}):
                continue
            ranks[item_id][name] = rank
            scores[item_id] = scores.get(item_id, 0.0) + 1.0 / (RRF_K + rank)
    best = sorted(scores, key=lambda item_id: (-scores[item_id], -item_id))[:limit]
    return [(scores[item_id], item_id, ranks[item_id]) for item_id in best]


def search(query: str, limit: int) -> Answer:
    """Items ranked by RRF over text and semantic search; text alone, with a fallback field, without the model."""
    per_ranking = depth(limit)
    rankings = {"text": [item_id for item_id, _ in textindex.search(db.session, query, per_ranking).hits]}
    # The semantic query may wait in the model queue: its connection goes back to the pool meanwhile, so
    # hybrid searches waiting for the model never hold the connections text and tag searches need.
    db.session.commit()
    fallback = None
    try:
        rankings["semantic"] = [item_id for _, item_id in get_service().search(query, per_ranking).scored]
    except SemanticUnavailable as exc:  # disabled, failed to load, or shed as overloaded (a subclass)
        fallback = {"mode": "text", "reason": str(exc)}
    fused = fuse(rankings, limit)
    items = {i.id: i for i in db.session.scalars(select(Item).where(Item.id.in_([i for _, i, _ in fused])))}
    # Shown as a share of the best score possible (first in every ranking that answered = 1.0): raw RRF
    # sums are near 0.016, where the 4 decimals of a result's score would no longer tell ranks apart.
    best_possible = len(rankings) / (RRF_K + 1)
    results = []
    for score, item_id, ranks in fused:
        if item_id in items:  # an item deleted between the rankings and this read is skipped, not an error
            shaped = result(items[item_id], score / best_possible)
            shaped["ranks"] = {name: ranks[name] for name in RANKINGS if name in ranks}
            results.append(shaped)
    return Answer(results, fallback)
