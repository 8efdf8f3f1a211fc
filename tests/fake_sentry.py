"""A local stand-in for Sentry's ingest endpoint: records the envelopes it receives.

Modes: "ok" answers 200; "hang" accepts the connection and never answers (a slow Sentry).
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def decode_envelope(body: bytes) -> list[tuple[dict, object]]:
    """(item header, payload) pairs of a Sentry envelope."""
    lines = body.split(b"\n")
    items, i = [], 1  # line 0 is the envelope header
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        header = json.loads(lines[i])
        payload = lines[i + 1] if i + 1 < len(lines) else b""
        try:
            payload = json.loads(payload)
        except ValueError:
            pass
        items.append((header, payload))
        i += 2
    return items


class FakeSentry:
    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.envelopes: list[list[tuple[dict, object]]] = []
        self.held = 0  # requests received in "hang" mode (and never answered): tests wait on this
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                if owner.mode == "hang":
                    with owner.lock:
                        owner.held += 1
                    time.sleep(3600)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with owner.lock:
                    owner.envelopes.append(decode_envelope(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.dsn = f"http://publickey@127.0.0.1:{self.port}/1"

    def __enter__(self) -> "FakeSentry":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self, level: str | None = None) -> list[dict]:
        with self.lock:
            found = [payload for env in self.envelopes for header, payload in env
                     if header.get("type") == "event" and isinstance(payload, dict)]
        return [e for e in found if level is None or e.get("level") == level]

    def checkins(self) -> list[dict]:
        with self.lock:
            return [p for env in self.envelopes for h, p in env if h.get("type") == "check_in"]
