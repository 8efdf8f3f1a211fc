"""bench/relevance/meaning/: the relevance set written by meaning — its paraphrase
share checked mechanically, its grades well formed and fixed before any system ran, pooling that only
adds, and a split into tuning and test halves within each class."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from bench.relevance import meaning

ITEMS = {item["id"]: item for item in meaning.load(meaning.ITEMS)}
QUERIES = meaning.load(meaning.QUERIES)
GRADES = meaning.grades()
PARAPHRASES = [q for q in QUERIES if q["class"] == "paraphrase"]


# --- the mechanical paraphrase check -----------------------------------------------------------


@pytest.mark.parametrize("query, item_words", [
    ("ברזים", "ברז"),  # plural
    ("והספרים", "ספר"),  # prefixes and plural
    ("שבמטבח", "מטבח"),  # stacked prefixes
    ("כואב", "כאב"),  # spelling with and without vav
    ("סיסמא", "הסיסמה"),  # final alef read as he
    ("חו\"ל", "לחו״ל"),  # abbreviation quotes, either kind
    ("שָׁלוֹם", "שלום"),  # niqqud
    ("עכברים אלחוטיים", "עכבר"),
    ("לעובדת", "עובדים"),  # feminine and plural endings
])
def test_the_check_sees_a_word_through_prefixes_endings_and_spelling(query, item_words):
    assert meaning.shared_words(query, item_words), (query, item_words)


@pytest.mark.parametrize("query, item_words", [
    ("איך מחליפים את זה?", "איך עושים את זה"),  # function words are not content
    ("ביטוח נסיעות", "דרכון ביומטרי"),
    ("ראוטר", "נתב אלחוטי"),
])
def test_the_check_finds_nothing_shared_between_other_words(query, item_words):
    assert meaning.shared_words(query, item_words) == []


def test_at_least_40_percent_of_queries_share_no_content_word_with_the_items_they_want():
    share = meaning.paraphrase_share(QUERIES, ITEMS, GRADES)
    assert share >= meaning.PARAPHRASE_SHARE_MIN, f"{share:.1%} of queries pass the paraphrase check"
    assert len(PARAPHRASES) / len(QUERIES) >= meaning.PARAPHRASE_SHARE_MIN


@pytest.mark.parametrize("query", PARAPHRASES, ids=[q["id"] for q in PARAPHRASES])
def test_a_paraphrase_shares_no_content_word_with_the_items_it_wants(query):
    assert meaning.shares_with_wanted(query, ITEMS, GRADES[query["id"]]) == {}


# --- the grades ---------------------------------------------------------------------------------


def test_the_pre_run_grades_are_the_ones_committed_before_any_system_ran():
    digest = hashlib.sha256(meaning.GRADES.read_bytes()).hexdigest()
    assert digest == meaning.PRE_RUN_SHA256, "grades.json changed: pooled grades go in pooled.json"


def test_grades_are_0_to_3_on_known_items_and_every_query_wants_an_item():
    assert set(GRADES) == {q["id"] for q in QUERIES}
    for qid, given in GRADES.items():
        assert set(given) <= set(ITEMS), (qid, set(given) - set(ITEMS))
        assert all(isinstance(g, int) and 0 <= g <= 3 for g in given.values()), (qid, given)
        assert max(given.values()) >= meaning.WANTED, f"{qid} wants no item"


def test_pooling_only_adds_grades():
    pre_run, pooled = meaning.load(meaning.GRADES), meaning.load(meaning.POOLED)
    assert set(pooled) <= set(pre_run), set(pooled) - set(pre_run)
    for qid, added in pooled.items():
        changed = set(added) & set(pre_run[qid])
        assert not changed, f"pooling regraded {qid}: {sorted(changed)}"
        assert all(isinstance(g, int) and 0 <= g <= 3 for g in added.values()), (qid, added)


# --- the set and its halves ---------------------------------------------------------------------


def test_items_are_written_whole_in_twenty_domains():
    assert 300 <= len(ITEMS) <= 400 and len({i["domain"] for i in ITEMS.values()}) == 20
    for item in ITEMS.values():
        assert item["title"] and item["body"] and 1 <= len(item["tags"]) <= 5, item["id"]
    assert len({(i["title"], i["body"]) for i in ITEMS.values()}) == len(ITEMS)


def test_queries_cover_every_class():
    counts = Counter(q["class"] for q in QUERIES)
    assert set(counts) == set(meaning.CLASSES) and min(counts.values()) >= 15, counts
    assert len({q["id"] for q in QUERIES}) == len(QUERIES) and len({q["q"] for q in QUERIES}) == len(QUERIES)


def test_the_halves_split_every_class_evenly_and_always_the_same_way():
    halves = meaning.halves(QUERIES)
    assert halves == meaning.halves(list(reversed(QUERIES)))
    for cls in meaning.CLASSES:
        per_half = Counter(halves[q["id"]] for q in QUERIES if q["class"] == cls)
        assert abs(per_half["tuning"] - per_half["test"]) <= 1, (cls, per_half)
    assert all(meaning.half(qid) == h for qid, h in halves.items())


# --- the evaluation's arithmetic (bench/relevance/meaning/evaluate.py) ---------------------------


def test_the_bootstrap_interval_holds_the_gain_and_is_the_same_every_run():
    from bench.relevance.meaning import evaluate

    # Hybrid gains 0.3 on every third query and nothing on the others: 0.3 × 7 / 20 on average.
    scores = {f"q{n}": {"text": (0.2, 0), "semantic": (0.5, 0), "hybrid": (0.8 if n % 3 == 0 else 0.5, 0)}
              for n in range(20)}
    gain = evaluate.bootstrap_gain(scores, list(scores))
    assert gain["gain"] == pytest.approx(0.105) and 0 < gain["low"] < 0.105 < gain["high"] < 0.3, gain
    assert gain == evaluate.bootstrap_gain(scores, list(scores))


def test_the_before_figure_is_reciprocal_rank_fusion_of_the_same_rankings():
    from bench.relevance.meaning import evaluate

    # Ranks only: 3, third in both, beats either first; scores are not read.
    assert evaluate.rrf({"text": [(1, 9.0), (2, 8.0), (3, 1.0)], "semantic": [(4, 0.9), (5, 0.8), (3, 0.7)]}) == [
        3, 4, 1, 5, 2]


def test_the_fusion_is_the_tuning_halfs_choice_over_both_back_ends():
    from bench.relevance.meaning import evaluate

    def entry(cells, text=0.5):
        modes = {"text": {"by_class": {"same": {"ndcg@10": text}}}, "semantic": {"by_class": {"same": {"ndcg@10": 0.6}}}}
        grid = {half: {"2": {w: {"ndcg@10": v, "by_class": {"same": v}} for w, v in cells.items()}}
                for half in ("tuning", "test")}
        grid["test"]["2"]["0.1"] = {"ndcg@10": 0.99, "by_class": {"same": 0.99}}  # never read
        return {"halves": {"tuning": modes}, "fusion": {"grid": grid}}

    # 0.4 and 0.2 tie on the mean of both back ends (the smaller share wins); 0.6 is better on sqlite
    # alone, but postgresql's tuning half falls below its text ranking there.
    entries = {"sqlite": entry({"0.1": 0.55, "0.2": 0.7, "0.4": 0.7, "0.6": 0.8}),
               "postgresql": entry({"0.1": 0.55, "0.2": 0.7, "0.4": 0.7, "0.6": 0.64}, text=0.65)}
    assert evaluate.tuning_choice(entries) == {"text_weight": 0.2, "coverage_power": 2, "tuning_ndcg@10": 0.7,
                                               "every_class_holds": True, "back_ends": ["postgresql", "sqlite"]}


# --- the recipes measured beside the shipped one (bench/relevance/meaning/variants.py) ----------


@pytest.fixture(params=["sqlite"])
def backend(request) -> str:
    # The replay reads stored vectors, whichever database holds them: one back end is enough.
    return request.param


def test_the_replay_ranks_and_scores_as_semantic_search_does(make_app, tiny_onnx):
    """variants.py's figures are the shipped scoring's only if its numpy replay (own cosine, closest tags'
    blend, candidates) ranks as SemanticService.search does."""
    import numpy as np

    from app.db import Embedding, Item, db
    from app.state import get_service
    from bench.relevance.meaning.variants import Replay
    from support import embed_all

    app = make_app(SEMANTIC_MODEL=str(tiny_onnx))
    assert app.test_cli_runner().invoke(args=["seed"]).exit_code == 0
    embed_all(app)
    with app.app_context():
        service = get_service(app)
        fingerprint, dim = service.encoder().fingerprint, service.encoder().dim
        stored = {(e.kind, e.ref_id): np.frombuffer(e.vector, dtype="<f2").astype(np.float32)
                  for e in db.session.query(Embedding).filter(Embedding.model_fp == fingerprint)}
        item_ids = sorted(i for kind, i in stored if kind == "item")
        assert item_ids == list(range(1, len(item_ids) + 1)), "the replay numbers items 1..N"
        tag_ids = sorted(i for kind, i in stored if kind == "tag")
        carriers: dict[int, set[int]] = {}
        for item in db.session.query(Item):
            for tag in item.tags:
                carriers.setdefault(tag.id, set()).add(item.id)
        replay = Replay(np.stack([stored["item", i] for i in item_ids]), np.stack([stored["tag", t] for t in tag_ids]),
                        tag_ids, carriers)
        blended = 0
        for query in ("ספרים לילדים", "מתכון לעוגה", "תיקון ברז", "טיול בצפון"):
            vector = np.asarray(service.encoder().encode([query], 1, kind="query")[0], dtype=np.float32)
            served = service.search(query, 10)
            replayed = replay.semantic(vector, 10, blend=True)
            assert [i for i, _ in replayed] == [i for _, i in served.scored], query
            assert [s for _, s in replayed] == pytest.approx([s for s, _ in served.scored], abs=1e-3), query
            blended += bool(served.item_tags)
        assert blended, "no query reached an item through its tags: the blend went untested"
        assert dim == replay.items.shape[1]


def test_the_tuning_half_alone_chooses_the_recipe_and_the_table_bolds_it():
    from bench.relevance.meaning import variants

    def recipe(passage, tuning, holds, test):
        halves = {"tuning": {m: {"ndcg@10": tuning} for m in ("semantic", "hybrid")},
                  "test": {m: {"ndcg@10": test} for m in ("semantic", "hybrid")}}
        return {"passage": passage, "tag_blend": True, "feedback": None, "fusion": {"text_weight": 0.4, "coverage_power": 3},
                "tuning_holds": holds, "tuning_ndcg@10": tuning,
                "back_ends": {"sqlite": halves, "postgresql": {**halves, "test": {
                    m: {"ndcg@10": test - 0.1} for m in ("semantic", "hybrid")}}},
                "semantic_test_gain_over_shipped": {"gain": 0.0, "low": 0.0, "high": 0.0}}

    # The best test half and the best tuning half that lets a class fall below its parts are both passed over.
    recipes = [recipe("a", 0.70, True, 0.50), recipe("b", 0.60, True, 0.90), recipe("c", 0.80, False, 0.50)]
    chosen = variants.choose(recipes)
    assert chosen["passage"] == "a"
    table = variants.section({"back_ends": ["postgresql", "sqlite"], "queries": 3, "items": 9, "recipes": recipes,
                              "chosen_on_tuning": {k: chosen[k] for k in ("passage", "tag_blend", "feedback", "fusion")}})
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert "SQLite / PostgreSQL" in rows[0]
    assert [row.startswith("| **") for row in rows[2:]] == [True, False, False], table
    assert "| 0.500 / 0.400 |" in rows[2], "SQLite's test figure first, as the header says"
