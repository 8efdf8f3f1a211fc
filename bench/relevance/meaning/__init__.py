"""A relevance set written by meaning: everyday Hebrew items and queries as people
type them, graded 0–3 by what the query wants, not by which words it shares.

- ``items.json``: 326 items in 20 domains (home, cooking, health, travel, kids, tech support, cars,
  money, garden, pets, jobs, study, sport, music, shopping, housing, government services, cleaning,
  events, transport), each a title, a body of one to three sentences and a few tags, written as a
  site's users would write them (not generated from word lists).
- ``queries.json``: 186 queries in five classes (``CLASSES``): the item's own words; the same words
  in another inflection, prefix or spelling; a paraphrase that shares no content word with the items
  it wants; one word; a whole question.
- ``grades.json``: the grades written with the queries, committed before any search system ran on
  them (``PRE_RUN_SHA256`` pins that file); an item a query has no grade for is 0.
- ``pooled.json``: grades added afterwards for items the systems ranked high that had none; it only
  adds, it never changes a pre-run grade (``tests/test_relevance_meaning.py``).

``paraphrase_share()`` checks the paraphrase class mechanically: no content word of the query, after
``normal_forms`` (niqqud, final letters, prefixes, plural and feminine endings, spelling with or
without vav and yod, a stopword list), is a word of an item it wants (graded ≥ 2). ``half()``
splits the queries into a tuning half and a test half, by a hash of the id, within each class.

    python -m bench.relevance.meaning     # the set's counts and the paraphrase check
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ITEMS, QUERIES, GRADES, POOLED = (HERE / name for name in ("items.json", "queries.json", "grades.json", "pooled.json"))
# sha256 of grades.json as committed before any system ran on the set: the pre-run grades never change.
PRE_RUN_SHA256 = "85276e2926af6c9d907cb13ef39d6d44b272d6749dbf77b7a61d0a344602430c"
CLASSES = ("same", "inflection", "paraphrase", "one_word", "question")
CLASS_NAMES = {"same": "same words", "inflection": "other inflection/prefix/spelling", "paraphrase": "paraphrase",
               "one_word": "one word", "question": "a whole question"}
HALVES = ("tuning", "test")
WANTED = 2  # a grade from which an item is one the query wants (the paraphrase check compares with these)
PARAPHRASE_SHARE_MIN = 0.40

# Letters that attach to the front of a Hebrew word (and, the, in, to, from, that, as): a form with up
# to three of them taken off is compared too, as long as two letters remain.
PREFIX_LETTERS = "והבלמשכ"
MAX_PREFIXES = 3
# Plural, dual and feminine endings; taken off only where three letters remain.
FINALS = str.maketrans("ךםןףץ", "כמנפצ")
SUFFIXES = tuple(s.translate(FINALS) for s in ("יים", "ים", "ות", "ה", "ת"))  # compared after folding
# Function words and words that say nothing of a topic (question words, pronouns, "can", "should",
# "want", "do"). Compared after niqqud and final letters are folded; a word that is one of these after
# one prefix letter (שלא, כשאני) is one too.
STOPWORDS = frozenset(word.translate(FINALS) for word in """
    של את על עם אל אני אתה את הוא היא אנחנו אתם הם הן זה זו זאת אלה מה מי איך למה מתי איפה לאן מאיפה כמה
    האם יש אין לא כן גם רק כל או אם כי אבל עוד כבר עד בלי אחרי לפני יותר פחות מאוד הכי כמו לי לך לו לה
    לנו לכם להם שלי שלך שלו שלה שלנו שלכם שלהם אותו אותה אותי אותך אותם אותן יכול יכולה יכולים אפשר
    צריך צריכה צריכים רוצה רוצים כדאי עושים עושה לעשות דבר משהו מישהו איזה איזו מאיזה באיזה כדי בשביל
    תוך בתוך אצל ליד מול מתחת מעל בין יחד הרבה ככה עכשיו כאן פה אז ממה למי ממי
""".split())

_MARKS = re.compile(r"[\u0591-\u05c7]")  # cantillation and niqqud (and the maqaf, read as a space below)
_WORD = re.compile(r"[\u05d0-\u05eaa-z0-9]+")


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def normalise(text: str) -> str:
    """Lower case, no niqqud, no final letters, abbreviation quotes dropped (חו"ל -> חול)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u05be", " ")
    text = re.sub(r"[\"'\u05f3\u05f4\u2019]", "", _MARKS.sub("", text))
    return text.translate(FINALS)


def _without_suffix(word: str) -> set[str]:
    return {word} | {word[: -len(s)] for s in SUFFIXES if word.endswith(s) and len(word) - len(s) >= 3}


def _skeleton(word: str) -> str:
    # Spelling with or without vav and yod as vowels (ktiv male and haser): drop them after the first letter.
    return word[0] + re.sub("[וי]", "", word[1:]) if len(word) > 2 else word


def normal_forms(word: str) -> set[str]:
    """Every form a (normalised) word is compared by: prefixes off (up to three), endings off, a final
    alef read as he, vav and yod dropped."""
    forms = {word}
    for n in range(1, MAX_PREFIXES + 1):
        if len(word) - n < 2 or any(letter not in PREFIX_LETTERS for letter in word[:n]):
            break
        forms.add(word[n:])
    forms |= {f for form in forms for f in _without_suffix(form)}
    forms |= {form[:-1] + "ה" for form in forms if form.endswith("א")}  # סיסמא, סיסמה
    forms |= {_skeleton(form) for form in forms}
    forms |= {f for form in forms for f in _without_suffix(form)}
    return {form for form in forms if len(form) >= 2}


def is_stopword(word: str) -> bool:
    return word in STOPWORDS or (len(word) > 2 and word[0] in PREFIX_LETTERS and word[1:] in STOPWORDS) or (
        word.startswith("כש") and word[2:] in STOPWORDS)


def content_words(text: str) -> list[str]:
    """The words of a text that carry its topic: normalised, stopwords and single letters left out."""
    return [w for w in _WORD.findall(normalise(text)) if len(w) > 1 and not is_stopword(w)]


def item_text(item: dict) -> str:
    return " ".join([item["title"], item["body"], *item["tags"]])


def shared_words(query: str, text: str) -> list[str]:
    """The query's content words that meet a word of ``text`` in some normal form."""
    forms = set().union(*(normal_forms(w) for w in content_words(text))) if content_words(text) else set()
    return [word for word in content_words(query) if normal_forms(word) & forms]


def grades(pooled: bool = True) -> dict[str, dict[str, int]]:
    """query id -> {item id: grade}: the pre-run grades, and with ``pooled`` the ones added by pooling."""
    merged = {qid: dict(given) for qid, given in load(GRADES).items()}
    if pooled and POOLED.exists():
        for qid, added in load(POOLED).items():
            merged.setdefault(qid, {}).update(added)
    return merged


def shares_with_wanted(query: dict, items: dict[str, dict], graded: dict[str, int]) -> dict[str, list[str]]:
    """item id -> the words the query shares with it, for every item the query wants that shares one."""
    found = {}
    for item_id, grade in graded.items():
        if grade >= WANTED:
            words = shared_words(query["q"], item_text(items[item_id]))
            if words:
                found[item_id] = words
    return found


def paraphrase_share(queries: list[dict], items: dict[str, dict], graded: dict[str, dict[str, int]]) -> float:
    """The share of queries that share no content word with any item they want."""
    return sum(not shares_with_wanted(q, items, graded[q["id"]]) for q in queries) / len(queries)


def half(query_id: str) -> str:
    """'tuning' or 'test' for a query id; see ``halves``."""
    return _HALVES[query_id]


def halves(queries: list[dict]) -> dict[str, str]:
    """query id -> half: within each class, queries in order of sha256(id) alternate tuning, test."""
    assigned = {}
    for cls in sorted({q["class"] for q in queries}):
        ordered = sorted((q["id"] for q in queries if q["class"] == cls),
                         key=lambda qid: hashlib.sha256(qid.encode()).hexdigest())
        assigned.update((qid, HALVES[n % 2]) for n, qid in enumerate(ordered))
    return assigned


_HALVES = halves(load(QUERIES))


def main() -> int:
    items = {i["id"]: i for i in load(ITEMS)}
    queries = load(QUERIES)
    graded = grades()
    print(f"{len(items)} items in {len({i['domain'] for i in items.values()})} domains, {len(queries)} queries")
    for cls in CLASSES:
        of_class = [q for q in queries if q["class"] == cls]
        split = sum(half(q["id"]) == "test" for q in of_class)
        print(f"  {CLASS_NAMES[cls]:34} {len(of_class):3}  (test half {split})")
    share = paraphrase_share(queries, items, graded)
    print(f"queries sharing no content word with the items they want: {share:.1%} (at least {PARAPHRASE_SHARE_MIN:.0%})")
    failed = 0
    for q in queries:
        shared = shares_with_wanted(q, items, graded[q["id"]])
        if q["class"] == "paraphrase" and shared:
            failed += 1
            print(f"  paraphrase {q['id']} {q['q']!r} shares {shared}")
    return 1 if failed or share < PARAPHRASE_SHARE_MIN else 0


if __name__ == "__main__":
    sys.exit(main())
