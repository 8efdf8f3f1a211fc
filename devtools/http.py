"""Small HTTP helpers on the standard library, for code that talks to a running memfit (tests, bench)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port() -> int:
    """A loopback port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str, data: dict | None = None, timeout: float = 30.0,
          token: str | None = None) -> tuple[int, bytes, float]:
    """GET (or POST a JSON body, with the write token when given): status, raw body and milliseconds
    taken; HTTP errors are returned, not raised."""
    body = json.dumps(data).encode() if data is not None else None
    headers = {"Content-Type": "application/json"} if body else {}
    if token and body:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    return status, raw, (time.perf_counter() - started) * 1000


def fetch_json(url: str, data: dict | None = None, timeout: float = 30.0,
               token: str | None = None) -> tuple[int, dict, float]:
    """fetch() with the body decoded as JSON (an empty body reads as {})."""
    status, raw, ms = fetch(url, data, timeout, token)
    return status, json.loads(raw or b"{}"), ms


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Return once url answers 200, fail early if proc exits first, raise TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if fetch(url, timeout=2)[0] == 200:
                return
        except OSError:  # refused or reset while the server boots
            pass
        time.sleep(0.1)  # poll interval between checks of the condition, not a wait for it
    raise TimeoutError(f"{url} did not answer within {timeout}s")
