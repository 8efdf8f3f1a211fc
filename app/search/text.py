"""Text search: SQL narrows by substring, Python ranks whole words (niqqud ignored, prefixes understood).

Kept to one function, ``search(query, limit)``, so that another engine can replace it.
"""

from __future__ import annotations

from sqlalchemy import or_, select

from .. import hebrew
from ..db import Item, db
from .results import result

CANDIDATES = 500  # rows fetched by the SQL filter before ranking in Python
TITLE_WEIGHT = 2.0


def search(query: str, limit: int) -> list[dict]:
    """Items whose words answer the query words (niqqud ignored, prefixes understood), best first.

    A query token holding symbols (``100%``, ``c++``, ``a_b``) must also appear literally: the
    symbols are searched for, never read as LIKE wildcards.
    """
    query_words = list(dict.fromkeys(hebrew.words(query)))
    literals = [t for t in hebrew.normalize(query).split() if not t.isalnum()]
    if not query_words and not literals:
        return []
    statement = select(Item)
    if query_words:
        # SQL narrows by substring of any form of any word; Python then scores whole words.
        patterns = sorted({form for word in query_words for form in hebrew.stems(word)})
        statement = statement.where(or_(*(_contains(p) for p in patterns)))
    for literal in literals:
        statement = statement.where(_contains(literal))
    rows = db.session.scalars(statement.order_by(Item.id.desc()).limit(CANDIDATES))
    scored = []
    for item in rows:
        title_words, body_words = set(hebrew.words(item.title)), set(hebrew.words(item.body))
        score = 0.0
        for q in query_words:
            in_title = max((hebrew.word_score(q, w) for w in title_words), default=0.0)
            in_body = max((hebrew.word_score(q, w) for w in body_words), default=0.0)
            score += max(in_title * TITLE_WEIGHT, in_body)
        score = score / (len(query_words) * TITLE_WEIGHT) if query_words else 1.0
        if score > 0:
            scored.append((score, item))
    scored.sort(key=lambda pair: (-pair[0], -pair[1].id))
    return [result(item, score) for score, item in scored[:limit]]


def _contains(fragment: str):
    return Item.search_text.like(f"%{hebrew.escape_like(fragment)}%", escape="\\")
