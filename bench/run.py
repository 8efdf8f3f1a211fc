"""``make bench``: the naive set-up against memfit's 512 MB and 1 GB tiers, side by side, in one run.

Each scenario runs in a fresh gunicorn started with the project's gunicorn.conf.py and its tier's
environment (deploy/env/<tier>.env), inside a cgroup-v1 memory cgroup of the tier's size where the
machine allows it (root and /sys/fs/cgroup/memory writable). A sampler records the memory of the
whole serving process tree (master + workers: RSS and USS) and of the cgroup every 50 ms through:

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
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
MB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
GOALS = {"peak_mb": 400, "idle_worker_mb": 60, "cosine": 0.99, "speedup": 2.5, "peak_1gb_mb": 800}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- models --------------------------------------------------------------------------------------

def flask(*args: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"flask {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def models() -> dict[str, Path]:
    """AlephBERT-architecture models, built once and cached under bench/work/models."""
    base = WORK / "models"
    paths = {"fp32": base / "alephbert-st", "q8": base / "alephbert-q8", "onnx-fp32": base / "alephbert-onnx-fp32"}
    if not (paths["fp32"] / "modules.json").exists():
        log("building the AlephBERT-architecture model (random weights)")
        flask("model", "build-synthetic", str(paths["fp32"]), "--arch", "alephbert")
    if not (paths["q8"] / "memfit_model.json").exists():
        log("preparing the q8 ONNX artifact with `flask model prepare`")
        flask("model", "prepare", str(paths["fp32"]), str(paths["q8"]), "--precision", "q8", "--max-seq-length", "512")
    if not (paths["onnx-fp32"] / "memfit_model.json").exists():
        log("preparing the fp32 ONNX artifact (the full-precision alternative for the 1 GB tier)")
        flask("model", "prepare", str(paths["fp32"]), str(paths["onnx-fp32"]), "--precision", "fp32",
              "--max-seq-length", "512")
    return paths


# --- scenarios -----------------------------------------------------------------------------------

def tier_env(tier: str) -> dict[str, str]:
    env = {}
    for line in (ROOT / "deploy" / "env" / f"{tier}.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def scenarios(paths: dict[str, Path]) -> list[dict]:
    common = {"SEMANTIC_CATCHUP_LIMIT": "1000", "SECRET_KEY": "bench-secret", "APP_ENV": "production",
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


class Cgroup:
    """A cgroup-v1 memory cgroup with a limit, or a no-op where the machine does not allow one."""

    def __init__(self, name: str, limit_mb: int):
        self.path = CGROUP_ROOT / f"memfit-bench-{name}-{os.getpid()}"
        self.enabled = False
        try:
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit_mb * MB))
            try:  # no swap either, as on the platforms
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit_mb * MB))
            except OSError:
                pass
            self.enabled = True
        except OSError as exc:
            log(f"no memory cgroup ({exc.strerror}); measuring without a limit")

    def wrap(self, argv: list[str]) -> list[str]:
        if not self.enabled:
            return argv
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def read(self, name: str) -> int | None:
        try:
            return int((self.path / name).read_text().split()[0]) if self.enabled else None
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int | None:
        if not self.enabled:
            return None
        stats = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return int(stats.get("oom_kill", 0))

    def remove(self) -> None:
        if self.enabled:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


class Sampler(threading.Thread):
    """Memory of the gunicorn process tree and of its cgroup, every 50 ms, labelled by phase."""

    def __init__(self, pid: int, cgroup: Cgroup):
        super().__init__(daemon=True, name="bench-sampler")
        import psutil

        self.root = psutil.Process(pid)
        self.cgroup = cgroup
        self.phase = "startup"
        self.samples: list[dict] = []
        self.started = time.monotonic()
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            rss = uss = 0
            workers = []
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                        continue  # an exited worker not yet reaped: its memory is already gone
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                rss += info.rss
                uss += info.uss
                if proc.pid != self.root.pid:
                    workers.append(info.rss)
            self.samples.append({"t": round(time.monotonic() - self.started, 3), "phase": self.phase,
                                 "pids": len(procs),
                                 "rss_mb": round(rss / MB, 1), "uss_mb": round(uss / MB, 1),
                                 "worker_max_mb": round(max(workers, default=0) / MB, 1),
                                 "cgroup_mb": round((self.cgroup.read("memory.usage_in_bytes") or 0) / MB, 1)})
            self.stop.wait(0.05)

    def peaks(self) -> dict:
        out = {}
        for phase in dict.fromkeys(s["phase"] for s in self.samples):
            rows = [s for s in self.samples if s["phase"] == phase]
            out[phase] = {"rss_mb": max(r["rss_mb"] for r in rows), "uss_mb": max(r["uss_mb"] for r in rows)}
        return out


WRITE_TOKEN = "bench-write-token"  # writes need a token in production (WRITE_TOKEN)


def http(url: str, data: dict | None = None, timeout: float = 300) -> tuple[int, dict, float]:
    body = json.dumps(data).encode() if data is not None else None
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {WRITE_TOKEN}"} if body else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read() or b"{}")
            status = response.status
    except urllib.error.HTTPError as err:
        payload, status = json.loads(err.read() or b"{}"), err.code
    return status, payload, (time.perf_counter() - started) * 1000


def pseudo_words(rng: random.Random, n: int) -> list[str]:
    letters = "אבגדהוזחטיכלמנסעפצקרשת"
    return [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(3, 7))) for _ in range(rng.randint(1, 3)))
            for _ in range(n)]


def run_scenario(spec: dict, queries: int, new_tags: int, port: int) -> dict:
    log(f"scenario {spec['name']}: {spec['label']}")
    db_path = WORK / f"{spec['name']}.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    env = {**os.environ, **spec["env"], "DATABASE_URL": f"sqlite:///{db_path}", "PORT": str(port),
           "PROMETHEUS_MULTIPROC_DIR": str(WORK / f"metrics-{spec['name']}")}
    flask("seed", env=env)
    flask("embed", env=env)  # the sample's vectors exist beforehand; the bench measures serving
    cgroup = Cgroup(spec["name"], spec["memory_mb"])
    argv = cgroup.wrap([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", spec["app"]])
    log_file = open(WORK / f"{spec['name']}-gunicorn.log", "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    sampler = Sampler(proc.pid, cgroup)
    sampler.start()
    result: dict = {"name": spec["name"], "label": spec["label"], "memory_limit_mb": spec["memory_mb"],
                    "cgroup": cgroup.enabled, "workers": int(spec["env"].get("WEB_CONCURRENCY", "1"))}
    try:
        started = time.monotonic()
        while True:
            try:
                if http(url + "/healthz", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() - started > 180:
                raise SystemExit(f"{spec['name']}: gunicorn did not start (see bench/work/{spec['name']}-gunicorn.log)")
            time.sleep(0.1)
        result["startup_seconds"] = round(time.monotonic() - started, 2)
        time.sleep(2.0)
        idle = [s for s in sampler.samples if s["phase"] == "startup"][-5:]
        result["idle_worker_rss_mb"] = min(s["worker_max_mb"] for s in idle)
        import psutil

        workers = psutil.Process(proc.pid).children(recursive=True)
        result["idle_worker_uss_mb"] = round(max(w.memory_full_info().uss for w in workers) / MB, 1)

        sampler.phase = "load"
        if cgroup.enabled:
            (cgroup.path / "memory.max_usage_in_bytes").write_text("0")
        status, body, ms = http(url + "/search?" + urllib.parse.urlencode({"q": "ספר טוב לקיץ", "mode": "semantic"}))
        if status != 200:
            raise SystemExit(f"{spec['name']}: first semantic query failed: {status} {body}")
        result["first_query_ms"] = round(ms, 1)
        ready = [http(url + "/readyz")[1]["semantic"] for _ in range(3 * result["workers"])]
        loaded = [r for r in ready if r.get("load_seconds") is not None]
        result["load_seconds"] = loaded[0]["load_seconds"] if loaded else None
        result["model"] = {k: v for k, v in (loaded[0] if loaded else ready[0]).items()
                           if k in ("backend", "precision", "max_seq_length", "dim")}

        sampler.phase = "queries"
        rng = random.Random(1)
        sample = json.loads((ROOT / "app" / "data" / "sample_items.json").read_text(encoding="utf-8"))
        texts = [f"{e['title']} {e['body']}" for e in sample]
        latencies, took, errors = [], [], 0

        def one(i: int):
            q = rng.choice(texts)[: rng.randint(10, 80)]
            return http(url + "/search?" + urllib.parse.urlencode({"q": q, "mode": "semantic"}))

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for status, body, ms in pool.map(one, range(queries)):
                if status != 200:
                    errors += 1
                    continue
                latencies.append(ms)
                took.append(body["took_ms"])
        wall = time.perf_counter() - started
        quantiles = statistics.quantiles(latencies, n=100)
        result["queries"] = {"count": queries, "errors": errors, "concurrency": 8,
                             "p50_ms": round(quantiles[49], 1), "p95_ms": round(quantiles[94], 1),
                             "p99_ms": round(quantiles[98], 1), "server_p50_ms": round(statistics.median(took), 1),
                             "throughput_qps": round(len(latencies) / wall, 1)}

        sampler.phase = "embedding"
        tags = pseudo_words(random.Random(2), new_tags)
        for start in range(0, new_tags, 10):
            http(url + "/items", {"title": f"פריט {start}", "tags": tags[start : start + 10]})
        started = time.perf_counter()
        status, body, ms = http(url + "/search?" + urllib.parse.urlencode({"q": "תגית חדשה", "mode": "semantic"}))
        result["embedding"] = {"new_tags": new_tags, "status": status, "seconds": round(time.perf_counter() - started, 1),
                               "batch_size": int(spec["env"].get("EMBEDDING_BATCH_SIZE", "10"))}
        time.sleep(0.5)
    finally:
        sampler.phase = "end"
        result["cgroup_peak_mb"] = round((cgroup.read("memory.max_usage_in_bytes") or 0) / MB, 1) or None
        result["oom_kills"] = cgroup.oom_kills()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        sampler.stop.set()
        sampler.join()
        log_file.close()
        cgroup.remove()
    samples = [s for s in sampler.samples if s["phase"] != "end"]
    result["phases"] = sampler.peaks()
    result["peak_rss_mb"] = max(s["rss_mb"] for s in samples)
    result["peak_uss_mb"] = max(s["uss_mb"] for s in samples)
    result["samples"] = samples
    recycled = (WORK / f"{spec['name']}-gunicorn.log").read_text(errors="replace")
    result["recycles"] = {"max_requests": recycled.count("Autorestarting worker"),
                          "memory": recycled.count("memfit recycle:"), "killed": recycled.count("SIGKILL")}
    log(f"  peak rss {result['peak_rss_mb']} MB, uss {result['peak_uss_mb']} MB, cgroup {result['cgroup_peak_mb']} MB,"
        f" p50 {result['queries']['p50_ms']} ms")
    return result


def fidelity(paths: dict[str, Path], n: int = 200) -> dict:
    """Mean cosine of each serving model's embeddings to the fp32 model's, on n Hebrew sentences."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
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
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores", "goals": GOALS,
              "fidelity": fidelity(paths), "scenarios": results}
    from bench import fidelity as real

    log("top-5 retrieval agreement on real weights (all-minilm-l6-v2)")
    report["real_weights"] = real.run()
    from bench import report as render

    render.write(report)
    print((RESULTS / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
