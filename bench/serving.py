"""Serving, side by side in one run: today's design against the new one, in memory
cgroups of each tier's size, under the 16-client mix of docs/reliability.md's load run, then an overload run.

    python -m bench.serving                 # make load: both designs, both tiers, then the overload run
    python -m bench.serving --seconds 20    # shorter runs (the figures are then not those of docs/capacity.md)

Designs (the same AlephBERT-architecture q8 model, built by devtools/project.py's models()):
  today   the layout before weight sharing, on this release's code: the weights inside one model.onnx
          (a version 1 artifact, private to each worker), one sync worker on 512 MB and two on 1 GB, the
          model loaded on the first semantic request of every worker (and again after every recycle at
          its max_requests of 100, jitter 10), no bound on model runs (SEMANTIC_MAX_INFLIGHT 64, a
          deadline of 60 s). The previous release's code itself is bench/capacity.py's "today".
  shared  deploy/tiers.yaml as it is: the version 2 artifact whose weights every worker maps from one
          file, the tier's workers and threads, each worker warmed before its first request, semantic
          queries in each worker's model queue (batched, shed past SEMANTIC_DEADLINE_MS), new rows
          embedded by the background embedder, recycling on private memory

Runs:
  mix       16 clients, each looping over text 3 : tags 2 : semantic 3 : create 2 (bench/load.py's
            mix), per tier and design; the tier's max_requests (a backstop) may recycle workers during the run
  overload  64 clients on the 512 MB tier: half the mix above, half sending 500-token texts (semantic
            queries at MAX_QUERY_LENGTH and new items whose bodies the model must embed)
  recycle   per design on the 512 MB tier, one client sending semantic queries one at a time with
            max_requests 5: the first query of each replacement worker with nothing else to wait for,
            which is what a recycle costs a user (under the mix it also waits for a semantic slot)

Each run records latency per request kind (p50/p95/p99), throughput, every status (503 sheds with and
without Retry-After apart), the instance's peak memory (cgroup peak, and the largest PSS sum of the
gunicorn tree sampled every 50 ms), OOM kills, recycles, and the first semantic query each recycled
worker served (server-side milliseconds from gunicorn's access log). Results: bench/results/serving.json,
bench/results/serving.md (with the goals checked) and bench/results/serving.png. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

from bench.load import LONG_TOKENS, WRITE_TOKEN, drive
from devtools.gunicorn import GunicornServer
from devtools.http import fetch, free_port
from devtools.cgroups import Cgroup
from devtools.project import WORK, flask, models, remove_database, tier_env
from devtools.sampler import measured, strict_peak

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MB = 1024 * 1024
TIERS = {"512mb": 512, "1gb": 1024}
# The serving goals, written once; report() checks every run against those that apply to it.
GOALS = {
    "text_p50_ms": 30, "tags_p50_ms": 30, "all_p99_ms": 500, "throughput_vs_today": 2.0,
    "peak_mb": {"512mb": 400, "1gb": 800}, "first_semantic_ms": 150, "overload_text_p99_ms": 1000,
}


def designs(tier: str, models: dict[str, Path], overrides: dict[str, str] | None = None) -> dict[str, dict]:
    """The environment each design adds to the tier's (deploy/env/<tier>.env); overrides (--set) go
    to the shared design only."""
    return {
        "today": {"SEMANTIC_MODEL": str(models["v1"]), "WEB_CONCURRENCY": {"512mb": "1", "1gb": "2"}[tier],
                  "GUNICORN_THREADS": "1", "SEMANTIC_WARM": "false",
                  "GUNICORN_MAX_REQUESTS": "100", "GUNICORN_MAX_REQUESTS_JITTER": "10",
                  "MAX_WORKER_MEMORY_MB": {"512mb": "400", "1gb": "420"}[tier],
                  "SEMANTIC_MAX_INFLIGHT": "64", "SEMANTIC_DEADLINE_MS": "60000"},
        "shared": {"SEMANTIC_MODEL": str(models["v2"]), **(overrides or {})},
    }


ACCESS = re.compile(r'"GET /search\?[^"]*mode=semantic[^"]*" (\d+) \S+ (\d+)ms pid=<?(\d+)')
BOOT = re.compile(r"Booting worker with pid: (\d+)")


def first_semantic_of_recycled(log: str, initial_workers: int) -> list[int]:
    """Server-side milliseconds of the first semantic query each replacement worker served."""
    boots = BOOT.findall(log)
    replacements = set(boots[initial_workers:])
    seen, firsts = set(), []
    for status, ms, pid in ACCESS.findall(log):
        if pid in replacements and pid not in seen and status == "200":
            seen.add(pid)
            firsts.append(int(ms))
    return firsts


def quantiles(values: list[float]) -> dict:
    if len(values) < 3:
        return {"p50_ms": round(statistics.median(values), 1) if values else None}
    q = statistics.quantiles(values, n=100)
    return {"p50_ms": round(q[49], 1), "p95_ms": round(q[94], 1), "p99_ms": round(q[98], 1), "n": len(values)}


def seeded_env(name: str, tier: str, env_extra: dict) -> tuple[int, dict]:
    """A free port and the server's environment for one run: the tier's, on a fresh SQLite database
    seeded and embedded beforehand (the runs measure serving), then env_extra."""
    WORK.mkdir(parents=True, exist_ok=True)
    db_path = WORK / f"serving-{name}.sqlite3"
    remove_database(db_path)
    port = free_port()
    env = {**os.environ, **tier_env(tier), "DATABASE_URL": f"sqlite:///{db_path}", "PORT": str(port),
           "SECRET_KEY": "serving-bench", "APP_ENV": "production", "WRITE_TOKEN": WRITE_TOKEN,
           "WRITE_RATE_LIMIT": "1000000 per minute",  # the limit has its own tests
           "GUNICORN_BACKLOG": "256",  # max_requests stays the tier's, as in production
           "PROMETHEUS_MULTIPROC_DIR": str(WORK / f"metrics-serving-{port}"), **env_extra}
    flask("seed", env=env)
    flask("embed", env=env)
    return port, env


def run_case(name: str, tier: str, design: str, env_extra: dict, seconds: float, clients: int,
             long_clients: int = 0) -> dict:
    port, env = seeded_env(name, tier, env_extra)
    print(f"[serving] {name}: {tier} {design}, {clients} clients ({long_clients} long), {seconds:.0f} s", flush=True)
    cgroup = Cgroup(f"serving-{name}", TIERS[tier])
    log_path = WORK / f"serving-{name}-gunicorn.log"
    server = GunicornServer(env, log_path, port=port, wrap=cgroup.wrap, ready_timeout=180)
    with measured(server, cgroup, "run", reset_peak=True) as (sampler, figures):
        started = time.monotonic()
        stats = asyncio.run(drive(server.url, seconds, clients, long_clients=long_clients))
        wall = time.monotonic() - started
    log = log_path.read_text(errors="replace")
    latency = stats["latency"]
    requests = sum(stats["status"].values())
    firsts = first_semantic_of_recycled(log, int(env["WEB_CONCURRENCY"]))
    samples = [s for s in sampler.samples if s["phase"] == "run"]
    return {
        "name": name, "tier": tier, "design": design, "seconds": seconds, "clients": clients,
        "long_clients": long_clients, "workers": int(env["WEB_CONCURRENCY"]), "requests": requests,
        "throughput_rps": round(requests / wall, 1),
        "all": quantiles([x for values in latency.values() for x in values]),
        "by_kind": {kind: quantiles(values) for kind, values in sorted(latency.items())},
        "status": {str(k): v for k, v in sorted(stats["status"].items())},
        "server_errors": sum(v for k, v in stats["status"].items() if k >= 500) - stats["sheds"],
        "sheds": stats["sheds"], "failed": len(stats["errors"]), "failures": stats["errors"][:10],
        "created": len(stats["created"]), "created_missing": len(stats["missing"]),
        "recycles": log.count("Autorestarting worker") + log.count("memfit recycle:"),
        "first_semantic_after_recycle_ms": {"n": len(firsts), "median": statistics.median(firsts) if firsts else None,
                                            "max": max(firsts, default=None)},
        **figures, "pss_peak_mb": strict_peak(samples, "pss_mb"),
        "working_set_peak_mb": strict_peak(samples, "working_set_mb") if cgroup.enabled else None,
        "rss_sum_peak_mb": strict_peak(samples, "rss_mb"),  # the shared weights counted once per worker
        "pss_samples": [(s["t"], s["pss_mb"]) for s in samples[::4]],
    }


RECYCLE_EVERY = 5  # max_requests of the recycle run: a worker replaced every few queries
RECYCLE_QUERIES = 60


def run_recycles(tier: str, design: str, env_extra: dict) -> dict:
    """The first semantic query of each recycled worker, alone: one client sends semantic queries one
    after another to the tier's server with max_requests RECYCLE_EVERY, so each replacement worker's
    first query waits for nothing but what the worker itself does (a model load from disk, or not)."""
    from bench.load import QUERIES

    name = f"recycle-{design}"
    port, env = seeded_env(name, tier, {**env_extra, "GUNICORN_MAX_REQUESTS": str(RECYCLE_EVERY),
                                        "GUNICORN_MAX_REQUESTS_JITTER": "0"})
    print(f"[serving] {name}: {tier} {design}, one client, max_requests {RECYCLE_EVERY}", flush=True)
    log_path = WORK / f"serving-{name}-gunicorn.log"
    statuses = []
    with GunicornServer(env, log_path, port=port, ready_timeout=180) as server:
        for i in range(RECYCLE_QUERIES):
            query = f"{QUERIES[i % len(QUERIES)]} {i}"
            statuses.append(fetch(f"{server.url}/search?" + urllib.parse.urlencode({"q": query, "mode": "semantic"}),
                                  timeout=120)[0])
    firsts = first_semantic_of_recycled(log_path.read_text(errors="replace"), int(env["WEB_CONCURRENCY"]))
    return {"name": name, "tier": tier, "design": design, "queries": len(statuses),
            "failed": sum(status != 200 for status in statuses), "n": len(firsts),
            "median": statistics.median(firsts) if firsts else None, "max": max(firsts, default=None),
            "all_ms": firsts}


def answered_rps(run: dict) -> float:
    """Requests answered (2xx) per second: sheds are quick 503s, so they do not count as work done."""
    answered = sum(count for status, count in run["status"].items() if int(status) < 300)
    return round(answered * run["throughput_rps"] / max(run["requests"], 1), 1)


def _ms(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def checks(data: dict) -> list[tuple[str, bool]]:
    """Each goal of GOALS against the run it applies to: (wording, met)."""
    runs = {run["name"]: run for run in data["runs"]}
    out = []
    for tier in TIERS:
        new, old = runs.get(f"{tier}-shared"), runs.get(f"{tier}-today")
        if not new:
            continue
        peak = max(new["cgroup_peak_mb"] or 0, new["pss_peak_mb"])
        out.append((f"{tier}: instance peak (cgroup and PSS sum) {peak:.0f} MB ≤ {GOALS['peak_mb'][tier]} MB, "
                    f"{new['oom_kills'] or 0} OOM kills", peak <= GOALS["peak_mb"][tier] and not new["oom_kills"]))
        if tier != "512mb":
            continue
        for kind in ("text", "tags"):
            p50 = new["by_kind"].get(kind, {}).get("p50_ms")
            out.append((f"512mb: {kind} p50 {_ms(p50)} ms ≤ {GOALS[kind + '_p50_ms']} ms",
                        p50 is not None and p50 <= GOALS[kind + "_p50_ms"]))
        p99 = new["all"].get("p99_ms")
        out.append((f"512mb: all requests p99 {_ms(p99)} ms ≤ {GOALS['all_p99_ms']} ms",
                    p99 is not None and p99 <= GOALS["all_p99_ms"]))
        if old:
            ratio = answered_rps(new) / max(answered_rps(old), 0.1)
            out.append((f"512mb: throughput (requests answered) {ratio:.1f}× today's in the same run "
                        f"(≥ {GOALS['throughput_vs_today']}×)",
                        ratio >= GOALS["throughput_vs_today"]))
        quiet = next((r for r in data.get("recycles", []) if r["design"] == "shared"), None)
        if quiet:
            out.append((f"512mb: a recycled worker's first semantic query, alone, max {_ms(quiet['max'])} ms over "
                        f"{quiet['n']} recycles ≤ {GOALS['first_semantic_ms']} ms",
                        quiet["max"] is not None and quiet["max"] <= GOALS["first_semantic_ms"]))
    over = runs.get("overload-shared")
    if over:
        text_p99 = over["by_kind"].get("text", {}).get("p99_ms")
        out.append((f"overload (64 clients, 32 sending {LONG_TOKENS}-token texts, 512 MB): {over['oom_kills'] or 0} OOM "
                    f"kills, {over['server_errors']} 5xx other than {over['sheds']} counted 503 sheds with "
                    f"Retry-After, text p99 {_ms(text_p99)} ms ≤ {GOALS['overload_text_p99_ms']} ms",
                    not over["oom_kills"] and over["server_errors"] == 0 and over["failed"] == 0
                    and text_p99 is not None and text_p99 <= GOALS["overload_text_p99_ms"]))
    return out


def table(data: dict) -> str:
    """The runs side by side, then the goals: bench/results/serving.md and docs/capacity.md's serving table."""
    rows = ["| run | workers | requests/s (answered) | text p50 | tags p50 | semantic p50 (not shed) | all p99 | 5xx | 503 sheds "
            "| cgroup peak | PSS peak | OOM kills | first semantic query after a recycle, under the mix (median / max) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in data["runs"]:
        kind = run["by_kind"]
        first = run["first_semantic_after_recycle_ms"]
        rows.append(f"| {run['name']} | {run['workers']} | {run['throughput_rps']} ({answered_rps(run)}) "
                    f"| {_ms(kind.get('text', {}).get('p50_ms'))} ms | {_ms(kind.get('tags', {}).get('p50_ms'))} ms "
                    f"| {_ms(kind.get('semantic', {}).get('p50_ms'))} ms | {_ms(run['all'].get('p99_ms'))} ms "
                    f"| {run['server_errors']} | {run['sheds']} | {_ms(run['cgroup_peak_mb'])} MB "
                    f"| {_ms(run['pss_peak_mb'])} MB | {run['oom_kills']} "
                    f"| {_ms(first['median'])} / {_ms(first['max'])} ms ({first['n']}) |")
    if data.get("recycles"):
        rows += ["", f"First semantic query of each recycled worker, alone (one client, max_requests {RECYCLE_EVERY}, "
                     "server-side time from gunicorn's access log):", "",
                 "| design | recycles | median | max | failed queries |", "| --- | --- | --- | --- | --- |"]
        rows += [f"| {r['design']} | {r['n']} | {_ms(r['median'])} ms | {_ms(r['max'])} ms | {r['failed']} |"
                 for r in data["recycles"]]
    goals = [f"- {'met' if ok else '**not met**'}: {text}" for text, ok in checks(data)]
    return "\n".join(rows + ["", f"{data['seconds']:.0f} s per run, measured {data['measured_at']} "
                              f"(load average {data['load_average'][0]:.1f} at the end). Goals:", *goals])


def plot(data: dict, path: Path) -> None:
    """PSS sum of the gunicorn tree over each run, one line per run, tier limits dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run in data["runs"]:
        if run["pss_samples"]:
            t, mb = zip(*run["pss_samples"])
            ax.plot(t, mb, label=run["name"], linewidth=1.2)
    for tier, limit in TIERS.items():
        ax.axhline(limit, linestyle="--", color="grey", linewidth=0.8)
        ax.text(0, limit, f" {tier} limit", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("seconds")
    ax.set_ylabel("PSS sum of the gunicorn tree (MB)")
    ax.set_title("Serving: today's design against shared weights, per tier")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def prepare_models() -> dict[str, Path]:
    from devtools.sharing import single_file_copy

    v2 = models()["q8"]
    v1 = WORK / "models" / "alephbert-q8-v1"
    if not (v1 / "memfit_model.json").exists():
        single_file_copy(v2, v1)
    return {"v1": v1, "v2": v2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--only", help="comma-separated run names (e.g. 512mb-shared,overload-shared)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the shared design's runs, over the tier's "
                             "(to try a tier change before writing it in deploy/tiers.yaml)")
    args = parser.parse_args(argv)
    bad = [item for item in args.set if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        parser.error(f"--set takes KEY=VALUE, not {bad[0]!r}")
    overrides = dict(item.split("=", 1) for item in args.set)
    models = prepare_models()
    cases = []
    for tier in TIERS:
        for design, extra in designs(tier, models, overrides).items():
            cases.append((f"{tier}-{design}", tier, design, extra, 16, 0))
    for design, extra in designs("512mb", models, overrides).items():
        cases.append((f"overload-{design}", "512mb", design, extra, 64, 32))
    wanted = set(args.only.split(",")) if args.only else None
    runs = [run_case(name, tier, design, extra, args.seconds, clients, long_clients)
            for name, tier, design, extra, clients, long_clients in cases if not wanted or name in wanted]
    recycles = [run_recycles("512mb", design, extra) for design, extra in designs("512mb", models, overrides).items()
                if not wanted or f"recycle-{design}" in wanted]
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average": os.getloadavg(),
              "seconds": args.seconds, "goals": GOALS, "overrides": overrides, "runs": runs,
              "recycles": recycles}
    (RESULTS / "serving.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (RESULTS / "serving.md").write_text(table(result) + "\n")
    plot(result, RESULTS / "serving.png")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
