"""The recommender's item views are read from the store when a request first needs
them (polyrec.store.item_lookup), not all at start-up: what is read equals the stored
items, an item deleted since the snapshot keeps its name and loses its attributes."""
from __future__ import annotations

import pytest

from polyrec.store import Store
from polyrec.store.catalog import item_views
from polyrec.store.item_lookup import ItemLookup, Titles
from polyrec.store.models import Item


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "lookup.db")
    with s.session() as session:
        session.execute(Item.__table__.insert(), [
            {"id": i, "external_id": f"i{i}", "title": f"item {i}", "text": f"text {i}",
             "attributes": {"colour": "red" if i % 2 else "blue"},
             "created_at": 0.0, "updated_at": 0.0} for i in range(1, 41)])
    yield s
    s.close()


def _lookup(store):
    ids = list(range(1, 41))
    return ItemLookup(store, ids, {i: f"i{i}" for i in ids})


def test_views_are_read_on_first_use_and_equal_the_store(store, monkeypatch):
    lookup = _lookup(store)
    reads = []
    real = item_views

    def counted(session, ids=None):
        reads.append(None if ids is None else list(ids))
        return real(session, ids)

    monkeypatch.setattr("polyrec.store.item_lookup.item_views", counted)
    assert reads == []  # nothing read at construction
    lookup.prefetch_indices([0, 4, 9])
    assert reads == [[1, 5, 10]]
    assert lookup[4].title == "item 5" and lookup[4].attributes == {"colour": "red"}
    assert len(reads) == 1  # already read: no second query
    assert Titles(lookup)[10] == "item 10" and len(reads) == 1
    with store.snapshot() as session:
        truth = item_views(session, None)
    assert list(lookup) == truth  # iteration reads the rest, in dense index order
    assert reads[-1] is None  # most items missing: one read of the whole catalogue


def test_an_item_deleted_after_the_snapshot_keeps_its_name_only(store):
    lookup = _lookup(store)
    with store.session() as session:
        session.execute(Item.__table__.delete().where(Item.id == 7))
    view = lookup.view(7)
    assert view.external_id == "i7" and view.title is None and view.attributes == {}
    assert lookup.view(8).title == "item 8"
    with pytest.raises(KeyError):
        Titles(lookup)[99]
