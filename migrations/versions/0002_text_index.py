"""The Hebrew text index: items.index_text, and over it the FTS5 table (SQLite) or the
weighted tsvector column with its GIN index (PostgreSQL), filled for the rows already there.

Existing rows are analysed here, in batches, before the index is built over them, so a populated
database comes out of the upgrade with a complete index. `flask --app app text-index` re-analyses
rows later (after a change of analysis), idempotent and resumable.

Revision ID: 0002
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa

from app import textindex

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BATCH = 1000


def upgrade():
    conn = op.get_bind()
    if "index_text" not in {c["name"] for c in sa.inspect(conn).get_columns("items")}:
        op.add_column("items", sa.Column("index_text", sa.Text(), nullable=True))
    after = 0
    while True:
        rows = conn.execute(sa.text("SELECT id, title, body FROM items WHERE id > :after AND index_text IS NULL "
                                    "ORDER BY id LIMIT :n"), {"after": after, "n": BATCH}).all()
        if not rows:
            break
        conn.execute(sa.text("UPDATE items SET index_text = :doc WHERE id = :id"),
                     [{"id": item_id, "doc": textindex.document(title, body)} for item_id, title, body in rows])
        after = rows[-1][0]
    textindex.ensure_schema(conn)  # FTS5 is rebuilt from the analysed rows; PostgreSQL computes the column


def downgrade():
    conn = op.get_bind()
    textindex.drop(conn)
    if conn.dialect.name == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS ix_items_{textindex.TSV}")
        op.drop_column("items", textindex.TSV)
    with op.batch_alter_table("items") as batch:
        batch.drop_column("index_text")
