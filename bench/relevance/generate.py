"""Generate the labelled Hebrew relevance set: ``python -m bench.relevance.generate`` writes
bench/relevance/corpus.json (items, oldest first) and bench/relevance/queries.json (graded queries).

The generator knows which lemmas it put in each item's title and body, so the judgments come from
that knowledge, never from a search engine: an item is graded 3 when its title holds every query
lemma, 2 when title and body together do, 1 when it holds at least half of them, else not relevant.
Items and queries write those lemmas in other surface forms on purpose: with one-letter prefixes,
with niqqud, in the other spelling (כתיב מלא/חסר). Same seed, same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import words as W

SEED = 12
N_ITEMS = 2400
HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus.json"
QUERIES = HERE / "queries.json"

TOPIC_WORDS = {name: ws.split() for name, ws in W.TOPICS.items()}
SPELLING = {full: (full, defective) for full, defective in W.SPELLING_PAIRS}
# Old-best targets are planted among the first OLD_ZONE items; their decoys among the newest half.
OLD_ZONE = 300
DECOYS_PER_OLD = 40


def surface(rng: random.Random, lemma: str, prefix_p: float, point_p: float) -> str:
    """One way of writing a lemma: either spelling, maybe a prefix, maybe niqqud."""
    form = rng.choice(SPELLING[lemma]) if lemma in SPELLING else lemma
    if rng.random() < prefix_p:
        form = rng.choice(W.PREFIXES) + form
    if rng.random() < point_p:
        form = "".join(ch + (rng.choice(W.POINTS) if rng.random() < 0.7 else "") for ch in form)
    return form


def make_item(rng: random.Random, title_lemmas: list[str], body_lemmas: list[str], pointed: bool) -> dict:
    point_p = 0.6 if pointed else 0.0
    title = " ".join(surface(rng, lemma, 0.15, point_p) for lemma in title_lemmas)
    body = " ".join(w if w in W.FILLER else surface(rng, w, 0.3, point_p) for w in body_lemmas)
    return {"title": title, "body": body, "_title": sorted(set(title_lemmas)),
            "_body": sorted(set(body_lemmas) - set(W.FILLER))}


def random_item(rng: random.Random) -> tuple[list[str], list[str]]:
    topic = rng.choice(list(TOPIC_WORDS))
    own = TOPIC_WORDS[topic]
    title = rng.sample(own, rng.randint(2, 3))
    if rng.random() < 0.3:
        title.insert(0, rng.choice(W.FIRST_NAMES) + (" " + rng.choice(W.LAST_NAMES) if rng.random() < 0.6 else ""))
    if rng.random() < 0.15:
        title.append(rng.choice(W.PLACES))
    if rng.random() < 0.25:
        title.append(rng.choice(list(SPELLING)))
    if rng.random() < 0.05:
        title.append(rng.choice(W.TRAPS))
    title = [w for part in title for w in part.split()]
    body = []
    others = [w for t, ws in TOPIC_WORDS.items() if t != topic for w in ws]
    for _ in range(rng.randint(12, 40)):
        roll = rng.random()
        if roll < 0.45:
            body.append(rng.choice(W.FILLER))
        elif roll < 0.85:
            body.append(rng.choice(own))
        elif roll < 0.93:
            body.append(rng.choice(others))
        else:
            body.append(rng.choice(list(SPELLING) + W.FIRST_NAMES + W.LAST_NAMES + W.PLACES + W.TRAPS))
    return title, body


def query_specs(rng: random.Random) -> list[dict]:
    """Query lemma sets and how each is written, by category."""
    topics = list(TOPIC_WORDS)
    specs = []

    def add(category, lemmas, prefix_p=0.0, point_p=0.0):
        specs.append({"category": category, "lemmas": lemmas, "prefix_p": prefix_p, "point_p": point_p})

    for _ in range(50):
        add("multi-word", rng.sample(TOPIC_WORDS[rng.choice(topics)], rng.randint(2, 3)))
    for _ in range(40):
        add("prefix", rng.sample(TOPIC_WORDS[rng.choice(topics)], rng.randint(1, 2)), prefix_p=1.0)
    for _ in range(30):
        add("niqqud", rng.sample(TOPIC_WORDS[rng.choice(topics)], rng.randint(1, 2)), point_p=1.0)
    for _ in range(30):
        lemmas = [rng.choice(list(SPELLING))]
        if rng.random() < 0.5:
            lemmas.append(rng.choice(TOPIC_WORDS[rng.choice(topics)]))
        add("spelling", lemmas)
    for _ in range(30):
        first = rng.choice(W.FIRST_NAMES)
        second = rng.choice(W.LAST_NAMES + W.PLACES) if rng.random() < 0.7 else rng.choice(
            TOPIC_WORDS[rng.choice(topics)])
        add("names", [first, *second.split()])
    for _ in range(30):
        topic = rng.choice(topics)
        add("old-best", [*rng.sample(TOPIC_WORDS[topic], 2), rng.choice(W.LAST_NAMES)])
    for lemma in W.TRAPS:
        for _ in range(5):
            add("homograph", [lemma, rng.choice(TOPIC_WORDS["history"] + TOPIC_WORDS["travel"])])
    return specs


def grade(query: set[str], title: set[str], body: set[str]) -> int:
    in_title = len(query & title)
    covered = len(query & (title | body))
    if in_title == len(query):
        return 3
    if covered == len(query):
        return 2
    if covered and 2 * covered >= len(query):
        return 1
    return 0


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    specs = query_specs(rng)
    old_specs = [s for s in specs if s["category"] == "old-best"]
    planted = dict(zip(rng.sample(range(OLD_ZONE), len(old_specs)), old_specs))
    decoys = {}
    for spec in old_specs:
        for position in rng.sample(range(N_ITEMS // 2, N_ITEMS), DECOYS_PER_OLD):
            decoys.setdefault(position, []).append(rng.choice(spec["lemmas"]))
    items = []
    for position in range(N_ITEMS):
        title, body = random_item(rng)
        if position in planted:
            title = list(planted[position]["lemmas"])  # every query word in the title of an old item
        elif position in decoys:
            title = [*decoys[position], *title[:1]]  # a newer item holding just one of them
        items.append(make_item(rng, title, body, pointed=rng.random() < 0.06))
    queries = []
    for spec in specs:
        text = " ".join(surface(rng, lemma, spec["prefix_p"], spec["point_p"]) for lemma in spec["lemmas"])
        wanted = set(spec["lemmas"])
        judged = {}
        for item_id, item in enumerate(items, start=1):
            g = grade(wanted, set(item["_title"]), set(item["_body"]))
            if g:
                judged[str(item_id)] = g
        queries.append({"q": text, "category": spec["category"], "lemmas": spec["lemmas"], "relevant": judged})
    return items, queries


def main() -> None:
    items, queries = build()
    corpus = [{"title": i["title"], "body": i["body"]} for i in items]
    CORPUS.write_text(json.dumps(corpus, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    QUERIES.write_text(json.dumps(queries, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{len(corpus)} items -> {CORPUS}; {len(queries)} queries -> {QUERIES}")


if __name__ == "__main__":
    main()
