"""The search modes, one module each, behind one ``run(mode, query, limit)``.

``MODES`` and the limits are written here once; the API and the OpenAPI description take them from
here. Semantic search reaches the vector code (numpy) only when it runs, through the semantic service.
"""

from __future__ import annotations

from . import semantic, tags, text

_ENGINES = {"text": text.search, "tags": tags.search, "semantic": semantic.search}
MODES = tuple(_ENGINES)  # ("text", "tags", "semantic"): the order the API lists them in
LIMIT_DEFAULT, LIMIT_MAX = 10, 100


def run(mode: str, query: str, limit: int) -> list[dict]:
    """Results of one mode (one of MODES), best first, at most limit."""
    return _ENGINES[mode](query, limit)
