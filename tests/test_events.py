"""Events: validation, users created on the fly, unknown items refused, idempotent
retries, settings, and the order 'stored durably first, then learners observe'."""
from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner
from sqlalchemy import delete, select

from polyrec import Engine, FeedbackLearner, hookimpl
from polyrec.cli.main import cli
from polyrec.errors import ConfigError, NotFoundError, ValidationError
from polyrec.feedback.events import event_weight, hub, load_config, set_config


@pytest.fixture
def engine(store_engine):
    """The tests taking ``engine`` run on SQLite and on PostgreSQL (tests/conftest.py)."""
    return store_engine


def _items(eng: Engine, n: int = 5) -> None:
    eng.add_items([{"external_id": f"i{i}", "title": f"item {i}"} for i in range(n)])


def _count(eng: Engine) -> int:
    return eng.stats()["interactions"]


def test_feedback_stores_the_event_and_creates_the_user(engine):
    _items(engine)
    event = engine.feedback("alice", "i1", "cart", value=2.0, ts=100.0, context={"page": "home"})
    assert event.id > 0 and event.new and event.kind == "cart" and event.weight == 2.0
    assert (event.user, event.item, event.value, event.ts) == ("alice", "i1", 2.0, 100.0)
    stats = engine.stats()
    assert stats["users"] == 1 and stats["interactions_by_kind"] == {"cart": 1}


@pytest.mark.parametrize("kind", ["impression", "view", "click", "cart", "purchase", "skip"])
def test_every_kind_is_accepted(engine, kind):
    _items(engine)
    assert engine.feedback("u", "i0", kind).kind == kind


def test_unknown_item_is_refused_and_nothing_stored(engine):
    _items(engine)
    with pytest.raises(NotFoundError, match="unknown item 'ghost'"):
        engine.feedback("alice", "ghost", "click")
    with pytest.raises(NotFoundError):
        engine.feedback_many([{"user": "bob", "item": "i1"}, {"user": "bob", "item": "ghost"}])
    stats = engine.stats()
    assert stats["interactions"] == 0 and stats["users"] == 0


def test_bad_events_are_refused(engine):
    _items(engine)
    with pytest.raises(ValidationError, match="unknown event kind 'like'"):
        engine.feedback("u", "i1", "like")
    with pytest.raises(ValidationError, match="needs a value"):
        engine.feedback("u", "i1", "rating")
    with pytest.raises(ValidationError, match="field 'ts'"):
        engine.feedback_many([{"user": "u", "item": "i1", "ts": "yesterday"}])
    with pytest.raises(ValidationError, match="row 2, field 'value': not a finite number"):
        engine.feedback_many([{"user": "u", "item": "i1"},
                              {"user": "u", "item": "i1", "kind": "rating", "value": float("nan")}])
    with pytest.raises(ValidationError, match="missing user"):
        engine.feedback("", "i1")
    assert _count(engine) == 0


def test_event_id_makes_retries_idempotent(engine):
    _items(engine)
    first = engine.feedback("u", "i1", "click", context={"event_id": "abc"})
    again = engine.feedback("u", "i1", "click", context={"event_id": "abc"})
    assert first.new and not again.new and again.id == first.id
    assert _count(engine) == 1
    assert engine.feedback("u", "i1", "click").id != first.id  # no event_id: always new


def test_batches_are_stored_in_order(engine):
    _items(engine)
    stored = engine.feedback_many([{"user": f"u{n % 3}", "item": f"i{n % 5}", "kind": "view"}
                                   for n in range(50)])
    assert [e.id for e in stored] == sorted(e.id for e in stored)
    assert [e.user for e in stored] == [f"u{n % 3}" for n in range(50)]
    assert _count(engine) == 50 and engine.stats()["users"] == 3


class _Witness(FeedbackLearner):
    """Checks, from a separate SQLite connection, that each event is committed."""

    name = "witness"
    seen: list[tuple[int, bool]] = []

    def __init__(self, engine=None, **options):
        super().__init__(**options)
        self.path = engine.store.engine.url.database

    def observe(self, events):
        con = sqlite3.connect(self.path)
        try:
            for e in events:
                found = con.execute("select count(*) from interactions where id = ?", (e.id,)).fetchone()[0]
                type(self).seen.append((e.id, found == 1))
        finally:
            con.close()


class _Broken(FeedbackLearner):
    name = "broken"

    def observe(self, events):
        raise RuntimeError("boom")


class _WitnessPlugin:
    @hookimpl
    def register_feedback_learners(self, register):
        register(_Witness)
        register(_Broken)


def test_events_are_durable_before_learners_see_them(tmp_path):
    _Witness.seen = []
    with Engine(tmp_path / "w.db", device="cpu", entrypoints=False, progress=False,
                plugins=[_WitnessPlugin()]) as eng:
        _items(eng)
        a = eng.feedback("u", "i1", "click")
        batch = eng.feedback_many([{"user": "v", "item": "i2"}, {"user": "w", "item": "i3"}])
        assert _Witness.seen == [(a.id, True), (batch[0].id, True), (batch[1].id, True)]
        # the broken learner did not cost the events, and its failure is recorded
        assert _count(eng) == 3
        assert any("broken" in e for e in hub(eng).errors)


def test_handoff_gives_bulk_ingested_events_to_the_learners(tmp_path, monkeypatch):
    _Witness.seen = []
    with Engine(tmp_path / "h.db", device="cpu", entrypoints=False, progress=False,
                plugins=[_WitnessPlugin()]) as eng:
        _items(eng)
        from polyrec.feedback.events import handoff, last_event_id
        cursor = last_event_id(eng)
        eng.add_interactions([{"user": "x", "item": f"i{n}", "kind": "view", "ts": n}
                              for n in range(5)])
        assert [ok for _, ok in _Witness.seen] == [True] * 5  # add_interactions informs them
        _Witness.seen = []
        assert handoff(eng, cursor) == 5  # handoff hands the stored log over again
        assert [ok for _, ok in _Witness.seen] == [True] * 5
        # in batches of 2 (stored_events windows a kinds filter): every event once, in order, across a gap
        from polyrec.store.models import Interaction
        with eng.store.session() as s:
            ids = sorted(s.scalars(select(Interaction.id)).all())[-5:]
            s.execute(delete(Interaction).where(Interaction.id == ids[1]))
        _Witness.seen = []
        assert hub(eng).handoff(cursor, batch=2) == 4
        assert [i for i, _ in _Witness.seen] == [ids[0], *ids[2:]]
        # some kinds with a limit: read in windows of ids (2 here), the same events
        from polyrec.feedback import events as ev
        want = [e.id for e in ev.stored_events(eng, after_id=cursor)]
        monkeypatch.setattr(ev, "WINDOW", 2)
        got, at = [], cursor
        while batch := ev.stored_events(eng, after_id=at, kinds=["view"], limit=3):
            assert len(batch) <= 3
            got, at = got + [e.id for e in batch], batch[-1].id
        assert got == want and len(got) == 4


def test_settings_are_stored_and_checked(tmp_path):
    db = tmp_path / "cfg.db"
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        _items(eng)
        set_config(eng, {"kind_weights.click": "2.5", "kind_weights.share": 1.5,
                         "bandit.serving": "true"})
        assert eng.feedback("u", "i1", "click").weight == 2.5
        assert eng.feedback("u", "i1", "share").weight == 1.5  # a configured new kind
        with pytest.raises(ConfigError, match="unknown feedback setting"):
            set_config(eng, {"online.nope": 1})
        with pytest.raises(ConfigError, match="must be a number"):
            set_config(eng, {"online.decay": "fast"})
        with pytest.raises(ConfigError, match="true or false"):
            set_config(eng, {"bandit.serving": 1})
        with pytest.raises(ConfigError, match="'online': decay must be in"):
            set_config(eng, {"online.decay": 1.5})
        with pytest.raises(ConfigError, match="'bandit': share must be in"):
            set_config(eng, {"bandit.share": -0.1})
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        config = load_config(eng)
        assert config["kind_weights"]["click"] == 2.5 and config["bandit"]["serving"] is True
        assert config["online"]["decay"] == 0.9  # defaults fill what was not set


def test_event_weight_of_ratings():
    config = {"kind_weights": {"rating": 1.0}, "rating": {"center": 3.0, "scale": 2.0}}
    assert event_weight("rating", 5, config) == 1.0
    assert event_weight("rating", 2, config) == -0.5
    assert event_weight("rating", None, config) == 0.0
    assert event_weight("unknown", None, config) == 0.0


def test_cli_send_config_and_state(tmp_path):
    db = str(tmp_path / "c.db")
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        _items(eng)
    runner = CliRunner()
    out = runner.invoke(cli, ["--db", db, "feedback", "send", "carol", "i2", "--kind", "purchase",
                              "--context", '{"event_id": "p1"}'])
    assert out.exit_code == 0, out.output
    assert "stored event 1: carol purchase i2" in out.output
    again = runner.invoke(cli, ["--db", db, "feedback", "send", "carol", "i2", "--kind", "purchase",
                                "--context", '{"event_id": "p1"}', "--json"])
    assert '"new": false' in again.output
    bad = runner.invoke(cli, ["--db", db, "feedback", "send", "carol", "nope"])
    assert bad.exit_code == 1 and "unknown item 'nope'" in bad.output
    cfg = runner.invoke(cli, ["--db", db, "feedback", "config", "--set", "online.decay=0.7", "--json"])
    assert cfg.exit_code == 0 and '"decay": 0.7' in cfg.output
    state = runner.invoke(cli, ["--db", db, "feedback", "state", "carol", "--json"])
    assert state.exit_code == 0 and '"bandit"' in state.output, state.output
    missing = runner.invoke(cli, ["--db", db, "feedback", "state", "nobody"])
    assert missing.exit_code == 1 and "unknown user" in missing.output


def test_cli_stream_acknowledges_each_stored_event(tmp_path):
    """Acknowledgements come per stored event; a bad line stops the stream, naming its
    line, after every line before it was stored. (tests/test_kill_events.py runs the
    same command in a real process and kills it.)"""
    db = str(tmp_path / "s.db")
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        _items(eng)
    lines = "".join(f'{{"user": "u{n}", "item": "i{n % 5}", "kind": "view", '
                    f'"context": {{"event_id": "e{n}"}}}}\n' for n in range(30))
    out = CliRunner().invoke(cli, ["--db", db, "feedback", "stream", "--batch", "7"],
                             input=lines + '{"user": "u", "item": "ghost"}\n{"user": "v", "item": "i1"}\n')
    assert out.exit_code == 1
    acks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [a["event_id"] for a in acks] == [f"e{n}" for n in range(30)]
    assert all(a["new"] for a in acks)
    assert "stdin, row 31" in out.stderr and "unknown item 'ghost'" in out.stderr
    again = CliRunner().invoke(cli, ["--db", db, "feedback", "stream"], input=lines + "not json\n")
    assert again.exit_code == 1 and "stdin, row 31: not JSON" in again.stderr
    assert all('"new": false' in line for line in again.stdout.splitlines() if line.startswith("{"))
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        assert _count(eng) == 30  # retried event_ids were not stored twice
