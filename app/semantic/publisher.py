"""Building a generation of the shared vector index (app/semantic/shared.py): the build itself, the
manifest it writes, and the publisher child that runs it for a serving instance.

The background publisher is a process of its own beside the workers, so its memory counts against
the instance. It is this file run as a script (``python -P app/semantic/publisher.py``, started by
shared.start_publisher), which imports the standard library, numpy and USearch and nothing of the app:
the child it replaced (``flask --app app vectors publish``) loaded Flask, SQLAlchemy and the app before
its first vector, 85 MB PSS at its peak against 39 MB for a few hundred vectors, and took a fresh
512 MB instance to 412 MB PSS in bench.capacity. It reads the database through the DB-API (sqlite3, or psycopg2 for PostgreSQL), which
is why nothing here may import from the app's package: shared.py imports from here, not the reverse.
`flask --app app vectors publish` and the release step build in-process with the app's session
(shared.publish), through the same build.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

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
BUILD_CHUNK = 4096  # rows read from the database at a time: ~6 MB of float16 at 768 dims
# Probes taken from each chunk of the table as it is read, so that a table of one chunk still has
# enough: with four (three midpoints, 30 neighbours) one neighbour missed was a recall of 0.967, and a
# 3,000-row table of random 32-d vectors went exact in one build of a few dozen.
PROBES_PER_CHUNK = PROBES // 4
# A larger graph needs a wider search for the same recall (e5 vectors, probes at 128: 0.99 at 20 k, 0.97
# at 100 k): a generation whose probes miss MIN_RECALL is probed again at each wider breadth, and the
# first that passes is written in its manifest for every reader; past the widest it is searched exactly.
EXPANSIONS = (EXPANSION_SEARCH, 2 * EXPANSION_SEARCH, 4 * EXPANSION_SEARCH)
MIN_PUBLISH_GAP_S = 30.0  # a table that keeps changing otherwise is republished at most this often
PUBLISH_LOCK = "publish.lock"
# Set for the publisher child: the descriptor of the lock its worker took for it (start_publisher).
INHERITED_LOCK_ENV = "MEMFIT_PUBLISH_LOCK_FD"
# Set for the publisher child: where its database is, as sqlite3 or psycopg2 take it (start_publisher).
DATABASE_ENV = "MEMFIT_PUBLISH_DATABASE"

Version = tuple[int, "int | None", int]  # (count, largest id, sum of ids) of a kind's vectors


class Source(Protocol):
    """The embeddings table as a build reads it: the app's session, or the child's own connection."""

    def version(self, fingerprint: str, kind: str, after_id: int = 0) -> Version: ...

    def chunks(self, fingerprint: str, kind: str) -> Iterator[list[tuple[int, int, bytes, int]]]:
        """(id, ref_id, vector, dim) of kind's rows in id order, BUILD_CHUNK at a time."""

    def end(self) -> None:
        """End the read transaction (before the file work, and when nothing is due)."""


def from_blobs(blobs, dim: int) -> np.ndarray:
    """Stored vectors (L2-normalised float16, little-endian; bytes, or psycopg2's memoryviews) as one
    (n, dim) array."""
    return np.frombuffer(b"".join(blobs), dtype="<f2").reshape(len(blobs), dim)


# --- manifests ----------------------------------------------------------------------------------

def manifest_path(folder: Path, fingerprint: str, kind: str) -> Path:
    return folder / f"{fingerprint}-{kind}.json"


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


def publish_reason(folder: Path, fingerprint: str, kind: str, rebuild_rows: int,
                   version: Callable[..., Version], newer_rows: int | None = None) -> str | None:
    """Why kind needs a new generation now (None: it does not). The first one waits for rebuild_rows
    vectors; a next one for newer_rows stored after the current (by default rebuild_rows or a tenth of it,
    whichever is more: what a serving instance rebuilds for). version is Source.version."""
    count, newest, total = version(fingerprint, kind)
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
    after = version(fingerprint, kind, after_id=data["max_id"])
    if data["count"] + after[0] != count or data["id_sum"] + after[2] != total:
        if time.time() - st.st_mtime >= MIN_PUBLISH_GAP_S:
            return "vectors were replaced or removed since it was built"
        return None
    if after[0] >= (newer_rows if newer_rows is not None else max(rebuild_rows, data["count"] // 10)):
        return f"{after[0]} vectors stored after it"
    return None


# --- the build ----------------------------------------------------------------------------------

def take_lock(folder: Path) -> int | None:
    """The instance's publisher lock, not waited for: the descriptor that holds it (close it to let go),
    or None when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / PUBLISH_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def publish_lock(folder: Path):
    """The instance's publisher lock, not waited for: yields whether it was taken."""
    if os.environ.get(INHERITED_LOCK_ENV):
        # A publisher child: its worker took the lock and handed it over (the same open file, so the
        # lock lasts as long as this process).
        yield True
        return
    fd = take_lock(folder)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def publish(folder: Path, fingerprint: str, kind: str, source: Source, progress: Callable[[int], None] | None = None,
            if_due: int | None = None, newer_rows: int | None = None) -> dict | None:
    """Build a new generation of kind from source and make it current; None when another process is
    publishing, or with if_due (VECTOR_INDEX_REBUILD_ROWS; newer_rows as publish_reason's) when, once
    the lock is held, none is due (any more: two workers started a build for the same reason).
    Returns the manifest."""
    from usearch.index import Index

    with publish_lock(folder) as taken:
        if not taken:
            return None
        if if_due is not None and publish_reason(folder, fingerprint, kind, if_due, source.version, newer_rows) is None:
            source.end()
            return None
        started = time.monotonic()
        index = None
        count = max_id = id_sum = dim = 0
        probes: list = []
        for chunk in source.chunks(fingerprint, kind):
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
        source.end()  # ends the read transaction before the file work
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


# --- the publisher child ------------------------------------------------------------------------

def child_database(url: str) -> str:
    """DATABASE_ENV for a database URL as the app's engine has it (SQLAlchemy's form, password shown):
    ``sqlite:<path>`` or a libpq URI. ValueError for any other."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme == "sqlite" and rest.startswith("/") and rest != "/" and rest != "/:memory:":
        return "sqlite:" + os.path.abspath(rest[1:])  # the child runs elsewhere
    if sep and scheme.split("+")[0] in ("postgresql", "postgres"):
        return "postgresql://" + rest
    raise ValueError(f"the publisher child reads SQLite files and PostgreSQL, not {scheme or url!r}")


class DbApiSource:
    """The embeddings table through a DB-API connection of the child's own (read only)."""

    def __init__(self, database: str):
        if database.startswith("sqlite:"):
            import sqlite3

            self.connection = sqlite3.connect(database[len("sqlite:"):], timeout=30)
            self.mark, self.server_side = "?", False
        else:
            import psycopg2

            self.connection = psycopg2.connect(database)
            self.connection.set_session(readonly=True)
            self.mark, self.server_side = "%s", True

    def _sql(self, text: str) -> str:
        return text.replace("?", self.mark)

    def version(self, fingerprint: str, kind: str, after_id: int = 0) -> Version:
        cursor = self.connection.cursor()
        cursor.execute(self._sql("SELECT count(*), max(id), coalesce(sum(id), 0) FROM embeddings "
                                 "WHERE model_fp = ? AND kind = ? AND id > ?"), (fingerprint, kind, after_id))
        count, newest, total = cursor.fetchone()
        cursor.close()
        return int(count), (int(newest) if newest is not None else None), int(total)

    def chunks(self, fingerprint: str, kind: str):
        # PostgreSQL: a named cursor streams from the server; sqlite3 steps through its result anyway.
        cursor = self.connection.cursor(name="publish") if self.server_side else self.connection.cursor()
        if self.server_side:
            cursor.itersize = BUILD_CHUNK
        try:
            cursor.execute(self._sql("SELECT id, ref_id, vector, dim FROM embeddings WHERE model_fp = ? "
                                     "AND kind = ? ORDER BY id"), (fingerprint, kind))
            while chunk := cursor.fetchmany(BUILD_CHUNK):
                yield chunk
        finally:
            cursor.close()

    def end(self) -> None:
        self.connection.rollback()

    def close(self) -> None:
        self.connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Publish generations of the shared vector index (the "
                                                 "background publisher; `flask --app app vectors publish` by hand).")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--kind", dest="kinds", action="append", choices=("tag", "item"), required=True)
    parser.add_argument("--if-due", type=int, metavar="ROWS", help="only where one is due (VECTOR_INDEX_REBUILD_ROWS)")
    args = parser.parse_args(argv)
    database = os.environ.get(DATABASE_ENV)
    if not database:
        print(f"publisher: {DATABASE_ENV} is not set: it names the database to read", file=sys.stderr)
        return 2
    try:
        source = DbApiSource(database)
    except Exception as exc:  # noqa: BLE001 -- one line in the server's log, not a traceback
        print(f"publisher: cannot open the database ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    try:
        for kind in args.kinds:
            result = publish(args.folder, args.fingerprint, kind, source, if_due=args.if_due)
            if result is None:
                print(f"{kind}: another process is publishing this instance's index, or none is due; nothing done")
            elif result["count"]:
                print(f"{kind}: published {result['file']} ({result['count']} vectors, search {result['search']}, "
                      f"{result['built_seconds']} s) in {args.folder}", flush=True)
    except Exception as exc:  # noqa: BLE001 -- the workers search the older generation meanwhile
        print(f"publisher: no new generation ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
              file=sys.stderr)
        return 1
    finally:
        source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
