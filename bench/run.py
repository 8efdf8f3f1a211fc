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
import subprocess
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devtools.gunicorn import ROOT, GunicornServer
from devtools.http import fetch_json
from monitoring import memory

WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
MB = 1024 * 1024
CGROUP_V1_ROOT = Path("/sys/fs/cgroup/memory")  # the v1 memory hierarchy (hybrid and legacy mounts)
CGROUP_V2_ROOT = Path("/sys/fs/cgroup")  # the unified hierarchy (cgroup v2 only machines)
# The 512 MB goals, written once: the limit, whether a measure must stay at or under it ("max") or reach
# it ("min"), and the wording of the report's check (the limit fills the {}). bench/report.py checks them.
GOALS = {
    "peak_mb": {"limit": 400, "kind": "max",
                "text": "instance peak (PSS sum of the process tree, and cgroup working set) ≤ {} MB"},
    "cosine": {"limit": 0.99, "kind": "min", "text": "mean cosine to fp32 ≥ {}"},
    "speedup": {"limit": 2.5, "kind": "min", "text": "semantic query median ≥ {}× faster than fp32"},
    "idle_worker_mb": {"limit": 60, "kind": "max", "text": "idle worker private memory ≤ {} MB"},
    "peak_1gb_mb": {"limit": 800, "kind": "max", "text": "1gb tier instance peak (PSS sum, working set) ≤ {} MB"},
}
IDLE_SAMPLES = 40  # samples (50 ms apart) the idle worker settles over after boot before it is measured


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
        subprocess.run([sys.executable, "-m", "devtools.synthetic", str(paths["fp32"]), "--arch", "alephbert"], cwd=ROOT, check=True)
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


class CgroupError(RuntimeError):
    """A figure the memory cgroup must give is missing or zero: a run must fail on it, never pass."""


class Cgroup:
    """A memory cgroup with a limit, v1 or v2 (whichever the machine mounts with a memory controller), or a
    no-op where the machine does not allow one (``enabled`` False; callers that need it must say so)."""

    def __init__(self, name: str, limit_mb: int, v1_root: Path = CGROUP_V1_ROOT, v2_root: Path = CGROUP_V2_ROOT):
        self.enabled = False
        self.version: int | None = None
        self.path: Path | None = None
        leaf = f"memfit-bench-{name}-{os.getpid()}"
        reasons = []
        for version, root in ((1, v1_root), (2, v2_root)):
            try:
                self._create(version, root, root / leaf, limit_mb)
            except OSError as exc:
                reasons.append(f"v{version} {root}: {exc.strerror or exc}")
                continue
            self.enabled, self.version, self.path = True, version, root / leaf
            return
        log(f"no memory cgroup ({'; '.join(reasons)}); measuring without a limit")

    @staticmethod
    def _create(version: int, root: Path, path: Path, limit_mb: int) -> None:
        if version == 1:
            if not (root / "memory.limit_in_bytes").exists():
                raise FileNotFoundError(2, "no cgroup v1 memory hierarchy", str(root))
            limit, swap = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
        else:
            controllers = root / "cgroup.controllers"
            if not controllers.exists() or "memory" not in controllers.read_text().split():
                raise FileNotFoundError(2, "no cgroup v2 memory controller", str(root))
            subtree = root / "cgroup.subtree_control"
            if "memory" not in subtree.read_text().split():
                subtree.write_text("+memory")  # children get memory.* files only once the parent delegates it
            limit, swap = "memory.max", "memory.swap.max"
        path.mkdir()
        try:
            (path / limit).write_text(str(limit_mb * MB))
        except OSError:
            path.rmdir()
            raise
        try:  # no swap either, as on the platforms
            (path / swap).write_text(str(limit_mb * MB) if version == 1 else "0")
        except OSError:
            pass

    def wrap(self, argv: list[str]) -> list[str]:
        if not self.enabled:
            return argv
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def figures(self) -> memory.CgroupMemory | None:
        """Usage, working set, peak and OOM kills as monitoring reads them; None without a cgroup."""
        return memory.read_cgroup_dir(self.path, self.version) if self.enabled else None

    def reset_peak(self) -> bool:
        """Restart the peak from now (v1 always; v2 from kernel 6.12). False: the peak counts from the start."""
        try:
            (self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")).write_text("0")
            return True
        except OSError:
            return False

    def peak(self) -> int:
        """The kernel's peak usage (v1 memory.max_usage_in_bytes, v2 memory.peak). Raises CgroupError when it
        is missing or zero: a cgroup that held a server cannot have peaked at nothing."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        figures = self.figures()
        if figures is None or not figures.peak:
            hint = " (cgroup v2 has memory.peak from Linux 5.19)" if self.version == 2 else ""
            raise CgroupError(f"memory cgroup peak unreadable or zero: {self.path}/{name}{hint}")
        return figures.peak

    def oom_kills(self) -> int:
        """OOM kills in the cgroup (v1 memory.oom_control, v2 memory.events); CgroupError when unreadable."""
        figures = self.figures()
        if figures is None or figures.oom_kills is None:
            name = "memory.oom_control" if self.version == 1 else "memory.events"
            raise CgroupError(f"memory cgroup OOM count unreadable: {self.path}/{name} has no oom_kill")
        return figures.oom_kills

    def final_figures(self) -> dict:
        """The run's cgroup figures for the results; raises CgroupError if the cgroup cannot give them."""
        if not self.enabled:
            return {"cgroup": False, "cgroup_version": None, "cgroup_peak_mb": None, "oom_kills": None}
        return {"cgroup": True, "cgroup_version": self.version, "cgroup_peak_mb": round(self.peak() / MB, 1),
                "oom_kills": self.oom_kills()}

    def remove(self) -> None:
        if self.enabled:
            for _ in range(50):  # the kernel frees the cgroup a moment after its last process exits
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


def strict_peak(samples: list[dict], key: str) -> float:
    """The largest value of key over samples; raises when there is none or a sample lacks it (no PSS
    without /proc/PID/smaps_rollup): a missing figure must fail a run, never read as 0."""
    values = [s.get(key) for s in samples]
    if not values or any(v is None for v in values):
        raise ValueError(f"no {key} in {values.count(None)} of {len(values)} memory samples")
    return max(values)


SWEEP_TRIES = 5  # reads of the process tree per sample until one sees no fork or exit (Sampler.take)


class Sampler(threading.Thread):
    """Memory of the gunicorn process tree and of its cgroup, every 50 ms, labelled by phase."""

    def __init__(self, pid: int, cgroup: Cgroup):
        super().__init__(daemon=True, name="bench-sampler")
        self.root_pid = pid
        self.cgroup = cgroup
        self.phase = "startup"
        self.samples: list[dict] = []
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.recorded = threading.Condition()

    def run(self) -> None:
        try:
            self._sample()
        finally:  # wake wait_samples() when the tree is gone, instead of leaving it to its timeout
            with self.recorded:
                self.recorded.notify_all()

    def take(self) -> dict | None:
        """One sample of the tree and the cgroup; None once the tree is gone.

        The processes are read one after another, so a sweep during which a worker exits or is forked
        mixes two states of the tree: PSS splits a shared page among the processes mapping it at the
        moment each is read, and a worker read before a sibling's exit or a fork keeps its old share
        while the others are read with their new one. Such sweeps summed up to ~75 MB above the samples
        around them (one sample, at a recycle). A sweep counts when the tree is the same before and
        after it; otherwise it is read again (a handful of tries: forks and exits are rare events).
        """
        for _ in range(SWEEP_TRIES):
            pids = memory.process_tree(self.root_pid)  # zombies left out: an exited worker's memory is gone
            if not pids:
                return None
            rows = memory.read_processes(pids)
            if len(rows) == len(pids) and set(memory.process_tree(self.root_pid)) == set(pids):
                break
        tree = memory.total(rows)
        workers = [r for r in rows if r.pid != self.root_pid]
        cgroup = self.cgroup.figures()
        return {"t": round(time.monotonic() - self.started, 3), "phase": self.phase, "pids": len(rows),
                "pss_mb": None if tree.pss is None else round(tree.pss / MB, 1),
                "uss_mb": round(tree.private / MB, 1), "rss_mb": round(tree.rss / MB, 1),
                "worker_max_mb": round(max((w.rss for w in workers), default=0) / MB, 1),
                "worker_private_max_mb": round(max((w.private for w in workers), default=0) / MB, 1),
                "cgroup_mb": round(cgroup.usage / MB, 1) if cgroup else 0,
                "working_set_mb": round(cgroup.working_set / MB, 1) if cgroup else None}

    def _sample(self) -> None:
        while not self.stop.is_set():
            sample = self.take()
            if sample is None:
                break
            self.samples.append(sample)
            with self.recorded:
                self.recorded.notify_all()
            self.stop.wait(0.05)

    def wait_samples(self, count: int, timeout: float = 60) -> None:
        """Block until count more samples are recorded: a measuring window counted in samples, not a sleep."""
        target = len(self.samples) + count
        with self.recorded:
            self.recorded.wait_for(lambda: len(self.samples) >= target or not self.is_alive(), timeout)

    def peaks(self) -> dict:
        out = {}
        for phase in dict.fromkeys(s["phase"] for s in self.samples):
            rows = [s for s in self.samples if s["phase"] == phase]
            out[phase] = {key: max((r[key] for r in rows if r.get(key) is not None), default=None)
                          for key in ("pss_mb", "uss_mb", "rss_mb", "working_set_mb")}
        return out


@contextmanager
def measured(server: GunicornServer, cgroup: Cgroup, phase: str, reset_peak: bool = False):
    """Start server in cgroup with a Sampler on its tree, wait until it answers, and run the block under
    `phase`; afterwards stop server and sampler, read the cgroup's figures and remove it, whatever
    happened. Yields (sampler, figures): figures fills with Cgroup.final_figures() on the way out.
    reset_peak: the cgroup's peak counts from readiness, not from boot."""
    sampler = Sampler(server.start().pid, cgroup)
    sampler.start()
    figures: dict = {}
    try:
        server.wait_ready()
        if reset_peak:
            cgroup.reset_peak()
        sampler.phase = phase
        yield sampler, figures
    finally:
        # The shutdown is not serving: the master's own exit briefly copies the pages it shares with
        # the workers still leaving (its sample is kept, under "stop"; the cgroup's peak includes it).
        sampler.phase = "stop"
        server.stop()
        sampler.stop.set()
        sampler.join()
        try:
            figures.update(cgroup.final_figures())  # raises when the cgroup gives no peak or OOM count
        finally:
            cgroup.remove()


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
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
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


# --- CPU quota and other trees (bench/capacity.py) -------------------------------------------------

CPU_V1_ROOT = Path("/sys/fs/cgroup/cpu")  # the v1 cpu hierarchy (hybrid and legacy mounts)
CPU_PERIOD_US = 100_000


def flask_in(cwd: Path, *args: str, env: dict | None = None) -> str:
    """flask() run in another source tree (cwd first on sys.path, so its `app` is imported); raises
    RuntimeError instead of exiting, so a caller can record the failure and go on."""
    out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", *args], cwd=cwd, capture_output=True,
                         text=True, env={**os.environ, **(env or {})}, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"flask {' '.join(args)} in {cwd} failed:\n{out.stderr[-3000:]}")
    return out.stdout


class CpuCgroup:
    """A CPU quota of `cpus` CPUs for a server: cgroup v1's cpu controller (a child with cpu.cfs_period_us
    100000 and cpu.cfs_quota_us cpus × 100000) or, on a cgroup v2 only machine, cpu.max. cpus None asks
    for no limit. Where the machine allows neither, ``enabled`` is False and ``reason`` says why: the
    caller records no limit, it never pretends one.

    wrap() composes with Cgroup.wrap (cpu.wrap(memory.wrap(argv))): each echoes the shell's pid into its
    cgroup.procs before exec, so the server's pid ends in both and its workers inherit them. On v2 a
    process is in one cgroup only: pass the memory Cgroup's v2 folder as shared_v2 and the quota is set
    there (wrap then adds nothing, and the memory Cgroup removes the folder).

    visible (v1): a container sees its own quota at /sys/fs/cgroup/cpu, and the app sizes itself from
    it (app/semantic/encoders.py available_cpus reads /sys/fs/cgroup/cpu/cpu.cfs_quota_us). Here the
    server would read the host's root (no quota), so wrap starts it in a private mount namespace with
    the child bind-mounted over /sys/fs/cgroup/cpu: its view, and only its, is a container's. Probed
    once; ``visible`` False where unshare or the mount is not allowed.
    """

    def __init__(self, name: str, cpus: float | None, v1_root: Path = CPU_V1_ROOT,
                 v2_root: Path = CGROUP_V2_ROOT, shared_v2: Path | None = None, show_quota: bool = True):
        self.cpus, self.v1_root = cpus, v1_root
        self.enabled, self.version, self.path, self.owned, self.visible = False, None, None, False, False
        self.reason: str | None = None
        if cpus is None:
            self.reason = "no limit asked"
            return
        quota = int(round(cpus * CPU_PERIOD_US))
        leaf = f"memfit-bench-cpu-{name}-{os.getpid()}"
        reasons = []
        try:
            if not (v1_root / "cpu.cfs_quota_us").exists():
                raise FileNotFoundError(2, "no cgroup v1 cpu hierarchy", str(v1_root))
            path = v1_root / leaf
            path.mkdir()
            try:
                (path / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
            except OSError:
                path.rmdir()
                raise
            self.enabled, self.version, self.path, self.owned = True, 1, path, True
        except OSError as exc:
            reasons.append(f"v1 {v1_root}: {exc.strerror or exc}")
        if not self.enabled:
            try:
                controllers = v2_root / "cgroup.controllers"
                if not controllers.exists() or "cpu" not in controllers.read_text().split():
                    raise FileNotFoundError(2, "no cgroup v2 cpu controller", str(v2_root))
                subtree = v2_root / "cgroup.subtree_control"
                if "cpu" not in subtree.read_text().split():
                    subtree.write_text("+cpu")
                path = shared_v2 or v2_root / leaf
                if shared_v2 is None:
                    path.mkdir()
                try:
                    (path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
                except OSError:
                    if shared_v2 is None:
                        path.rmdir()
                    raise
                self.enabled, self.version, self.path, self.owned = True, 2, path, shared_v2 is None
            except OSError as exc:
                reasons.append(f"v2 {v2_root}: {exc.strerror or exc}")
        if not self.enabled:
            self.reason = "no CPU cgroup (" + "; ".join(reasons) + ")"
            log(f"{self.reason}: running without a CPU limit")
        elif self.version == 1 and show_quota:
            self.visible = self._probe_visible(quota)

    def _probe_visible(self, quota: int) -> bool:
        try:
            out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                  f"mount --bind {self.path} {self.v1_root} && cat {self.v1_root}/cpu.cfs_quota_us"],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.returncode == 0 and out.stdout.strip() == str(quota)

    def wrap(self, argv: list[str]) -> list[str]:
        if not self.enabled or not self.owned:
            return argv
        script = f"echo $$ > {self.path}/cgroup.procs"
        if self.visible:
            script += f" && mount --bind {self.path} {self.v1_root}"
        command = ["sh", "-c", script + ' && exec "$@"', "sh", *argv]
        return ["unshare", "--mount", "--propagation", "private", *command] if self.visible else command

    def stat(self) -> dict:
        """cpu.stat as seconds and counts: nr_periods, nr_throttled, throttled_s (and usage_s on v2); {}
        without a cgroup or once it is gone."""
        if not self.enabled:
            return {}
        try:
            raw = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if line.strip())
        except (OSError, ValueError):
            return {}
        out = {"nr_periods": int(raw.get("nr_periods", 0)), "nr_throttled": int(raw.get("nr_throttled", 0))}
        if "throttled_time" in raw:  # v1: nanoseconds
            out["throttled_s"] = round(int(raw["throttled_time"]) / 1e9, 3)
        if "throttled_usec" in raw:  # v2: microseconds
            out["throttled_s"] = round(int(raw["throttled_usec"]) / 1e6, 3)
        if "usage_usec" in raw:
            out["usage_s"] = round(int(raw["usage_usec"]) / 1e6, 3)
        return out

    def describe(self) -> dict:
        return {"cpus_asked": self.cpus, "cpu_limit": self.cpus if self.enabled else None,
                "cpu_cgroup_version": self.version, "cpu_cgroup": str(self.path) if self.path else None,
                "cpu_quota_visible_to_server": self.visible if self.enabled else None, "cpu_note": self.reason}

    def remove(self) -> None:
        """rmdir the child (retried while the kernel lets go of exited processes); a process still in it
        after that (one of the server's, started through wrap) is moved to the root first."""
        if not (self.enabled and self.owned and self.path):
            return
        root = self.v1_root if self.version == 1 else self.path.parent
        for attempt in range(60):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if attempt == 50:
                    try:
                        for pid in (self.path / "cgroup.procs").read_text().split():
                            (root / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass
                time.sleep(0.1)
        log(f"could not remove {self.path}")
