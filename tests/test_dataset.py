"""build_training_data: positives, weights, dense indices over all items, item features."""
from __future__ import annotations

import pytest
import torch

from polyrec import Encoder, EncodeResult, Engine, hookimpl
from polyrec.store.catalog import user_ids
from polyrec.rank.dataset import build_training_data
from polyrec.errors import ConfigError, NotFoundError
from polyrec.store.vectors import save_vectors


class ToyKG(Encoder):
    """A real (if tiny) encoder: a 3-d vector from the item's 'genre' attribute."""

    name = "toykg"
    modality = "kg"

    @property
    def dim(self) -> int:
        return 3

    def fingerprint(self) -> str:
        return "toykg-1"

    def content(self, item):
        return item.attributes.get("genre")

    def encode(self, items, ctx):
        vecs = torch.tensor([[float(len(i.attributes["genre"])), 1.0, 0.0] for i in items])
        return EncodeResult(vecs, [i.id for i in items])


class ToyPlugin:
    @hookimpl
    def register_encoders(self, register):
        register(ToyKG)


@pytest.fixture
def shop(tmp_path):
    with Engine(tmp_path / "shop.db", device="cpu", entrypoints=False, progress=False,
                builtins=(), plugins=[ToyPlugin()]) as eng:
        eng.add_items([{"external_id": f"i{k}", "attributes": {"genre": "x" * (k + 1)}}
                       for k in range(5)])
        eng.add_interactions([
            {"user": "a", "item": "i0", "kind": "rating", "value": 5, "ts": 10},
            {"user": "a", "item": "i1", "kind": "rating", "value": 3, "ts": 11},  # too low
            {"user": "a", "item": "i2", "kind": "click", "ts": 12},
            {"user": "a", "item": "i2", "kind": "purchase", "ts": 13},  # same pair: max weight
            {"user": "b", "item": "i1", "kind": "cart", "ts": 5},
            {"user": "b", "item": "i3", "kind": "impression", "ts": 6},  # weight 0: ignored
            {"user": "b", "item": "i0", "kind": "skip", "ts": 7},  # negative: ignored
            {"user": "c", "item": "i1", "kind": "impression", "ts": 8},  # no positives
        ])
        yield eng


def _pairs(data):
    return {(data.user_ids[u], data.item_ids[i], w, t) for u, i, w, t in
            zip(data.users.tolist(), data.items.tolist(), data.weights.tolist(), data.ts.tolist())}


def test_positives_weights_and_dense_indices(shop):
    data = build_training_data(shop)
    assert data.n_items == 5 and data.n_users == 3  # every item, even without interactions
    ext = {it.id: it.external_id for it in shop.items()}
    got = {(u, ext[i], w, t) for u, i, w, t in _pairs(data)}
    with shop.store.session() as s:
        uid = user_ids(s, "abc")
    assert got == {(uid["a"], "i0", 1.0, 10.0), (uid["a"], "i2", 3.0, 12.0),
                   (uid["b"], "i1", 2.0, 5.0)}
    assert data.item_counts().tolist() == [1, 1, 1, 0, 0]
    assert data.users.dtype == torch.long and data.items.dtype == torch.long


def test_min_rating_and_kinds(shop):
    assert len(build_training_data(shop, min_rating=3).users) == 4
    only = build_training_data(shop, kinds=["rating"])
    assert len(only.users) == 1
    with pytest.raises(ConfigError):
        build_training_data(shop, kinds=[])


def test_item_features_aligned_with_item_index(shop):
    assert build_training_data(shop).item_features == {}
    items = shop.items()
    with shop.store.session() as s:  # vectors for items 1 and 3 only
        save_vectors(s, "toykg", "toykg-1", [(items[1].id, "h1"), (items[3].id, "h3")],
                     torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    data = build_training_data(shop)
    vectors, present = data.item_features["kg"]
    assert data.feature_encoders == {"kg": "toykg"}
    assert vectors.dtype == torch.float32 and vectors.shape == (5, 3)
    assert present.tolist() == [False, True, False, True, False]
    assert vectors[data.item_ids.index(items[3].id)].tolist() == [4.0, 5.0, 6.0]
    assert vectors[0].abs().sum() == 0
    assert build_training_data(shop, features=False).item_features == {}
    with pytest.raises(NotFoundError):
        build_training_data(shop, encoders=["bert"])


def test_history_rows(shop):
    data = build_training_data(shop)
    hist = data.history(torch.tensor([0, 2, 0]))
    assert torch.equal(hist, data.matrix()[[0, 2, 0]])
    assert data.history(torch.arange(3), binary=False).max() == 3.0


def test_ml100k_positives(ml100k_db):
    with Engine(ml100k_db, device="cpu", entrypoints=False, progress=False) as eng:
        data = build_training_data(eng, features=False)
    assert (data.n_users, data.n_items) == (943, 1682)
    assert len(data.users) == 55375  # ratings of 4 and 5 in MovieLens-100k
    assert int((data.item_counts() == 0).sum()) == 235


def _same(a, b) -> None:
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    for name in ("users", "items", "weights", "ts"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_extending_with_appended_events_equals_a_full_build(shop):
    """New users and events merged into the previous pairs give exactly what reading
    everything again gives: a pair's largest weight and earliest time, new users at the
    end, ratings under the threshold and weightless kinds left out."""
    from sqlalchemy import func, select

    from polyrec.rank.dataset import extend_training_data
    from polyrec.store.models import Interaction, User

    def marks():
        with shop.store.snapshot() as s:
            return (s.execute(select(func.max(Interaction.id))).scalar_one(),
                    s.execute(select(func.max(User.id))).scalar_one())
    data = build_training_data(shop, features=False)
    after_event, after_user = marks()
    shop.add_users([{"external_id": "quiet"}])  # a new user with no event
    shop.add_interactions([
        {"user": "a", "item": "i2", "kind": "purchase", "ts": 5},   # an older, heavier event
        {"user": "a", "item": "i1", "kind": "rating", "value": 5, "ts": 30},  # now positive
        {"user": "b", "item": "i4", "kind": "rating", "value": 2, "ts": 31},  # too low
        {"user": "new", "item": "i0", "kind": "click", "ts": 32},
        {"user": "new", "item": "i0", "kind": "click", "ts": 33},   # the same pair again
        {"user": "new", "item": "i3", "kind": "impression", "ts": 34},  # weighs nothing
    ])
    with shop.store.snapshot() as s:
        grown = extend_training_data(data, s, after_interaction=after_event,
                                     after_user=after_user)
    full = build_training_data(shop, features=False)
    _same(grown, full)
    assert grown.n_users == data.n_users + 2 and len(grown.users) == len(data.users) + 2


def test_a_click_is_merged_into_the_served_snapshot_without_a_full_read(tmp_path, monkeypatch):
    """The recommender's refresh after new events and users extends its snapshot (no
    full read of the events) and serves what a full read would; a deletion falls back
    to the full read."""
    import polyrec.rank.recommend as recommend_module
    shop = Engine(tmp_path / "live.db", device="cpu", entrypoints=False, progress=False)
    shop.add_items([{"external_id": f"i{k}"} for k in range(6)])
    shop.add_interactions([{"user": f"u{n}", "item": f"i{(n * k) % 6}", "kind": "click",
                            "ts": n * 10 + k} for n in range(1, 8) for k in range(3)])
    shop.train("popular")
    shop.recommend("u1", 3)
    rec = shop.services.recommender()
    full_reads: list[int] = []
    real = recommend_module.build_training_data

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        full_reads.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(recommend_module, "build_training_data", counting)
    shop.feedback("newcomer", "i3", kind="purchase")
    snap = rec.refresh(wait=True)
    assert full_reads == []
    _same(snap.data, build_training_data(shop, features=False))
    assert [r.item for r in shop.recommend("newcomer", 5)] == [
        r.item for r in shop.recommend("newcomer", 5)]  # served, stable
    shop.forget_user("newcomer")
    snap = rec.refresh(wait=True)
    assert full_reads == [1]
    _same(snap.data, build_training_data(shop, features=False))
    shop.close()

