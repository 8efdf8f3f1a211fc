"""One vector index per instance, memory-mapped and shared by every worker, as the weights are.

Used where the database cannot search vectors itself: SQLite (the embedded default) and PostgreSQL
without pgvector. Instead of a float16 matrix in every worker (or streaming every row past
SEMANTIC_INDEX_MAX_MB), the instance keeps one USearch HNSW index (float16 vectors, inner product on
L2-normalised vectors = cosine) in a file that every worker opens with ``view=True``: the kernel
maps its pages once for all of them, and a query visits a few hundred vectors, not all of them. Each
generation is probed when built: where its graph finds less than MIN_RECALL of the exact top 10 for
some of its own vectors, it is searched exactly instead (every vector of the file, in SIMD).

Files, in VECTOR_INDEX_DIR (by default beside the SQLite file, else in the instance's shared folder):

* ``<fingerprint>-<kind>-<stamp>.usearch``: one generation of the index (kind ``item`` or ``tag``);
  keys are the rows' ``ref_id``.
* ``<fingerprint>-<kind>.json``: the manifest naming the current generation and what it holds (its
  size in bytes, row count, largest ``embeddings.id``, sum of ids, dimension). Written last, by atomic
  rename: a reader sees the old generation or the new one, never half of one.

A viewed index cannot be added to, so new vectors are found another way until the next generation:
the rows stored after it (``embeddings.id`` above the manifest's) are searched exactly, beside it,
by each worker's small in-process matrix (``VectorIndex`` with ``after_id``). Publishing builds a
whole new generation from the database in a separate process (publisher.py, which loads none of the
app: its memory counts against the instance), started by the background embedder's loop when the
rows after the generation pass VECTOR_INDEX_REBUILD_ROWS (or a tenth of the generation), when the
table changed otherwise (a vector replaced or deleted), or when there is none. One publisher per instance at a time (a ``flock``).

Never trusted blindly: a manifest or index file that is missing, unreadable or does not match what
its manifest says is ignored (the search falls back to the in-process matrix over every row) and
the next publication replaces it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sqlalchemy import select

from ..db import Embedding, db
from . import publisher
from .index import VectorIndex, table_version
from .publisher import EXPANSION_SEARCH, checked_manifest, manifest_path

log = logging.getLogger(__name__)

def folder_for(settings) -> Path | None:
    """VECTOR_INDEX_DIR, or its default: beside the SQLite file, else the instance's shared folder.
    None when set to "off" (every worker keeps its own matrix, as before the shared index)."""
    configured = settings.vector_index_dir
    if configured == "off":
        return None
    if configured:
        return Path(configured)
    if settings.sqlite_path:
        return Path(f"{settings.sqlite_path}.vectors")
    return Path(settings.shared_folder) / "vectors"


@dataclass(frozen=True)
class Generation:
    stamp: tuple  # the manifest's inode, mtime and size when read: any new manifest differs
    file: Path
    count: int
    max_id: int
    id_sum: int
    dim: int
    index: Any  # usearch.index.Index, a read-only view of file
    exact: bool  # search every vector (the graph failed its probe) rather than walk the graph


def open_generation(folder: Path, fingerprint: str, kind: str, stamp: tuple) -> Generation:
    """The generation a manifest names, viewed; ValueError when the file does not match it."""
    from usearch.index import Index

    data, file = checked_manifest(folder, fingerprint, kind)
    index = Index.restore(str(file), view=True)
    if index is None or len(index) != data["count"]:
        raise ValueError(f"{file} could not be opened as the index its manifest describes")
    index.expansion_search = int(data.get("expansion_search", EXPANSION_SEARCH))
    return Generation(stamp, file, data["count"], data["max_id"], data["id_sum"], data["dim"], index,
                      exact=data.get("search") == "exact")


class SharedIndex:
    """Nearest-neighbour search over the instance's published generation plus the rows stored after it."""

    kind = "shared"

    def __init__(self, folder: Path, delta: VectorIndex):
        self.folder = folder
        self.delta = delta  # every row when there is no usable generation, the newer rows otherwise
        self._lock = threading.Lock()
        self._generations: dict[tuple[str, str], Generation] = {}
        self._refused: dict[tuple[str, str], tuple] = {}  # manifests found unusable (warned once each)

    def write(self, ids, vectors) -> None:
        """Nothing to do: the table is the truth, searched beside the generation until the next one."""

    def memory_bytes(self) -> int:
        """This worker's own bytes: the delta matrices (the generation is shared: see mapped_bytes)."""
        return self.delta.memory_bytes()

    def mapped_bytes(self) -> int:
        return sum(g.file.stat().st_size for g in self._generations.values() if g.file.exists())

    def generation(self, fingerprint: str, kind: str) -> Generation | None:
        """The current generation, reopened when its manifest changed; None when there is none usable."""
        key = (fingerprint, kind)
        path = manifest_path(self.folder, fingerprint, kind)
        try:
            st = path.stat()
        except OSError:
            self._generations.pop(key, None)
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        current = self._generations.get(key)
        if current is not None and current.stamp == stamp:
            return current
        if self._refused.get(key) == stamp:
            return None
        with self._lock:
            current = self._generations.get(key)
            if current is not None and current.stamp == stamp:
                return current
            try:
                opened = open_generation(self.folder, fingerprint, kind, stamp)
            except Exception as exc:  # noqa: BLE001 -- a bad file is never trusted: search without it
                self._refused[key] = stamp
                self._generations.pop(key, None)
                log.warning("shared vector index %s not used (%s); searching every row in-process until "
                            "the next generation is published", path, exc)
                return None
            self._generations[key] = opened
            return opened

    def top(self, fingerprint: str, kind: str, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        generation = self.generation(fingerprint, kind)
        if generation is None or generation.dim != query.shape[0]:
            return self.delta.top(fingerprint, kind, query, k)
        newer = self.delta.top(fingerprint, kind, query, k, after_id=generation.max_id)
        found = generation.index.search(np.asarray(query, dtype=np.float32), k, exact=generation.exact)
        scores = {int(key): 1.0 - float(distance) for key, distance in zip(found.keys, found.distances)}
        # A row stored again after the generation (its text edited) is searched with its newer vector.
        scores.update(newer)
        return sorted(scores.items(), key=lambda hit: (-hit[1], hit[0]))[:k]


# --- publishing ---------------------------------------------------------------------------------

class SessionSource:
    """The embeddings table through the app's session: `flask vectors publish` and the release build in
    their own process."""

    def version(self, fingerprint: str, kind: str, after_id: int = 0) -> tuple[int, int | None, int]:
        return table_version(fingerprint, kind, after_id)

    def chunks(self, fingerprint: str, kind: str):
        rows = db.session.execute(
            select(Embedding.id, Embedding.ref_id, Embedding.vector, Embedding.dim)
            .where(Embedding.model_fp == fingerprint, Embedding.kind == kind)
            .order_by(Embedding.id).execution_options(yield_per=publisher.BUILD_CHUNK))
        try:
            yield from rows.partitions(publisher.BUILD_CHUNK)
        finally:
            rows.close()

    def end(self) -> None:
        db.session.commit()


def publish_reason(folder: Path, fingerprint: str, kind: str, rebuild_rows: int,
                   newer_rows: int | None = None) -> str | None:
    """publisher.publish_reason over the app's session."""
    return publisher.publish_reason(folder, fingerprint, kind, rebuild_rows, table_version, newer_rows)


def publish(folder: Path, fingerprint: str, kind: str, progress: Callable[[int], None] | None = None,
            if_due: int | None = None, newer_rows: int | None = None) -> dict | None:
    """publisher.publish in this process, reading through the app's session."""
    return publisher.publish(folder, fingerprint, kind, SessionSource(), progress, if_due, newer_rows)


# The publisher child itself: Python, numpy, USearch and a database driver (publisher.py): 39 MB PSS
# at its peak for a few hundred vectors (the app's CLI child it replaced: 85 MB).
BUILD_BASE_BYTES = 45 * 2**20


def build_bytes(count: int, dim: int) -> int:
    """What a build of count vectors needs in the publisher: float16 vectors, the graph's links
    (about 2 x CONNECTIVITY neighbours of 4 bytes on the base layer) and the process."""
    return BUILD_BASE_BYTES + count * (2 * dim + 8 * publisher.CONNECTIVITY + 32)


def start_publisher(folder: Path, database_url: str, fingerprint: str, kinds: list[str], nice: int,
                    rebuild_rows: int):
    """The publisher child (publisher.py, run as a script: none of the app is loaded) for kinds where a
    generation is due (rebuild_rows: VECTOR_INDEX_REBUILD_ROWS), at a lower priority: the build's memory
    is the child's and goes with it, never a worker's (which the recycling bound would count).
    database_url is the engine's, as this worker resolved it (a relative SQLite path made absolute).
    None when another build holds the instance's lock. The lock is taken here and handed to the child,
    so two workers that find a generation due at the same moment start one build, not two."""
    import subprocess
    import sys

    database = publisher.child_database(database_url)  # before the lock: a bad URL takes nothing
    fd = publisher.take_lock(folder)
    if fd is None:
        return None

    # -P: the script's folder (app/semantic, with its queue.py) is not put first on sys.path.
    command = [sys.executable, "-P", publisher.__file__, "--folder", str(folder), "--fingerprint", fingerprint,
               "--if-due", str(rebuild_rows)]
    for kind in kinds:
        command += ["--kind", kind]
    # The database in the environment, not the command line (a password would show in ps), and no metrics
    # folder: the child is not a gunicorn worker.
    env = {**os.environ, publisher.DATABASE_ENV: database, publisher.INHERITED_LOCK_ENV: str(fd)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        return subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, pass_fds=(fd,),
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)
    finally:
        os.close(fd)  # the child's copy holds the lock until it exits
