"""Hebrew-aware normalisation and word matching for text and tag search.

Hebrew writes several particles as one-letter prefixes glued to the next word (ו "and", ה "the",
ב "in", כ "as", ל "to", מ "from", ש "that"), often stacked: והספרים = ו + ה + ספרים. Texts may also
carry niqqud (vowel points) and cantillation marks, which readers ignore and so should search.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

PREFIX_LETTERS = "והבכלמש"
# Up to three stacked prefixes (וכשה...) and a stem of at least two letters.
MAX_PREFIXES = 3
MIN_STEM = 2

# Cantillation U+0591-U+05AF, points U+05B0-U+05BD, U+05BF, U+05C1-U+05C2, U+05C4-U+05C5, U+05C7.
_MARKS = re.compile("[\u0591-\u05af\u05b0-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7]")
# Geresh/gershayim and ASCII quotes inside abbreviations (צה"ל, צה״ל) are dropped, not split on.
_QUOTES = re.compile("[\u05f3\u05f4'\"`\u2019\u201d]")
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


def escape_like(fragment: str) -> str:
    """Make %, _ and the escape character literal inside a LIKE pattern (ESCAPE '\\')."""
    return fragment.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# --- Index analysis: the terms app/textindex.py stores and searches. ---

HEBREW_LETTERS = "אבגדהוזחטיכךלמםנןסעפףצץקרשת"
FINAL_FORMS = "ךםןףץ"
# Final letters are positional spellings of כ מ נ פ צ: folded, a word typed without them still matches.
_FOLD_FINALS = str.maketrans(FINAL_FORMS, "כמנפצ")
# Index terms are runs of letters and digits: "_" would be a separator to FTS5 and PostgreSQL alike.
_TERM = re.compile(r"[^\W_]+")
# A defective-spelling skeleton is only made of words this long, so short words stay distinct.
MIN_SKELETON_SOURCE = 4


def fold_finals(word: str) -> str:
    """The word with final letters (ך ם ן ף ץ) written as their ordinary forms."""
    return word.translate(_FOLD_FINALS)


def is_hebrew(word: str) -> bool:
    return bool(word) and all(ch in HEBREW_LETTERS for ch in word)


def raw_terms(text: str) -> list[str]:
    """The words of a text after normalize(), split on anything but letters and digits."""
    return _TERM.findall(normalize(text))


def terms(text: str) -> list[str]:
    """Index terms: the words of a text, final letters folded, in order and with repeats."""
    return [fold_finals(w) for w in raw_terms(text)]


def prefix_stems(word: str) -> list[str]:
    """Forms of a (normalised, unfolded) Hebrew word with one to three prefix letters removed.

    A stem keeps at least MIN_STEM letters and never starts with a final letter: no Hebrew word
    does, so מלך is never read as מ + לך's ל + ך. Whether a stem is a real word is decided by the
    index (app/textindex.py accepts a stripped query word only when it is itself an indexed word).
    """
    found = []
    current = word
    if not is_hebrew(word):
        return found
    for _ in range(MAX_PREFIXES):
        if len(current) - 1 < MIN_STEM or current[0] not in PREFIX_LETTERS or current[1] in FINAL_FORMS:
            break
        current = current[1:]
        found.append(current)
    return found


def skeleton(word: str) -> str | None:
    """The defective spelling (כתיב חסר) of a folded word: ו and י inside it dropped; None if unchanged.

    שולחן and שלחן both give שלחן, so a full spelling finds a defective one and back. Letters at the
    ends are kept (the ו of ואו, the י of ילד are consonants there).
    """
    if len(word) < MIN_SKELETON_SOURCE or not is_hebrew(word):
        return None
    # The plural endings ים and ות keep their vowel letter in either spelling.
    tail = 2 if word.endswith(("ימ", "ות")) else 1
    inner = word[1:-tail].replace("ו", "").replace("י", "")
    result = word[0] + inner + word[-tail:]
    return result if result != word and len(result) >= MIN_STEM + 1 else None


# --- Dictionary analysis: Hspell's lexicon (app/lexicon.py) where it knows the word. ---

# Version of the analysis below, stored with every analysed row (app/textindex.py): a release finds
# the rows analysed another way by it and analyses them again.
ANALYZER = 2


@dataclass(frozen=True)
class Analysis:
    """What the index makes of one (normalised, unfolded) word besides the word itself.

    ``stems`` are the word with prefixes removed: for a word the lexicon knows, only the splits it
    accepts (ב+בלמים, never ב+ב+ל+מים); for another word, leading prefix letters that make a prefix
    string the lexicon knows (all letters of PREFIX_LETTERS, up to MAX_PREFIXES, without it).
    ``lemmas`` are the lexicon's lemmas of the word (or of its prefixed readings when it is no word
    alone): what plural, construct and possessive forms share with their singular. ``whole`` says
    the word is a word by itself; ``known`` that the lexicon knows it, alone or after prefixes.
    """

    stems: tuple[str, ...] = ()
    lemmas: tuple[str, ...] = ()
    whole: bool = False
    known: bool = False


def lexicon():
    """The process's Hebrew lexicon (mapped on first use), or None where Hspell is missing."""
    from . import lexicon as lexicon_module

    return lexicon_module.get()


def analyzer_version() -> str:
    """Names the analysis the index holds: its rules' version and the lexicon it read, if any."""
    found = lexicon()
    return f"{ANALYZER}+{found.id}" if found is not None else f"{ANALYZER}+rules"


def _bases(lex, prefix: str, rest: str) -> list[int]:
    """Lexicon entries that can follow prefix as rest is written. After a prefix the Academy's rules
    (and Hspell) double an initial consonant waw (ה+ורד is הוורד), which is then read as one; most
    people write it single (הורד), so a single waw is read as written too."""
    candidates = [rest[1:], rest] if rest.startswith("וו") and not rest.startswith("ווו") else [rest]
    return [i for form in candidates if (i := lex.find(form)) >= 0 and lex.accepts(prefix, i)]


# Cached: an item's words repeat, in it and across items (running text is mostly a few thousand forms),
# and each analysis is a few lexicon probes and tens of string operations in Python. 16384 short words
# and their few forms: a few MB.
@functools.lru_cache(maxsize=16384)
def analyse(word: str) -> Analysis:
    """The prefix stems and lemmas of one normalised word (see Analysis)."""
    lex = lexicon() if is_hebrew(word) else None
    if lex is None:
        return Analysis(tuple(prefix_stems(word)))
    whole = [i for i in [lex.find(word)] if i >= 0 and lex.accepts("", i)]
    split: list[tuple[str, int]] = []
    for length in range(1, min(lex.max_prefix, len(word) - MIN_STEM) + 1):
        prefix = word[:length]
        if prefix[-1] not in PREFIX_LETTERS:
            break
        if prefix in lex.prefixes:  # not every run of prefix letters is one: "כש" is, "בב" is not
            split.extend((prefix, i) for i in _bases(lex, prefix, word[length:]))
    if not whole and not split:
        # Unknown to the lexicon (a name, slang, a loanword): the rules of old, but only with prefix
        # strings that exist.
        return Analysis(tuple(s for s in prefix_stems(word) if word[:len(word) - len(s)] in lex.prefixes))
    stems = tuple(dict.fromkeys(lex.word(i) for _, i in split))
    # The lemmas of a word that is a word alone are its own; its prefixed readings add their stems
    # (as today's rules did) but not their lemmas: מלך is a king, not also a form of הלך through מ+לך.
    lemmas = [lemma for i in (whole or [i for _, i in split]) for lemma in lex.lemmas(i)]
    if word in lemmas:
        # A headword (מחברת, a notebook) is what its own forms meet; its other lemmas are homographs
        # (מחברת, "connects", of חיבר) that would tie it to unrelated words.
        lemmas = []
    return Analysis(stems, tuple(l for l in dict.fromkeys(lemmas) if l not in stems), bool(whole), True)


@functools.lru_cache(maxsize=16384)
def alternate_terms(word: str) -> tuple[str, ...]:
    """Extra index terms of one (normalised, unfolded) word: its accepted prefix stems and their
    spelling skeletons, and its lemmas (no skeletons: Hspell spells a lemma in full, and its skeleton
    is a step further from what was written, where other words live: חיבר's is חבר, a friend)."""
    analysis = analyse(word)
    forms = []
    for form in [word, *analysis.stems]:
        folded = fold_finals(form)
        if form is not word:
            forms.append(folded)
        bare = skeleton(folded)
        if bare:
            forms.append(bare)
    forms.extend(fold_finals(lemma) for lemma in analysis.lemmas)
    own = fold_finals(word)
    return tuple(f for f in dict.fromkeys(forms) if f != own)


def reset() -> None:
    """Forget the lexicon and every cached analysis (tests that change the lexicon)."""
    from . import lexicon as lexicon_module

    lexicon_module.forget()
    analyse.cache_clear()
    alternate_terms.cache_clear()
