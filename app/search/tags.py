"""Tag search: items carrying the query tags, exact or by prefix."""

from __future__ import annotations

from sqlalchemy import or_, select

from .. import hebrew
from ..db import Tag, db, item_tags
from .results import load, result


def parse_tags(query: str) -> list[str]:
    """Tags are separated by commas, or by spaces when there is no comma; '#' is optional."""
    parts = query.split(",") if "," in query else query.split()
    return list(dict.fromkeys(t for t in (hebrew.normalize(p).strip().lstrip("#").strip() for p in parts) if t))


def search(query: str, limit: int) -> list[dict]:
    """Items carrying the query tags, exact or by prefix, ranked by how many (and how exactly) match."""
    wanted = parse_tags(query)
    if not wanted:
        return []
    conditions = [Tag.norm.like(f"{hebrew.escape_like(t)}%", escape="\\") for t in wanted]
    tags = db.session.scalars(select(Tag).where(or_(*conditions))).all()
    weights: dict[int, tuple[str, float]] = {}
    for tag in tags:
        best = max(((1.0 if tag.norm == w else 0.5) for w in wanted if tag.norm.startswith(w)), default=0.0)
        if best:  # the database's LIKE may be looser than startswith (collation): Python decides
            weights[tag.id] = (tag.name, best)
    if not weights:
        return []
    item_scores: dict[int, dict[str, float]] = {}
    for item_id, tag_id in db.session.execute(
        select(item_tags.c.item_id, item_tags.c.tag_id).where(item_tags.c.tag_id.in_(list(weights)))
    ):
        name, weight = weights[tag_id]
        item_scores.setdefault(item_id, {})[name] = weight
    norms = {name: hebrew.normalize(name) for name, _ in weights.values()}

    def coverage(matched: dict[str, float]) -> float:
        # Each wanted tag counts once, by its best-matching tag on the item: 1 exact, 0.5 prefix.
        return sum(max((wt for name, wt in matched.items() if norms[name].startswith(w)), default=0.0)
                   for w in wanted) / len(wanted)

    ranked = sorted(((coverage(m), len(m), item_id, m) for item_id, m in item_scores.items()),
                    key=lambda r: (-r[0], -r[1], -r[2]))[:limit]
    items = load(r[2] for r in ranked)
    # An item deleted between the tag read and this one is skipped, not an error.
    return [result(items[item_id], score, [{"name": n, "score": s} for n, s in sorted(matched.items())])
            for score, _, item_id, matched in ranked if item_id in items]
