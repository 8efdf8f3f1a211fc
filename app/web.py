"""The search page: one right-to-left Hebrew page, plain HTML and a small script, no build step."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Blueprint, render_template

from . import hebrew
from .search import LIMIT_DEFAULT, LIMIT_MAX, MODES
from .state import get_service

bp = Blueprint("web", __name__, static_folder="static", template_folder="templates")

@dataclass(frozen=True)
class PageMode:
    """How the page presents one search mode of app.search.MODES."""

    value: str
    label: str
    # "required": greyed out with the reason while /readyz says semantic is disabled or failed;
    # "optional": stays offered and says it answers from text alone meanwhile; "none": never affected.
    semantic: str = "none"
    # "words": mark the query's words in titles and bodies; "tags": the answer's matched_tags mark tags.
    highlight: str = "tags"


# Presentation of every mode the API may offer. The page shows those of MODES, in MODES' order, so a
# mode added to app.search appears here by one entry (hybrid is ready for it).
PAGE_MODES = {m.value: m for m in (
    PageMode("text", "טקסט", highlight="words"),
    PageMode("tags", "תגיות"),
    PageMode("semantic", "סמנטי", semantic="required"),
    PageMode("hybrid", "משולב", semantic="optional", highlight="words"),
)}


def page_modes() -> list[PageMode]:
    """The modes the API accepts, as the page presents them (a mode without an entry shows its name)."""
    return [PAGE_MODES.get(mode, PageMode(mode, mode)) for mode in MODES]


# What the page says beside a mode while the model cannot answer, by /readyz semantic state (in
# not_loaded, loading and loaded every mode is offered: the first semantic search loads the model).
# app.js reads these same texts from the page; {error} becomes /readyz's error.
SEMANTIC_NOTES = {
    "required": {"disabled": "כבוי בשרת הזה (ENABLE_SEMANTIC_SEARCH=false)", "failed": "המודל לא נטען: {error}"},
    "optional": {"disabled": "בלי המודל: לפי טקסט בלבד", "failed": "בלי המודל: לפי טקסט בלבד"},
}


def semantic_note(mode: PageMode, status: dict) -> str | None:
    """The note shown beside mode for this semantic status, or None when the mode runs in full."""
    note = SEMANTIC_NOTES.get(mode.semantic, {}).get(status.get("state", ""))
    return note.replace("{error}", status.get("error") or "?") if note else None


@bp.get("/")
def index():
    # The first paint uses this worker's view of the model; app.js then follows /readyz.
    semantic = get_service().status()
    return render_template(
        "index.html", modes=[(mode, semantic_note(mode, semantic)) for mode in page_modes()],
        notes=SEMANTIC_NOTES, limit_default=LIMIT_DEFAULT, limit_max=LIMIT_MAX, hebrew=hebrew)
