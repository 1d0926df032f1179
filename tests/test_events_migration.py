"""Schema version 2 (feedback tables): a version-1 database is upgraded in place."""
from __future__ import annotations

from sqlalchemy import create_engine, inspect, text

from polyrec import Engine
from polyrec.store.migrations import SCHEMA_VERSION
from polyrec.store.models import V2_TABLES, Base

V2_NAMES = {m.__tablename__ for m in V2_TABLES}


def _make_v1(path) -> None:
    """A database as polyrec schema version 1 wrote it, with some rows."""
    sa = create_engine(f"sqlite:///{path}")
    with sa.begin() as conn:
        Base.metadata.create_all(conn, tables=[t for t in Base.metadata.sorted_tables
                                               if t.name not in V2_NAMES])
        conn.execute(text("insert into meta (key, value) values ('schema_version', '1')"))
        conn.execute(text("insert into items (id, external_id, title, attributes, created_at, updated_at) "
                          "values (1, 'm1', 'Heat', '{\"genre\": \"crime\"}', 1, 1), "
                          "(2, 'm2', 'Alien', '{}', 1, 1)"))
        conn.execute(text("insert into users (id, external_id, attributes, created_at, updated_at) "
                          "values (1, 'u1', '{\"age\": 30}', 1, 1)"))
        conn.execute(text("insert into interactions (user_id, item_id, kind, value, ts, dedup_key) "
                          "values (1, 1, 'rating', 5, 10, 'k1'), (1, 2, 'click', null, 11, 'k2')"))
    sa.dispose()


def test_version_1_database_is_upgraded_without_data_loss(tmp_path):
    db = tmp_path / "v1.db"
    _make_v1(db)
    assert SCHEMA_VERSION >= 2
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
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
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:  # idempotent reopen
        assert eng.store.previous_version == SCHEMA_VERSION
        assert eng.stats()["interactions"] == 3
