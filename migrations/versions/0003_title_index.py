"""The text index's title tier: on PostgreSQL, a generated tsvector of the
title's exact forms and alternates with its own GIN index, so that a query finds the items holding its
words in their titles without visiting every row that holds them anywhere. SQLite's FTS5 index has
column filters already: nothing to do there.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

from app import textindex

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    # Idempotent: adds only what is missing (the generated column is computed for the rows already there).
    textindex.ensure_schema(op.get_bind())


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS ix_items_{textindex.TITLE_TSV}")
        op.drop_column("items", textindex.TITLE_TSV)
