"""Baseline: the schema of the first release (items, tags, item_tags, embeddings).

A database made before migrations existed (by `create_all`) already has these tables: they are
adopted as they are, after checking that they hold the columns this schema expects, and the
revision is recorded. Nothing is recreated, so the data stays. A fresh database gets the tables.

Revision ID: 0001
Revises:
"""

from alembic import context, op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Column names per table: an existing table must have at least these to be adopted.
EXPECTED = {
    "tags": {"id", "name", "norm"},
    "items": {"id", "title", "body", "search_text", "created_at", "updated_at"},
    "item_tags": {"item_id", "tag_id"},
    "embeddings": {"id", "model_fp", "kind", "ref_id", "text_hash", "dim", "vector", "created_at"},
}


def _create_tags():
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("norm", sa.String(64), nullable=False),
        sa.UniqueConstraint("name"),
    )
    op.create_index("ix_tags_norm", "tags", ["norm"])


def _create_items():
    op.create_table(
        "items",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("search_text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def _create_item_tags():
    op.create_table(
        "item_tags",
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("items.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tag_id", sa.Integer(), sa.ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
    )


def _create_embeddings():
    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_fp", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("ref_id", sa.Integer(), nullable=False),
        sa.Column("text_hash", sa.String(64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model_fp", "kind", "ref_id", name="uq_embedding_ref"),
    )
    op.create_index("ix_embedding_fp_kind", "embeddings", ["model_fp", "kind"])


# In dependency order: item_tags refers to items and tags.
CREATORS = {"tags": _create_tags, "items": _create_items, "item_tags": _create_item_tags,
            "embeddings": _create_embeddings}


def upgrade():
    if context.is_offline_mode():  # `flask db upgrade --sql`: the SQL for an empty database
        for create in CREATORS.values():
            create()
        return
    inspector = sa.inspect(op.get_bind())
    existing = set(inspector.get_table_names())
    for table, create in CREATORS.items():
        if table not in existing:
            create()
            continue
        columns = {c["name"] for c in inspector.get_columns(table)}
        missing = EXPECTED[table] - columns
        if missing:
            # A table of that name that is not memfit's: stop rather than build on it.
            raise RuntimeError(f"cannot adopt the existing table {table!r}: it lacks the columns "
                               f"{', '.join(sorted(missing))}; is DATABASE_URL the right database?")


def downgrade():
    for table in reversed(list(CREATORS)):
        op.drop_table(table)
