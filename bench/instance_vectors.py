"""The 512 MB tier serving 100,000 items' vectors from its shared index: the instance's memory while a
worker publishes the first generation and while semantic queries are answered.

    python -m bench.instance_vectors              # 100,000 vectors
    python -m bench.instance_vectors --vectors 20000

The tier's own settings (deploy/env/512mb.env: two workers) in a 512 MB memory cgroup, with the
Hebrew-capable multilingual-e5-small q8 artifact (bench/e5.py, 384-d) as the model. The database is the
bundled sample, embedded by `flask embed`, plus N item vectors (bench/vectors.py's e5 vectors of Hebrew
passages) stored under the served model's fingerprint, as a large corpus would leave them. By default
the release step (`flask --app app release`, in the same 512 MB cgroup, before the server starts, as
`make run` and every platform run it) publishes the first generation; with --build serving the server
starts with no index and its embedder's loop publishes one where the instance has the memory for the
build (the PSS of the whole process tree is sampled every 50 ms, the publisher's child included),
waited for up to --wait seconds. Then 100 semantic queries are sent by one client, and 200 by 4 at a time, and the
latency of the answered ones is recorded, with or without a generation, and the workers killed or recycled on the way. Nothing
is asserted. Results: bench/results/instance-vectors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devtools.cgroups import Cgroup
from devtools.project import WORK, flask, tier_env
from devtools.sampler import measured, strict_peak

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--wait", type=float, default=300, help="seconds to wait for the first generation")
    parser.add_argument("--writes", type=int, default=20, help="items created (one a second) and timed until found")
    parser.add_argument("--build", choices=("release", "serving"), default="release",
                        help="who publishes the first generation: the release step, or the serving instance")
    args = parser.parse_args(argv)
    from bench.e5 import prepared_artifact
    from bench.vectors import e5_vectors, hebrew_texts
    from devtools.gunicorn import GunicornServer
    from devtools.http import fetch, free_port

    work = WORK / "instance-vectors"
    work.mkdir(parents=True, exist_ok=True)
    db_path = work / "db.sqlite3"
    for leftover in [*work.glob("db.sqlite3*")]:
        if leftover.is_dir():
            for f in leftover.iterdir():
                f.unlink()
            leftover.rmdir()
        else:
            leftover.unlink()
    port = free_port()
    env = {**os.environ, **tier_env("512mb"), "DATABASE_URL": f"sqlite:///{db_path}", "PORT": str(port),
           "SEMANTIC_MODEL": str(prepared_artifact()), "SECRET_KEY": "bench", "APP_ENV": "production",
           "WRITE_TOKEN": "bench", "PROMETHEUS_MULTIPROC_DIR": str(work / f"metrics-{port}")}
    flask("seed", env=env)
    flask("embed", env=env)
    passages, _ = e5_vectors(max(args.vectors, 10_000))
    passages = passages[: args.vectors]
    store_vectors(env, passages)
    cgroup = Cgroup("instance-vectors", 512)
    release = None
    if args.build == "release":
        import subprocess

        cgroup.reset_peak()
        started = time.monotonic()
        out = subprocess.run(cgroup.wrap([sys.executable, "-m", "flask", "--app", "app", "release"]), cwd=ROOT,
                             env=env, capture_output=True, text=True)
        figures = cgroup.figures()
        release = {"exit": out.returncode, "seconds": round(time.monotonic() - started, 1),
                   "cgroup_peak_mb": round(figures.peak / 2**20, 1) if figures and figures.peak else None,
                   "oom_kills": figures.oom_kills if figures else None,
                   "said": [line for line in out.stdout.splitlines() if line.startswith("vector index:")]}
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-3000:], file=sys.stderr)
    server = GunicornServer(env, work / "gunicorn.log", port=port, wrap=cgroup.wrap, ready_timeout=180)
    folder = Path(f"{db_path}.vectors")
    queries = hebrew_texts(args.queries, (2, 5), seed=3)
    timings: list[float] = []
    statuses: dict[int, int] = {}
    with measured(server, cgroup, "publish", reset_peak=True) as (sampler, figures):
        started = time.monotonic()
        published = None
        while time.monotonic() - started < args.wait:
            manifest = next(iter(folder.glob("*-item.json")), None) if folder.exists() else None
            if manifest and json.loads(manifest.read_text())["count"] >= args.vectors:
                published = json.loads(manifest.read_text())
                break
            time.sleep(0.5)
        published_after = round(time.monotonic() - started, 1) if published else None
        sampler.phase = "queries"

        def one(q: str, timings: list[float]) -> None:
            t = time.perf_counter()
            status, _, _ = fetch(f"{server.url}/search?" + urllib.parse.urlencode({"q": q, "mode": "semantic"}),
                                 timeout=30)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                timings.append((time.perf_counter() - t) * 1000)

        alone: list[float] = []  # one client: the latency a person searching alone sees
        for q in queries[: len(queries) // 2]:
            one(q, alone)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda q: one(q, timings), queries))
        sampler.phase = "writes"
        found_after = freshness(server.url, args.writes)
    log = (work / "gunicorn.log").read_text(errors="replace")
    samples = sampler.samples
    by_phase = {phase: [s for s in samples if s["phase"] == phase] for phase in ("publish", "queries")}
    timings.sort()
    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tier": "512mb",
        "model": "multilingual-e5-small q8 (384-d)", "vectors": args.vectors + 0, "built_by": args.build,
        "release": release,
        "generation": ({k: published.get(k) for k in ("count", "search", "probe_recall", "built_seconds")}
                       if published else None),
        "index_file_mb": round((folder / published["file"]).stat().st_size / 2**20, 1) if published else None,
        "published_after_start_s": published_after, "waited_s": args.wait,
        "build_refused_for_memory": "needs about" in log and "left under MAX_MEMORY_MB" in log,
        "workers_killed": log.count("was sent SIGKILL"), "recycles": log.count("memfit recycle:"),
        # Nothing to sample when the release published the generation before the server started.
        "pss_peak_publishing_mb": strict_peak(by_phase["publish"], "pss_mb") if by_phase["publish"] else None,
        "pss_peak_serving_mb": strict_peak(by_phase["queries"], "pss_mb"),
        "pss_end_mb": by_phase["queries"][-1]["pss_mb"],
        "queries": args.queries + len(alone), "status": {str(k): v for k, v in sorted(statuses.items())},
        "one_client": {"queries": len(alone), "p50_ms": round(statistics.median(alone), 1) if alone else None,
                       "p95_ms": round(sorted(alone)[int(0.95 * (len(alone) - 1))], 1) if alone else None},
        "found_after_201_s": found_after,
        "semantic_p50_ms": round(statistics.median(timings), 1) if timings else None,
        "semantic_p95_ms": round(timings[int(0.95 * (len(timings) - 1))], 1) if timings else None,
        **{k: figures.get(k) for k in ("cgroup_peak_mb", "oom_kills")},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "instance-vectors.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


def freshness(url: str, writes: int) -> dict:
    """Items created one a second, each searched by meaning (its own title as the query) until it is in
    the top 10: seconds from its 201 to being found, or None if not within 30 s."""
    from devtools.http import fetch_json

    waits: list[float | None] = []
    for n in range(writes):
        title = hebrew_title(n)
        status, item, _ = fetch_json(f"{url}/items", {"title": title, "tags": ["חדש"]}, token="bench")
        created = time.monotonic()
        if status != 201:
            waits.append(None)
            continue
        found = None
        while time.monotonic() - created < 30:
            _, body, _ = fetch_json(f"{url}/search?" + urllib.parse.urlencode({"q": title, "mode": "semantic"}))
            if item["id"] in [r["id"] for r in body.get("results", [])]:
                found = round(time.monotonic() - created, 2)
                break
            time.sleep(0.05)
        waits.append(found)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - created)))
    seen = sorted(w for w in waits if w is not None)
    return {"items": writes, "found": len(seen), "p50_s": seen[len(seen) // 2] if seen else None,
            "max_s": seen[-1] if seen else None}


def hebrew_title(n: int) -> str:
    words = ["מדריך", "קצר", "לגינון", "עירוני", "במרפסת", "עם", "עגבניות", "ותבלינים", "לכל", "עונה"]
    return f"{' '.join(words[(n + i) % len(words)] for i in range(6))} {n}"


def section(data: dict) -> str:
    """The run in a few sentences, for docs/vectors.md (bench/readme.py copies it there)."""
    release = data.get("release") or {}
    generation = data.get("generation") or {}
    built = (f"the release step published the first generation before the server started "
             f"({release.get('seconds')} s, the cgroup's peak {release.get('cgroup_peak_mb')} MB, "
             f"{release.get('oom_kills')} OOM kills)" if data.get("built_by") == "release" else
             f"the serving instance was left to publish the first generation "
             f"({'after ' + str(data['published_after_start_s']) + ' s' if generation else 'it never did'})")
    alone = data.get("one_client") or {}
    return (f"Measured {data['measured_at']}: the 512 MB tier's settings in a 512 MB memory cgroup, "
            f"{data['model']}, {data['vectors']:,} stored item vectors on SQLite. {built[0].upper()}{built[1:]}; "
            f"the generation holds {generation.get('count', 0):,} vectors in {data.get('index_file_mb')} MB, "
            f"searched by {generation.get('search', '–')} (probe recall {generation.get('probe_recall', '–')}). "
            f"Serving: semantic p50 **{alone.get('p50_ms')} ms** (p95 {alone.get('p95_ms')} ms) for one client, "
            f"{data['semantic_p50_ms']} ms (p95 {data['semantic_p95_ms']} ms) for four at a time on 2 cores; "
            f"answers {', '.join(f'{n} × {code}' for code, n in data['status'].items())}; instance PSS peak **{data['pss_peak_serving_mb']} MB**; "
            f"{data['recycles']} recycles, {data['workers_killed']} workers killed, {data['oom_kills']} OOM kills."
            + (f" New items, one a second: {fresh['found']} of {fresh['items']} found by meaning, "
               f"{fresh['p50_s']} s after their 201 at the median, {fresh['max_s']} s at most."
               if (fresh := data.get("found_after_201_s")) else ""))


def store_vectors(env: dict, passages) -> None:
    """passages as item vectors of the served model, with ref ids past the sample's items."""
    import subprocess

    code = (
        "import sys, numpy as np\n"
        "from app import create_app\n"
        "from app.db import Embedding, db\n"
        "from app.semantic import index\n"
        "from app.state import get_service\n"
        "app = create_app()\n"
        "vectors = np.load(sys.argv[1])\n"
        "with app.app_context():\n"
        "    fp = get_service(app).encoder().fingerprint\n"
        "    for start in range(0, len(vectors), 5000):\n"
        "        db.session.execute(Embedding.__table__.insert(), [dict(model_fp=fp, kind='item', ref_id=1_000_000 + start + i,\n"
        "            text_hash='bench', dim=vectors.shape[1], vector=index.to_blob(v)) for i, v in enumerate(vectors[start:start + 5000])])\n"
        "        db.session.commit()\n")
    import numpy as np

    path = Path(env["DATABASE_URL"][len("sqlite:///"):]).with_suffix(".npy")
    np.save(path, passages)
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env, check=True)
    path.unlink()


if __name__ == "__main__":
    sys.exit(main())
