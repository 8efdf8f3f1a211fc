"""Slow and idle clients against the 512 MB tier: gunicorn alone (the Procfile's command) and behind
nginx (deploy/serve.sh, the Docker image's command), side by side in one run.

    python -m bench.slowclients                 # 30 s per phase
    python -m bench.slowclients --seconds 10

Each set-up serves the tier's settings (deploy/env/512mb.env: 2 workers x 48 threads; semantic search
off, the model is not what is measured) on a seeded SQLite database. A client sends text searches on
a schedule (open loop, --rate per second, each with a 10 s timeout), first alone, then while 40
clients send their headers one byte every 3 s, 40 send a 5,000-byte body one byte every 2 s, and 300
connections send nothing (each reopened when the server closes it, as an attacker would). Recorded per
set-up and phase: searches answered, errors and timeouts, p50/p99. Nothing is asserted.
Results: bench/results/slowclients.json (docs/reliability.md shows them through bench/readme.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
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
SLOW_HEADERS, SLOW_BODIES, IDLE = 40, 40, 300
QUERIES = ["ספר", "טיול", "מתכון", "מוזיקה", "בריאות"]


async def _attacker(port: int, kind: str, stop: asyncio.Event) -> None:
    """One slow or idle client, reconnecting whenever the server lets go of it."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            if kind == "headers":
                writer.write(b"GET /search?q=x HTTP/1.1\r\nHost: bench\r\nX-Slow: ")
                while not stop.is_set():
                    await writer.drain()
                    await asyncio.sleep(3)
                    writer.write(b"a")
            elif kind == "body":
                writer.write(b"POST /items HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 5000\r\n\r\n{")
                while not stop.is_set():
                    await writer.drain()
                    await asyncio.sleep(2)
                    writer.write(b" ")
            else:
                # Idle: nothing sent; returns when the server closes the connection.
                read = asyncio.ensure_future(reader.read(1))
                waiting = asyncio.ensure_future(stop.wait())
                await asyncio.wait({read, waiting}, return_when=asyncio.FIRST_COMPLETED)
                read.cancel()
                waiting.cancel()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _attack(port: int, stop_flag: threading.Event) -> None:
    async def main():
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(_attacker(port, kind, stop)) for kind, n in
                 (("headers", SLOW_HEADERS), ("body", SLOW_BODIES), ("idle", IDLE)) for _ in range(n)]
        while not stop_flag.is_set():
            await asyncio.sleep(0.2)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def _searches(url: str, rate: float, seconds: float) -> dict:
    """Text searches sent on schedule; latencies of the answered ones, errors by kind."""
    timings: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        query = urllib.parse.urlencode({"q": QUERIES[i % len(QUERIES)]})
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(f"{url}/search?{query}", timeout=10) as response:
                response.read()
            with lock:
                timings.append((time.perf_counter() - started) * 1000)
        except urllib.error.HTTPError as exc:
            with lock:
                errors[str(exc.code)] = errors.get(str(exc.code), 0) + 1
        except (OSError, TimeoutError) as exc:
            kind = "timeout" if "timed out" in str(exc) else type(exc).__name__
            with lock:
                errors[kind] = errors.get(kind, 0) + 1

    total = int(rate * seconds)
    start = time.monotonic()
    with ThreadPoolExecutor(128) as pool:
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, i)
    timings.sort()
    return {"sent": total, "answered": len(timings), "errors": errors,
            "p50_ms": round(statistics.median(timings), 1) if timings else None,
            "p99_ms": round(timings[int(0.99 * (len(timings) - 1))], 1) if timings else None}


def run_setup(name: str, env: dict, work: Path, rate: float, seconds: float) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**env, "PORT": str(port), "MEMFIT_RUN_DIR": str(work / f"run-{name}"),
           "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",  # serve.sh runs gunicorn
           "PROMETHEUS_MULTIPROC_DIR": str(work / f"metrics-{name}")}
    argv = ([str(ROOT / "deploy" / "serve.sh")] if name == "nginx" else
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()"])
    log = open(work / f"{name}.log", "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", timeout=60, proc=proc)
        phases = {"alone": _searches(url, rate, seconds)}
        stop = threading.Event()
        attack = threading.Thread(target=_attack, args=(port, stop), daemon=True)
        attack.start()
        time.sleep(3)  # every attacking connection opened and holding what it holds
        phases["attacked"] = _searches(url, rate, seconds)
        stop.set()
        attack.join(timeout=30)
        return phases
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rate", type=float, default=20, help="text searches per second")
    args = parser.parse_args(argv)

    if not shutil.which("nginx"):
        raise SystemExit("nginx is not installed (Debian's nginx-light): the image's front cannot be measured")
    work = WORK / "slowclients"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, **tier_env("512mb"), "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
           "ENABLE_SEMANTIC_SEARCH": "false", "SECRET_KEY": "bench", "APP_ENV": "production", "WRITE_TOKEN": "bench"}
    out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "seed"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    result = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tier": "512mb",
              "cores": os.cpu_count(), "rate_per_s": args.rate, "seconds": args.seconds,
              "attack": {"slow_headers": SLOW_HEADERS, "slow_bodies": SLOW_BODIES, "idle": IDLE},
              "setups": {name: run_setup(name, env, work, args.rate, args.seconds) for name in ("gunicorn", "nginx")}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "slowclients.json").write_text(json.dumps(result, indent=1))
    print(section(result))
    return 0


def section(data: dict) -> str:
    """The run as a table, for docs/reliability.md (bench/readme.py copies it there)."""
    a = data["attack"]
    lines = [f"Measured {data['measured_at']}, {data['cores']} cores, the {data['tier']} tier's settings: text "
             f"searches at {data['rate_per_s']:g}/s for {data['seconds']:g} s, alone and while {a['slow_headers']} "
             f"clients trickle headers, {a['slow_bodies']} trickle bodies and {a['idle']} connections idle.", "",
             "| front | phase | answered | errors | p50 | p99 |", "| --- | --- | --- | --- | --- | --- |"]
    names = {"gunicorn": "gunicorn alone (Procfile)", "nginx": "nginx + gunicorn (Docker image)"}
    for name, phases in data["setups"].items():
        for phase, r in phases.items():
            errors = ", ".join(f"{n} {kind}" for kind, n in sorted(r["errors"].items())) or "0"
            p50 = f"{r['p50_ms']} ms" if r["p50_ms"] is not None else "–"
            p99 = f"{r['p99_ms']} ms" if r["p99_ms"] is not None else "–"
            lines.append(f"| {names.get(name, name)} | {phase} | {r['answered']} of {r['sent']} | {errors} | {p50} | {p99} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
