"""Bulk import: `flask --app app import FILE`, a file of JSON lines, one item per line
(``{"title": ..., "body": ..., "tags": [...]}``, checked exactly as ``POST /items`` checks a body).

* Streaming: the file is read line by line; items are written in batches of ``BATCH``, one transaction
  each, with the text index analysed as for any new item. Vectors are not computed here: the running
  instance's background embedder finds the new rows (or run `flask --app app embed`).
* Resumable: the file is known by the SHA-256 of its bytes, and how many of its lines have landed is
  committed in the same transaction as each batch (the ``imports`` table). Run the same command again
  after Ctrl-C, a crash or a lost connection and it continues after the last batch that committed:
  nothing twice, nothing lost. A file already imported whole imports nothing again.
* Bad lines are reported by line number with what is wrong. ``--on-error refuse`` (the default) reads
  the whole file first and imports nothing if any line is bad; ``--on-error skip`` imports the good
  lines and lists the bad ones at the end. Never half-imported silently.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy.exc import IntegrityError

from .db import ImportRun, Item, db, tags_by_name
from .errors import ApiError
from .items import item_fields

BATCH = 500
SHOWN_BAD = 20  # bad lines listed; the rest are counted
# A line is at most one item's worth of JSON: the largest body and tags, escaped (\uXXXX) six times over.
LINE_MAX_BYTES = 1 << 20


class ImportRefused(Exception):
    """The file cannot be imported as asked; the message says why (bad lines by number, or unreadable)."""


@dataclass
class Outcome:
    items: int = 0  # imported by this run
    resumed_after: int = 0  # lines an earlier run had imported
    lines: int = 0  # lines in the file
    bad: list[tuple[int, str]] = field(default_factory=list)
    bad_count: int = 0
    already_done: bool = False
    through: int = 0  # the last line accounted for


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, problem) for every line; blank lines are skipped, not counted as bad."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > LINE_MAX_BYTES:
                yield number, None, f"is longer than {LINE_MAX_BYTES} bytes"
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, f"is not UTF-8 (byte {exc.start})"
                continue
            if text.strip():
                yield number, text, None


def parse(text: str) -> dict:
    """One line's item fields; ValueError with what is wrong."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(payload, dict):
        raise ValueError('is not a JSON object: accepts {"title": ..., "body": ..., "tags": [...]}')
    try:
        return item_fields(payload)
    except ApiError as exc:
        raise ValueError(exc.message) from None


def checked(path: Path, start_after: int = 0) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, fields or None, problem or None) for the lines after start_after."""
    for number, text, problem in lines(path):
        if number <= start_after:
            continue
        if problem is None:
            try:
                yield number, parse(text), None
                continue
            except ValueError as exc:
                problem = str(exc)
        yield number, None, problem


def run(path: Path, on_error: str = "refuse", progress: Callable[[int], Callable[[int], None]] | None = None,
        source: str | None = None) -> Outcome:
    """Import path (see the module's docstring); ImportRefused when it cannot. progress(lines left) gives
    the function told how many more lines each batch accounted for."""
    try:
        source = source or digest(path)
    except OSError as exc:
        raise ImportRefused(f"cannot read {path}: {exc.strerror or exc}") from None
    outcome = Outcome()
    done = db.session.get(ImportRun, source)
    outcome.resumed_after = outcome.through = done.lines_done if done else 0
    db.session.commit()
    with path.open("rb") as handle:
        outcome.lines = sum(1 for _ in handle)
    advance = progress(max(0, outcome.lines - outcome.resumed_after)) if progress else None
    if on_error == "refuse":
        for number, _, problem in checked(path, outcome.resumed_after):
            if problem is not None:
                _note_bad(outcome, number, problem)
        if outcome.bad_count:
            raise ImportRefused(_refusal(path, outcome))
    batch: list[tuple[int, dict]] = []
    last = outcome.resumed_after
    for number, fields, problem in checked(path, outcome.resumed_after):
        last = number
        if problem is not None:
            _note_bad(outcome, number, problem)
            continue
        batch.append((number, fields))
        if len(batch) >= BATCH:
            _store(source, path, batch, number, outcome, advance)
            batch = []
    if batch or last > outcome.resumed_after:
        _store(source, path, batch, max(last, outcome.lines), outcome, advance)
    elif done is not None and not outcome.items:
        outcome.already_done = True
    return outcome


def _store(source: str, path: Path, batch: list[tuple[int, dict]], through_line: int, outcome: Outcome,
           progress: Callable[[int], None] | None) -> None:
    """One transaction: the batch's items, their tags, and the file's progress through through_line."""
    for attempt in range(3):
        try:
            for _, fields in batch:
                item = Item(title=fields["title"], body=fields["body"], tags=[])
                db.session.add(item)
                db.session.flush()
                item.tags.extend(tags_by_name(fields["tags"]))
            run_row = db.session.get(ImportRun, source)
            if run_row is None:
                db.session.add(ImportRun(source=source, path=str(path)[:1000], lines_done=through_line,
                                         items=len(batch)))
            else:
                run_row.lines_done, run_row.items = through_line, run_row.items + len(batch)
            db.session.commit()
            break
        except IntegrityError:
            # A request created one of the batch's new tags at the same moment: the retry finds it.
            db.session.rollback()
            if attempt == 2:
                raise
    outcome.items += len(batch)
    if progress:
        progress(through_line - outcome.through)
    outcome.through = through_line


def _note_bad(outcome: Outcome, number: int, problem: str) -> None:
    outcome.bad_count += 1
    if len(outcome.bad) < SHOWN_BAD:
        outcome.bad.append((number, problem))


def _listing(outcome: Outcome) -> str:
    listed = "\n".join(f"  line {n}: {problem}" for n, problem in outcome.bad)
    more = outcome.bad_count - len(outcome.bad)
    return listed + (f"\n  ... and {more} more" if more else "")


def _refusal(path: Path, outcome: Outcome) -> str:
    return (f"{path}: {outcome.bad_count} bad line(s); nothing imported (fix them, or import the good lines "
            f"with --on-error skip):\n{_listing(outcome)}")


def bad_lines_report(outcome: Outcome) -> str:
    return f"{outcome.bad_count} bad line(s) skipped:\n{_listing(outcome)}"


@contextlib.contextmanager
def exclusive(source: str, settings) -> Iterator[None]:
    """One import of a given file at a time per database (two would insert its items twice): a session
    advisory lock on PostgreSQL, a flock beside the SQLite file. ImportRefused when another holds it."""
    busy = ImportRefused("another import of this file is running on this database; wait for it, then run "
                         "this again to continue where it stopped")
    if settings.is_sqlite:
        base = settings.sqlite_path or str(Path(settings.shared_folder) / "memory.sqlite3")
        fd = os.open(f"{base}.import-{source[:16]}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy from None
            yield
        finally:
            os.close(fd)
        return
    from sqlalchemy import text

    key = int(source[:15], 16)  # 60 bits of the file's digest: a bigint key of its own
    with db.engine.connect() as conn:
        if not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            raise busy
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
