"""A living catalogue: rankers fitted on MovieLens-100k score a catalogue that grew after
fitting (new items, some with copied BERT/KG vectors, one with none; new users), with no
retrain, and a new item whose content matches a user's taste reaches their top 10."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from sqlalchemy import select

from polyrec import Engine
from polyrec.rank.dataset import build_training_data
from polyrec.rank.train import build_ranker
from polyrec.store.models import Item, ItemVector, User
from polyrec.store.vectors import delete_vectors, save_vectors

#: Source items (external ids) copied as new items: their title, attributes and vectors.
SOURCES = ["50", "181", "100", "258", "1"]
BARE = "new-bare"          # no vectors at all
TEXT_ONLY = "new-text-only"  # a BERT vector only (copied from item "172")
NEW_USERS = ["new-u1", "new-u2"]

FAST = {
    "popular": {},
    "itemknn": {"neighbors": 50, "shrink": 10.0},
    "ease": {"l2": 500.0},
    "two_tower": {"dim": 32, "epochs": 2, "validation": False},
    "ensemble": {"members": [{"name": "ease", "options": {"l2": 500.0}}, "popular"],
                 "weights": [1.0, 0.5]},
    "hybrid": {"base_options": {"l2": 500.0},
               "scorers": [{"name": "two_tower",
                            "options": {"dim": 32, "epochs": 2, "validation": False}}]},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _open(path) -> Engine:
    return Engine(path, device="cpu", entrypoints=False, progress=False)


def _settle(eng: Engine) -> None:
    """Wait for background encoding of added items, where the engine does that."""
    wait = getattr(eng, "wait_for_encoding", None)
    if wait is not None:
        assert wait(300)


def _copy_vectors(eng: Engine, pairs: list[tuple[str, str]], encoders: tuple[str, ...]) -> None:
    """Store, for each (new item, source item), the source's vectors of ``encoders``."""
    with eng.store.session() as s:
        ids = dict(s.execute(select(Item.external_id, Item.id)).all())
        for enc in encoders:
            rows, vecs, fingerprint = [], [], None
            for new, src in pairs:
                row = s.execute(select(ItemVector).where(ItemVector.item_id == ids[src])
                                .where(ItemVector.encoder == enc)).scalar_one_or_none()
                if row is None:
                    continue
                fingerprint = row.fingerprint
                rows.append((ids[new], row.content_hash))
                vecs.append(torch.from_numpy(np.frombuffer(row.vector, dtype=row.dtype).astype("float32")))
            if rows:
                save_vectors(s, enc, fingerprint, rows, torch.stack(vecs))


@pytest.fixture(scope="module")
def grown(tmp_path_factory, ml100k_encoded_db):
    """(engine, data before the catalogue grew, data after): five copies of existing films
    (title, attributes, bert and kg vectors), one text-only item, one bare item, and two
    new users with a few interactions (one of them with a new item)."""
    from conftest import copy_db
    db = copy_db(ml100k_encoded_db, tmp_path_factory.mktemp("grown"))
    eng = _open(db)
    before = build_training_data(eng)
    views = {v.external_id: v for v in eng.items()}
    new = [{"external_id": f"new-{src}", "title": views[src].title,
            "attributes": dict(views[src].attributes)} for src in SOURCES]
    new += [{"external_id": TEXT_ONLY, "title": views["172"].title},
            {"external_id": BARE}]  # nothing to encode
    eng.add_items(new)
    _settle(eng)
    with eng.store.session() as s:  # whatever arrived on its own: the test sets the vectors
        ids = dict(s.execute(select(Item.external_id, Item.id)).all())
        for enc in ("bert", "kg"):
            delete_vectors(s, enc, [ids[r["external_id"]] for r in new])
    _copy_vectors(eng, [(f"new-{s}", s) for s in SOURCES], ("bert", "kg"))
    _copy_vectors(eng, [(TEXT_ONLY, "172")], ("bert",))
    eng.add_interactions(
        [{"user": NEW_USERS[0], "item": it, "kind": "rating", "value": 5, "ts": 9e8 + n}
         for n, it in enumerate(["50", "181", "172"])]
        + [{"user": NEW_USERS[1], "item": it, "kind": "click", "ts": 9e8 + n}
           for n, it in enumerate([f"new-{SOURCES[0]}", "100"])])
    after = build_training_data(eng)
    yield eng, before, after
    eng.close()


def _index(data, eng) -> dict[str, int]:
    ext = {v.id: v.external_id for v in eng.items()}
    return {ext[i]: k for k, i in enumerate(data.item_ids)}


@pytest.mark.slow
def test_new_items_come_after_the_fitted_ones(grown):
    eng, before, after = grown
    assert after.n_items == before.n_items + len(SOURCES) + 2
    assert after.item_ids[:before.n_items] == before.item_ids  # dense order = id order
    assert after.n_users == before.n_users + 2
    idx = _index(after, eng)
    text, text_present = after.item_features["text"]
    assert bool(text_present[idx[TEXT_ONLY]]) and not bool(text_present[idx[BARE]])
    assert not bool(after.item_features["kg"][1][idx[BARE]])


@pytest.mark.slow
def test_catalogue_map_finds_content_neighbours_by_id(grown):
    eng, before, after = grown
    idx = _index(after, eng)
    cmap = after.catalogue_map(before.item_ids)
    assert not cmap.identical and cmap.n_fitted == before.n_items
    assert cmap.position[:before.n_items].tolist() == list(range(before.n_items))
    unseen = cmap.unseen.tolist()
    assert sorted(unseen) == list(range(before.n_items, after.n_items))
    rows = {i: r for r, i in enumerate(unseen)}
    for src in SOURCES:  # a copy's nearest fitted item is its source (identical vectors)
        r = rows[idx[f"new-{src}"]]
        assert int(cmap.neighbours[r, 0]) == idx[src]
        assert float(cmap.weights[r, 0]) > 0.5
        assert math.isclose(float(cmap.weights[r].sum()), 1.0, rel_tol=1e-5)
    assert not bool(cmap.has_content[rows[idx[BARE]]])
    assert float(cmap.weights[rows[idx[BARE]]].abs().sum()) == 0.0
    # cached: the same object for the same catalogue, fitted ids and features
    assert after.catalogue_map(before.item_ids) is cmap
    assert before.catalogue_map(before.item_ids).identical


def _deleted(data, drop: int):
    """``data`` without item index ``drop`` (its interactions removed, indices shifted)."""
    keep = data.items != drop
    items = data.items[keep]
    items = items - (items > drop).long()
    mask = torch.ones(data.n_items, dtype=torch.bool)
    mask[drop] = False
    feats = {m: (v[mask], p[mask]) for m, (v, p) in data.item_features.items()}
    return replace(data, item_ids=[i for k, i in enumerate(data.item_ids) if k != drop],
                   users=data.users[keep], items=items, weights=data.weights[keep],
                   ts=data.ts[keep], item_features=feats)


@pytest.fixture(scope="module")
def fitted(grown):
    """Every built-in ranker but hybrid, fitted on the data before the catalogue grew."""
    eng, before, _ = grown
    out = {}
    for name in ("popular", "itemknn", "ease", "two_tower", "ensemble", "random"):
        ranker = build_ranker(eng, name, FAST.get(name, {}))
        ranker.fit(before)
        out[name] = ranker
    return out


def _check_grown_scores(name, ranker, eng, before, after):
    idx = _index(after, eng)
    uidx = {u: k for k, u in enumerate(after.user_ids)}
    with eng.store.session() as s:
        new_users = [uidx[i] for i in s.execute(select(User.id).where(
            User.external_id.in_(NEW_USERS))).scalars()]
    users = torch.tensor([0, 1, 5, 42, *new_users])
    with torch.no_grad():
        scores = ranker.score_users(users, after).float()
    assert scores.shape == (len(users), after.n_items)
    assert not torch.isnan(scores).any()
    new_items = torch.arange(before.n_items, after.n_items)
    # every new item has a defined (finite) score, the bare one included
    assert torch.isfinite(scores[:, new_items]).all(), name
    return scores, idx, users


@pytest.mark.slow
@pytest.mark.parametrize("name", ["popular", "itemknn", "ease", "two_tower", "ensemble", "random"])
def test_ranker_scores_a_grown_catalogue(grown, fitted, name):
    eng, before, after = grown
    ranker = fitted[name]
    scores, idx, users = _check_grown_scores(name, ranker, eng, before, after)
    if name in ("popular", "itemknn", "ease"):
        # the fitted items keep exactly the scores they had (users with fitted-only
        # history), a copy scores (nearly) like its source, the bare item ranks last
        old = ranker.score_users(users[:4], before)
        assert torch.equal(scores[:4, :before.n_items], old)
        for src in SOURCES:
            a, b = scores[:4, idx[f"new-{src}"]], scores[:4, idx[src]]
            assert torch.allclose(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()) + 1e-6), (name, src)
        finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
        assert torch.equal(scores[:, idx[BARE]], finite.min(1).values)
    if name == "two_tower":
        # a copy's item-tower vector is close to its source's (content + neighbour ID part)
        vecs = ranker.item_vectors(after)
        for src in SOURCES:
            assert float(vecs[idx[f"new-{src}"]] @ vecs[idx[src]]) > 0.8, src
        assert float(vecs[idx[TEXT_ONLY]].norm()) > 0.5  # scored from its text alone
        finite = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, math.inf))
        assert torch.equal(scores[:, idx[BARE]], finite.min(1).values)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["popular", "itemknn", "ease", "two_tower", "ensemble"])
def test_states_keep_the_fitted_ids_and_old_states_still_load(grown, fitted, name):
    eng, before, after = grown
    ranker = fitted[name]
    users = torch.tensor([0, 3, after.n_users - 1])
    want = ranker.score_users(users, after)
    state = ranker.state()
    again = build_ranker(eng, name, FAST.get(name, {}))
    again.load_state(state)
    assert torch.allclose(again.score_users(users, after), want, atol=1e-5, equal_nan=True)
    if name in ("popular", "itemknn", "ease"):
        old = {k: v for k, v in state.items() if k != "item_ids"}  # saved before this change
        legacy = build_ranker(eng, name, FAST.get(name, {}))
        legacy.load_state(old)
        assert legacy.item_ids is None
        assert torch.equal(legacy.score_users(users, after), want)  # prefix order holds here


@pytest.mark.slow
@pytest.mark.parametrize("name", ["itemknn", "ease", "two_tower"])
def test_a_deleted_item_is_mapped_by_id_not_position(grown, fitted, name):
    eng, before, after = grown
    drop = 10
    shrunk = _deleted(after, drop)
    users = torch.tensor([0, 1, 2])
    full = fitted[name].score_users(users, after)
    scores = fitted[name].score_users(users, shrunk)
    assert scores.shape == (3, after.n_items - 1)
    keep = torch.ones(after.n_items, dtype=torch.bool)
    keep[drop] = False
    if name == "two_tower":  # its user tower averages the history, which lost an item
        corr = torch.corrcoef(torch.stack([scores[0, :before.n_items - 1],
                                           full[0, keep][:before.n_items - 1]]))[0, 1]
        assert float(corr) > 0.95
    else:
        # users 0-2 never interacted with item 10? then the scores match exactly
        hist = after.history(users)[:, drop]
        for r in range(3):
            if float(hist[r]) == 0:
                assert torch.allclose(scores[r, :before.n_items - 1],
                                      full[r, keep][:before.n_items - 1], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("options", [FAST["hybrid"], {"base_options": {"l2": 500.0}}],
                         ids=["with_two_tower", "default_no_scorer"])
def test_hybrid_scores_a_grown_catalogue_and_rescores_new_items(grown, options):
    eng, before, after = grown
    ranker = build_ranker(eng, "hybrid", options)
    ranker.fit(before)
    scores, idx, users = _check_grown_scores("hybrid", ranker, eng, before, after)
    from polyrec.plugins.rank_rerank import CANDIDATE_OFFSET
    history = after.user_items()
    for r, u in enumerate(users.tolist()):
        seen = set(history[u].tolist())
        fresh = [i for i in range(before.n_items, after.n_items)
                 if i not in seen and i != idx[BARE]]
        # every new item with content is re-scored by the click model (the top tier)
        assert bool((scores[r, fresh] > CANDIDATE_OFFSET / 2).all()), r
    # the bare item is defined and below every re-scored candidate
    assert bool((scores[:, idx[BARE]] < CANDIDATE_OFFSET / 2).all())
    state = ranker.state()
    assert state["item_ids"] == before.item_ids
    legacy = build_ranker(eng, "hybrid", options)
    legacy.load_state({k: v for k, v in state.items() if k != "item_ids"})
    again = legacy.score_users(users, after)
    # the same ranking (scores sit near the 1e4 candidate offset: float32 steps of 1e-3)
    assert float((again - scores).abs().max()) < 1e-2
    assert torch.equal(torch.topk(again, 10).indices, torch.topk(scores, 10).indices)


# -- end to end: Engine.add_items + Engine.encode, then recommend with no retrain -------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, ml100k_default_db):
    from conftest import copy_db
    return copy_db(ml100k_default_db[0], tmp_path_factory.mktemp("living"))


@pytest.mark.slow
def test_a_new_item_encoded_from_content_is_recommended_with_no_retrain(trained):
    user = "1"
    with _open(trained) as eng:
        rec = eng.services.recommender()
        version = rec.version
        before = eng.recommend(user, k=10)
        assert len(before) == 10
        # a new item with the same title and attributes as the film whose fit with the
        # user's history the model rates best: its BERT vector (encoded now, for the new
        # items only) matches that film's; it has no KG link, so no KG vector
        source = next(v for v in eng.items() if v.external_id == before[0].item)
        eng.add_items([{"external_id": "brand-new-film", "title": source.title,
                        "attributes": dict(source.attributes)},
                       {"external_id": "brand-new-bare"}])  # nothing to encode
        _settle(eng)
        report = eng.encode(["bert"])
        assert report is not None
        recs = eng.recommend(user, k=10)
        assert eng.services.recommender().version == version  # no retrain
        items = [r.item for r in recs]
        assert len(recs) == 10 and "brand-new-film" in items, items
        assert "brand-new-bare" not in items
        # nothing breaks for anyone: every existing user still gets k results
        with eng.store.session() as s:
            users = list(s.execute(select(User.external_id).order_by(User.id)).scalars())
        for u in users[:: max(1, len(users) // 40)]:
            assert len(eng.recommend(u, k=10)) == 10, u
        # the bare item is reachable through a filter-free request of a new user too
        eng.add_interactions([{"user": "brand-new-user", "item": "brand-new-film", "kind": "click"}])
        assert len(eng.recommend("brand-new-user", k=10)) == 10
