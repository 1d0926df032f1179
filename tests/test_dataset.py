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
