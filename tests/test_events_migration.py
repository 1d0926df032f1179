"""Schema migrations on SQLite and PostgreSQL: a version-1 database (before the feedback
tables), a version-2 one (before the items.updated_at index and, on PostgreSQL, the
full-text column) and a version-3 one (before items.retired_at) are upgraded in place,
by opening them or by `polyrec migrate`."""
from __future__ import annotations

import json

from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.store import postgres
from polyrec.store.migrations import SCHEMA_VERSION
from polyrec.store.models import V2_TABLES, Base

V2_NAMES = {m.__tablename__ for m in V2_TABLES}


def _make_old(url: str, version: int) -> None:
    """A database as polyrec schema version 1, 2 or 3 wrote it, with some rows."""
    sa = create_engine(url)
    skip = V2_NAMES if version == 1 else set()
    with sa.begin() as conn:
        Base.metadata.create_all(conn, tables=[t for t in Base.metadata.sorted_tables
                                               if t.name not in skip])
        conn.execute(text("drop index ix_items_retired"))  # added by version 4
        conn.execute(text("alter table items drop column retired_at"))
        if version < 3:
            conn.execute(text("drop index ix_items_updated_at"))  # added by version 3
        elif postgres.is_postgres(conn):  # version 3's full-text column of items
            postgres.ensure_fulltext(conn)
        conn.execute(text(f"insert into meta (key, value) values ('schema_version', '{version}')"))
        conn.execute(text("insert into items (id, external_id, title, attributes, created_at, updated_at) "
                          "values (1, 'm1', 'Heat', '{\"genre\": \"crime\"}', 1, 1), "
                          "(2, 'm2', 'Alien', '{}', 1, 1)"))
        conn.execute(text("insert into users (id, external_id, attributes, created_at, updated_at) "
                          "values (1, 'u1', '{\"age\": 30}', 1, 1)"))
        conn.execute(text("insert into interactions (user_id, item_id, kind, value, ts, dedup_key) "
                          "values (1, 1, 'rating', 5, 10, 'k1'), (1, 2, 'click', null, 11, 'k2')"))
    sa.dispose()


def _open(url: str) -> Engine:
    return Engine(url, device="cpu", entrypoints=False, progress=False)


def test_version_1_database_is_upgraded_without_data_loss(store_url):
    _make_old(store_url, 1)
    assert SCHEMA_VERSION >= 3
    with _open(store_url) as eng:
        assert eng.store.previous_version == 1
        tables = set(inspect(eng.store.engine).get_table_names())
        assert V2_NAMES <= tables
        with eng.store.engine.connect() as conn:
            version = conn.execute(text("select value from meta where key='schema_version'")).scalar()
        assert int(version) == SCHEMA_VERSION
        stats = eng.stats()
        assert (stats["items"], stats["users"], stats["interactions"]) == (2, 1, 2)
        assert stats["interactions_by_kind"] == {"rating": 1, "click": 1}
        assert eng.items()[0].attributes == {"genre": "crime"}
        # the new tables work: an event, a setting, an experiment
        eng.feedback("u1", "m2", "purchase")
        from polyrec.feedback.events import set_config
        from polyrec.feedback.experiments import create
        set_config(eng, {"online.decay": 0.5})
        create(eng, "ab", {"a": 1, "b": 1})
        assert eng.stats()["interactions"] == 3
    with _open(store_url) as eng:  # idempotent reopen
        assert eng.store.previous_version == SCHEMA_VERSION
        assert eng.stats()["interactions"] == 3


def _cli(url: str, *args: str):
    return CliRunner().invoke(cli, ["--db", url, *args])


def test_migrate_upgrades_a_version_2_database(store_url):
    _make_old(store_url, 2)
    backend = "postgresql" if store_url.startswith("postgresql") else "sqlite"
    check = _cli(store_url, "migrate", "--check")
    assert check.exit_code == 1 and f"schema version 2 ({backend}): needs an upgrade" in check.output
    inspector = inspect(create_engine(store_url))
    assert "ix_items_updated_at" not in {i["name"] for i in inspector.get_indexes("items")}
    done = _cli(store_url, "migrate", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.output) == {"backend": backend, "from_version": 2,
                                       "to_version": SCHEMA_VERSION, "latest": SCHEMA_VERSION,
                                       "upgraded": True}
    sa = create_engine(store_url)
    indexes = {i["name"] for i in inspect(sa).get_indexes("items")}
    columns = {c["name"] for c in inspect(sa).get_columns("items")}
    sa.dispose()
    assert "ix_items_updated_at" in indexes
    if backend == "postgresql":  # the full-text column, filled for the rows already there
        assert "search_doc" in columns and "ix_items_search_doc" in indexes
    again = _cli(store_url, "migrate")
    assert again.exit_code == 0 and f"schema version {SCHEMA_VERSION} ({backend}): up to date" in again.output
    assert _cli(store_url, "migrate", "--check").exit_code == 0
    with _open(store_url) as eng:
        assert eng.store.previous_version == SCHEMA_VERSION
        assert eng.stats()["interactions"] == 2 and eng.items()[0].attributes == {"genre": "crime"}
        assert eng.search("heat crime", 5, weights={"dense": 0.0}).ids()[:1] == ["m1"]


def test_migrate_refuses_what_is_not_a_polyrec_database(tmp_path, pg_url):
    missing = _cli(str(tmp_path / "none.db"), "migrate")
    assert missing.exit_code == 1 and "no polyrec database" in missing.output
    empty = _cli(pg_url, "migrate")  # an empty PostgreSQL database: nothing is created
    assert empty.exit_code == 1 and "not a polyrec database" in empty.output
    assert inspect(create_engine(pg_url)).get_table_names() == []


def test_version_3_database_gets_retired_items(store_url):
    """Version 4 adds items.retired_at (every stored item stays live) and the partial
    index of retired items; retiring then works on the upgraded database."""
    _make_old(store_url, 3)
    sa = create_engine(store_url)
    assert "retired_at" not in {c["name"] for c in inspect(sa).get_columns("items")}
    sa.dispose()
    with _open(store_url) as eng:
        assert eng.store.previous_version == 3
        inspector = inspect(eng.store.engine)
        assert "retired_at" in {c["name"] for c in inspector.get_columns("items")}
        assert "ix_items_retired" in {i["name"] for i in inspector.get_indexes("items")}
        assert eng.list_items(retired=True) == [] and eng.stats()["retired_items"] == 0
        assert eng.search("heat", 5, weights={"dense": 0.0}).ids()[:1] == ["m1"]
        assert eng.retire_items(["m1"]).changed == ["m1"]
        assert eng.search("heat", 5, weights={"dense": 0.0}).ids() == []
        assert [r["item"] for r in eng.list_items(retired=True)] == ["m1"]
        assert eng.stats()["interactions"] == 2  # its history stays
    with _open(store_url) as eng:  # idempotent reopen; the state is kept
        assert eng.store.previous_version == SCHEMA_VERSION
        assert eng.stats()["retired_items"] == 1
