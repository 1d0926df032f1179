"""Requests under writes: reads see one snapshot of the store, so no request fails
because users, items or events were written while it ran.

The issue: 8 threads mixing /recommend, /search and /feedback from new users gave HTTP
500 on some recommend calls (KeyError in build_training_data: users created between its
SELECTs)."""
from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
from sqlalchemy import event

from polyrec import Engine
from polyrec.rank.dataset import build_training_data


def _open(path, **kw) -> Engine:
    return Engine(path, device="cpu", entrypoints=False, progress=False, **kw)


# -- the race, made deterministic ---------------------------------------------------------
def _small_store(eng: Engine) -> None:
    eng.add_items([{"external_id": f"i{n}", "title": f"item {n}"} for n in range(10)])
    eng.add_interactions([{"user": f"u{n}", "item": f"i{n % 10}", "kind": "click", "ts": n}
                          for n in range(30)])


def _write_between_selects(eng: Engine, path) -> list[int]:
    """Before the store's interactions SELECT runs, commit a new user and their event,
    and an event of a known user, from another connection (what concurrent /feedback
    calls do)."""
    written: list[int] = []

    def before(_conn, _cursor, statement, *_a) -> None:
        if "FROM interactions" in statement and not written:
            con = sqlite3.connect(path, timeout=30)
            try:
                cur = con.execute("INSERT INTO users (external_id, attributes, created_at, "
                                  "updated_at) VALUES ('late', '{}', 0, 0)")
                con.execute("INSERT INTO interactions (user_id, item_id, kind, ts, dedup_key) "
                            "VALUES (?, 1, 'click', 99, 'late-key')", (cur.lastrowid,))
                con.execute("INSERT INTO interactions (user_id, item_id, kind, ts, dedup_key) "
                            "VALUES (1, 7, 'click', 99, 'late-key-2')")  # a known user's
                con.commit()
                written.append(int(cur.lastrowid))
            finally:
                con.close()

    event.listen(eng.store.engine, "before_cursor_execute", before)
    # the training data's reads go through the driver's cursor (polyrec.rank.dataset._fetch),
    # which SQLAlchemy's event does not see: the same write before its interactions SELECT
    from polyrec.rank import dataset
    fetch = dataset._fetch

    def fetch_after_write(session, stmt):  # type: ignore[no-untyped-def]
        if "FROM interactions" in str(stmt):
            before(None, None, "FROM interactions")
        return fetch(session, stmt)
    dataset._fetch = fetch_after_write
    return written


def test_training_data_is_read_in_one_snapshot(tmp_path, monkeypatch):
    from polyrec.rank import dataset
    monkeypatch.setattr(dataset, "_fetch", dataset._fetch)  # restored after the test
    path = tmp_path / "race.db"
    with _open(path, encode_on_arrival=False) as eng:
        _small_store(eng)
        written = _write_between_selects(eng, path)
        data = build_training_data(eng)  # before the fix: KeyError (uidx[user])
        assert written, "the write between the SELECTs did not happen"
        assert len(data.user_ids) == 30 and written[0] not in data.user_ids
        assert len(data.users) == 30  # neither late event: one state of the store
        again = build_training_data(eng)  # the next snapshot has the late user and event
        assert written[0] in again.user_ids and len(again.users) == 32


def test_snapshot_sees_one_state_of_the_store(tmp_path):
    from sqlalchemy import func, select

    from polyrec.store.models import User
    path = tmp_path / "snap.db"
    with _open(path, encode_on_arrival=False) as eng:
        _small_store(eng)
        with eng.store.snapshot() as s:
            before = s.execute(select(func.count()).select_from(User)).scalar_one()
            eng.add_users([{"external_id": "new"}])
            assert s.execute(select(func.count()).select_from(User)).scalar_one() == before
        with eng.store.snapshot() as s:
            assert s.execute(select(func.count()).select_from(User)).scalar_one() == before + 1


# -- the HTTP mix --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_db(tmp_path_factory, ml100k_default_db):
    """A copy of the encoded ml-100k store with the default pipeline trained fast
    (conftest.FAST_DEFAULT_PIPELINE)."""
    from conftest import copy_db
    return copy_db(ml100k_default_db[0], tmp_path_factory.mktemp("concurrency"))


class _ServerErrors(logging.Handler):
    """Collects the server's logged exceptions, each as its type, message and innermost
    frames, so a failure says where the server failed (not only that a request did)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            frames = traceback.extract_tb(exc.__traceback__)[-4:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                for f in reversed(frames))
            self.records.append(f"{type(exc).__name__}: {exc} at {where}")
        else:
            self.records.append(record.getMessage())

    def __enter__(self) -> "_ServerErrors":
        logging.getLogger("uvicorn.error").addHandler(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        logging.getLogger("uvicorn.error").removeHandler(self)


QUERIES = ["star wars", "toy story", "comedy about a wedding", "space adventure",
           "crime thriller", "zebra documentary", "romantic drama", "horror 1996"]
THREADS = 8
REQUESTS = 1000


@pytest.mark.slow
def test_mixed_http_load_from_new_users_and_new_items_has_no_errors(tmp_path, trained_db):
    import httpx

    from conftest import copy_db
    from polyrec.serve.app import create_app, start_background
    db = copy_db(trained_db, tmp_path)
    torch.set_num_threads(1)
    with _open(db) as eng, start_background(create_app(eng)) as server, \
            _ServerErrors() as server_errors:
        with httpx.Client(base_url=server.url, timeout=120) as warm:  # load the pipeline once
            assert warm.post("/recommend", json={"user": "1"}).status_code == 200
        errors: list[str] = []
        counts: dict[str, int] = {}
        lock = threading.Lock()
        ticket = iter(range(REQUESTS))

        def client(t: int) -> None:
            rnd = random.Random(t)
            made: list[str] = []  # this thread's new users, with events
            new_items: list[str] = []
            with httpx.Client(base_url=server.url, timeout=120) as http:
                def call(kind: str, method: str, path: str, body: dict) -> None:
                    try:
                        r = http.request(method, path, json=body)
                        ok = r.status_code == 200
                        text = r.text[:300]
                    except Exception as exc:  # noqa: BLE001 - counted as an error
                        ok, text = False, f"{type(exc).__name__}: {exc}"
                    with lock:
                        counts[kind] = counts.get(kind, 0) + 1
                        if not ok:
                            errors.append(f"{kind} {path} {body}: {text}")

                for n in ticket:
                    op = n % 10
                    if op in (0, 1, 2):  # a known user
                        call("recommend", "POST", "/recommend",
                             {"user": str(rnd.randint(1, 943)), "k": 10})
                    elif op in (3, 4):
                        call("search", "POST", "/search",
                             {"query": rnd.choice(QUERIES), "k": 10,
                              "user": str(rnd.randint(1, 943)) if op == 4 else None})
                    elif op == 5:  # a brand-new user's first event, then their recommendations
                        user = f"new-{t}-{n}"
                        item = rnd.choice(new_items) if new_items and rnd.random() < 0.5 \
                            else str(rnd.randint(1, 1682))
                        call("feedback", "POST", "/feedback", {"user": user, "item": item})
                        made.append(user)
                    elif op == 6:
                        user = rnd.choice(made) if made else f"new-{t}-{n}"
                        call("recommend", "POST", "/recommend", {"user": user, "k": 10})
                    elif op == 7:  # a known user's event
                        call("feedback", "POST", "/feedback",
                             {"user": str(rnd.randint(1, 943)), "item": str(rnd.randint(1, 1682)),
                              "kind": "view"})
                    elif op == 8:  # a new item, soon clicked by a new user
                        ident = f"live-{t}-{n}"
                        call("items", "PUT", "/items",
                             {"items": [{"external_id": ident, "title": f"Zebra documentary {n}",
                                         "text": "Zebras crossing a frozen river."}]})
                        new_items.append(ident)
                    else:  # unknown user (popular items) or a new user's search
                        user = rnd.choice(made) if made else f"ghost-{t}-{n}"
                        call("search", "POST", "/search",
                             {"query": rnd.choice(QUERIES), "k": 5, "user": user})

        start = time.monotonic()
        threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(900)
        elapsed = time.monotonic() - start
        assert not any(th.is_alive() for th in threads), "clients did not finish"
        assert sum(counts.values()) == REQUESTS, counts
        assert errors == [], (f"{len(errors)} errors in {elapsed:.0f}s, e.g. {errors[:3]}; "
                              f"server exceptions: {server_errors.records[:3]}")
        assert counts["items"] == REQUESTS // 10
        # the new items were encoded in the background and the recommender serves them
        assert eng.wait_for_encoding(180)
        assert eng.services.arrivals().status()["errors"] == []
        snap = eng.services.recommender().refresh(wait=True)  # after any running refresh
        assert snap.data.n_items == 1682 + REQUESTS // 10
        present = snap.data.item_features["text"][1]
        assert bool(present.all())
