"""pgvector's HNSW indexes on ``embeddings.vec``: their kinds, names and expressions, and which exist.

The release builds them (``release.ensure_hnsw``), one per vector size, on `vec` cast to a pgvector
type of that size (partial on it); ``index.PgVectorIndex.top`` orders by the expression of the one
that is valid, so that the search goes through it. No numpy here: the release imports this at start-up.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import text

from ..db import db

# Every index the release makes starts so (migrations/env.py keeps autogenerate away from them).
PREFIX = "ix_embeddings_vec_hnsw"


class Hnsw(NamedTuple):
    """A kind of HNSW index: the pgvector type vec is cast to, whose cosine operator class it uses."""

    type: str
    suffix: str  # after the prefix in the index's name

    def name(self, dim: int) -> str:
        return f"{PREFIX}{self.suffix}_d{dim}"

    def expression(self, dim: int) -> str:
        return f"vec::{self.type}({dim})"

    def ops(self) -> str:
        return f"{self.type}_cosine_ops"


# Half precision: 2 bytes a dimension in the graph instead of 4, as precise as the float16 blobs every
# vector is kept as (db.py); the search still scores at full precision (index.PgVectorIndex.top).
HALFVEC = Hnsw("halfvec", "_half")
VECTOR = Hnsw("vector", "")
KINDS = (HALFVEC, VECTOR)  # best first: a search goes through the first one that is valid
HALFVEC_SINCE = (0, 7)  # the first pgvector with halfvec
# The indexes among :names, each with whether it is valid: an interrupted CONCURRENTLY build leaves an
# invalid one, which the planner never uses. PgVectorIndex.top reads it in its ef_search statement.
PRESENT = ("SELECT c.relname::text AS name, i.indisvalid AS valid FROM pg_index i "
           "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname::text = ANY(CAST(:names AS text[]))")


def names(dim: int) -> list[str]:
    return [kind.name(dim) for kind in KINDS]


def pgvector_version() -> tuple[int, ...]:
    """The installed pgvector's (major, minor), or (0,) without it."""
    value = db.session.scalar(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'"))
    try:
        return tuple(int(part) for part in (value or "0").split(".")[:2])
    except ValueError:
        return (0,)


def kind_for(version: tuple[int, ...]) -> Hnsw:
    """The kind of index a server with this pgvector gets: half precision from 0.7 on."""
    return HALFVEC if version >= HALFVEC_SINCE else VECTOR


def present(dim: int) -> dict[str, bool]:
    """The indexes of dim's vectors that exist, of any kind: name -> whether valid."""
    return {name: valid for name, valid in db.session.execute(text(PRESENT), {"names": names(dim)})}
