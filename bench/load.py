"""Load test: real gunicorn with the 512mb tier's settings, in a 512 MB memory cgroup where the
machine allows it, under 16 concurrent clients mixing text, tag and semantic search with item
creation, with max_requests set low so workers recycle during the run. Loopback only; bounded in
time and stops by itself.

    python -m bench.load --seconds 60      # make load: the full run, figures to bench/results/load.json

Afterwards every created item is read back. A short run of this is tests/test_load.py.

Memory is judged as the instance is: the peak PSS sum of gunicorn's process tree (the workers share the
memory-mapped weights; PSS splits them among the workers) and, in the cgroup, its peak working set and
the kernel's peak (v1 memory.max_usage_in_bytes, v2 memory.peak). The peak RSS sum is reported too,
labelled: it counts the shared weights once per worker. A cgroup that gives no peak fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

from devtools.gunicorn import GunicornServer
from devtools.http import free_port
from devtools.cgroups import Cgroup
from devtools.project import WORK, flask, models, remove_database, tier_env
from devtools.sampler import measured, strict_peak

RESULTS = Path(__file__).resolve().parent / "results"
QUERIES = ["ספר", "טיול בצפון", "מתכון", "מוזיקה", "בריאות", "חיות", "היסטוריה", "בישול", "ילדים", "ים"]


WRITE_TOKEN = "load-test-token"  # writes need a token in production (WRITE_TOKEN)


KINDS = ("text", "tags", "semantic", "create")
MIX = {"text": 3, "tags": 2, "semantic": 3, "create": 2}  # weights of KINDS in a client's loop
LONG_MIX = {"semantic": 1, "create": 1}  # an overload client's heavy loop (bench/serving.py)
LONG_TOKENS = 500


def long_text(rng: random.Random, tokens: int = LONG_TOKENS) -> str:
    """About `tokens` model tokens of Hebrew words (these words are one or two tokens each)."""
    return " ".join(rng.choice(QUERIES) for _ in range(tokens // 2))


def is_shed(response) -> bool:
    """A semantic request shed under load: 503 `overloaded` with Retry-After, the answer the API
    promises past its bound (counted apart from failures)."""
    if response.status_code != 503 or not response.headers.get("retry-after", "").isdigit():
        return False
    try:
        return response.json()["error"]["code"] == "overloaded"
    except (ValueError, KeyError, TypeError):
        return False


def keep_going(deadline: float, stats: dict, min_requests: int, hard_deadline: float) -> bool:
    """Until the deadline and at least min_requests answered; never past hard_deadline."""
    if time.monotonic() >= hard_deadline:
        return False
    return time.monotonic() < deadline or sum(stats["status"].values()) < min_requests


async def client_loop(client, go, rng: random.Random, stats: dict, mix: dict[str, int] = MIX,
                      long: bool = False, max_query: int = 500) -> None:
    """One client: requests of the kinds in mix until go() says stop. long: 500-token texts (semantic
    queries cut at MAX_QUERY_LENGTH, item bodies whole), latency recorded as "<kind>-long"."""
    kinds, weights = list(mix), list(mix.values())
    while go():
        kind = rng.choices(kinds, weights)[0]
        started = time.perf_counter()
        try:
            if kind == "create":
                title = f"פריט עומס {rng.randrange(10**9)}"
                body = long_text(rng) if long else rng.choice(QUERIES) * 3
                response = await client.post("/items", {"title": title, "body": body, "tags": rng.sample(QUERIES, 2)})
                if response.status_code == 201:
                    stats["created"].append((response.json()["id"], title))
            else:
                q = long_text(rng)[:max_query] if long else rng.choice(QUERIES)
                response = await client.get("/search", params={"q": q, "mode": kind})
            status = response.status_code
        except Exception as exc:  # connection refused/reset, timeout: all count as failures
            stats["errors"].append(f"{kind}: {type(exc).__name__}")
            continue
        shed = status >= 300 and is_shed(response)
        # Sheds apart ("semantic-shed"): a shed answers in milliseconds (or after the queue timeout), and
        # mixed with the answered queries its latency would read as semantic search getting faster.
        label = f"{kind}-long" if long else kind
        label += "-shed" if shed else ""
        stats["latency"].setdefault(label, []).append((time.perf_counter() - started) * 1000)
        stats["status"][status] = stats["status"].get(status, 0) + 1
        if status < 300:
            stats["answered"][kind] = stats["answered"].get(kind, 0) + 1
        elif shed:
            stats["sheds"] += 1
        elif status >= 500:
            stats["errors"].append(f"{kind}: HTTP {status}")


class Response:
    """What the clients read of an answer: status, headers (names in lower case) and the JSON body."""

    def __init__(self, status_code: int, headers: dict[str, str], body: bytes):
        self.status_code, self.headers, self.body = status_code, headers, body

    def json(self):
        return json.loads(self.body)


class Client:
    """HTTP/1.1 over a new connection per request (Connection: close, as the earlier httpx client with
    no keep-alive did), on asyncio streams.

    The load generator shares the machine's two cores with the server it measures, so its own CPU time
    is time the server does not get, and a busy client loop stamps a response late: httpx spent ~3.5
    ms of CPU per request here (0.43 of a core at 120 requests/s). This does the same requests with
    a few hundred microseconds of Python each. The server's answers are small JSON bodies with a
    Content-Length; reading to EOF takes them whole.
    """

    def __init__(self, url: str, timeout: float, headers: dict[str, str]):
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.timeout = parsed.hostname, parsed.port or 80, timeout
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in {"Host": parsed.netloc, **headers}.items())

    async def get(self, path: str, params: dict[str, str] | None = None) -> Response:
        return await self.request("GET", path + ("?" + urllib.parse.urlencode(params) if params else ""))

    async def post(self, path: str, payload: object) -> Response:
        return await self.request("POST", path, json.dumps(payload).encode(), "application/json")

    async def request(self, method: str, target: str, body: bytes = b"", content_type: str = "") -> Response:
        return await asyncio.wait_for(self._exchange(method, target, body, content_type), self.timeout)

    async def _exchange(self, method: str, target: str, body: bytes, content_type: str) -> Response:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            head = f"{method} {target} HTTP/1.1\r\n{self.headers}Connection: close\r\n"
            if body:
                head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"\r\n" + body)
            raw = await reader.read(-1)  # to EOF: the server closes after the answer
        finally:
            writer.close()
        header_block, _, payload = raw.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ConnectionError(f"no HTTP status line in the answer: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Response(int(parts[1]), headers, payload)


async def drive(url: str, seconds: float, clients: int, min_requests: int = 0, long_clients: int = 0) -> dict:
    """clients loops for seconds, and on until min_requests were answered (a slow machine then runs longer
    instead of testing less), but never past 10 × seconds + 120 s; long_clients of them send LONG_MIX."""
    stats: dict = {"created": [], "errors": [], "latency": {}, "status": {}, "answered": {}, "sheds": 0}
    now = time.monotonic()
    deadline, hard_deadline = now + seconds, now + 10 * seconds + 120
    client = Client(url, timeout=120, headers={"Authorization": f"Bearer {WRITE_TOKEN}"})
    go = functools.partial(keep_going, deadline, stats, min_requests, hard_deadline)
    loops = [client_loop(client, go, random.Random(i), stats) for i in range(clients - long_clients)]
    loops += [client_loop(client, go, random.Random(1000 + i), stats, LONG_MIX, long=True)
              for i in range(long_clients)]
    await asyncio.gather(*loops)
    missing = []
    for item_id, title in stats["created"]:
        response = await client.get(f"/items/{item_id}")
        if response.status_code != 200 or response.json()["title"] != title:
            missing.append(item_id)
    stats["missing"] = missing
    return stats


def run(seconds: float, clients: int = 16, max_requests: int = 40, model: str | None = None,
        min_recycles: int = 0) -> dict:
    """One load run. With min_recycles, the clients go on past seconds until enough requests were answered
    for gunicorn's max_requests to have replaced that many workers (requests, not speed, decide)."""
    WORK.mkdir(parents=True, exist_ok=True)
    model = model or str(models()["q8"])
    db_path = WORK / "load.sqlite3"
    remove_database(db_path)
    port = free_port()
    env = {**os.environ, **tier_env("512mb"), "SEMANTIC_MODEL": model, "DATABASE_URL": f"sqlite:///{db_path}",
           "PORT": str(port), "SECRET_KEY": "load-test", "APP_ENV": "production",
           "WRITE_TOKEN": WRITE_TOKEN, "WRITE_RATE_LIMIT": "1000000 per minute",  # the limit has its own tests
           "GUNICORN_MAX_REQUESTS": str(max_requests),
           # the tier's ratio of jitter to max_requests (deploy/tiers.yaml): recycles spread, not in step
           "GUNICORN_MAX_REQUESTS_JITTER": str(max_requests // 2),
           "GUNICORN_BACKLOG": "256", "PROMETHEUS_MULTIPROC_DIR": str(WORK / f"metrics-load-{port}")}
    flask("seed", env=env)
    flask("embed", env=env)
    max_memory = int(env["MAX_MEMORY_MB"])
    workers = int(env.get("WEB_CONCURRENCY", "1"))
    # A worker serves at most max_requests + jitter requests; the first `workers` lifetimes are not recycles.
    min_requests = (workers + min_recycles) * (max_requests + int(env["GUNICORN_MAX_REQUESTS_JITTER"])) \
        if min_recycles else 0
    cgroup = Cgroup("load", 512)
    server = GunicornServer(env, WORK / "load-gunicorn.log", port=port, wrap=cgroup.wrap)
    with measured(server, cgroup, "load") as (sampler, cgroup_figures):
        started = time.monotonic()
        stats = asyncio.run(drive(server.url, seconds, clients, min_requests))
        wall = time.monotonic() - started
    samples = sampler.samples
    text = (WORK / "load-gunicorn.log").read_text(errors="replace")
    all_latency = sorted(x for values in stats["latency"].values() for x in values)
    q = statistics.quantiles(all_latency, n=100) if len(all_latency) > 2 else [0] * 99
    requests = sum(stats["status"].values())
    return {
        "seconds": seconds, "wall_seconds": round(wall, 1), "clients": clients, "workers": workers,
        "max_requests": max_requests, "min_requests": min_requests, "requests": requests,
        "throughput_rps": round(requests / wall, 1), "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1),
        "by_mode_p50_ms": {k: round(statistics.median(v), 1) for k, v in stats["latency"].items()},
        "answered": {kind: stats["answered"].get(kind, 0) for kind in KINDS},
        "status": {str(k): v for k, v in sorted(stats["status"].items())},
        "failed": len(stats["errors"]), "failures": stats["errors"][:20], "sheds": stats["sheds"],
        "created": len(stats["created"]), "created_missing": len(stats["missing"]),
        "recycles": text.count("Autorestarting worker") + text.count("memfit recycle:"),
        "killed": text.count("SIGKILL"),
        "peak_pss_mb": strict_peak(samples, "pss_mb"),
        "peak_working_set_mb": strict_peak(samples, "working_set_mb") if cgroup.enabled else None,
        "peak_rss_mb": strict_peak(samples, "rss_mb"),  # RSS sum: the shared weights counted per worker
        **cgroup_figures, "max_memory_mb": max_memory,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    result = run(args.seconds, args.clients)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return 0 if result["failed"] == 0 and result["created_missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
