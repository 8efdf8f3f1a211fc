"""What an item may hold: the checks of its title, body and tags (and of a query's text), shared by the
JSON API and `flask import`, which must refuse exactly the same things. ApiError (400) names the field
and the problem."""

from __future__ import annotations

import unicodedata

from . import hebrew
from .db import BODY_MAX, TAG_MAX, TAGS_PER_ITEM_MAX, TITLE_MAX
from .errors import ApiError

# Embedding, override and isolate controls reorder how text is shown (a "Trojan source" title or tag
# reads differently from what is stored). The marks LRM, RLM and ALM stay allowed: Hebrew text uses them.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
MULTILINE = frozenset("\t\n\r")


def refuse(field: str, problem: str, code: str = "bad_field"):
    raise ApiError(400, code, f"{field} {problem}")


def checked_text(field: str, value: object, *, limit: int, required: bool, multiline: bool = False,
                  code: str = "bad_field") -> str:
    """value as stored: NFC, stripped, valid Unicode, no controls, at most limit characters."""
    if not isinstance(value, str):
        refuse(field, "is required: a non-empty string" if required else "must be a string", code)
    for position, char in enumerate(value):
        point = ord(char)
        if 0xD800 <= point <= 0xDFFF:
            refuse(field, f"contains an unpaired surrogate (U+{point:04X}) at character {position}: "
                           "text must be valid Unicode", code)
    value = unicodedata.normalize("NFC", value).strip()
    for char in value:
        point, category = ord(char), unicodedata.category(char)
        if category == "Cc" and not (multiline and char in MULTILINE):
            refuse(field, f"contains the control character U+{point:04X}, which is not allowed", code)
        if char in BIDI_CONTROLS:
            refuse(field, f"contains the bidi control U+{point:04X} ({unicodedata.name(char)}), which is not allowed",
                    code)
        if (point & 0xFFFE) == 0xFFFE or 0xFDD0 <= point <= 0xFDEF:
            refuse(field, f"contains U+{point:04X}, a Unicode noncharacter", code)
    if value and unicodedata.category(value[0]).startswith("M"):
        refuse(field, f"begins with a combining mark (U+{ord(value[0]):04X}) that has no letter to attach to", code)
    # Letters, digits, punctuation or symbols: a text of only spaces and invisible marks says nothing.
    if required and not any(unicodedata.category(char)[0] in "LNPS" for char in value):
        refuse(field, "is required: a non-empty string with visible text", code)
    if len(value) > limit:
        refuse(field, f"is too long: at most {limit} characters (counted after Unicode NFC normalisation)", code)
    return value


def item_fields(payload: dict) -> dict:
    """An item's fields as stored, from a JSON object (a request's body or a line of `flask import`);
    ApiError (400) naming the field and the problem."""
    unknown = sorted(set(payload) - {"title", "body", "tags"})
    if unknown:  # repr: a name may hold a lone surrogate (unencodable) or a bidi control
        names = ", ".join(map(repr, unknown))[:200]
        raise ApiError(400, "bad_field", f"unknown field(s): {names}; accepts title, body, tags")
    title = checked_text("title", payload.get("title"), limit=TITLE_MAX, required=True)
    body = checked_text("body", payload.get("body", ""), limit=BODY_MAX, required=False, multiline=True)
    tags = payload.get("tags", [])
    if not isinstance(tags, list) or len(tags) > TAGS_PER_ITEM_MAX:
        raise ApiError(400, "bad_field", f"tags must be a list of at most {TAGS_PER_ITEM_MAX} strings")
    clean = []
    for position, tag in enumerate(tags):
        field = f"tags[{position}]"
        tag = checked_text(field, tag, limit=TAG_MAX, required=True)
        if tag.lstrip("#").strip():  # "#חדש" is the tag "חדש"; a tag of only "#" stays as it is
            tag = checked_text(field, tag.lstrip("#"), limit=TAG_MAX, required=True)
        # One tag whatever the case it is written in ("Python", "python"), as tag search compares them.
        tag = tag.lower()
        # The name and its search form (tags.norm) have the same width, and lower-casing can lengthen
        # text: 'İ' becomes 'i' + U+0307. Count what the columns will hold, not what was sent.
        if max(len(tag), len(hebrew.normalize(tag))) > TAG_MAX:
            refuse(field, f"is too long once normalised for search (lower case can lengthen letters such as "
                           f"'İ'): at most {TAG_MAX} characters")
        clean.append(tag)
    return {"title": title, "body": body, "tags": list(dict.fromkeys(clean))}
