"""The Thompson-sampling bandit: slot budget, learning from impressions and clicks,
off unless configured for serving, and state kept across restarts."""
from __future__ import annotations

import numpy as np

from polyrec import Engine
from polyrec.feedback.events import explore, hub, set_config
from polyrec.plugins.feedback_bandit import FEATURES, ThompsonBandit


def _open(path):
    return Engine(path, device="cpu", entrypoints=False, progress=False)


def _catalogue(eng: Engine, n: int = 40) -> dict[str, int]:
    """Items p0..p19 popular (25 views each), n0..n19 new (no events)."""
    eng.add_items([{"external_id": f"p{i}"} for i in range(n // 2)]
                  + [{"external_id": f"n{i}"} for i in range(n // 2)])
    eng.feedback_many([{"user": f"old{j}", "item": f"p{i}", "kind": "view"}
                       for i in range(n // 2) for j in range(25)])
    return {v.external_id: v.id for v in eng.items()}


def test_explore_spends_the_share_of_slots_outside_the_top(engine):
    ids = _catalogue(engine)
    bandit = ThompsonBandit(hub(engine).context("bandit"), share=0.3, seed=1)
    candidates = [ids[f"p{i}"] for i in range(20)] + [ids[f"n{i}"] for i in range(10)]
    scores = list(np.linspace(1.0, 0.0, len(candidates)))
    out = bandit.explore(candidates, scores, user_id=None, k=10)
    assert sorted(out) == sorted(candidates)  # a permutation of the candidates
    top = out[:10]
    kept = [c for c in top if c in candidates[:7]]
    assert kept == candidates[:7]  # the model's top 7 keep their relative order
    assert len(set(top) - set(candidates[:10])) == 3  # 3 slots explored beyond the top 10
    assert ThompsonBandit(hub(engine).context("bandit"), share=0.0).explore(candidates, scores, k=10) == candidates


def test_features_mark_new_items_and_popularity(engine):
    ids = _catalogue(engine)
    bandit = ThompsonBandit(hub(engine).context("bandit"))
    x = bandit.features(None, [ids["p0"], ids["n0"]], [2.0, 1.0])
    assert x.shape == (2, len(FEATURES))
    col = {f: i for i, f in enumerate(FEATURES)}
    assert x[0, col["new_item"]] == 0 and x[1, col["new_item"]] == 1
    assert x[0, col["popularity"]] > x[1, col["popularity"]] == 0
    assert x[0, col["score"]] > x[1, col["score"]]


def test_it_learns_which_items_get_clicked(engine):
    """Users click only new items: the posterior learns it and exploration follows."""
    ids = _catalogue(engine)
    set_config(engine, {"bandit.serving": True, "bandit.share": 0.3,
                        "bandit.new_item_max_events": 20})
    bandit = hub(engine).learner("bandit")
    bandit.rng = np.random.default_rng(0)
    new_ids = {ids[f"n{i}"] for i in range(20)}
    candidates = [ids[f"p{i}"] for i in range(20)] + sorted(new_ids)
    scores = list(np.linspace(1.0, 0.0, len(candidates)))
    rng = np.random.default_rng(0)

    def new_in_explored(rounds: int) -> float:
        shown_new = 0
        for r in range(rounds):
            user = f"user{r}"
            uid = engine.feedback(user, "p0", "impression").user_id
            ranked = explore(engine, uid, candidates, scores, k=10)[:10]
            explored = [c for c in ranked if c not in candidates[:7]]
            shown_new += sum(c in new_ids for c in explored)
            external = {v: k for k, v in ids.items()}
            engine.feedback_many([{"user": user, "item": external[c], "kind": "impression"}
                                  for c in ranked])
            clicks = [c for c in ranked if c in new_ids and rng.random() < 0.5]
            engine.feedback_many([{"user": user, "item": external[c], "kind": "click"} for c in clicks])
        return shown_new / (3 * rounds)

    new_in_explored(60)
    mean, _ = bandit.posterior()
    weights = dict(zip(FEATURES, mean))
    assert weights["new_item"] > 0.1 and weights["new_item"] > weights["popularity"]
    assert bandit.impressions >= 600 and bandit.rewards > 50
    assert new_in_explored(20) > 0.9


def test_off_unless_configured_for_serving(engine):
    ids = _catalogue(engine)
    candidates = list(ids.values())
    scores = [float(-i) for i in range(len(candidates))]
    assert explore(engine, None, candidates, scores, k=10) == candidates
    set_config(engine, {"bandit.serving": True})
    assert explore(engine, None, candidates, scores, k=10)[:10] != candidates[:10]


def test_posterior_survives_restart_and_crash(tmp_path):
    db = tmp_path / "b.db"
    with _open(db) as eng:
        _catalogue(eng)
        for i in range(5):
            eng.feedback(f"u{i}", f"n{i}", "impression")
            eng.feedback(f"u{i}", f"n{i}", "click")
        A = hub(eng).learner("bandit").A.copy()
    eng = _open(db)
    bandit = hub(eng).learner("bandit")
    assert bandit.describe()["rewards"] == 5
    np.testing.assert_allclose(bandit.A, A)
    eng.feedback("u9", "n9", "impression")
    after = bandit.A.copy()
    eng.store.close()  # crash: no Engine.close, the last impression was never flushed
    with _open(db) as eng:
        bandit = hub(eng).learner("bandit")
        assert bandit.describe()["impressions"] == 6  # caught up from the event log
        np.testing.assert_allclose(bandit.A, after)


def test_unknown_visitors_over_http_see_new_items_when_exploring(tmp_path, ml100k_default_db):
    """A visitor with no user record gets popular items; with exploration on for serving
    the explorer's slots reach them too, so items added today are shown to someone."""
    from conftest import copy_db
    from fastapi.testclient import TestClient

    from polyrec.serve.app import create_app
    with Engine(copy_db(ml100k_default_db[0], tmp_path), device="cpu", entrypoints=False,
                progress=False, encode_on_arrival=False) as eng:
        eng.add_items([{"external_id": f"fresh-{n}", "title": f"Fresh {n}"} for n in range(5)])
        client = TestClient(create_app(eng))

        def shown(n: int = 12) -> tuple[set[str], list[dict]]:
            bodies = [client.post("/recommend", json={"user": f"visitor-{j}", "k": 10,
                                                      "explain": True}).json()
                      for j in range(n)]
            return {h["item"] for b in bodies for h in b["results"]}, bodies

        items, bodies = shown()
        assert not any(i.startswith("fresh-") for i in items)  # popularity alone: never
        assert all(b["basis"] == "popular" and len(b["results"]) == 10 for b in bodies)
        set_config(eng, {"bandit.serving": True})
        items, bodies = shown()
        assert any(i.startswith("fresh-") for i in items)
        assert all(b["basis"] == "popular" and len(b["results"]) == 10 for b in bodies)
        assert "explorer" in bodies[0]["notes"][-1]
        assert "anonymous" in bodies[0]["results"][0]["explanation"]
