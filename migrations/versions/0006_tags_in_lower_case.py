"""Tags in lower case: tags that differ only in case become one tag.

The API stores tags in lower case from this revision on (app/items.py). Tags written before it in other
cases ("Python", "python") were separate tags, each counted when ranking by tags: each group becomes its
oldest tag, named in lower case, carrying the links of them all; the others' vectors go with them, and
the kept tag's vector is recomputed by the embedder, its text having changed.

Lower case as Python computes it (str.lower, as the API does): SQLite's lower() changes ASCII only.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

TAG_MAX = 64  # tags.name's width, as this revision finds it


def upgrade():
    bind = op.get_bind()
    groups: dict[str, list[tuple[int, str]]] = {}
    for tag_id, name in bind.execute(sa.text("SELECT id, name FROM tags ORDER BY id")):
        groups.setdefault(name.lower(), []).append((tag_id, name))
    renames = []
    for lowered, tags in groups.items():
        (keep, name), others = tags[0], [tag_id for tag_id, _ in tags[1:]]
        for other in others:
            # The kept tag takes the other's items it does not have yet; the rest of the links go with the tag.
            bind.execute(sa.text(
                "INSERT INTO item_tags (item_id, tag_id) SELECT item_id, :keep FROM item_tags WHERE tag_id = :other "
                "AND item_id NOT IN (SELECT item_id FROM item_tags WHERE tag_id = :keep)"), {"keep": keep, "other": other})
            bind.execute(sa.text("DELETE FROM item_tags WHERE tag_id = :other"), {"other": other})
            bind.execute(sa.text("DELETE FROM embeddings WHERE kind = 'tag' AND ref_id = :other"), {"other": other})
            bind.execute(sa.text("DELETE FROM tags WHERE id = :other"), {"other": other})
        if name != lowered and len(lowered) <= TAG_MAX:  # lower case can lengthen ('İ'): such a tag keeps its name
            renames.append((keep, lowered))
    for keep, lowered in renames:  # after every merge, so no lower-case name is still taken
        bind.execute(sa.text("UPDATE tags SET name = :name WHERE id = :id"), {"name": lowered, "id": keep})


def downgrade():
    pass  # merged tags cannot be told apart again; their lower-case names are valid before this revision
