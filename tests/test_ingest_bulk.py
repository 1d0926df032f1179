"""The bulk paths of interaction ingest (engine/ingest/interactions.py, the bandit's
catch-up in plugins/feedback_bandit.py) give what the plain paths give: the same stored
rows and ids as SQLAlchemy's INSERT, on SQLite and on PostgreSQL (COPY); the same bandit
state as observing the events one at a time; a bad row late in a large file still
names file, row and field, and nothing is written."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Text, cast, select

from polyrec import Engine, ValidationError
from polyrec.feedback.events import Event, hub, stored_events
from polyrec.ingest import interactions
from polyrec.plugins.feedback_bandit import LEARN_KINDS, ThompsonBandit
from polyrec.store.models import Interaction

KINDS = ["click", "purchase", "impression", "skip", "view", "cart", "rating"]


def _open(url: str) -> Engine:
    return Engine(url, device="cpu", entrypoints=False, progress=False)


def _plain_insert(conn, rows, batch):  # type: ignore[no-untyped-def]
    """SQLAlchemy's multi-row INSERT ... RETURNING: the path before the bulk ones."""
    new_ids: dict[str, int] = {}
    for start in range(0, len(rows), batch):
        new_ids.update((k, i) for i, k in conn.execute(interactions._statement(conn, "insert"),
                                                       list(rows[start:start + batch])))
    return new_ids


def _events_file(path: Path, n: int, seed: int, *, bad_row: int | None = None) -> Path:
    """``n`` rows over users u0..u59 and items i0..i39, every kind, ratings with values,
    rows without a time, exact repeats (kept once each), an extra column (context)."""
    rng = random.Random(seed)
    lines = ["user_id,item_id,kind,value,timestamp,page"]
    for r in range(1, n + 1):
        kind = rng.choice(KINDS)
        value = f"{rng.randint(1, 5)}" if kind == "rating" else rng.choice(["", "", "0.5"])
        ts = "" if r % 17 == 0 else str(1_700_000_000 + rng.randint(0, 50) * 0.25)
        page = rng.choice(["", "home", "search"])
        item = "nope" if r == bad_row else f"i{rng.randint(0, 39)}"
        lines.append(f"u{rng.randint(0, 59)},{item},{kind},{value},{ts},{page}")
        if r % 50 == 0:
            lines.append(lines[-1])  # an exact repeat
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(eng: Engine) -> list[tuple]:
    """Every stored interaction; the ts of a row without a time (the time of its
    ingestion) as 'now'."""
    with eng.store.session() as s:
        return [(*r[:5], r[5] if r[5] < 1_750_000_000 else "now", *r[6:]) for r in s.execute(
            select(Interaction.id, Interaction.user_id, Interaction.item_id, Interaction.kind,
                   Interaction.value, Interaction.ts, cast(Interaction.context, Text),
                   Interaction.dedup_key).order_by(Interaction.id))]


def _ingest_twice(url: str, files: list[Path]) -> tuple[list[tuple], list[tuple[int, int]]]:
    with _open(url) as eng:
        eng.add_items([{"external_id": f"i{n}"} for n in range(40)])
        reports = [eng.ingest(f, "interactions", batch_size=700) for f in files]
        return _rows(eng), [(r.written, r.new) for r in reports]


@pytest.fixture
def two_stores(request, tmp_path):
    """Two empty stores of one backend (SQLite files, or PostgreSQL databases)."""
    if request.param == "sqlite":
        yield [f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"]
        return
    server = request.getfixturevalue("pg_server")
    names = ["bulk_a", "bulk_b"]
    urls = [server.create_database(n) for n in names]
    yield urls
    for n in names:
        server.drop_database(n)


@pytest.mark.parametrize("two_stores", ["sqlite", "postgresql"], indirect=True)
def test_bulk_insert_stores_the_rows_the_plain_insert_stores(two_stores, tmp_path, monkeypatch):
    """A file of 2,500 rows (above COPY_MIN_ROWS, several batches), then one overlapping it
    (old and new rows, repeats), through the bulk path and through SQLAlchemy's insert:
    the same rows, ids, contexts (as text) and dedup keys, the same new-row counts."""
    first = _events_file(tmp_path / "a.csv", 2500, seed=1)
    second = _events_file(tmp_path / "b.csv", 3000, seed=1)  # a.csv's rows, then 500 more
    files = [first, second, first]
    monkeypatch.setattr(interactions, "PART", 1100)  # rows made and inserted in parts
    bulk, bulk_counts = _ingest_twice(two_stores[0], files)
    monkeypatch.setattr(interactions, "PART", 10**9)
    monkeypatch.setattr(interactions, "_insert", _plain_insert)
    plain, plain_counts = _ingest_twice(two_stores[1], files)
    assert len(bulk) > 3000
    assert bulk == plain
    assert bulk_counts == plain_counts
    assert bulk_counts[2][1] == 0 and 0 < bulk_counts[1][1] < bulk_counts[1][0]


def test_a_batch_in_parts_returns_what_one_part_returns(tmp_path, monkeypatch):
    """feedback_many over parts of 3 events: the same Events (ids, new flags), an
    event_id repeated in a later part is not new and has the first one's id."""
    def send(db: str) -> list[tuple]:
        with _open(tmp_path / db) as eng:
            eng.add_items([{"external_id": f"i{n}"} for n in range(5)])
            eng.feedback_many([{"user": "a", "item": "i0", "ts": 5,
                                "context": {"event_id": "old"}}])
            batch = [{"user": f"u{n % 4}", "item": f"i{n % 5}", "kind": "click", "ts": n % 3,
                      "context": {"event_id": f"e{n % 7}"} if n % 2 else None}
                     for n in range(20)] + [{"user": "a", "item": "i0", "ts": 99,
                                             "context": {"event_id": "old"}}]
            return [(e.id, e.new, e.user, e.item, e.ts) for e in eng.feedback_many(batch)]

    monkeypatch.setattr(interactions, "PART", 3)
    parts = send("parts.db")
    monkeypatch.setattr(interactions, "PART", 10**9)
    assert parts == send("whole.db")
    assert sum(new for _, new, *_ in parts) == 10 + 7 and not parts[-1][1] and parts[-1][0] == 1
    assert parts[-1][-1] == 5  # the retry is answered as stored (ts 5), not as sent (99)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_bad_row_late_in_a_large_file_writes_nothing(store, tmp_path, request):
    url = (f"sqlite:///{tmp_path / 't.db'}" if store == "sqlite"
           else request.getfixturevalue("pg_url"))
    path = _events_file(tmp_path / "bad.csv", 2500, seed=2, bad_row=2401)
    row = next(n for n, line in enumerate(path.read_text().splitlines()) if ",nope," in line)
    assert row > 2400  # the file's row (the header is line 0): after the repeats
    with _open(url) as eng:
        eng.add_items([{"external_id": f"i{n}"} for n in range(40)])
        with pytest.raises(ValidationError) as err:
            eng.ingest(path, "interactions")
        assert err.value.file == str(path) and err.value.field == "item_id"
        assert err.value.row == row and "(nothing was written)" in str(err.value)
        assert _rows(eng) == []
        # with on_error=skip the others are written, the bad one reported
        report = eng.ingest(path, "interactions", on_error="skip")
        assert report.skipped == 1 and report.errors[0]["row"] == row
        assert len(_rows(eng)) == report.new > 2000


def _event(n: int, user: int, item: int, kind: str, context=None, weight: float = 1.0) -> Event:
    return Event(id=n, user_id=user, item_id=item, user=f"u{user}", item=f"i{item}", kind=kind,
                 value=None, ts=float(n), context=context, weight=weight)


def _mixed_events(n: int, seed: int) -> list[Event]:
    """Impressions (some with their rank or features in the context), clicks and
    purchases after them or not, skips, views (popularity only) and zero-weight kinds."""
    rng = random.Random(seed)
    out = []
    for k in range(1, n + 1):
        kind = rng.choice(["impression", "impression", "click", "purchase", "skip", "view",
                           "cart"])
        context = rng.choice([None, None, {"rank": rng.randint(0, 9)},
                              {"x": [1.0, 0.3, 0.5, 0.2, 0.0, 0.1]}, {"rank": -1}])
        out.append(_event(k, rng.randint(1, 8), rng.randint(1, 30), kind, context,
                          weight=rng.choice([1.0, 0.0])))
    return out


def _state(b: ThompsonBandit) -> tuple:
    return (b.A.tobytes(), b.b.tobytes(), b.impressions, b.rewards, b.last_event_id,
            dict(b.popularity()), b._max_pop,
            {k: v.tobytes() for k, v in b._pending.items()}, list(b._pending))


def test_bandit_batch_learning_equals_one_event_at_a_time(engine):
    """Bit for bit: the posterior sums, counts, popularity and pending impressions."""
    engine.add_items([{"external_id": f"i{n}"} for n in range(40)])
    engine.feedback_many([{"user": "w", "item": f"i{n % 5}", "kind": "view"} for n in range(12)])
    context = hub(engine).context("bandit")
    events = _mixed_events(3000, seed=3)
    whole, single = ThompsonBandit(context, seed=0), ThompsonBandit(context, seed=0)
    whole._loaded = single._loaded = True  # no state or log to catch up with: start at the prior
    for start in range(0, len(events), 1000):
        whole.observe(events[start:start + 1000])
    for e in events:
        single.observe([e])
    assert _state(whole) == _state(single)
    assert whole.impressions > 500 and whole.rewards > 500 and len(whole._pending) > 50
    # and it is not the same as learning the events in another order
    shuffled = ThompsonBandit(context, seed=0)
    shuffled._loaded = True
    mixed = events[:]
    random.Random(0).shuffle(mixed)
    shuffled.observe([Event(**{**e.__dict__, "id": k}) for k, e in enumerate(mixed, start=1)])
    assert _state(shuffled)[:2] != _state(whole)[:2]


def test_a_failure_inside_a_batch_keeps_the_events_before_it_in_the_posterior(engine, monkeypatch):
    """The events of a batch counted before one that fails are in the sums as well: the
    counters and ``last_event_id`` never run ahead of the posterior."""
    engine.add_items([{"external_id": f"i{n}"} for n in range(40)])
    context = hub(engine).context("bandit")
    events = _mixed_events(400, seed=5)
    bad = next(k for k, e in enumerate(events) if k > 200 and e.kind == "impression"
               and not (e.context or {}).get("x"))
    reference, failing = ThompsonBandit(context, seed=0), ThompsonBandit(context, seed=0)
    reference._loaded = failing._loaded = True
    reference.observe(events[:bad])
    real = ThompsonBandit._x_lazy

    def x_lazy(self, event, rows):  # type: ignore[no-untyped-def]
        if event.id == events[bad].id:
            raise RuntimeError("a broken event")
        return real(self, event, rows)
    monkeypatch.setattr(ThompsonBandit, "_x_lazy", x_lazy)
    with pytest.raises(RuntimeError, match="a broken event"):
        failing.observe(events)
    assert failing.last_event_id == events[bad].id
    assert (failing.impressions, failing.rewards) == (reference.impressions, reference.rewards)
    assert failing.rewards > 20
    assert np.array_equal(failing.A, reference.A) and np.array_equal(failing.b, reference.b)


def test_ingest_catch_up_equals_observing_the_log_one_event_at_a_time(store_url, tmp_path):
    """After `ingest`, the bandit (caught up from the log once, not handed the events a
    second time) holds the state of a bandit fed the stored events one by one."""
    path = _events_file(tmp_path / "e.csv", 2500, seed=4)
    with _open(store_url) as eng:
        eng.add_items([{"external_id": f"i{n}"} for n in range(40)])
    with _open(store_url) as eng:  # a fresh process, as `polyrec ingest` is
        h = hub(eng)
        reads = []
        original = h.observe
        h.observe = lambda events: (reads.append(len(events)), original(events))  # type: ignore[method-assign]
        eng.ingest(path, "interactions")
        bandit = h.learner("bandit")
        assert reads == []  # nothing handed over: the bandit read the log itself
        log = stored_events(eng, kinds=sorted(LEARN_KINDS))
        assert bandit.last_event_id == max(e.id for e in stored_events(eng))
        reference = ThompsonBandit(h.context("bandit"))
        reference._loaded = True
        for e in log:
            reference.observe([e])
        assert _state(reference)[:5] == _state(bandit)[:5]
        assert np.array_equal(reference.A, bandit.A) and bandit.rewards > 500


def test_a_failure_while_writing_leaves_nothing_and_the_page_cache_as_it_was(tmp_path, monkeypatch):
    """An error after part of a large file is inserted: the transaction is rolled back
    (nothing stored), the error is the insert's, SQLite's page cache is restored."""
    path = _events_file(tmp_path / "e.csv", 2500, seed=5)
    written = interactions._insert_sqlite_rows
    used = []

    def half_then_fail(conn, rows, n):  # type: ignore[no-untyped-def]
        used.append(conn.connection.driver_connection)  # the sqlite3 connection
        assert used[0].execute("PRAGMA cache_size").fetchone()[0] == -interactions.SQLITE_CACHE_KIB
        written(conn, rows[:len(rows) // 2], n)
        raise RuntimeError("disk on fire")

    with _open(tmp_path / "t.db") as eng:
        eng.add_items([{"external_id": f"i{n}"} for n in range(40)])
        with eng.store.session() as s:
            before = s.connection().exec_driver_sql("PRAGMA cache_size").scalar()
        monkeypatch.setattr(interactions, "_insert_sqlite_rows", half_then_fail)
        monkeypatch.setattr(interactions, "_sqlite_rows_per_statement", lambda conn: 500)
        with pytest.raises(RuntimeError, match="disk on fire"):
            eng.ingest(path, "interactions")
        assert _rows(eng) == []
        assert used[0].execute("PRAGMA cache_size").fetchone()[0] == before
        monkeypatch.setattr(interactions, "_insert_sqlite_rows", written)
        assert eng.ingest(path, "interactions").new == len(_rows(eng)) > 2000
