"""The search modes, one module each, behind one ``run(mode, query, limit)``.

``MODES`` and the limits are written here once; the API and the OpenAPI description take them from
here. Semantic search reaches the vector code (numpy) only when it runs, through the semantic service.
"""

from __future__ import annotations

from typing import Callable

from . import hybrid, semantic, tags, text
from .results import Answer


def _always_in_full(engine: Callable[[str, int], list[dict]]) -> Callable[[str, int], Answer]:
    # Text, tags and semantic either answer as asked or raise (semantic: a 503); only hybrid falls back.
    return lambda query, limit: Answer(engine(query, limit))


_ENGINES = {"text": _always_in_full(text.search), "tags": _always_in_full(tags.search),
            "semantic": _always_in_full(semantic.search), "hybrid": hybrid.search}
MODES = tuple(_ENGINES)  # ("text", "tags", "semantic", "hybrid"): the order the API and the page list them in
LIMIT_DEFAULT, LIMIT_MAX = 10, 100


def run(mode: str, query: str, limit: int) -> Answer:
    """What one mode (one of MODES) found: results best first, at most limit, and any fallback taken."""
    return _ENGINES[mode](query, limit)
