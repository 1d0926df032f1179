"""Issue 12, forget a user: Engine.forget_user / `polyrec forget-user` / DELETE /users/{id}
remove the user, their interactions, online state and experiment assignments in one
transaction, drop them from the live model's serving state at once, and leave a
tombstone so that re-ingesting an old file does not bring them back unless asked."""
from __future__ import annotations

import sqlite3

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from polyrec import Engine
from polyrec.errors import NotFoundError
from polyrec.store.models import (ExperimentAssignment, ForgottenUser, Interaction, User,
                                  UserState)

ITEMS = [f"i{n}" for n in range(12)]
USERS = [f"u{n}" for n in range(15)]
TOKEN = "t0k"


def events_csv() -> str:
    rows = ["user,item,kind,ts"]
    for n, user in enumerate(USERS):
        for j in range(5):
            rows.append(f"{user},{ITEMS[(n + 2 * j) % len(ITEMS)]},click,{100 * n + j}")
    return "\n".join(rows) + "\n"


@pytest.fixture
def eng(tmp_path, one_thread):
    with Engine(tmp_path / "f.db", device="cpu", entrypoints=False, progress=False,
                encode_on_arrival=False) as engine:
        engine.add_items([{"external_id": i, "title": i.upper()} for i in ITEMS])
        (tmp_path / "events.csv").write_text(events_csv())
        engine.ingest(tmp_path / "events.csv", "interactions")
        yield engine


def counts(eng: Engine, user: str) -> dict[str, int]:
    with eng.store.session() as s:
        uid = s.execute(select(User.id).where(User.external_id == user)).scalar()
        if uid is None:
            return {"user": 0, "interactions": 0, "user_states": 0, "assignments": 0}
        n = lambda model: s.execute(select(func.count()).select_from(model)  # noqa: E731
                                    .where(model.user_id == uid)).scalar_one()
        return {"user": 1, "interactions": n(Interaction), "user_states": n(UserState),
                "assignments": n(ExperimentAssignment)}


def with_online_state_and_experiment(eng: Engine, user: str) -> None:
    from polyrec.feedback.experiments import create
    create(eng, "ab", {"a": 1, "b": 1})
    eng.feedback(user, "i3", "click")  # an experiment assignment
    with eng.store.session() as s:  # an online learner's state, as it stores one
        uid = s.execute(select(User.id).where(User.external_id == user)).scalar_one()
        s.add(UserState(user_id=uid, learner="online", space="test", dim=2,
                        vector=b"\0" * 8, weight=1.0, n_events=1))
    assert counts(eng, user) == {"user": 1, "interactions": 6, "user_states": 1,
                                 "assignments": 1}


def test_forget_user_removes_everything_of_the_user_only(eng):
    eng.train("ease", options={"l2": 10.0}, force=True)
    with_online_state_and_experiment(eng, "u1")
    before_u2 = counts(eng, "u2")
    report = eng.forget_user("u1")
    assert report == {"user": "u1", "interactions": 6, "user_states": 1,
                      "experiment_assignments": 1, "tombstone": True}
    assert counts(eng, "u1") == {"user": 0, "interactions": 0, "user_states": 0,
                                 "assignments": 0}
    assert counts(eng, "u2") == before_u2
    with pytest.raises(NotFoundError, match="unknown user 'u1'"):
        eng.forget_user("u1")


def test_forget_user_is_one_transaction(eng, monkeypatch):
    with_online_state_and_experiment(eng, "u1")
    before = counts(eng, "u1")
    from polyrec.store import catalog

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk full")  # fails at the last step: the tombstone

    monkeypatch.setattr(catalog, "dialect_insert", broken)
    with pytest.raises(RuntimeError):
        eng.forget_user("u1")
    assert counts(eng, "u1") == before  # nothing of it was deleted


def test_the_live_model_stops_serving_the_user_at_once(eng):
    from fastapi.testclient import TestClient

    from polyrec.serve.app import create_app
    eng.train("ease", options={"l2": 10.0}, force=True)
    client = TestClient(create_app(eng, token=TOKEN))
    assert client.post("/recommend", json={"user": "u1", "k": 3}).json()["basis"] == "model"
    assert eng.recommend("u1", 3)
    rec = eng.services.started("recommender")
    with eng.store.session() as s:
        uid = s.execute(select(User.id).where(User.external_id == "u1")).scalar_one()
    assert uid in rec.snapshot().user_index
    eng.forget_user("u1")
    snap = rec.snapshot()  # swapped by forget_user itself, before any request
    assert uid not in snap.user_index and uid not in snap.data.user_ids
    with pytest.raises(NotFoundError):
        eng.recommend("u1", 3)
    body = client.post("/recommend", json={"user": "u1", "k": 3}).json()
    assert body["basis"] == "popular"


def test_a_tombstone_keeps_old_files_from_bringing_the_user_back(eng, tmp_path):
    eng.forget_user("u1")
    con = sqlite3.connect(eng.url.removeprefix("sqlite:///"))
    stored = [r[0] for r in con.execute("SELECT id_hash FROM forgotten_users")]
    con.close()
    assert len(stored) == 1 and "u1" not in stored[0]  # a hash, never the id
    users = tmp_path / "users.csv"
    users.write_text("user_id,age\nu1,30\nu2,40\n")
    report = eng.ingest(tmp_path / "events.csv", "interactions")
    assert (report.rows, report.forgotten, report.new) == (75, 5, 0)
    assert "rows of forgotten users left out" in report.summary()
    assert eng.ingest(users, "users").forgotten == 1
    assert counts(eng, "u1")["user"] == 0
    restored = eng.ingest(tmp_path / "events.csv", "interactions", include_forgotten=True)
    assert restored.forgotten == 0 and restored.new == 5
    assert counts(eng, "u1")["interactions"] == 5
    with eng.store.session() as s:
        assert s.execute(select(func.count()).select_from(ForgottenUser)).scalar_one() == 0


def test_no_tombstone_when_asked(eng, tmp_path):
    eng.forget_user("u1", tombstone=False)
    assert eng.ingest(tmp_path / "events.csv", "interactions").new == 5


def test_cli_forget_user(eng, tmp_path):
    from polyrec.cli.main import cli
    db = eng.url.removeprefix("sqlite:///")
    run = lambda *a: CliRunner().invoke(cli, ["--db", db, "-q", *a])  # noqa: E731
    result = run("forget-user", "u3")
    assert result.exit_code == 0, result.output
    assert "Forgot user 'u3': 5 interactions" in result.stdout and "tombstone" in result.stdout
    missing = run("forget-user", "u3")
    assert missing.exit_code == 1 and missing.stderr.strip() == "Error: unknown user 'u3'"
    again = run("ingest", "interactions", str(tmp_path / "events.csv"), "--json")
    assert '"forgotten": 5' in again.stdout
    assert run("ingest", "interactions", str(tmp_path / "events.csv"),
               "--include-forgotten").exit_code == 0
    assert counts(eng, "u3")["interactions"] == 5


def test_http_delete_user_needs_the_token(eng):
    from fastapi.testclient import TestClient

    from polyrec.serve.app import create_app
    client = TestClient(create_app(eng, token=TOKEN))
    assert client.delete("/users/u4").status_code == 401
    assert counts(eng, "u4")["user"] == 1
    r = client.delete("/users/u4", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["interactions"] == 5
    assert counts(eng, "u4")["user"] == 0
    r = client.delete("/users/u4", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    assert "DELETE" in str(client.get("/openapi.json").json()["paths"]["/users/{user}"]).upper()


def test_learners_drop_the_user_from_memory(tmp_path):
    from polyrec import FeedbackLearner, hookimpl
    forgotten: list[int] = []
    built: list[int] = []

    class Memory(FeedbackLearner):
        name = "memory"

        def __init__(self, context=None, **options):  # type: ignore[no-untyped-def]
            super().__init__(context, **options)
            self.seen: set[int] = set()
            built.append(1)

        def observe(self, events):  # type: ignore[no-untyped-def]
            self.seen.update(e.user_id for e in events)

        def forget_user(self, user_id: int) -> None:
            forgotten.append(user_id)
            self.seen.discard(user_id)

    class Plugin:
        @hookimpl
        def register_feedback_learners(self, register):  # type: ignore[no-untyped-def]
            register(Memory)

    with Engine(tmp_path / "m.db", device="cpu", entrypoints=False, progress=False,
                plugins=[Plugin()], encode_on_arrival=False) as eng:
        eng.add_items([{"external_id": "i1"}])
        eng.feedback("u1", "i1", "click")
        learner = eng.services.feedback().learner("memory")
        uid = next(iter(learner.seen))
        eng.forget_user("u1")
        assert forgotten == [uid] and uid not in learner.seen
        assert eng.services.feedback().learner("memory") is not learner  # rebuilt
        assert len(built) == 2
