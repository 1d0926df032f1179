"""The online learner: decayed kind-weighted averages of item vectors, cold start,
persistence across restarts, recovery from the event log, and blending."""
from __future__ import annotations

import torch

from polyrec import Engine
from polyrec.feedback.events import hub, set_config
from polyrec.store.vectors import save_vectors

GENRES = ("action", "comedy", "drama")


def _open(path):
    return Engine(path, device="cpu", entrypoints=False, progress=False)


def _toy_catalogue(eng: Engine, per_genre: int = 10, dim: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Items g0..g9 per genre whose stored 'toy' vectors sit around one centroid per genre."""
    gen = torch.Generator().manual_seed(seed)
    centroids = {g: torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0) * 3
                 for g in GENRES}
    eng.add_items([{"external_id": f"{g}{i}", "title": f"{g} {i}", "attributes": {"genre": g}}
                   for g in GENRES for i in range(per_genre)])
    ids = {v.external_id: v.id for v in eng.items()}
    rows, vecs = [], []
    for g in GENRES:
        for i in range(per_genre):
            rows.append((ids[f"{g}{i}"], f"h{g}{i}"))
            vecs.append(centroids[g] + 0.5 * torch.randn(dim, generator=gen))
    with eng.store.session() as s:
        save_vectors(s, "toy", "fp", rows, torch.stack(vecs), dtype="float32")
    return centroids


def _top_genres(eng: Engine, user: str, k: int = 10) -> list[str]:
    space = hub(eng).item_space()
    state = eng.user_state(user)
    assert state is not None
    scores = space.vectors @ state
    views = {v.id: v for v in eng.items()}
    order = torch.argsort(scores, descending=True)[:k].tolist()
    return [views[space.item_ids[i]].attributes["genre"] for i in order]


def test_first_event_gives_a_cold_user_a_vector(engine):
    _toy_catalogue(engine)
    assert engine.user_state("newbie") is None
    engine.feedback("newbie", "comedy3", "click")
    state = engine.user_state("newbie")
    space = hub(engine).item_space()
    item = space.vector(next(v.id for v in engine.items() if v.external_id == "comedy3"))
    assert state is not None and torch.allclose(state, item, atol=1e-6)


def test_clicks_shift_the_state_to_a_genre(engine):
    _toy_catalogue(engine)
    engine.feedback("u", "action0", "click")
    assert _top_genres(engine, "u", 5).count("action") == 5
    for i in range(3):
        engine.feedback("u", f"drama{i}", "click")
    assert _top_genres(engine, "u", 10).count("drama") >= 8


def test_weights_decay_and_skips(engine):
    _toy_catalogue(engine)
    set_config(engine, {"online.decay": 0.5})
    space = hub(engine).item_space()
    idx = {v.external_id: v.id for v in engine.items()}
    a, c = space.vector(idx["action1"]).double(), space.vector(idx["comedy1"]).double()
    engine.feedback("d", "action1", "click")
    engine.feedback("d", "comedy1", "purchase")  # weight 3, older click decays by 0.5
    expected = (0.5 * 1.0 * a + 3.0 * c) / (0.5 * 1.0 + 3.0)
    assert torch.allclose(engine.user_state("d").double(), expected, atol=1e-5)
    engine.feedback("d", "comedy2", "impression")  # weight 0: no change at all
    assert torch.allclose(engine.user_state("d").double(), expected, atol=1e-5)
    before = float(engine.user_state("d").double() @ c)
    engine.feedback("d", "comedy1", "skip")  # negative weight pushes away
    assert float(engine.user_state("d").double() @ c) < before


def test_an_event_delivered_late_counts_as_old_as_its_time(engine):
    """An event older than ones already folded in (offline clicks synced later) weighs as
    an old event and takes its place by time in the session: it is not the newest."""
    _toy_catalogue(engine)
    set_config(engine, {"online.decay": 0.5})
    space = hub(engine).item_space()
    idx = {v.external_id: v.id for v in engine.items()}
    a, c, d = (space.vector(idx[x]).double() for x in ("action1", "comedy1", "drama1"))
    engine.feedback("late", "action1", "click", ts=1_000)
    engine.feedback("late", "comedy1", "click", ts=2_000)
    engine.feedback("late", "drama1", "click", ts=500)  # arrives last, happened first
    # two later events in the session: 0.5 ** 2; the in-time ones keep their weights
    expected = (0.5 * a + c + 0.25 * d) / (0.5 + 1.0 + 0.25)
    assert torch.allclose(engine.user_state("late").double(), expected, atol=1e-5)
    online = hub(engine).learners["online"].describe(_user_id(engine, "late"))
    assert online["session"] == [idx["drama1"], idx["action1"], idx["comedy1"]]
    assert online["last_ts"] == 2_000


def _user_id(eng: Engine, user: str) -> int:
    from polyrec.store import catalog
    with eng.store.session() as s:
        return catalog.get_user_id(s, user)


def test_rating_weight_follows_the_value(engine):
    _toy_catalogue(engine)
    set_config(engine, {"rating.center": 3.0, "rating.scale": 2.0})
    engine.feedback("r", "drama1", "rating", value=5)
    event = engine.feedback("r", "drama1", "rating", value=1)
    assert event.weight == -1.0
    assert hub(engine).learner("online").strength(hub(engine)._users["r"]) > 0


def test_state_survives_a_restart(tmp_path):
    db = tmp_path / "s.db"
    with _open(db) as eng:
        _toy_catalogue(eng)
        for i in range(3):
            eng.feedback("alice", f"comedy{i}", "click")
        before = eng.user_state("alice").clone()
    with _open(db) as eng:
        from polyrec.store.models import UserState
        with eng.store.session() as s:
            assert s.query(UserState).count() == 1  # flushed on close
        assert torch.allclose(eng.user_state("alice"), before, atol=1e-6)
        assert _top_genres(eng, "alice", 10).count("comedy") >= 8


def test_lost_state_is_rebuilt_from_the_event_log(tmp_path):
    """A crash before the state is flushed loses nothing: events are stored first."""
    db = tmp_path / "c.db"
    eng = _open(db)
    _toy_catalogue(eng)
    for i in range(4):
        eng.feedback("bob", f"action{i}", "click")
    expected = eng.user_state("bob").clone()
    eng.store.close()  # no Engine.close: the in-memory state is never flushed
    with _open(db) as again:
        from polyrec.store.models import UserState
        with again.store.session() as s:
            assert s.query(UserState).count() == 0
        assert torch.allclose(again.user_state("bob"), expected, atol=1e-6)


def test_a_new_space_rebuilds_states(engine):
    _toy_catalogue(engine)
    engine.feedback("eve", "drama0", "click")
    old = engine.user_state("eve").clone()
    ids = {v.external_id: v.id for v in engine.items()}
    with engine.store.session() as s:  # re-encode: a new 'toy' space of other vectors
        save_vectors(s, "toy", "fp2", [(ids["drama0"], "x")], torch.ones(1, old.shape[0]),
                     dtype="float32")
    hub(engine).reset_space()
    new = engine.user_state("eve")
    assert torch.allclose(new, torch.nn.functional.normalize(torch.ones(old.shape[0]), dim=0))


def test_online_scores_blend_into_the_model_scores(engine):
    """What Engine.recommend does with the state: z(model) and z(state . items) blended
    by the user's event weight; unscorable items stay unscorable."""
    from types import SimpleNamespace

    from polyrec.feedback.events import online_scores
    _toy_catalogue(engine)
    set_config(engine, {"online.space": "toy", "online.session_weight": 0})  # the state alone
    ids = [v.id for v in engine.items()]
    rec = SimpleNamespace(version=1, meta={}, data=SimpleNamespace(item_ids=ids))
    model = torch.linspace(1.0, 0.0, len(ids))
    model[5] = float("-inf")
    uid = engine.feedback("m", "drama4", "click").user_id
    out = online_scores(engine, rec, uid, model.clone())
    space = hub(engine).item_space()
    mine = torch.stack([space.vector(i) for i in ids]) @ engine.user_state("m")
    ok = torch.isfinite(model)
    normal = torch.distributions.Normal(0.0, 1.0)

    def g(x):  # normal quantile of each scorable item's rank (best = highest)
        vals = x[ok]
        ranks = torch.tensor([float((vals < v).sum()) for v in vals])
        out = torch.zeros_like(x)
        out[ok] = normal.icdf((ranks + 0.5) / len(vals))
        return out

    share = 1.0 / (1.0 + 6.0)  # one click of weight 1, online.blend 6
    expected = (1 - share) * g(model) + share * g(mine)
    assert torch.allclose(out[ok], expected[ok], atol=1e-4)
    clicked = int(torch.argmax(mine))  # the clicked item itself: it moves up
    assert int((out > out[clicked]).sum()) < int((model > model[clicked]).sum())
    assert out[5] == float("-inf")
    assert torch.equal(online_scores(engine, rec, uid, model.clone(), online=False), model)
    other = engine.feedback("n", "drama0", "impression").user_id  # weight 0: no state
    assert torch.equal(online_scores(engine, rec, other, model.clone()), model)


def test_tied_model_scores_share_their_rank_and_the_newest_items_gain_nothing(engine):
    """A model that cannot tell items apart (EASE for a user whose items co-occur with
    nothing: all zeros) leaves the order to the online state; the items last in the index
    (the newest) get no better quantile than the ones tied with them."""
    from types import SimpleNamespace

    from polyrec.feedback.events import _gauss_ranks, online_scores
    x = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.0, float("-inf"), 2.0])
    g = _gauss_ranks(x, torch.isfinite(x))
    assert g[0] == g[2] == g[4] < g[3] < g[1] == g[6] and g[5] == 0
    # 6 scorable: the three 0s share rank 1 of 0..5, the two 2s rank 4.5
    icdf = torch.distributions.Normal(0.0, 1.0).icdf
    assert torch.allclose(g[[0, 3, 1]], icdf(torch.tensor([1.5, 3.5, 5.0]) / 6), atol=1e-5)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_gauss_ranks(x[perm], torch.isfinite(x[perm])), g[perm])

    _toy_catalogue(engine)
    set_config(engine, {"online.space": "toy", "online.session_weight": 0})
    ids = [v.id for v in engine.items()]
    rec = SimpleNamespace(version=1, meta={}, data=SimpleNamespace(item_ids=ids))
    uid = engine.feedback("m", "comedy4", "click").user_id
    out = online_scores(engine, rec, uid, torch.zeros(len(ids)))
    space = hub(engine).item_space()
    mine = torch.stack([space.vector(i) for i in ids]) @ engine.user_state("m")
    top = torch.topk(out, 5).indices
    assert torch.equal(top, torch.topk(mine, 5).indices)  # the state's order, not the index's
    assert len(ids) - 1 not in top.tolist() or int(torch.argmax(mine)) == len(ids) - 1


def test_session_similarity_scores_the_recent_items_neighbours(engine):
    """The session part: items like the ones just clicked (cosine in every space) score
    highest, the most recent click counting most."""
    _toy_catalogue(engine)
    set_config(engine, {"online.space": "toy"})
    engine.feedback("s", "action0", "click")
    engine.feedback("s", "comedy0", "click")  # the latest
    learner = hub(engine).role("user_state")
    views = {v.id: v for v in engine.items()}
    ids = list(views)
    session = learner.session_scores(hub(engine)._users["s"], ids)
    assert session is not None and torch.isfinite(session).all()
    top = [views[ids[i]].attributes["genre"] for i in torch.argsort(session, descending=True)[:10]]
    assert top[:5] == ["comedy"] * 5 and "drama" not in top, top  # both, the latest first
    assert learner.describe(hub(engine)._users["s"])["session"][-1] == views[ids[0]].id + 10


class _Trending:
    """A plugin whose learner implements only the documented contract: it sees events,
    keeps counts of clicks, and answers ``strength`` and ``scores`` -- no engine internals."""

    from polyrec import FeedbackLearner as _Base

    class Learner(_Base):
        name = "trending"

        def __init__(self, context, **options):
            super().__init__(context, **options)
            self.counts: dict[int, int] = {}
            self.boost = float(options.get("boost", 50.0))

        def observe(self, events):
            for e in events:
                if e.kind == "click":
                    self.counts[e.item_id] = self.counts.get(e.item_id, 0) + 1

        def strength(self, user_id):
            return self.boost if self.counts else 0.0

        def scores(self, user_id, item_ids):
            return torch.tensor([float(self.counts.get(int(i), 0)) for i in item_ids])

    from polyrec import hookimpl as _hookimpl

    @_hookimpl
    def register_feedback_learners(self, register):
        register(self.Learner)


def test_a_contract_only_learner_in_the_user_state_role_changes_recommendations(tmp_path):
    from polyrec import LearnerContext
    with Engine(tmp_path / "t.db", device="cpu", entrypoints=False, progress=False,
                plugins=[_Trending()]) as eng:
        _toy_catalogue(eng)
        eng.add_interactions([{"user": f"u{j}", "item": f"action{i}", "kind": "click"}
                              for i in range(5) for j in range(5 - i)]
                             + [{"user": f"bg{n % 3}", "item": f"{g}{n}", "kind": "click"}
                                for g in GENRES for n in range(10)])  # every item scorable
        eng.train("popular")
        eng.add_users([{"external_id": "viewer"}])
        before = [r.item for r in eng.recommend("viewer", k=3)]
        assert before == ["action0", "action1", "action2"]
        for j in range(4):  # others click a drama: the "trending" learner counts them
            eng.feedback(f"fan{j}", "drama7", "click")
        eng.feedback("viewer", "comedy1", "view")
        model_only = [r.item for r in eng.recommend("viewer", k=3, online=False)]
        assert model_only[0] == "action0"
        assert [r.item for r in eng.recommend("viewer", k=3)][0] == "action0"  # "online" role
        set_config(eng, {"roles.user_state": "trending"})
        learner = hub(eng).role("user_state")
        assert isinstance(learner.context, LearnerContext) and learner.context.roles == ("user_state",)
        eng.feedback("viewer", "comedy2", "view")
        assert learner.counts == {}  # built anew with the settings: it saw no click yet
        for j in range(4, 8):
            eng.feedback(f"fan{j}", "drama7", "click")
        after = [r.item for r in eng.recommend("viewer", k=3)]
        assert after[0] == "drama7", after  # the learner's scores, blended by its strength
        assert [r.item for r in eng.recommend("viewer", k=3, online=False)] == model_only
        set_config(eng, {"roles.user_state": None})  # no learner in the role: the model alone
        assert [r.item for r in eng.recommend("viewer", k=3)] == model_only
