"""Semantic recipes measured on the set written by meaning, not shipped:
``python -m bench.relevance.meaning.variants [--database-url URL] [--model DIR]``.

The items, their tags and the queries are embedded once; semantic search is then replayed in numpy
(``semantic``: the item's own cosine blended with its closest tags', as ``SemanticService.search``
scores them, checked against the app's own ranking for the shipped recipe) under each recipe:

* the item's passage: title and body (shipped); title, tags and body; title, body and tags; title and
  body embedded as a query (e5's prompt for symmetric tasks); or the item's cosine blended with its best
  sentence's (the title and each sentence of the body embedded apart: α × whole + (1 − α) × best, α 0.5, 0.75);
* the tag blend kept or dropped (the item's own cosine alone);
* pseudo-relevance feedback: the query's vector moved towards the mean of its k best items'
  (q + β·mean, k 3, 5, 10, β 0.3, 0.5, 1), then searched again.

Each recipe's semantic ranking is fused with the text ranking (read once per back end: SQLite, and
PostgreSQL with ``--database-url``) over the fusion grid of evaluate.py, and the tuning half alone
chooses, with evaluate.py's rule (``tuning_choice``): the best mean nDCG@10 over the back ends among
the settings keeping every class at or above the better of text and semantic alone on each. The test
half of every recipe is written beside it, with a paired bootstrap of its semantic against the shipped
recipe's, to bench/results/relevance-meaning-variants.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import scoring as common
from . import CLASSES, HALVES, ITEMS, QUERIES, grades, half, load
from .evaluate import GRID, POWERS, corpus, percentile_bootstrap, relevant_ids

RESULTS = common.RESULTS.with_name("relevance-meaning-variants.json")
PASSAGES = {
    "title+body": lambda i: f"{i['title']}\n{i['body']}",
    "title+tags+body": lambda i: f"{i['title']}\n{', '.join(i['tags'])}\n{i['body']}",
    "title+body+tags": lambda i: f"{i['title']}\n{i['body']}\n{', '.join(i['tags'])}",
}
QUERY_PROMPTED = "title+body as a query"
SENTENCE_SHARES = (0.5, 0.75)  # the whole passage's share when blended with the item's best sentence
FEEDBACK = [None] + [(k, beta) for k in (3, 5, 10) for beta in (0.3, 0.5, 1.0)]
SHIPPED = ("title+body", True, None)
NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
# evaluate.py's text shares up to 0.6: a first run over the whole grid never chose more on the tuning half.
WEIGHTS = [w for w in GRID if w <= 0.6]


def top(ids: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], -ids[j]))[:k]
    return [(int(ids[j]), float(scores[j])) for j in order]


class Replay:
    """Semantic search over cached vectors, scored as app.semantic.service.SemanticService.search scores."""

    def __init__(self, items: np.ndarray, tags: np.ndarray, tag_ids: list[int], carriers: dict[int, set[int]],
                 sentences: tuple[np.ndarray, np.ndarray, float] | None = None):
        self.items, self.tags, self.sentences = items, tags, sentences
        self.item_ids, self.tag_ids = np.arange(1, len(items) + 1), np.array(tag_ids)
        self.carriers = carriers

    def own(self, query: np.ndarray) -> np.ndarray:
        """Each item's own cosine to the query (blended with its best sentence's when sentences are given)."""
        whole = self.items @ query
        if self.sentences is None:
            return whole
        vectors, owners, share = self.sentences
        best = np.full(len(whole), -1.0, dtype=np.float32)
        np.maximum.at(best, owners - 1, vectors @ query)
        return share * whole + (1 - share) * best

    def semantic(self, query: np.ndarray, limit: int, blend: bool) -> list[tuple[int, float]]:
        from app.semantic.service import CARRYING_TAGS, TAG_CANDIDATES, blend_tags

        item_hits = dict(top(self.item_ids, self.own(query), max(limit * 5, 50)))
        tagged: dict[int, set[int]] = {}
        tag_hits: dict[int, float] = {}
        if blend:
            tag_hits = dict(top(self.tag_ids, self.tags @ query, TAG_CANDIDATES))
            for tag in sorted(tag_hits, key=tag_hits.get, reverse=True)[:CARRYING_TAGS]:
                for item_id in self.carriers.get(tag, ()):
                    tagged.setdefault(item_id, set()).add(tag)
        return [(item_id, score) for score, item_id in blend_tags(item_hits, tag_hits, tagged)[:limit]]

    def rankings(self, query: np.ndarray, blend: bool, feedback, depth: int) -> tuple[list[int], list[tuple[int, float]]]:
        """(the top 10 semantic mode answers, the ranking hybrid reads at depth) for one recipe."""
        if feedback:
            k, beta = feedback
            first = [item_id for item_id, _ in self.semantic(query, k, blend)]
            moved = query + beta * self.items[[i - 1 for i in first]].mean(axis=0)
            query = moved / np.linalg.norm(moved)
        return ([i for i, _ in self.semantic(query, common.K, blend)], self.semantic(query, depth, blend))


def read_text(database_url: str | None, workdir: Path, items: list[dict], queries: list[dict]) -> dict:
    """query id -> (the text ranking hybrid reads, its coverage of the query), on one back end."""
    from app import textindex
    from app.db import db
    from app.search import hybrid

    app = common.load_app(database_url, workdir, None, corpus(items))
    with app.app_context():
        found = {}
        for q in queries:
            text = textindex.search(db.session, q["q"], hybrid.depth(common.K))
            found[q["id"]] = (list(text.hits), textindex.coverage(db.session, text))
        return found


def embed(model: Path, workdir: Path, items: list[dict], queries: list[dict]) -> dict:
    """Every passage recipe's item vectors, the tags' and the queries' (float16 as stored), the item ids
    carrying each tag, and the app's own semantic top 10 per query (to check the replay against)."""
    from app.db import Item, Tag, db
    from app.search import run
    from app.state import get_service

    app = common.load_app(None, workdir, model, corpus(items))
    common.embed_everything(app)
    with app.app_context():
        encoder = get_service().encoder()
        tags = {t.id: (t.name, set()) for t in db.session.query(Tag).all()}
        for item in db.session.query(Item).all():
            for tag in item.tags:
                tags[tag.id][1].add(item.id)
        served = {q["id"]: common.ranked_ids(run("semantic", q["q"], common.K)) for q in queries}

        def encode(texts, kind="passage"):
            return np.asarray(encoder.encode(texts, 32, kind=kind), dtype=np.float16).astype(np.float32)

        tag_ids = sorted(tags)
        passages = {name: encode([compose(i).strip() for i in items]) for name, compose in PASSAGES.items()}
        passages[QUERY_PROMPTED] = encode([PASSAGES["title+body"](i).strip() for i in items], kind="query")
        sentences = [(n, part) for n, i in enumerate(items, start=1) for part in split(i)]
        return {"items": passages, "sentences": (encode([part for _, part in sentences]),
                                                 np.array([n for n, _ in sentences])),
                "tags": encode([tags[t][0] for t in tag_ids]), "tag_ids": tag_ids,
                "carriers": {t: tags[t][1] for t in tag_ids},
                "queries": np.asarray(encoder.encode([q["q"] for q in queries], 32, kind="query"), dtype=np.float32),
                "served": served}


def split(item: dict) -> list[str]:
    """The title and each sentence of the body."""
    return [item["title"]] + [part.strip() for part in re.split(r"(?<=[.!?])\s+", item["body"]) if part.strip()]


def class_means(values: dict[str, float], queries: list[dict], which: str) -> dict:
    in_half = [q for q in queries if half(q["id"]) == which]
    return {"ndcg@10": round(statistics.fmean(values[q["id"]] for q in in_half), 4),
            "by_class": {c: round(statistics.fmean(values[q["id"]] for q in in_half if q["class"] == c), 4)
                         for c in CLASSES}}


def paired_bootstrap(a: dict[str, float], b: dict[str, float], qids: list[str]) -> dict:
    """mean(a − b) over qids and its 95 % percentile bootstrap interval."""
    return percentile_bootstrap(lambda sample: statistics.fmean(a[q] - b[q] for q in sample), qids)


def choose(recipes: list[dict]) -> dict:
    """The tuning half's recipe: the best tuning nDCG@10 among those keeping every class at or above the
    better of text and semantic (among all if none does); the test half is never read."""
    return max(recipes, key=lambda r: (r["tuning_holds"], r["tuning_ndcg@10"]))


def recipe_name(recipe: dict) -> str:
    feedback = f"k {recipe['feedback'][0]}, β {recipe['feedback'][1]}" if recipe["feedback"] else "none"
    return f"{recipe['passage']} | {'kept' if recipe['tag_blend'] else 'dropped'} | {feedback}"


def section(data: dict) -> str:
    """docs/search.md's table: every recipe without feedback and each passage's best with it (on the tuning
    half), their tuning figure and their test half beside the shipped recipe's."""
    chosen = data["chosen_on_tuning"]
    best_fed = {}
    for r in data["recipes"]:
        if r["feedback"] and (r["passage"] not in best_fed or (r["tuning_holds"], r["tuning_ndcg@10"]) >
                              (best_fed[r["passage"]]["tuning_holds"], best_fed[r["passage"]]["tuning_ndcg@10"])):
            best_fed[r["passage"]] = r
    shown = [r for r in data["recipes"] if not r["feedback"]] + list(best_fed.values())
    rows = ["| passage | tag blend | feedback | fusion | tuning hybrid | every class ≥ parts (tuning) "
            f"| test semantic | test hybrid, {' / '.join(NAMES[b] for b in NAMES if b in data['back_ends'])} "
            "| test semantic − shipped [95 %] |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in shown:
        name = recipe_name(r)
        if all(r[k] == chosen[k] for k in chosen):
            name = " | ".join(f"**{part}**" for part in name.split(" | "))
        test = {b: r["back_ends"][b]["test"] for b in ("sqlite", "postgresql") if b in data["back_ends"]}
        gain = r["semantic_test_gain_over_shipped"]
        rows.append(f"| {name} | {r['fusion']['text_weight']} × c^{r['fusion']['coverage_power']} | "
                    f"{r['tuning_ndcg@10']:.3f} | {'yes' if r['tuning_holds'] else 'no'} | "
                    f"{test['sqlite']['semantic']['ndcg@10']:.3f} | "
                    + " / ".join(f"{t['hybrid']['ndcg@10']:.3f}" for t in test.values())
                    + f" | {gain['gain']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}] |")
    fed = sum(bool(r["feedback"]) for r in data["recipes"])
    rows += ["", f"{len(data['recipes'])} recipes measured ({fed} with feedback), {data['queries']} queries over "
             f"{data['items']} items; in bold, the tuning half's choice among all of them."]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from app.search import hybrid

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="also read the text ranking on this PostgreSQL database")
    parser.add_argument("--model", type=Path, help="the semantic model (default: the prepared e5)")
    args = parser.parse_args(argv)
    items, queries, graded = load(ITEMS), load(QUERIES), grades()
    ids = {item["id"]: n for n, item in enumerate(items, start=1)}
    relevant = {q["id"]: relevant_ids(graded[q["id"]], ids) for q in queries}
    with tempfile.TemporaryDirectory() as workdir:
        vectors = embed(args.model or common.default_model(), Path(workdir) / "model", items, queries)
        texts = {"sqlite": read_text(None, Path(workdir) / "sqlite", items, queries)}
        if args.database_url:
            texts["postgresql"] = read_text(args.database_url, Path(workdir) / "pg", items, queries)
    depth = hybrid.depth(common.K)

    def ndcg(ranked, qid):
        return common.ndcg_at_k(ranked, relevant[qid])

    recipes = []
    shared = (vectors["tags"], vectors["tag_ids"], vectors["carriers"])
    replays = {name: Replay(vectors["items"][name], *shared) for name in vectors["items"]}
    for share in SENTENCE_SHARES:
        replays[f"title+body ⊕ best sentence, α {share}"] = Replay(
            vectors["items"]["title+body"], *shared, sentences=(*vectors["sentences"], share))
    for passage, replay in replays.items():
        for blend in (True, False):
            for feedback in FEEDBACK:
                ranked = {q["id"]: replay.rankings(vectors["queries"][n], blend, feedback, depth)
                          for n, q in enumerate(queries)}
                if (passage, blend, feedback) == SHIPPED:
                    differ = [qid for qid, (top10, _) in ranked.items() if top10 != vectors["served"][qid]]
                    if differ:
                        raise SystemExit(f"error: the replay ranks {len(differ)} queries unlike the app ({differ[:3]})")
                recipes.append(score_recipe((passage, blend, feedback), ranked, texts, queries, ndcg))
    choice = choose(recipes)
    shipped = next(r for r in recipes if (r["passage"], r["tag_blend"], r["feedback"]) == SHIPPED[:2] + (None,))
    for recipe in recipes:
        recipe["semantic_test_gain_over_shipped"] = paired_bootstrap(
            recipe.pop("_semantic"), shipped["_semantic_copy"], [q["id"] for q in queries if half(q["id"]) == "test"])
    for recipe in recipes:
        recipe.pop("_semantic_copy", None)
    report = {"items": len(items), "queries": len(queries), "back_ends": sorted(texts),
              "chosen_on_tuning": {k: choice[k] for k in ("passage", "tag_blend", "feedback", "fusion")},
              "recipes": recipes}
    RESULTS.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for r in sorted(recipes, key=lambda r: (r["tuning_holds"], r["tuning_ndcg@10"]), reverse=True)[:8] + [shipped]:
        test = {b: r["back_ends"][b]["test"]["hybrid"]["ndcg@10"] for b in texts}
        print(f"{r['passage']:36} blend {r['tag_blend']!s:5} feedback {r['feedback']!s:12} fusion {r['fusion']}: "
              f"tuning {r['tuning_ndcg@10']:.4f} (holds {r['tuning_holds']}), test hybrid {test}")
    return 0


def score_recipe(recipe, ranked, texts, queries, ndcg) -> dict:
    """One recipe's best fusion on the tuning half (over every back end), and both halves' figures with it."""
    from app.search import hybrid

    passage, blend, feedback = recipe
    semantic = {qid: ndcg(top10, qid) for qid, (top10, _) in ranked.items()}
    best = None
    for power in POWERS:
        for weight in WEIGHTS:
            per_back = {}
            for back, text in texts.items():
                fused = {q["id"]: ndcg([i for _, i, _ in hybrid.fuse(
                    {"text": text[q["id"]][0], "semantic": ranked[q["id"]][1]}, common.K,
                    text_weight=hybrid.text_share(text[q["id"]][1], weight, power))], q["id"]) for q in queries}
                plain = {q["id"]: ndcg([i for i, _ in text[q["id"]][0]][:common.K], q["id"]) for q in queries}
                per_back[back] = {which: {mode: class_means(values, queries, which) for mode, values in
                                          (("text", plain), ("semantic", semantic), ("hybrid", fused))}
                                  for which in HALVES}
            holds = all(halves["tuning"]["hybrid"]["by_class"][c] >= max(halves["tuning"][m]["by_class"][c]
                                                                         for m in ("text", "semantic"))
                        for halves in per_back.values() for c in CLASSES)
            mean = round(statistics.fmean(h["tuning"]["hybrid"]["ndcg@10"] for h in per_back.values()), 4)
            key = (holds, mean, -weight, -power)
            if best is None or key > best[0]:
                best = (key, {"text_weight": weight, "coverage_power": power}, per_back)
    (holds, mean, _, _), fusion, per_back = best
    return {"passage": passage, "tag_blend": blend, "feedback": list(feedback) if feedback else None,
            "fusion": fusion, "tuning_holds": holds, "tuning_ndcg@10": mean, "back_ends": per_back,
            "_semantic": semantic, "_semantic_copy": dict(semantic)}


if __name__ == "__main__":
    sys.exit(main())
