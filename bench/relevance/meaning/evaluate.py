"""Score text, semantic and hybrid search on the set written by meaning (``bench/relevance/meaning``):
``python -m bench.relevance.evaluate --set meaning [--database-url URL] [--model DIR] [--pool FILE]``.

The items (with their tags) go into a fresh database, ids 1..N in file order; every item and tag is
embedded with the semantic model; each query runs in text, semantic and hybrid through
``app.search.run`` (the API's entry point) for its top 10. nDCG@10 and recall@10 are written per mode,
per query class and per half to ``bench/results/relevance-meaning.json`` (one entry per back end), with a
95 % bootstrap interval of hybrid − max(text, semantic) per class of each half, and, for comparison,
the reciprocal rank fusion hybrid used before (``rrf``) over the same two rankings. Only the test half
is the reported figure: the tuning half chose the fusion's weight.

The same run reads the two rankings hybrid fuses and the text ranking's coverage of each query, as
hybrid reads them (``hybrid.rankings``), and scores the fusion on each half over a grid of text shares
(a full match's) and coverage powers (``fusion_grid``). ``tuning_choice`` picks from the tuning half of
every back end recorded: the best mean nDCG@10 among the settings that keep every class at or above the
better of text and semantic alone on each back end; it is how ``hybrid.TEXT_WEIGHT`` and
``hybrid.COVERAGE_POWER`` were chosen, and the run says whether the tuning half still picks them.
``--pool FILE`` lists, per query, the items any mode ranks in its top 10 that have no grade yet: what
pooling reviews.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from .. import scoring as common
from . import CLASSES, HALVES, ITEMS, QUERIES, grades, half, load

RESULTS = common.RESULTS.with_name("relevance-meaning.json")
MODES = ("text", "semantic", "hybrid")
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 20  # the issue's number: the same intervals on every run over the same rankings
GRID = [round(w / 20, 2) for w in range(21)]  # text shares 0, 0.05, …, 1 (a full match's)
POWERS = (1, 2, 3, 4)  # how fast text's share falls with its coverage of the query
RRF_K = 60  # reciprocal rank fusion as hybrid ran it before score fusion, scored on the same rankings
BEFORE = "hybrid (RRF, before)"


def corpus(items: list[dict]) -> list[dict]:
    return [{"title": i["title"], "body": i["body"], "tags": i["tags"]} for i in items]


def relevant_ids(graded: dict[str, int], ids: dict[str, int]) -> dict[int, int]:
    return {ids[item]: grade for item, grade in graded.items() if grade > 0}


def run_modes(app, queries: list[dict]) -> dict[str, dict[str, list[int]]]:
    """query id -> mode -> the top 10 item ids, through ``app.search.run``."""
    from app.search import run

    with app.app_context():
        return {q["id"]: {mode: common.ranked_ids(run(mode, q["q"], common.K)) for mode in MODES} for q in queries}


def read_rankings(app, queries: list[dict]) -> dict[str, tuple[dict[str, list[tuple[int, float]]], float]]:
    """query id -> (the (item id, score) rankings hybrid fuses for a top 10, the text ranking's coverage of
    the query), read the way hybrid reads them."""
    from app.db import db
    from app.search import hybrid

    with app.app_context():
        found = {}
        for q in queries:
            rankings, coverage, fallback = hybrid.rankings(q["q"], hybrid.depth(common.K))
            if fallback:
                raise RuntimeError(f"semantic search did not answer: {fallback}")
            found[q["id"]] = (rankings, coverage)
            db.session.commit()
        return found


def summary(values: list[tuple[float, float]]) -> dict:
    return {"ndcg@10": round(statistics.fmean(v[0] for v in values), 4),
            "recall@10": round(statistics.fmean(v[1] for v in values), 4), "queries": len(values)}


def per_query_scores(ranked: dict[str, dict[str, list[int]]], queries: list[dict], graded, ids) -> dict:
    """query id -> mode -> (nDCG@10, recall@10)."""
    scores = {}
    for q in queries:
        relevant = relevant_ids(graded[q["id"]], ids)
        scores[q["id"]] = {mode: (common.ndcg_at_k(found, relevant), common.recall_at_k(found, relevant))
                           for mode, found in ranked[q["id"]].items()}
    return scores


def by_half_and_class(scores: dict, queries: list[dict], modes) -> dict:
    """half -> mode -> {nDCG@10, recall@10, queries, by_class}."""
    report = {}
    for which in HALVES:
        in_half = [q for q in queries if half(q["id"]) == which]
        report[which] = {}
        for mode in modes:
            report[which][mode] = {**summary([scores[q["id"]][mode] for q in in_half]), "by_class": {
                cls: summary([scores[q["id"]][mode] for q in in_half if q["class"] == cls])
                for cls in CLASSES if any(q["class"] == cls for q in in_half)}}
    return report


def percentile_bootstrap(statistic, qids: list[str], samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """statistic(qids) as "gain", and its 95 % percentile bootstrap interval over the queries resampled
    with replacement (a fixed seed: the same interval on every run over the same scores)."""
    rng = random.Random(BOOTSTRAP_SEED)
    draws = sorted(statistic([rng.choice(qids) for _ in qids]) for _ in range(samples))
    return {"gain": round(statistic(qids), 4), "low": round(draws[int(0.025 * samples)], 4),
            "high": round(draws[int(0.975 * samples) - 1], 4)}


def bootstrap_gain(scores: dict, qids: list[str], samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """hybrid − max(text, semantic) in mean nDCG@10 over qids, and its 95 % percentile bootstrap interval."""
    def gain(sample):
        mean = {m: statistics.fmean(scores[q][m][0] for q in sample) for m in MODES}
        return mean["hybrid"] - max(mean["text"], mean["semantic"])

    return {**percentile_bootstrap(gain, qids, samples), "queries": len(qids)}


def intervals(scores: dict, queries: list[dict]) -> dict:
    """half -> class (and "all") -> the bootstrap of hybrid's gain over the better of its parts."""
    out = {}
    for which in HALVES:
        in_half = [q for q in queries if half(q["id"]) == which]
        out[which] = {"all": bootstrap_gain(scores, [q["id"] for q in in_half])}
        for cls in CLASSES:
            qids = [q["id"] for q in in_half if q["class"] == cls]
            if qids:
                out[which][cls] = bootstrap_gain(scores, qids)
    return out


def fusion_grid(rankings: dict, queries: list[dict], graded, ids, weights=GRID, powers=POWERS) -> dict:
    """half -> coverage power -> text share -> mean nDCG@10 of hybrid.fuse over the rankings read, and per class."""
    from app.search import hybrid

    grid = {}
    for which in HALVES:
        in_half = [q for q in queries if half(q["id"]) == which]
        grid[which] = {}
        for power in powers:
            grid[which][str(power)] = row = {}
            for weight in weights:
                per_class: dict[str, list[float]] = {}
                for q in in_half:
                    scored, coverage = rankings[q["id"]]
                    share = hybrid.text_share(coverage, weight, power)
                    fused = [item_id for _, item_id, _ in hybrid.fuse(scored, common.K, text_weight=share)]
                    per_class.setdefault(q["class"], []).append(
                        common.ndcg_at_k(fused, relevant_ids(graded[q["id"]], ids)))
                every = [v for values in per_class.values() for v in values]
                row[str(weight)] = {"ndcg@10": round(statistics.fmean(every), 4),
                                    "by_class": {c: round(statistics.fmean(v), 4) for c, v in per_class.items()}}
    return grid


def tuning_choice(entries: dict) -> dict:
    """The text share and coverage power the tuning half picks from the back ends' entries: the best mean
    nDCG@10 over them among the settings that keep every class, on each back end, at or above the better
    of text and semantic alone (among all settings if none does); on a tie the smaller share, then power."""
    def parts_best(entry, cls):
        modes = entry["halves"]["tuning"]
        return max(modes[m]["by_class"][cls]["ndcg@10"] for m in ("text", "semantic"))

    settings = []
    for power, row in next(iter(entries.values()))["fusion"]["grid"]["tuning"].items():
        for weight in row:
            cells = [entry["fusion"]["grid"]["tuning"][power][weight] for entry in entries.values()]
            holds = all(cell["by_class"][cls] >= parts_best(entry, cls)
                        for entry, cell in zip(entries.values(), cells) for cls in cell["by_class"])
            mean = statistics.fmean(cell["ndcg@10"] for cell in cells)
            settings.append((holds, round(mean, 4), -float(weight), -int(power), float(weight), int(power)))
    holds, mean, _, _, weight, power = max(settings)
    return {"text_weight": weight, "coverage_power": power, "tuning_ndcg@10": mean,
            "every_class_holds": holds, "back_ends": sorted(entries)}


def rrf(rankings: dict[str, list[tuple[int, float]]], limit: int = common.K) -> list[int]:
    """The top ids of reciprocal rank fusion (k = 60) over the same rankings: what hybrid answered before."""
    scores: dict[int, float] = {}
    for scored in rankings.values():
        for rank, item_id in enumerate(dict.fromkeys(i for i, _ in scored), start=1):
            scores[item_id] = scores.get(item_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores, key=lambda item_id: (-scores[item_id], -item_id))[:limit]


def pool_listing(ranked: dict, queries: list[dict], graded, items: list[dict]) -> str:
    """Per query, the items some mode ranks in its top 10 that have no grade yet, and which modes did."""
    lines = []
    for q in queries:
        seen: dict[int, list[str]] = {}
        for mode in MODES:
            for rank, item_id in enumerate(ranked[q["id"]][mode], start=1):
                seen.setdefault(item_id, []).append(f"{mode}#{rank}")
        ungraded = [(i, modes) for i, modes in seen.items() if items[i - 1]["id"] not in graded[q["id"]]]
        if ungraded:
            lines.append(f"{q['id']} [{q['class']}] {q['q']}  (wants {graded[q['id']]})")
            lines += [f"    {items[i - 1]['id']:10} {items[i - 1]['title']}  <- {' '.join(modes)}" for i, modes in ungraded]
    return "\n".join(lines) + "\n"


def print_report(backend: str, report: dict) -> None:
    for which in HALVES:
        for mode, score in report[which].items():
            classes = "  ".join(f"{c} {s['ndcg@10']:.3f}" for c, s in score["by_class"].items())
            print(f"{backend:10} {which:6} {mode:20} nDCG@10 {score['ndcg@10']:.3f}  recall@10 "
                  f"{score['recall@10']:.3f} | {classes}")


def main(args) -> int:
    """Run the set on one back end (``args`` from bench.relevance.evaluate's parser)."""
    from app.search import hybrid

    items, queries, graded = load(ITEMS), load(QUERIES), grades()
    ids = {item["id"]: n for n, item in enumerate(items, start=1)}
    if args.no_semantic:
        raise SystemExit("error: the set scores semantic and hybrid search; it needs the model")
    model = args.model or common.default_model()
    backend = "postgresql" if args.database_url else "sqlite"
    output = args.output if args.output != common.RESULTS else RESULTS
    with tempfile.TemporaryDirectory() as workdir:
        app = common.load_app(args.database_url, Path(workdir), model, corpus(items))
        embed_seconds = common.embed_everything(app)
        ranked = run_modes(app, queries)
        rankings = read_rankings(app, queries)
        model_status = common.describe_model(app)
    for q in queries:
        ranked[q["id"]][BEFORE] = rrf(rankings[q["id"]][0])
    scores = per_query_scores(ranked, queries, graded, ids)
    report = by_half_and_class(scores, queries, (*MODES, BEFORE))
    grid = fusion_grid(rankings, queries, graded, ids)
    entry = {
        "items": len(items), "queries": len(queries),
        "queries_per_half": {h: sum(half(q["id"]) == h for q in queries) for h in HALVES},
        "pooled_grades": sum(len(v) for v in load(ITEMS.with_name("pooled.json")).values()),
        "embed_seconds": embed_seconds, "semantic_model": {**model_status, "model": str(model)},
        "halves": report, "hybrid_gain": intervals(scores, queries),
        "fusion": {"text_weight": hybrid.TEXT_WEIGHT, "coverage_power": hybrid.COVERAGE_POWER, "grid": grid},
        "per_query": {qid: {m: round(v[0], 4) for m, v in s.items()} for qid, s in scores.items()},
    }
    common.update(output, backend, entry)
    every = {name: e for name, e in json.loads(output.read_text(encoding="utf-8")).items() if "coverage_power" in e.get("fusion", {})}
    choice = tuning_choice(every)
    print_report(backend, report)
    print(f"fusion: text share {hybrid.TEXT_WEIGHT} × coverage^{hybrid.COVERAGE_POWER}; the tuning half of "
          f"{', '.join(choice['back_ends'])} picks {choice['text_weight']} × coverage^{choice['coverage_power']}",
          file=sys.stderr)
    if args.pool:
        args.pool.write_text(pool_listing(ranked, queries, graded, items), encoding="utf-8")
    return 0
