"""``make bench``: the naive set-up against memfit's 512 MB and 1 GB tiers, side by side, in one run.

Each scenario runs in a fresh gunicorn started with the project's gunicorn.conf.py and its tier's
environment (deploy/env/<tier>.env), inside a memory cgroup (v1 or v2, whichever the machine mounts)
of the tier's size where the machine allows it (root, cgroup folders writable). A sampler records the
memory of the whole serving process tree (master + workers) and of the cgroup every 50 ms:
PSS sum (shared pages split among the processes mapping them: what the tree really occupies), private
sum (each process's own written pages, Private_Dirty: monitoring/memory.py), RSS sum (labelled as
such: it counts the shared model weights once per worker), and the cgroup's usage and working set
(usage minus inactive page cache), through:

  startup    gunicorn boots; the idle worker (semantic search on, not yet used) is measured
  load       the first semantic query: model load plus one query
  queries    N semantic queries, 8 concurrent clients
  embedding  1,000 new tags created, then embedded in batches by the serving process

Results: bench/results/bench.json, bench/results/bench.md (the table), bench/results/memory.png.
Models are built by the project itself (AlephBERT's architecture, random weights): memory and
speed do not depend on weight values. Fidelity on real weights is measured separately on
all-minilm-l6-v2 (bench/fidelity.py). Nothing here is a test: no figure is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import fidelity as real
from bench import report as render
from devtools.cgroups import Cgroup
from devtools.gunicorn import ROOT, GunicornServer
from devtools.http import fetch_json
from devtools.project import WORK, flask, log, models, remove_database, tier_env
from devtools.sampler import Sampler, strict_peak

RESULTS = ROOT / "bench" / "results"
IDLE_SAMPLES = 40  # samples (50 ms apart) the idle worker settles over after boot before it is measured


# --- scenarios -----------------------------------------------------------------------------------

def scenarios(paths: dict[str, Path]) -> list[dict]:
    common = {"SECRET_KEY": "bench-secret", "APP_ENV": "production",
              "WRITE_TOKEN": WRITE_TOKEN, "WRITE_RATE_LIMIT": "1000000 per minute"}  # writes need the token
    return [
        {"name": "naive", "label": "naive (module-top import, fp32 torch)", "memory_mb": 4096,
         "app": "bench.naive_app:app",
         "env": {**common, "WEB_CONCURRENCY": "1", "SEMANTIC_MODEL": str(paths["fp32"]), "SEMANTIC_THREADS": "2",
                 "SEMANTIC_MAX_SEQ_LENGTH": "512", "EMBEDDING_BATCH_SIZE": "10", "MAX_MEMORY_MB": "4000",
                 "MEMORY_TIER": "custom"}},
        {"name": "512mb", "label": "memfit 512mb tier", "memory_mb": 512, "app": "app:create_app()",
         "env": {**tier_env("512mb"), **common, "SEMANTIC_MODEL": str(paths["q8"])}},
        {"name": "1gb", "label": "memfit 1gb tier", "memory_mb": 1024, "app": "app:create_app()",
         "env": {**tier_env("1gb"), **common, "SEMANTIC_MODEL": str(paths["q8"])}},
        # The alternative the 1 GB tier was weighed against: full precision, which fits only one worker.
        {"name": "1gb-fp32", "label": "1gb alternative: fp32 ONNX, 1 worker", "memory_mb": 1024,
         "app": "app:create_app()",
         "env": {**tier_env("1gb"), **common, "WEB_CONCURRENCY": "1", "MAX_WORKER_MEMORY_MB": "900",
                 "SEMANTIC_MODEL": str(paths["onnx-fp32"])}},
    ]


WRITE_TOKEN = "bench-write-token"  # writes need a token in production (WRITE_TOKEN)


def http(url: str, data: dict | None = None, timeout: float = 300) -> tuple[int, dict, float]:
    """fetch_json() with the bench's long timeout (a first semantic query loads the model) and the
    write token (writes need one in production)."""
    return fetch_json(url, data, timeout, token=WRITE_TOKEN)


def pseudo_words(rng: random.Random, n: int) -> list[str]:
    letters = "אבגדהוזחטיכלמנסעפצקרשת"
    return [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(rng.randint(1, 3)))
            for _ in range(n)]


def search_url(url: str, q: str) -> str:
    return url + "/search?" + urllib.parse.urlencode({"q": q, "mode": "semantic"})


def fresh_database(spec: dict, port: int) -> dict[str, str]:
    """The scenario's environment, on a new SQLite file seeded and embedded beforehand: the bench measures serving."""
    db_path = WORK / f"{spec['name']}.sqlite3"
    remove_database(db_path)
    env = {**os.environ, **spec["env"], "DATABASE_URL": f"sqlite:///{db_path}", "PORT": str(port),
           "PROMETHEUS_MULTIPROC_DIR": str(WORK / f"metrics-{spec['name']}")}
    flask("seed", env=env)
    flask("embed", env=env)
    return env


def measure_idle(server: GunicornServer, sampler: Sampler) -> dict:
    """The idle worker after boot: semantic search on, not yet used."""
    sampler.wait_samples(IDLE_SAMPLES)
    idle = [s for s in sampler.samples if s["phase"] == "startup"][-5:]
    return {"startup_seconds": round(server.startup_seconds, 2),
            "idle_worker_rss_mb": min(s["worker_max_mb"] for s in idle),
            "idle_worker_uss_mb": min(s["worker_private_max_mb"] for s in idle)}


def measure_first_query(spec: dict, url: str, workers: int) -> dict:
    """The first semantic query (model load included) and the load figures each worker reports."""
    status, body, ms = http(search_url(url, "ספר טוב לקיץ"))
    if status != 200:
        raise SystemExit(f"{spec['name']}: first semantic query failed: {status} {body}")
    ready = [http(url + "/readyz")[1]["semantic"] for _ in range(3 * workers)]
    loaded = [r for r in ready if r.get("load_seconds") is not None]
    return {"first_query_ms": round(ms, 1), "load_seconds": loaded[0]["load_seconds"] if loaded else None,
            "model": {k: v for k, v in (loaded[0] if loaded else ready[0]).items()
                      if k in ("backend", "precision", "max_seq_length", "dim")}}


def measure_queries(url: str, queries: int, concurrency: int = 8) -> dict:
    """queries semantic searches on excerpts of the sample, from concurrency clients."""
    rng = random.Random(1)
    sample = json.loads((ROOT / "app" / "data" / "sample_items.json").read_text(encoding="utf-8"))
    texts = [f"{e['title']} {e['body']}" for e in sample]
    latencies, took, errors, sheds = [], [], 0, 0

    def one(i: int):
        return http(search_url(url, rng.choice(texts)[: rng.randint(10, 80)]))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for status, body, ms in pool.map(one, range(queries)):
            if status == 503 and body.get("error", {}).get("code") == "overloaded":
                sheds += 1  # past the instance's semantic slots: the documented answer, not a failure
                continue
            if status != 200:
                errors += 1
                continue
            latencies.append(ms)
            took.append(body["took_ms"])
    wall = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {"count": queries, "errors": errors, "sheds": sheds, "concurrency": concurrency,
            "p50_ms": round(quantiles[49], 1), "p95_ms": round(quantiles[94], 1),
            "p99_ms": round(quantiles[98], 1), "server_p50_ms": round(statistics.median(took), 1),
            "throughput_qps": round(len(latencies) / wall, 1)}


EMBEDDING_WAIT_S = 600  # the longest wait for the background embedder before the figure says it did not finish


def measure_embedding(spec: dict, url: str, new_tags: int, db_path: str) -> dict:
    """new_tags tags created through the API, then embedded by the background embedder: seconds from the
    last 201 until every tag has a vector (read from the database file), then one semantic query."""
    import sqlite3

    tags = pseudo_words(random.Random(2), new_tags)
    for start in range(0, new_tags, 10):
        http(url + "/items", {"title": f"פריט {start}", "tags": tags[start : start + 10]})
    started = time.perf_counter()
    missing = None
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        while time.perf_counter() - started < EMBEDDING_WAIT_S:
            missing = conn.execute("SELECT count(*) FROM tags WHERE id NOT IN "
                                   "(SELECT ref_id FROM embeddings WHERE kind = 'tag')").fetchone()[0]
            if not missing:
                break
            time.sleep(0.1)  # the database is polled, not the server: reads cost the embedder nothing
    seconds = round(time.perf_counter() - started, 1)
    status, _, _ = http(search_url(url, "תגית חדשה"))
    return {"new_tags": new_tags, "status": status, "seconds": seconds, "not_embedded": missing,
            "batch_size": int(spec["env"].get("EMBEDDING_BATCH_SIZE", "10"))}


def summarise(spec: dict, sampler: Sampler) -> dict:
    """Peaks per phase and overall, the samples for the plot, and the recycles the gunicorn log records."""
    samples = [s for s in sampler.samples if s["phase"] != "end"]
    log_text = (WORK / f"{spec['name']}-gunicorn.log").read_text(errors="replace")
    return {"phases": sampler.peaks(), "peak_pss_mb": strict_peak(samples, "pss_mb"),
            "peak_working_set_mb": strict_peak(samples, "working_set_mb") if sampler.cgroup.enabled else None,
            "peak_rss_mb": max(s["rss_mb"] for s in samples),
            "peak_uss_mb": max(s["uss_mb"] for s in samples), "samples": samples,
            "recycles": {"max_requests": log_text.count("Autorestarting worker"),
                         "memory": log_text.count("memfit recycle:"), "killed": log_text.count("SIGKILL")}}


def run_scenario(spec: dict, queries: int, new_tags: int, port: int) -> dict:
    """One scenario in a fresh gunicorn inside its memory cgroup, through the phases of the module docstring."""
    log(f"scenario {spec['name']}: {spec['label']}")
    env = fresh_database(spec, port)
    cgroup = Cgroup(spec["name"], spec["memory_mb"])
    server = GunicornServer(env, WORK / f"{spec['name']}-gunicorn.log", app=spec["app"], port=port,
                            wrap=cgroup.wrap, ready_timeout=180)
    sampler = Sampler(server.start().pid, cgroup)
    sampler.start()
    result: dict = {"name": spec["name"], "label": spec["label"], "memory_limit_mb": spec["memory_mb"],
                    "cgroup": cgroup.enabled, "workers": int(spec["env"].get("WEB_CONCURRENCY", "1"))}
    try:
        server.wait_ready()
        result.update(measure_idle(server, sampler))
        sampler.phase = "load"
        if cgroup.enabled:  # the cgroup peak counts from here where the kernel allows: boot is not judged
            result["cgroup_peak_from"] = "load" if cgroup.reset_peak() else "start"
        result.update(measure_first_query(spec, server.url, result["workers"]))
        sampler.phase = "queries"
        result["queries"] = measure_queries(server.url, queries)
        sampler.phase = "embedding"
        result["embedding"] = measure_embedding(spec, server.url, new_tags,
                                                env["DATABASE_URL"][len("sqlite:///"):])
        sampler.wait_samples(10)  # the memory right after the embedding, before the server stops
    finally:
        sampler.phase = "end"
        server.stop()
        sampler.stop.set()
        sampler.join()
        try:
            result.update(cgroup.final_figures())  # kept by the kernel after the processes exit
        finally:
            cgroup.remove()
    result.update(summarise(spec, sampler))
    log(f"  peak PSS {result['peak_pss_mb']} MB, working set {result['peak_working_set_mb']} MB, cgroup peak "
        f"{result['cgroup_peak_mb']} MB (RSS sum {result['peak_rss_mb']} MB, USS {result['peak_uss_mb']} MB),"
        f" p50 {result['queries']['p50_ms']} ms")
    return result


def fidelity(paths: dict[str, Path], n: int = 200) -> dict:
    """Mean cosine of each serving model's embeddings to the fp32 model's, on n Hebrew sentences."""
    import numpy as np

    from app.semantic.encoders import load_encoder
    from app.settings import Settings

    sample = json.loads((ROOT / "app" / "data" / "sample_items.json").read_text(encoding="utf-8"))
    sentences = [f"{e['title']}. {e['body']}" for e in sample][:n]

    def encode(path: Path, seq: int) -> np.ndarray:
        settings = Settings.from_env({"SEMANTIC_MODEL": str(path), "SEMANTIC_MAX_SEQ_LENGTH": str(seq)})
        return load_encoder(settings).encode(sentences, 16)

    reference = encode(paths["fp32"], 128)
    q8 = (encode(paths["q8"], 128) * reference).sum(axis=1)
    fp32 = (encode(paths["onnx-fp32"], 128) * reference).sum(axis=1)
    return {"sentences": len(sentences), "naive": 1.0, "512mb": round(float(q8.mean()), 5),
            "1gb": round(float(q8.mean()), 5), "1gb-fp32": round(float(fp32.mean()), 5),
            "min_512mb": round(float(q8.min()), 5)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--only", help="comma-separated scenario names (default: all)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths = models()
    chosen = [s for s in scenarios(paths) if not args.only or s["name"] in args.only.split(",")]
    results = [run_scenario(spec, args.queries, args.tags, args.port) for spec in chosen]
    log("fidelity to fp32 on the Hebrew sample")
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores", "goals": render.GOALS,
              "fidelity": fidelity(paths), "scenarios": results}
    log("top-5 retrieval agreement on real weights (all-minilm-l6-v2)")
    report["real_weights"] = real.run()
    render.write(report)
    print((RESULTS / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

