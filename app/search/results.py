"""The shape of one search result, shared by every mode."""

from __future__ import annotations

from ..db import Item


def result(item: Item, score: float, matched_tags: list | None = None) -> dict:
    shaped = {"id": item.id, "title": item.title, "body": item.body, "tags": [t.name for t in item.tags],
              "score": round(float(score), 4)}
    if matched_tags is not None:
        shaped["matched_tags"] = matched_tags
    return shaped
