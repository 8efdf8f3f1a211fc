"""Text search: the Hebrew text index (app/textindex.py) ranks every match by BM25, title above body.

The index does the work, so a query costs what the index costs, whatever the table size or item
length; this module loads the ranked items and shapes them.
"""

from __future__ import annotations

from .. import textindex
from ..db import db
from .results import load, result


def search(query: str, limit: int) -> list[dict]:
    """Items ranked by the index for the query's words (niqqud ignored, prefixes understood), best first."""
    hits = textindex.search(db.session, query, limit).hits
    items = load(i for i, _ in hits)
    # An item deleted between the index read and this one is skipped, not an error.
    return [result(items[item_id], score) for item_id, score in hits if item_id in items]
