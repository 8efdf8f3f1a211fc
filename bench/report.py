"""Turn a benchmark run into bench/results/bench.json, bench.md (the table) and memory.png (the plot),
and copy the table into docs/performance.md (its bench-results markers)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PHASES = ("startup", "load", "queries", "embedding")
# The 512 MB goals, written once: the limit, whether a measure must stay at or under it ("max") or reach
# it ("min"), and the wording of the report's check (the limit fills the {}). bench/run.py records them
# with each run; table() checks them.
GOALS = {
    "peak_mb": {"limit": 400, "kind": "max",
                "text": "instance peak (PSS sum of the process tree, and cgroup working set) ≤ {} MB"},
    "cosine": {"limit": 0.99, "kind": "min", "text": "mean cosine to fp32 ≥ {}"},
    "speedup": {"limit": 2.5, "kind": "min", "text": "semantic query median ≥ {}× faster than fp32"},
    "idle_worker_mb": {"limit": 60, "kind": "max", "text": "idle worker private memory ≤ {} MB"},
    "peak_1gb_mb": {"limit": 800, "kind": "max", "text": "1gb tier instance peak (PSS sum, working set) ≤ {} MB"},
}


def _check(ok: bool) -> str:
    return "yes" if ok else "**no**"


def met(goal: dict, value: float) -> bool:
    """Whether value meets one goal of the GOALS table."""
    return value <= goal["limit"] if goal["kind"] == "max" else value >= goal["limit"]


def instance_peak(scenario: dict) -> tuple[float, str]:
    """The instance's peak as the goals judge it: the larger of the PSS sum and the cgroup working set."""
    pss, working_set = scenario["peak_pss_mb"], scenario.get("peak_working_set_mb")
    shown = f"{pss} MB PSS" + (f", {working_set} MB working set" if working_set else "")
    return max(pss, working_set or 0), shown


def table(report: dict) -> str:
    scenarios = report["scenarios"]
    by_name = {s["name"]: s for s in scenarios}
    naive = by_name.get("naive")
    cols = [s["label"] for s in scenarios]
    rows = [("", cols), ("workers", [str(s["workers"]) for s in scenarios]),
            ("model", [f"{s['model'].get('backend')} {s['model'].get('precision')}, {s['model'].get('max_seq_length')} tokens"
                       for s in scenarios]),
            ("memory cgroup limit", [f"{s['memory_limit_mb']} MB" if s["cgroup"] else "none" for s in scenarios]),
            ("idle worker RSS / private (semantic on, unused)",
             [f"{s['idle_worker_rss_mb']} / {s['idle_worker_uss_mb']} MB" for s in scenarios])]
    for phase in PHASES:
        rows.append((f"peak RSS / private, {phase}",
                     [f"{s['phases'].get(phase, {}).get('rss_mb', '-')} / {s['phases'].get(phase, {}).get('uss_mb', '-')} MB"
                      for s in scenarios]))
    rows += [
        ("**peak PSS sum, whole process tree**", [f"**{s.get('peak_pss_mb', '-')} MB**" for s in scenarios]),
        ("**peak cgroup working set**", [f"**{s['peak_working_set_mb']} MB**" if s.get("peak_working_set_mb") else "-"
                                         for s in scenarios]),
        ("peak RSS sum (shared pages counted per process)", [f"{s['peak_rss_mb']} MB" for s in scenarios]),
        ("cgroup peak (kernel's, page cache included)", [f"{s['cgroup_peak_mb']} MB" if s["cgroup_peak_mb"] else "-"
                                                         for s in scenarios]),
        ("OOM kills", [str(s["oom_kills"]) for s in scenarios]),
        ("model load (in the first request, or before it with SEMANTIC_WARM)",
         [f"{s['load_seconds']} s" for s in scenarios]),
        ("first semantic query (incl. the load unless warmed)", [f"{s['first_query_ms']:.0f} ms" for s in scenarios]),
        ("semantic query p50 / p95 / p99 (8 clients)",
         [f"{s['queries']['p50_ms']:.0f} / {s['queries']['p95_ms']:.0f} / {s['queries']['p99_ms']:.0f} ms" for s in scenarios]),
        ("server time per query, median", [f"{s['queries']['server_p50_ms']} ms" for s in scenarios]),
        ("throughput", [f"{s['queries']['throughput_qps']} q/s" for s in scenarios]),
        ("errors / shed (503 overloaded)", [f'{s["queries"]["errors"]} / {s["queries"].get("sheds", 0)}'
                                            for s in scenarios]),
        ("embedding 1,000 new tags", [f"{s['embedding']['seconds']} s (batch {s['embedding']['batch_size']})" for s in scenarios]),
        ("worker recycles (requests / memory)", [f"{s['recycles']['max_requests']} / {s['recycles']['memory']}" for s in scenarios]),
        ("mean cosine to fp32 (200 Hebrew sentences)", [str(report["fidelity"].get(s["name"], "-")) for s in scenarios]),
    ]
    lines = ["| " + " | ".join([rows[0][0], *rows[0][1]]) + " |", "| --- " * (len(cols) + 1) + "|"]
    lines += ["| " + " | ".join([name, *values]) + " |" for name, values in rows[1:]]
    out = "\n".join(lines)
    if naive and "512mb" in by_name:
        tier = by_name["512mb"]
        speedup = naive["queries"]["server_p50_ms"] / max(tier["queries"]["server_p50_ms"], 0.1)
        measured = {"peak_mb": instance_peak(tier),
                    "cosine": (report["fidelity"]["512mb"], str(report["fidelity"]["512mb"])),
                    "speedup": (speedup, f"{speedup:.1f}×"),
                    "idle_worker_mb": (tier["idle_worker_uss_mb"], f"{tier['idle_worker_uss_mb']} MB private "
                                                                  f"({tier['idle_worker_rss_mb']} MB RSS)")}
        if "1gb" in by_name:
            measured["peak_1gb_mb"] = instance_peak(by_name["1gb"])
        checks = [(GOALS[key]["text"].format(GOALS[key]["limit"]), shown, met(GOALS[key], value))
                  for key, (value, shown) in measured.items()]
        out += "\n\n| 512 MB goal | measured | met |\n| --- | --- | --- |\n" + "\n".join(
            f"| {goal} | {value} | {_check(ok)} |" for goal, value, ok in checks)
    real = report.get("real_weights", {})
    if real.get("precisions"):
        out += (f"\n\nCompression on real weights ({real['model']}, {real['queries']} queries over {real['corpus']} "
                f"sentences): top-{real['k']} retrieval agreement with fp32 torch.\n\n"
                "| precision | top-5 agreement | mean cosine | query | weights |\n| --- | --- | --- | --- | --- |\n")
        out += "\n".join(f"| {name} | {p['top5_agreement']} | {p['mean_cosine']} | {p['query_ms']} ms | {p['weights_mb']} MB |"
                         for name, p in real["precisions"].items())
    return out + f"\n\nRun: {report['date']}, {report['machine']}.\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["scenarios"]), figsize=(5 * len(report["scenarios"]), 4), sharey=True)
    if len(report["scenarios"]) == 1:
        axes = [axes]
    colours = {"startup": "#eeeeee", "load": "#fde2c8", "queries": "#d5e8f7", "embedding": "#dcefd5"}
    for ax, scenario in zip(axes, report["scenarios"]):
        samples = scenario["samples"]
        t = [s["t"] for s in samples]
        for phase in PHASES:
            times = [s["t"] for s in samples if s["phase"] == phase]
            if times:
                ax.axvspan(min(times), max(times), color=colours[phase], label=phase)
        ax.plot(t, [s["rss_mb"] for s in samples], color="#c0392b", label="RSS sum (tree)", linewidth=1)
        if all(s.get("pss_mb") is not None for s in samples):
            ax.plot(t, [s["pss_mb"] for s in samples], color="#e67e22", label="PSS sum (tree)")
        ax.plot(t, [s["uss_mb"] for s in samples], color="#2c3e50", label="private sum (tree)", linewidth=1)
        if any(s["cgroup_mb"] for s in samples):
            ax.plot(t, [s["cgroup_mb"] for s in samples], color="#8e44ad", label="cgroup usage", linewidth=1,
                    linestyle="--")
        if scenario["memory_limit_mb"] <= 1024:
            ax.axhline(scenario["memory_limit_mb"], color="black", linestyle=":", label="tier limit")
        ax.set_title(scenario["label"], fontsize=10)
        ax.set_xlabel("seconds")
    axes[0].set_ylabel("MB")
    axes[-1].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    markdown = table(report)
    (RESULTS / "bench.md").write_text(markdown, encoding="utf-8")
    plot(report, RESULTS / "memory.png")
    from devtools.markers import write_section

    write_section("bench-results", markdown)
