"""Embedding ids are never reused on SQLite (AUTOINCREMENT): a vector stored again gets an id above
every id before it, on SQLite as on PostgreSQL (whose sequences never go back).

Without it SQLite gives a new row the largest id plus one, so replacing the newest vector (an item
edited right after it was embedded) gave the new vector the old one's id: the count, largest id and
sum of ids by which the workers' in-process matrices tell what changed stayed the same, and they kept
searching the old vector.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _recreate(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # SQLite cannot add AUTOINCREMENT to a table: batch mode copies it into a new one (rows, indexes
    # and constraints kept) in the release's transaction.
    with op.batch_alter_table("embeddings", recreate="always",
                              table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass


def upgrade():
    _recreate(True)


def downgrade():
    _recreate(False)
