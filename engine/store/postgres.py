"""What the store does differently on PostgreSQL: the full-text column of ``items``, the
advisory locks that serialise schema changes of processes opening one database at once
(and other read-check-write steps, e.g. the live model pointer), and whether the server
has pgvector.

The full-text document is a stored generated column (``items.search_doc``, a
``tsvector`` with a GIN index): PostgreSQL keeps it in step with every insert and update
itself, so lexical search never has to sync anything. Title words weigh A, attribute
values B, text D (the weights of :data:`polyrec.retrieve.lexical.FIELD_WEIGHTS`).
"""
from __future__ import annotations

import hashlib

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

#: The generated tsvector column of ``items`` and its text-search configuration.
FTS_COLUMN = "search_doc"
FTS_CONFIG = "english"
FTS_INDEX = "ix_items_search_doc"

#: The key of the advisory lock held while a process creates or upgrades the schema.
SCHEMA_LOCK = 0x706F6C79  # "poly"

_FTS_EXPRESSION = (
    f"setweight(to_tsvector('{FTS_CONFIG}', coalesce(title, '')), 'A') || "
    f"setweight(jsonb_to_tsvector('{FTS_CONFIG}', coalesce(attributes::jsonb, '{{}}'::jsonb), "
    "'[\"string\", \"numeric\"]'), 'B') || "
    f"setweight(to_tsvector('{FTS_CONFIG}', coalesce(text, '')), 'D')")


def is_postgres(conn: Connection) -> bool:
    """Whether ``conn`` is a PostgreSQL connection."""
    return conn.dialect.name == "postgresql"


def lock_schema(conn: Connection) -> None:
    """Hold the schema lock until ``conn``'s transaction ends (PostgreSQL; no-op elsewhere:
    SQLite serialises writers itself)."""
    if is_postgres(conn):
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK})


def lock_named(conn: Connection | Session, name: str) -> None:
    """Hold an advisory lock named ``name`` until the transaction ends (PostgreSQL;
    no-op elsewhere: SQLite's first write of a transaction locks the whole database).
    For read-check-write sequences whose rows may not exist yet (row locks need a row)."""
    bind = conn.get_bind() if isinstance(conn, Session) else conn
    if bind.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big",
                             signed=True)
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def ensure_fulltext(conn: Connection) -> None:
    """Add the generated full-text column of ``items`` and its GIN index when missing
    (looked up first: ALTER TABLE would lock the table even when there is nothing to do)."""
    found = conn.execute(text(
        "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'items' AND column_name = :c"), {"c": FTS_COLUMN}).first()
    if found:
        return
    conn.execute(text(f"ALTER TABLE items ADD COLUMN IF NOT EXISTS {FTS_COLUMN} tsvector "
                      f"GENERATED ALWAYS AS ({_FTS_EXPRESSION}) STORED"))
    conn.execute(text(f"CREATE INDEX IF NOT EXISTS {FTS_INDEX} ON items USING GIN ({FTS_COLUMN})"))


def has_pgvector(conn: Connection) -> bool:
    """Whether the server can provide the ``vector`` extension (pgvector)."""
    if not is_postgres(conn):
        return False
    return bool(conn.execute(text(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).first())
