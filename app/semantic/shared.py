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
whole new generation from the database in a separate process (``flask --app app vectors publish``),
started by the background embedder's loop when the rows after the generation pass
VECTOR_INDEX_REBUILD_ROWS (or a tenth of the generation), when the table changed otherwise (a vector
replaced or deleted), or when there is none. One publisher per instance at a time (a ``flock``).

Never trusted blindly: a manifest or index file that is missing, unreadable or does not match what
its manifest says is ignored (the search falls back to the in-process matrix over every row) and
the next publication replaces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from sqlalchemy import select

from ..db import Embedding, db
from .index import STREAM_CHUNK, VectorIndex, from_blobs, table_version

log = logging.getLogger(__name__)

# HNSW build and search breadth: measured on multilingual-e5-small vectors of Hebrew text
# (bench/vectors.py) for recall@10 >= 0.95; a search looks at least at twice the rows it returns.
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 128
# A generation is searched through its graph only if, for probe queries made from its own vectors
# (midpoints of two of them: near some vectors, equal to none), the graph finds this share of the
# exact top 10; otherwise exactly (all of the file's vectors, SIMD: 6 ms at 100 k x 768). Measured on
# multilingual-e5-small vectors of Hebrew text (20 k): probes 0.99, real queries 0.985; on random 768-d
# vectors (10 k; a graph cannot tell equidistant points apart): probes 0.72, random queries 0.52. The
# probes read a little high, hence the margin above the 0.95 asked of search.
MIN_RECALL = 0.97
PROBES = 64
# Probes taken from each chunk of the table as it streams (STREAM_CHUNK rows), so that a table of one
# chunk still has enough: with four (three midpoints, 30 neighbours) one neighbour missed was a recall
# of 0.967, and a 3,000-row table of random 32-d vectors went exact in one build of a few dozen.
PROBES_PER_CHUNK = PROBES // 4
# A larger graph needs a wider search for the same recall (e5 vectors, probes at 128: 0.99 at 20 k, 0.97
# at 100 k): a generation whose probes miss MIN_RECALL is probed again at each wider breadth, and the
# first that passes is written in its manifest for every reader; past the widest it is searched exactly.
EXPANSIONS = (EXPANSION_SEARCH, 2 * EXPANSION_SEARCH, 4 * EXPANSION_SEARCH)
MIN_PUBLISH_GAP_S = 30.0  # a table that keeps changing otherwise is republished at most this often
PUBLISH_LOCK = "publish.lock"
# Set for the publisher child: the descriptor of the lock its worker took for it (start_publisher).
INHERITED_LOCK_ENV = "MEMFIT_PUBLISH_LOCK_FD"


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


def manifest_path(folder: Path, fingerprint: str, kind: str) -> Path:
    return folder / f"{fingerprint}-{kind}.json"


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


def read_manifest(path: Path) -> dict:
    """The manifest's fields, checked; ValueError naming what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({type(exc).__name__})") from None
    fields = {"file": str, "count": int, "max_id": int, "id_sum": int, "dim": int}
    if not isinstance(data, dict) or any(not isinstance(data.get(k), t) for k, t in fields.items()):
        raise ValueError(f"{path} lacks one of {', '.join(fields)}")
    if "/" in data["file"] or data["file"].startswith("."):
        raise ValueError(f"{path} names a file outside its folder: {data['file']!r}")
    return data


def checked_manifest(folder: Path, fingerprint: str, kind: str) -> tuple[dict, Path]:
    """The manifest's fields and the file it names, whose header agrees with it; ValueError otherwise."""
    from usearch.index import Index

    data = read_manifest(manifest_path(folder, fingerprint, kind))
    file = folder / data["file"]
    meta = Index.metadata(str(file)) if file.exists() else None
    if not meta:
        raise ValueError(f"{file} is missing or not an index file")
    if "bytes" in data and file.stat().st_size != data["bytes"]:  # cut short (or grown) since it was built
        raise ValueError(f"{file} has {file.stat().st_size} bytes; its manifest says {data['bytes']}")
    if meta.get("count_present") != data["count"] or meta.get("dimensions") != data["dim"]:
        raise ValueError(f"{file} holds {meta.get('count_present')} vectors of {meta.get('dimensions')} "
                         f"dimensions; its manifest says {data['count']} of {data['dim']}")
    return data, file


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

def publish_reason(folder: Path, fingerprint: str, kind: str, rebuild_rows: int,
                   newer_rows: int | None = None) -> str | None:
    """Why kind needs a new generation now (None: it does not). The first one waits for rebuild_rows
    vectors; a next one for newer_rows stored after the current (by default rebuild_rows or a tenth of it,
    whichever is more: what a serving instance rebuilds for)."""
    count, newest, total = table_version(fingerprint, kind)
    if not count:
        return None
    path = manifest_path(folder, fingerprint, kind)
    if not path.exists():
        # A few thousand vectors are searched as fast from each worker's small matrix: the first
        # generation waits for as many rows as would start a new one (a publication costs a process).
        return "no generation yet" if count >= rebuild_rows else None
    try:
        # The header checks, not a view: each worker's store already holds one (generation()).
        data, _ = checked_manifest(folder, fingerprint, kind)
        st = path.stat()
    except Exception as exc:  # noqa: BLE001 -- whatever is wrong with it, a new one replaces it
        return f"the current one is unusable ({exc})"
    after = table_version(fingerprint, kind, after_id=data["max_id"])
    if data["count"] + after[0] != count or data["id_sum"] + after[2] != total:
        if time.time() - st.st_mtime >= MIN_PUBLISH_GAP_S:
            return "vectors were replaced or removed since it was built"
        return None
    if after[0] >= (newer_rows if newer_rows is not None else max(rebuild_rows, data["count"] // 10)):
        return f"{after[0]} vectors stored after it"
    return None


@contextlib.contextmanager
def publish_lock(folder: Path):
    """The instance's publisher lock, not waited for: yields whether it was taken."""
    if os.environ.get(INHERITED_LOCK_ENV):
        # A publisher child: its worker took the lock and handed it over (the same open file, so the
        # lock lasts as long as this process).
        yield True
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / PUBLISH_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def publish(folder: Path, fingerprint: str, kind: str, progress: Callable[[int], None] | None = None,
            if_due: int | None = None, newer_rows: int | None = None) -> dict | None:
    """Build a new generation of kind from the database and make it current; None when another
    process is publishing, or with if_due (VECTOR_INDEX_REBUILD_ROWS; newer_rows as publish_reason's)
    when, once the lock is held, none is due (any more: two workers started a build for the same
    reason). Returns the manifest."""
    from usearch.index import Index

    with publish_lock(folder) as taken:
        if not taken:
            return None
        if if_due is not None and publish_reason(folder, fingerprint, kind, if_due, newer_rows) is None:
            db.session.commit()
            return None
        started = time.monotonic()
        index = None
        count = max_id = id_sum = dim = 0
        probes: list = []
        rows = db.session.execute(
            select(Embedding.id, Embedding.ref_id, Embedding.vector, Embedding.dim)
            .where(Embedding.model_fp == fingerprint, Embedding.kind == kind)
            .order_by(Embedding.id).execution_options(yield_per=STREAM_CHUNK))
        for chunk in rows.partitions(STREAM_CHUNK):
            dim = chunk[0][3]
            if index is None:
                index = Index(ndim=dim, metric="ip", dtype="f16", connectivity=CONNECTIVITY,
                              expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)
            vectors = from_blobs([r[2] for r in chunk], dim).astype(np.float32)
            index.add(np.asarray([r[1] for r in chunk], dtype=np.uint64), vectors)
            if len(probes) < PROBES:  # a quarter of them from each of the first chunks, spread over it
                probes.extend(vectors[:: max(1, len(vectors) // PROBES_PER_CHUNK)][: PROBES - len(probes)])
            count += len(chunk)
            max_id = chunk[-1][0]
            id_sum += sum(r[0] for r in chunk)
            if progress:
                progress(len(chunk))
        rows.close()
        db.session.commit()  # ends the read transaction before the file work
        if index is None:
            return {"count": 0}
        recall, expansion = search_breadth(index, probes)
        stamp = f"{max_id}-{time.time_ns()}"
        name = f"{fingerprint}-{kind}-{stamp}.usearch"
        temporary = folder / f".{name}.tmp"
        index.save(str(temporary))
        del index
        _fsync(temporary)
        os.replace(temporary, folder / name)
        manifest = {"file": name, "bytes": (folder / name).stat().st_size, "count": count, "max_id": max_id,
                    "id_sum": id_sum, "dim": dim,
                    "search": "hnsw" if recall >= MIN_RECALL else "exact", "probe_recall": round(recall, 3),
                    "expansion_search": expansion,
                    "built_seconds": round(time.monotonic() - started, 2)}
        target = manifest_path(folder, fingerprint, kind)
        temporary = folder / f".{target.name}.tmp"
        temporary.write_text(json.dumps(manifest))
        _fsync(temporary)
        os.replace(temporary, target)
        _fsync(folder)
        _remove_old(folder, fingerprint, kind, keep=name)
        return manifest


def search_breadth(index, sample: list) -> tuple[float, int]:
    """(probe recall, search breadth): the narrowest of EXPANSIONS whose probes pass MIN_RECALL, or the
    widest one's recall when none does."""
    for expansion in EXPANSIONS:
        index.expansion_search = expansion
        recall = probe_recall(index, sample)
        if recall >= MIN_RECALL:
            break
    return recall, expansion


def probe_recall(index, sample: list) -> float:
    """Share of the exact top 10 the graph finds for the midpoints of consecutive sample vectors."""
    if len(sample) < 2:
        return 1.0
    k = min(10, len(index))
    probes = np.asarray(sample[:-1]) + np.asarray(sample[1:])
    probes /= np.maximum(np.linalg.norm(probes, axis=1, keepdims=True), 1e-12)
    found = 0
    for query in probes:
        walked = set(int(key) for key in index.search(query, k).keys)
        exact = set(int(key) for key in index.search(query, k, exact=True).keys)
        found += len(walked & exact)
    return found / (k * len(probes))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_old(folder: Path, fingerprint: str, kind: str, keep: str) -> None:
    """Earlier generations of kind, other models' files and leftovers of interrupted builds. Workers
    still viewing a removed file keep its pages until they open the new one (Linux unlinks lazily)."""
    for path in folder.iterdir():
        name = path.name
        if name == keep or name == PUBLISH_LOCK:
            continue
        stale = (name.startswith(f"{fingerprint}-{kind}-") and name.endswith(".usearch")) or \
                (name.startswith(".") and name.endswith(".tmp")) or \
                not name.startswith(f"{fingerprint}-")
        if stale:
            with contextlib.suppress(OSError):
                path.unlink()


BUILD_BASE_BYTES = 90 * 2**20  # the publisher process itself: Python, the app, numpy, SQLAlchemy


def build_bytes(count: int, dim: int) -> int:
    """What a build of count vectors needs in the publisher: float16 vectors, the graph's links
    (about 2 x CONNECTIVITY neighbours of 4 bytes on the base layer) and the process."""
    return BUILD_BASE_BYTES + count * (2 * dim + 8 * CONNECTIVITY + 32)


def start_publisher(folder: Path, database_url: str, fingerprint: str, kinds: list[str], nice: int):
    """`flask --app app vectors publish` for kinds, in a child process at a lower priority: the build's
    memory is the child's and goes with it, never a worker's (which the recycling bound would count).
    None when another build holds the instance's lock. The lock is taken here and handed to the child,
    so two workers that find a generation due at the same moment start one build, not two."""
    import subprocess
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / PUBLISH_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None

    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "flask", "--app", "app", "vectors", "publish", "--fingerprint", fingerprint,
               "--if-due"]
    for kind in kinds:
        command += ["--kind", kind]
    # The database and folder as this worker resolved them, and no metrics folder: the child is not a
    # gunicorn worker, and files of its pid there would outlive it in the instance's /metrics.
    env = {**os.environ, "DATABASE_URL": database_url, "VECTOR_INDEX_DIR": str(folder), INHERITED_LOCK_ENV: str(fd)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        return subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.DEVNULL, pass_fds=(fd,),
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)
    finally:
        os.close(fd)  # the child's copy holds the lock until it exits
