"""Semantic search: the service finds and scores the nearest ids; this module loads and shapes them."""

from __future__ import annotations

from ..state import get_service
from .results import load, result


def search(query: str, limit: int) -> list[dict]:
    """Items nearest the query by cosine, through their own text and their tags.

    Raises SemanticUnavailable (a 503 with its reason) when the model is off or failed to load.
    """
    hits = get_service().search(query, limit)
    items = load(i for _, i in hits.scored)
    results = []
    for score, item_id in hits.scored:
        item = items.get(item_id)
        if item is None:  # removed since its vector was read
            continue
        close = hits.item_tags.get(item_id, ())
        matched = sorted(({"name": name, "score": round(hits.tag_scores[tag_id], 4)}
                          for tag_id, name in item.tags if tag_id in close), key=lambda m: -m["score"])
        results.append(result(item, score, matched))
    return results
