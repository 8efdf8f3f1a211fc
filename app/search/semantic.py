"""Semantic search: the service finds and scores the nearest ids; this module loads and shapes them."""

from __future__ import annotations

from sqlalchemy import select

from ..db import Item, db
from ..state import get_service
from .results import result


def search(query: str, limit: int) -> list[dict]:
    """Items nearest the query by cosine, through their own text and their tags.

    Raises SemanticUnavailable (a 503 with its reason) when the model is off or failed to load.
    """
    hits = get_service().search(query, limit)
    items = {i.id: i for i in db.session.scalars(select(Item).where(Item.id.in_([i for _, i in hits.scored])))}
    results = []
    for score, item_id in hits.scored:
        item = items.get(item_id)
        if item is None:  # removed since its vector was read
            continue
        close = hits.item_tags.get(item_id, ())
        matched = sorted(({"name": t.name, "score": round(hits.tag_scores[t.id], 4)} for t in item.tags
                          if t.id in close), key=lambda m: -m["score"])
        results.append(result(item, score, matched))
    return results
