"""The shape of a search's answer and of one search result, shared by every mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import select

from ..db import Item, Tag, db, item_tags


@dataclass(frozen=True)
class Answer:
    """What one mode found: its results, best first, and how it fell back when it could not run in full."""

    results: list[dict]
    # {"mode": the mode that answered instead, "reason": why}; None when the mode ran as asked.
    fallback: dict | None = None

    def fields(self) -> dict:
        """The fields of the /search response this answer fills."""
        fields = {"count": len(self.results), "results": self.results}
        if self.fallback is not None:
            fields["fallback"] = self.fallback
        return fields


@dataclass(frozen=True)
class Shown:
    """What a result shows of an item: its title, its body and its tags, (tag id, name) by name."""

    id: int
    title: str
    body: str
    tags: tuple[tuple[int, str], ...]


def load(ids: Iterable[int]) -> dict[int, Shown]:
    """The items of ids that still exist, by id.

    Two plain queries, not ORM entities: a result shows three columns and the tags, and an entity would
    also carry the row's analysed text and cost the identity map's work on every search (without them a
    text search's server CPU fell by about a quarter under load).
    """
    ids = list(ids)
    if not ids:
        return {}
    tags: dict[int, list[tuple[int, str]]] = {}
    for item_id, tag_id, name in db.session.execute(
            select(item_tags.c.item_id, Tag.id, Tag.name).join(Tag, Tag.id == item_tags.c.tag_id)
            .where(item_tags.c.item_id.in_(ids)).order_by(Tag.name)):
        tags.setdefault(item_id, []).append((tag_id, name))
    rows = db.session.execute(select(Item.id, Item.title, Item.body).where(Item.id.in_(ids)))
    return {i: Shown(i, title, body, tuple(tags.get(i, ()))) for i, title, body in rows}


def result(item: Shown, score: float, matched_tags: list | None = None) -> dict:
    shaped = {"id": item.id, "title": item.title, "body": item.body, "tags": [name for _, name in item.tags],
              "score": round(float(score), 4)}
    if matched_tags is not None:
        shaped["matched_tags"] = matched_tags
    return shaped
