"""Write the benchmarks' and test suites' last results (bench/results/) into their marker sections
(devtools/markers.py), each in whichever of README.md and docs/*.md holds its markers, so the pages show
the last run's figures and nothing typed by hand.

    python -m bench.readme            # every section whose results file exists
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Callable

from devtools.markers import replace_section, section_file

RESULTS = Path(__file__).resolve().parent / "results"


def container_section(data: dict) -> str:
    rows = ["| tier | limit | cgroup peak | working set after | PSS sum | RSS sum (shared pages per process) "
            "| alert threshold | OOM kills | requests |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tier, m in sorted(data.get("memory", {}).items(), key=lambda kv: kv[1]["limit_mb"]):
        rows.append(f"| `{tier}` | {m['limit_mb']} MB | {m['cgroup_peak_mb']} MB | {m.get('working_set_mb', '-')} MB | "
                    f"{m.get('processes_pss_mb', '-')} MB | {m['processes_rss_mb']} MB | "
                    f"{m['max_memory_mb']} MB | {m['oom_kills']} | {m['requests']} |")
    rows.append("")
    rows.append(f"Image size: {data.get('image_size_mb')} MB (test budget {data.get('image_budget_mb')} MB: the model is baked "
                "in twice, portable and optimized, see Performance).")
    return "\n".join(rows)


def load_section(data: dict) -> str:
    cgroup = (f"{data['cgroup_peak_mb']} MB cgroup peak (working set {data.get('peak_working_set_mb', '-')} MB) in a "
              f"512 MB memory cgroup (v{data.get('cgroup_version', 1)}), {data['oom_kills']} OOM kills"
              if data.get("cgroup") else "no cgroup available")
    modes = ", ".join(f"{k} {v} ms" for k, v in sorted(data["by_mode_p50_ms"].items()))
    return "\n".join([
        "| figure | last run |", "| --- | --- |",
        f"| load held | {data['requests']} requests in {data['seconds']:.0f} s from {data['clients']} clients "
        f"({data['throughput_rps']} req/s), **{data['failed']} failed** (5xx or connection errors), "
        f"{data.get('sheds', 0)} semantic requests shed (503 overloaded with Retry-After) |",
        f"| latency | p50 {data['p50_ms']} ms, p99 {data['p99_ms']} ms; p50 by kind: {modes} |",
        f"| workers recycled during the run | {data['recycles']} (max_requests={data['max_requests']}), "
        f"{data['killed']} killed |",
        f"| memory | {data.get('peak_pss_mb', '-')} MB peak PSS sum of the process tree ({data['peak_rss_mb']} MB RSS sum, "
        f"shared weights counted per worker); {cgroup}; threshold {data['max_memory_mb']} MB |",
        f"| data lost | **{data['created_missing']}** of {data['created']} created items unreadable afterwards |",
    ])


def release_section(data: dict) -> str:
    items = data["backfill"].get("items", {})
    return "\n".join([
        "| figure | last run |", "| --- | --- |",
        f"| corpus | {data['items']} generated Hebrew items, {data['tags']} tags; {data['database']} |",
        f"| model | {data['model']}, {data['tier_settings']} tier settings (batch {data['embedding_batch_size']}, "
        f"{data['max_seq_length']} tokens), {data['cpus']} CPUs |",
        f"| first release (migrate, pgvector, backfill) | {data['release_seconds']} s |",
        f"| backfill rate | {items.get('rows_per_second', '-')} items/s ({items.get('rows', 0)} items in "
        f"{items.get('seconds', '-')} s) |",
        f"| second release (nothing to do) | {data['second_release_seconds']} s, "
        f"{'no-op' if data['second_release_nothing_to_do'] else '**did work**'} |",
    ])


def sharing_section(data: dict) -> str:
    rows = ["| layout | processes | PSS sum | USS (private) sum | RSS sum (shared pages counted per process) | load |",
            "| --- | --- | --- | --- | --- | --- |"]
    for run in data["runs"]:
        rows.append(f"| {run['layout']} | {run['n']} | {run['pss_mb']} MB | {run['uss_mb']} MB | {run['rss_mb']} MB | "
                    f"{run['load_seconds']} s |")
    rows.append("")
    rows.append(f"{data['model']}, {data['sentences']} sentences encoded per process, {data['threads']} thread; "
                f"largest embedding difference between the layouts: {data['max_embedding_diff']}.")
    return "\n".join(rows)


def textscale_section(data: dict) -> str:
    # CPU time and the load average beside the wall clock: the machine is shared, and a busy one
    # stretches the wall clock far more than the CPU a query takes.
    rows = ["| back end | items | query p50 | p95 | CPU per query | load | index on disk "
            "| write per item (insert + analysis) | analyzer |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in sorted(data.values(), key=lambda r: (r["backend"], r["items"])):
        # Runs from before the analyzer was recorded measured the rule-based one (version 1).
        version, _, lexicon = run.get("analyzer", "1+rules").partition("+")
        analyzer = f"{version}, {'Hspell lexicon' if lexicon.startswith('hspell') else 'rules only'}"
        load = run.get("loadavg_1min") or ["?"]
        rows.append(f"| {run['backend']} | {run['items']:,} | {run['p50_ms']} ms | {run['p95_ms']} ms | "
                    f"{run['cpu_ms_per_query']} ms | {load[0]} | {run['index_bytes'] / 2**20:.1f} MB | {run['insert_ms_per_item'] + run['analyse_ms_per_item']:.2f} ms "
                    f"| {analyzer} |")
    return "\n".join(rows)


def relevance_section(data: dict) -> str:
    rows = ["| back end | engine | nDCG@10 | recall@10 | queries / items |", "| --- | --- | --- | --- | --- |"]
    for backend, report in sorted(data.items()):
        for engine, score in report["engines"].items():
            rows.append(f"| {backend} | {engine} | {score['ndcg@10']:.3f} | {score['recall@10']:.3f} | "
                        f"{report['queries']} / {report['items']} |")
    return "\n".join(rows)


def relevance_meaning_section(data: dict) -> str:
    """The set written by meaning (bench/relevance/meaning): nDCG@10 of each mode per query class, test half."""
    from bench.relevance.meaning import CLASS_NAMES, CLASSES
    from bench.relevance.meaning.evaluate import tuning_choice

    rows = [f"| back end | mode | all | {' | '.join(CLASS_NAMES[c] for c in CLASSES)} | recall@10 |",
            "| --- | --- | --- | " + "--- | " * len(CLASSES) + "--- |"]
    for backend, report in sorted(data.items()):
        for mode, score in report["halves"]["test"].items():
            classes = " | ".join(f"{score['by_class'][c]['ndcg@10']:.3f}" for c in CLASSES)
            rows.append(f"| {backend} | {mode} | **{score['ndcg@10']:.3f}** | {classes} | {score['recall@10']:.3f} |")
    rows.append("")
    for backend, report in sorted(data.items()):
        gain = report["hybrid_gain"]["test"]
        intervals = "; ".join(f"{CLASS_NAMES.get(c, c)} {g['gain']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]"
                              for c, g in gain.items())
        rows.append(f"{backend}: hybrid − max(text, semantic), nDCG@10 with a 95 % bootstrap interval: {intervals}.")
        rows.append("")
    first = next(iter(data.values()))
    fusion, choice = first["fusion"], tuning_choice(data)
    rows.append(f"Text's share of the fused score: {fusion['text_weight']} × c^{fusion['coverage_power']}, c the "
                f"share of the query its best text match holds; the tuning half of {' and '.join(choice['back_ends'])} "
                f"picks {choice['text_weight']} × c^{choice['coverage_power']} (mean nDCG@10 {choice['tuning_ndcg@10']:.3f}"
                f"{', every class at or above the better of text and semantic' if choice['every_class_holds'] else ''}).")
    rows.append("")
    rows.append(f"Test half: {first['queries_per_half']['test']} of {first['queries']} queries over {first['items']} "
                f"items; {first['pooled_grades']} grades added by pooling.")
    return "\n".join(rows)


def model_quality_section(data: dict) -> str:
    """The default model's quality beside text and hybrid, from the same run as the per-class table
    (docs/search.md): nDCG@10 of each mode, test half, per back end."""
    modes = {"semantic": "semantic, this model", "text": "text", "hybrid": "hybrid"}
    names = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
    backends = [b for b in names if b in data]
    rows = ["| mode | " + " | ".join(f"nDCG@10, {names[b]}" for b in backends) + " | recall@10, SQLite |",
            "| --- | " + "--- | " * len(backends) + "--- |"]
    for mode, label in modes.items():
        scores = [data[b]["halves"]["test"][mode] for b in backends]
        rows.append(f"| {label} | " + " | ".join(f"{s['ndcg@10']:.3f}" for s in scores)
                    + f" | {data['sqlite']['halves']['test'][mode]['recall@10']:.3f} |")
    return "\n".join(rows) + "\n"


def model_quality_line(data: dict) -> str:
    """The README's one sentence of the same figures."""
    test = data["sqlite"]["halves"]["test"]
    return (f"nDCG@10 {test['semantic']['ndcg@10']:.3f} on Hebrew queries written by meaning against "
            f"{test['text']['ndcg@10']:.3f} for text search and {test['hybrid']['ndcg@10']:.3f} for hybrid "
            f"(SQLite, test half).")


def fuzz_section(data: dict) -> str:
    suites = ", ".join(f"{name} {count:,}" for name, count in sorted(data["by_suite"].items()))
    return (f"Last run: **{data['inputs_tried']:,} generated requests** ({suites}), "
            f"**{data['server_errors']} server errors** outside the documented 503s.")


def faults_section(data: dict) -> str:
    kinds = ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in sorted(data["by_fault"].items()))
    return (f"Last run: **{data['faults_injected']} faults injected, {data['faults_survived']} survived** ({kinds}); "
            f"{data['requests_sent']} requests sent, {data['items_acknowledged']} items acknowledged, "
            f"**{data['data_lost']} lost**.")


def from_script(module: str, function: str = "section") -> Callable[[dict], str]:
    """A section the bench script renders itself (bench.<module>.<function>), imported when its results
    are there: the scripts import what they measure, this command only the ones it needs."""
    def render(data: dict) -> str:
        return getattr(importlib.import_module(f"bench.{module}"), function)(data)

    return render


def capacity_section(data: dict, steps: str = "capacity.md") -> str:
    from bench.capacity import table

    # capacity.md is a page of its own: its title goes, its sections become bold lines inside docs/capacity.md's,
    # and every step of every ladder stays there (the docs page links it, relative to docs/).
    out, skipping = [], False
    for line in table(data).strip().splitlines()[1:]:
        if line.startswith("## "):
            skipping = line == "## Ladder steps"
            line = f"**{line[3:]}**"
        if not skipping:
            out.append(line)
    out += ["", f"Every step of every ladder: [bench/results/{steps}](../bench/results/{steps})."]
    return "\n".join(out).strip()


SECTIONS = {"container-results": ("container.json", container_section), "load-results": ("load.json", load_section),
            # bench/release.py; a page needs <!-- release-results:start/end --> markers for it.
            "release-results": ("release.json", release_section),
            "sharing-results": ("sharing.json", sharing_section),
            "textscale-results": ("textscale.json", textscale_section),
            "relevance-results": ("relevance.json", relevance_section),
            "relevance-meaning-results": ("relevance-meaning.json", relevance_meaning_section),
            "relevance-variants-results": ("relevance-meaning-variants.json", from_script("relevance.meaning.variants")),
            "model-quality": ("relevance-meaning.json", model_quality_section),
            "model-quality-line": ("relevance-meaning.json", model_quality_line),
            "fuzz-results": ("fuzz.json", fuzz_section),
            "faults-results": ("faults.json", faults_section),
            "serving-results": ("serving.json", from_script("serving", "table")),
            "capacity-results": ("capacity.json", capacity_section),
            "capacity-e5-results": ("capacity-e5/capacity.json",
                                    lambda data: capacity_section(data, "capacity-e5/capacity.md")),
            "batching-results": ("batching.json", from_script("batching", "table")),
            "instance-vectors-results": ("instance-vectors.json", from_script("instance_vectors")),
            "slowclients-results": ("slowclients.json", from_script("slowclients")),
            "vectors-scale-results": ("vectors-scale.json", from_script("vectors_scale")),
            "vectors-scale-768-results": ("vectors-scale-768.json", from_script("vectors_scale")),
            "halfvec-results": ("halfvec.json", from_script("halfvec")),
            "remote-results": ("remote.json", from_script("remote"))}


def main() -> int:
    texts: dict[Path, str] = {}  # each page read once, written once, however many of its sections change
    for name, (filename, render) in SECTIONS.items():
        path = RESULTS / filename
        if not path.exists():
            continue
        body = render(json.loads(path.read_text()))
        page = section_file(name)
        if page is None:
            # A section no page shows yet: print it for whoever adds the markers, rather than failing
            # every suite that ends with this command.
            print(f"no page (README.md, docs/*.md) has <!-- {name}:start/end --> markers; the section would be:\n"
                  f"{body}\n", file=sys.stderr)
            continue
        text = texts[page] if page in texts else page.read_text(encoding="utf-8")
        texts[page] = replace_section(text, name, body)
    for page, text in texts.items():
        page.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
