"""Semantic search with the model in the instance (SEMANTIC_BACKEND=local, the 512mb tier) and with the
model on an embedding service (SEMANTIC_BACKEND=remote, the 512mb-remote tier), side by side in one run;
then the remote set-up with the service slowed by 200 ms, and with the service dead.

    python -m bench.remote                 # 30 s per set-up
    python -m bench.remote --seconds 10

The model is multilingual-e5-small in both: memfit's q8 ONNX artifact in the instance (bench/e5.py), and
Infinity (`make infinity`) serving the same model's sentence-transformers folder over the OpenAI-style
API on loopback. Each set-up serves its tier's settings on a seeded SQLite database whose vectors the
release step computed (through the service for the remote ones), and gets an open-loop mix at --rate
requests per second (60 % text, 20 % tags, 15 % semantic, 5 % create), each request on schedule with a
10 s timeout. Recorded per set-up: per kind answered, errors (by status), p50/p99; the PSS sum of the
instance's processes at the end (the service's own memory is not the instance's: said apart); and the
hop's own latency (one embedding request to the service, p50 of 50). Nothing is asserted.
Results: bench/results/remote.json, shown in docs/remote.md by bench/readme.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
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

from devtools.http import wait_http
from devtools.project import WORK, tier_env

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INFINITY = Path(os.environ.get("MEMFIT_INFINITY", ROOT / ".venv-infinity" / "bin" / "infinity_emb"))
SERVED_NAME = "multilingual-e5-small"
MIX = (("text", 60), ("tags", 20), ("semantic", 15), ("create", 5))
QUERIES = ["ספרים לילדים", "טיול בצפון", "מתכון לעוגה", "מוזיקה ישראלית", "בריאות ושינה", "חיות בית"]
TAGS = ["טכנולוגיה", "בישול", "טיולים", "בריאות"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DelayRelay(threading.Thread):
    """A TCP relay that holds every chunk a client sends for delay seconds: a slow embedding service."""

    def __init__(self, target_port: int, delay: float):
        super().__init__(daemon=True)
        self.target_port, self.delay, self.port = target_port, delay, free_port()
        self.loop = asyncio.new_event_loop()

    def run(self) -> None:
        async def pipe(reader, writer, delay):
            try:
                while data := await reader.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        async def handle(client_reader, client_writer):
            try:
                server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_writer.close()
                return
            await asyncio.gather(pipe(client_reader, server_writer, self.delay), pipe(server_reader, client_writer, 0))

        async def main():
            server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            async with server:
                await server.serve_forever()

        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(main())


def mix(url: str, rate: float, seconds: float, token: str) -> dict:
    """The open-loop mix: per kind, answered, errors by status, p50/p99 of the answered."""
    rng = random.Random(5)
    kinds = [k for k, share in MIX for _ in range(share)]
    stats = {k: {"sent": 0, "answered": 0, "errors": {}, "ms": []} for k, _ in MIX}
    lock = threading.Lock()

    def one(kind: str, n: int) -> None:
        if kind == "create":
            request = urllib.request.Request(f"{url}/items", data=json.dumps(
                {"title": f"פריט חדש {n} על {QUERIES[n % len(QUERIES)]}", "tags": [TAGS[n % len(TAGS)]]}).encode(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        else:
            q = TAGS[n % len(TAGS)] if kind == "tags" else QUERIES[n % len(QUERIES)]
            request = urllib.request.Request(f"{url}/search?" + urllib.parse.urlencode({"q": q, "mode": kind}))
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
            outcome = None
        except urllib.error.HTTPError as exc:
            outcome = str(exc.code)
        except OSError as exc:
            outcome = "timeout" if "timed out" in str(exc) else type(exc).__name__
        ms = (time.perf_counter() - started) * 1000
        with lock:
            s = stats[kind]
            if outcome is None:
                s["answered"] += 1
                s["ms"].append(ms)
            else:
                s["errors"][outcome] = s["errors"].get(outcome, 0) + 1

    total = int(rate * seconds)
    start = time.monotonic()
    with ThreadPoolExecutor(128) as pool:
        for n in range(total):
            kind = rng.choice(kinds)
            stats[kind]["sent"] += 1
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, kind, n)
    out = {}
    for kind, s in stats.items():
        ms = sorted(s.pop("ms"))
        out[kind] = {**s, "p50_ms": round(statistics.median(ms), 1) if ms else None,
                     "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1) if ms else None}
    return out


def tree_pss_mb(pid: int) -> float:
    import psutil

    total = 0
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            for line in Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return round(total / 2**20, 1)


def hop_ms(url: str, n: int = 50) -> float:
    """One embedding request to the service (one short query), p50 of n."""
    body = json.dumps({"model": SERVED_NAME, "input": ["query: טיול בצפון"]}).encode()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        request = urllib.request.Request(f"{url}/embeddings", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def run_setup(name: str, env: dict, work: Path, rate: float, seconds: float) -> dict:
    db = work / f"{name}.sqlite3"
    port = free_port()
    env = {**env, "DATABASE_URL": f"sqlite:///{db}", "PORT": str(port), "SECRET_KEY": "bench",
           "APP_ENV": "production", "WRITE_TOKEN": "bench", "PROMETHEUS_MULTIPROC_DIR": str(work / f"metrics-{name}")}
    for command in (["seed"], ["release"]):
        out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", *command], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{name}: flask {command[0]} failed:\n{out.stderr[-2000:]}")
    from devtools.gunicorn import GunicornServer

    with GunicornServer(env, work / f"{name}.log", port=port, ready_timeout=180) as server:
        return {"kinds": mix(server.url, rate, seconds, "bench"), "instance_pss_mb": tree_pss_mb(server.proc.pid)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rate", type=float, default=20)
    args = parser.parse_args(argv)
    from bench.e5 import prepared_artifact

    if not INFINITY.exists():
        raise SystemExit(f"no embedding server at {INFINITY}: make infinity")
    artifact = prepared_artifact()
    folder = artifact.parent / artifact.name.removesuffix("-q8")
    if not (folder / "modules.json").exists():
        raise SystemExit(f"{folder} is not the sentence-transformers folder bench/e5.py converts")
    work = WORK / "remote"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    service_port = free_port()
    service = subprocess.Popen(
        [str(INFINITY), "v2", "--model-id", str(folder), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
         "--port", str(service_port), "--url-prefix", "/v1", "--engine", "torch", "--device", "cpu",
         "--batch-size", "16"], stdout=open(work / "infinity.log", "wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"},
        start_new_session=True)
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
              "rate_per_s": args.rate, "seconds": args.seconds, "model": "multilingual-e5-small", "setups": {}}
    try:
        wait_http(f"http://127.0.0.1:{service_port}/health", timeout=180, proc=service)
        service_url = f"http://127.0.0.1:{service_port}/v1"
        result["hop_p50_ms"] = hop_ms(service_url)
        result["service_pss_mb"] = tree_pss_mb(service.pid)
        base = {**os.environ, "SEMANTIC_MODEL": str(artifact)}
        remote = {**base, **tier_env("512mb-remote"), "SEMANTIC_BACKEND": "remote",
                  "SEMANTIC_REMOTE_MODEL": SERVED_NAME, "SEMANTIC_MODEL": str(folder)}
        result["setups"]["local"] = run_setup("local", {**base, **tier_env("512mb")}, work, args.rate, args.seconds)
        result["setups"]["remote"] = run_setup("remote", {**remote, "SEMANTIC_REMOTE_URL": service_url}, work,
                                               args.rate, args.seconds)
        relay = DelayRelay(service_port, 0.2)
        relay.start()
        result["setups"]["remote, service +200 ms"] = run_setup(
            "slow", {**remote, "SEMANTIC_REMOTE_URL": f"http://127.0.0.1:{relay.port}/v1"}, work, args.rate, args.seconds)
        os.killpg(service.pid, signal.SIGKILL)
        service.wait()
        result["setups"]["remote, service dead"] = run_setup(
            "dead", {**remote, "SEMANTIC_REMOTE_URL": service_url}, work, args.rate, args.seconds)
    finally:
        if service.poll() is None:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "remote.json").write_text(json.dumps(result, indent=1))
    print(section(result))
    return 0


def section(data: dict) -> str:
    """The run as a table, for docs/remote.md (bench/readme.py copies it there)."""
    lines = [f"Measured {data['measured_at']}, {data['cores']} cores, {data['model']}: an open-loop mix at "
             f"{data['rate_per_s']:g} requests/s for {data['seconds']:g} s (60 % text, 20 % tags, 15 % semantic, "
             f"5 % create). One embedding request to the service: p50 {data.get('hop_p50_ms')} ms; the "
             f"service's own PSS {data.get('service_pss_mb')} MB (not the instance's).", "",
             "| set-up | instance PSS | text p50 / p99 | semantic answered | semantic p50 / p99 | errors |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in data["setups"].items():
        k = r["kinds"]
        errors = "; ".join(f"{kind}: " + ", ".join(f"{n} × {code}" for code, n in sorted(v["errors"].items()))
                           for kind, v in k.items() if v["errors"]) or "0"
        def p(v: dict) -> str:
            return f"{v['p50_ms']} / {v['p99_ms']} ms" if v["p50_ms"] is not None else "–"

        lines.append(f"| {name} | {r['instance_pss_mb']} MB | {p(k['text'])} | "
                     f"{k['semantic']['answered']} of {k['semantic']['sent']} | {p(k['semantic'])} | {errors} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
