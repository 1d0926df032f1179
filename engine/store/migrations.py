"""Schema versions. A new database is created at the latest version; an older one is
upgraded step by step, each step in its own transaction (on PostgreSQL under an advisory
lock, so processes opening one database at once upgrade it once)."""
from __future__ import annotations

from typing import Callable

from sqlalchemy import Connection, inspect, select, text

from polyrec.errors import PolyrecError
from polyrec.store import postgres
from polyrec.store.models import V2_TABLES, Base, Item, Meta

#: Upgrade steps: MIGRATIONS[v] takes a database from version v to v + 1.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


def migration(from_version: int) -> Callable[[Callable[[Connection], None]], Callable[[Connection], None]]:
    """Decorator registering the step from ``from_version`` to ``from_version + 1``."""
    def wrap(fn: Callable[[Connection], None]) -> Callable[[Connection], None]:
        MIGRATIONS[from_version] = fn
        return fn
    return wrap


def _dialect_extras(conn: Connection) -> None:
    """Schema parts one backend has and the models do not declare (PostgreSQL: the
    full-text column of items and its GIN index, polyrec.store.postgres)."""
    if postgres.is_postgres(conn):
        postgres.ensure_fulltext(conn)


@migration(1)
def _v1_to_v2(conn: Connection) -> None:
    """Version 2 adds the feedback tables: settings, user_states, learner_states,
    experiments, experiment_assignments. Existing tables and rows are untouched."""
    for model in V2_TABLES:
        model.__table__.create(conn, checkfirst=True)


@migration(2)
def _v2_to_v3(conn: Connection) -> None:
    """Version 3: an index on ``items.updated_at`` (what changed since a time: the items'
    signature that serving processes poll, the lexical index's incremental sync) and, on
    PostgreSQL, the generated full-text column of items with its GIN index."""
    for index in Item.__table__.indexes:
        if index.name == "ix_items_updated_at":
            index.create(conn, checkfirst=True)
    _dialect_extras(conn)


@migration(3)
def _v3_to_v4(conn: Connection) -> None:
    """Version 4: ``items.retired_at`` (None: live; else when the item was retired: kept
    with its history, never served; polyrec.store.lifecycle) and a partial index of the
    retired items. Every existing item stays live."""
    columns = {c["name"] for c in inspect(conn).get_columns("items")}
    if "retired_at" not in columns:
        column = Item.__table__.c.retired_at
        kind = column.type.compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE items ADD COLUMN retired_at {kind}"))
    for index in Item.__table__.indexes:
        if index.name == "ix_items_retired":
            index.create(conn, checkfirst=True)


SCHEMA_VERSION = 1 + len(MIGRATIONS)


def current_version(conn: Connection) -> int | None:
    """The stored schema version; None for an empty database."""
    if not inspect(conn).has_table("meta"):
        return None
    row = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
    return int(row) if row is not None else None


def stored_version(engine) -> int | None:  # type: ignore[no-untyped-def]
    """The schema version of the database at ``engine``, read without changing anything."""
    with engine.connect() as conn:
        return current_version(conn)


def _set_version(conn: Connection, version: int) -> None:
    table = Meta.__table__
    if conn.execute(select(Meta.key).where(Meta.key == "schema_version")).first():
        conn.execute(table.update().where(table.c.key == "schema_version").values(value=str(version)))
    else:
        conn.execute(table.insert().values(key="schema_version", value=str(version)))


def upgrade(engine) -> int:  # type: ignore[no-untyped-def]
    """Bring the database at ``engine`` to SCHEMA_VERSION; return the version it had."""
    latest = SCHEMA_VERSION
    with engine.begin() as conn:
        postgres.lock_schema(conn)
        found = current_version(conn)
        if found is None:
            Base.metadata.create_all(conn)
            _dialect_extras(conn)
            _set_version(conn, latest)
            return latest
    if found > latest:
        raise PolyrecError(f"the database has schema version {found}, newer than this polyrec "
                           f"understands ({latest}); upgrade polyrec")
    for version in range(found, latest):
        with engine.begin() as conn:
            postgres.lock_schema(conn)
            if current_version(conn) != version:  # another process did this step meanwhile
                continue
            MIGRATIONS[version](conn)
            _set_version(conn, version + 1)
    with engine.begin() as conn:  # tables added by later versions that need no data step
        postgres.lock_schema(conn)
        Base.metadata.create_all(conn)
    return found
