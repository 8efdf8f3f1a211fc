"""The shape of a search's answer and of one search result, shared by every mode."""

from __future__ import annotations

from dataclasses import dataclass

from ..db import Item


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


def result(item: Item, score: float, matched_tags: list | None = None) -> dict:
    shaped = {"id": item.id, "title": item.title, "body": item.body, "tags": [t.name for t in item.tags],
              "score": round(float(score), 4)}
    if matched_tags is not None:
        shaped["matched_tags"] = matched_tags
    return shaped
