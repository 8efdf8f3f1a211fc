"""Hebrew-aware normalisation and word matching for text and tag search.

Hebrew writes several particles as one-letter prefixes glued to the next word (ו "and", ה "the",
ב "in", כ "as", ל "to", מ "from", ש "that"), often stacked: והספרים = ו + ה + ספרים. Texts may also
carry niqqud (vowel points) and cantillation marks, which readers ignore and so should search.
"""

from __future__ import annotations

import re
import unicodedata

PREFIX_LETTERS = "והבכלמש"
# Up to three stacked prefixes (וכשה...) and a stem of at least two letters.
MAX_PREFIXES = 3
MIN_STEM = 2

# Cantillation U+0591-U+05AF, points U+05B0-U+05BD, U+05BF, U+05C1-U+05C2, U+05C4-U+05C5, U+05C7.
_MARKS = re.compile("[\u0591-\u05af\u05b0-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7]")
# Geresh/gershayim and ASCII quotes inside abbreviations (צה"ל, צה״ל) are dropped, not split on.
_QUOTES = re.compile("[\u05f3\u05f4'\"`\u2019\u201d]")
_WORD = re.compile(r"\w+")
# Control characters and invisible formatting marks (NUL, RLM/LRM, bidi overrides) carry no text.
_INVISIBLE = re.compile("[\x00-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def normalize(text: str) -> str:
    """Lower-case text with Hebrew marks and abbreviation quotes removed and maqaf made a space."""
    text = unicodedata.normalize("NFC", text or "")
    text = _MARKS.sub("", text)
    text = _INVISIBLE.sub(" ", text)
    text = _QUOTES.sub("", text)
    text = text.replace("\u05be", " ")  # maqaf joins words like a hyphen
    return text.lower()


def words(text: str) -> list[str]:
    """The words of a text after normalize()."""
    return _WORD.findall(normalize(text))


def stems(word: str) -> set[str]:
    """The word itself and every form with one to three leading prefix letters removed."""
    forms = {word}
    current = word
    for _ in range(MAX_PREFIXES):
        if len(current) - 1 < MIN_STEM or current[0] not in PREFIX_LETTERS:
            break
        current = current[1:]
        forms.add(current)
    return forms


def word_score(query_word: str, doc_word: str) -> float:
    """How well one document word answers one query word: 1 exact, 0.8 via prefixes, 0.4 inside."""
    if query_word == doc_word:
        return 1.0
    if stems(query_word) & stems(doc_word):
        return 0.8
    if len(query_word) >= 2 and query_word in doc_word:
        return 0.4
    return 0.0


def escape_like(fragment: str) -> str:
    """Make %, _ and the escape character literal inside a LIKE pattern (ESCAPE '\\')."""
    return fragment.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
