"""Hybrid search: the text and the semantic rankings fused by a weighted sum of their normalised scores,
text's weight set per query by how much of the query its best match holds.

Each ranking's scores are put on 0..1 within the query (``normalise``: text as a share of its best
match, semantic min-max over the candidates read), then an item scores
w × its text score + (1 − w) × its semantic score, 0 for a ranking that did not find it, where
w = ``TEXT_WEIGHT`` × c³ and c is the text ranking's *coverage* (``textindex.coverage``): the share of
the query's words, weighted by their rarity, that its best match holds, as typed or in another form the
analyzer knows (a stem, a lemma, a respelling). A query that uses the items' own words (c near 1) gives
text up to ``TEXT_WEIGHT`` and an exact match rises; a query phrased unlike the items still gets text
matches on a common word, but c is small, w is nearly 0, and semantic's order stands.
When semantic search cannot answer (off, its model failed to load, or shed under load) the answer is
the text ranking alone, and says so: hybrid never answers 503 for the model's sake.
"""

from __future__ import annotations

from .. import textindex
from ..db import db
from ..semantic.service import SemanticUnavailable
from ..state import get_service
from .results import Answer, load, result

# Text's share of the fused score when its best match holds the whole query, and how fast it falls with
# the share held (``text_share``: 0.4 at a full match, 0.05 at half). Chosen on the tuning half of
# bench/relevance/meaning (``tuning_choice``) over shares 0, 0.05, …, 1 and powers 1 to 4: the best mean
# nDCG@10 of both back ends among the settings that keep every query class of each at or above the better
# of text and semantic alone (0.678, against 0.669 for semantic alone; the grid is flat near the top, from
# 0.676 to 0.680). `python -m bench.relevance.evaluate --set meaning` records the grid and says whether the
# tuning half still picks these in bench/results/relevance-meaning.json; the test half is the reported figure.
TEXT_WEIGHT = 0.4
COVERAGE_POWER = 3
# Where each ranking's normalised scores start (see normalise): text from no match, semantic from its last candidate.
FLOORS = {"text": 0.0, "semantic": None}
# Each ranking is read this far down, so an item ranked modestly by both can still rise into the limit,
# while a query's cost stays bounded by the limit, not by the table.
DEPTH_PER_RESULT, DEPTH_MIN = 3, 30
RANKINGS = ("text", "semantic")  # the order a result's "ranks" lists them in


def depth(limit: int) -> int:
    """How many ids each ranking contributes for a query asking for limit results."""
    return max(limit * DEPTH_PER_RESULT, DEPTH_MIN)


def normalise(scored: list[tuple[int, float]], floor: float | None = None) -> dict[int, float]:
    """A ranking's scores on 0..1 within the query: the best is 1, ``floor`` (by default the lowest score
    read) is 0. An id listed twice counts once, at its better score.

    Text scores (FTS5's negated bm25(), PostgreSQL's ts_rank) are 0 for no match, whatever their scale
    on either back end: text is read against that floor. Cosines have no such zero and crowd into a
    narrow band: semantic is read against the last candidate read (min-max).
    """
    best: dict[int, float] = {}
    for item_id, score in scored:
        best[item_id] = max(score, best.get(item_id, score))
    if not best:
        return {}
    high = max(best.values())
    low = min(best.values()) if floor is None else floor
    return {item_id: (score - low) / (high - low) if high > low else 1.0 for item_id, score in best.items()}


def text_share(coverage: float, weight: float = TEXT_WEIGHT, power: float = COVERAGE_POWER) -> float:
    """Text's share of the fused score for a query whose best text match holds ``coverage`` (0..1) of it."""
    return weight * coverage ** power


def fuse(rankings: dict[str, list[tuple[int, float]]], limit: int, text_weight: float = TEXT_WEIGHT
         ) -> list[tuple[float, int, dict[str, int]]]:
    """(fused score, item id, {ranking: 1-based rank}) of the best limit ids, best first; ties: newer id first.

    ``rankings`` maps "text" and (when it answered) "semantic" to (item id, score) pairs, best first;
    ``text_weight`` is text's share for this query (``text_share``; by default a full match's).
    """
    weights = {"text": text_weight, "semantic": 1.0 - text_weight}
    scores: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    for name, scored in rankings.items():
        for rank, item_id in enumerate(dict.fromkeys(item_id for item_id, _ in scored), start=1):
            ranks.setdefault(item_id, {})[name] = rank
        for item_id, score in normalise(scored, FLOORS[name]).items():
            scores[item_id] = scores.get(item_id, 0.0) + weights[name] * score
    best = sorted(scores, key=lambda item_id: (-scores[item_id], -item_id))[:limit]
    return [(scores[item_id], item_id, ranks[item_id]) for item_id in best]


def rankings(query: str, per_ranking: int) -> tuple[dict[str, list[tuple[int, float]]], float, dict | None]:
    """The text and semantic rankings of a query, (item id, score) best first, the text ranking's coverage
    of the query, and the fallback taken when semantic search could not answer (its ranking is then missing)."""
    text = textindex.search(db.session, query, per_ranking)
    found, coverage = {"text": list(text.hits)}, textindex.coverage(db.session, text)
    # The semantic query may wait in the model queue: its connection goes back to the pool meanwhile, so
    # hybrid searches waiting for the model never hold the connections text and tag searches need.
    db.session.commit()
    try:
        found["semantic"] = [(item_id, score) for score, item_id in get_service().search(query, per_ranking).scored]
    except SemanticUnavailable as exc:  # disabled, failed to load, or shed as overloaded (a subclass)
        return found, coverage, {"mode": "text", "reason": str(exc)}
    return found, coverage, None


def search(query: str, limit: int) -> Answer:
    """Items ranked by the fusion of text and semantic search, text weighed by its coverage of the query;
    text alone, with a fallback field, without the model."""
    found, coverage, fallback = rankings(query, depth(limit))
    fused = fuse(found, limit, text_weight=1.0 if fallback else text_share(coverage))
    items = load(i for _, i, _ in fused)
    results = []
    for score, item_id, ranks in fused:
        if item_id in items:  # an item deleted between the rankings and this read is skipped, not an error
            shaped = result(items[item_id], score)
            shaped["ranks"] = {name: ranks[name] for name in RANKINGS if name in ranks}
            results.append(shaped)
    return Answer(results, fallback)
