"""Bulk import's progress per file (the `imports` table): `flask --app app import FILE` commits it with
each batch of items, so an interrupted import resumes where it stopped.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    if "imports" in sa.inspect(op.get_bind()).get_table_names():
        return
    op.create_table(
        "imports",
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("lines_done", sa.Integer(), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade():
    op.drop_table("imports")
