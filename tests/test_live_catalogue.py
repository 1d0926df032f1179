"""A living catalogue: items written through the API (``PUT /items``, ``Engine.add_items``)
are encoded in the background by the encoders already in use, and the recommender and
the searcher serve them without a batch job; every user is still served meanwhile."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from sqlalchemy import select

from polyrec import Engine
from polyrec.store.models import Item, ItemVector

N_NEW = 20
NEW = [{"external_id": f"live-{n}", "title": f"Zebra Planet {n} (2031)",
        "text": "A documentary about zebras crossing a frozen planet.",
        "attributes": {"release_year": 2031, "class": "Documentary"}} for n in range(N_NEW)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _open(path, **kw) -> Engine:
    return Engine(path, device="cpu", entrypoints=False, progress=False, **kw)


@pytest.fixture(scope="module")
def trained_db(tmp_path_factory, ml100k_default_db):
    """A copy of the encoded ml-100k store with the default pipeline trained fast
    (conftest.FAST_DEFAULT_PIPELINE)."""
    from conftest import copy_db
    return copy_db(ml100k_default_db[0], tmp_path_factory.mktemp("live"))


def _vectors_of(eng: Engine, external_ids: list[str]) -> dict[str, set[str]]:
    with eng.store.session() as s:
        rows = s.execute(select(Item.external_id, ItemVector.encoder)
                         .join(ItemVector, ItemVector.item_id == Item.id)
                         .where(Item.external_id.in_(external_ids))).all()
    out: dict[str, set[str]] = {e: set() for e in external_ids}
    for ext, enc in rows:
        out[ext].add(enc)
    return out


@pytest.mark.slow
def test_put_items_are_encoded_on_arrival_and_every_user_is_served(tmp_path, trained_db):
    from fastapi.testclient import TestClient

    from conftest import copy_db
    from polyrec.serve.app import create_app
    db = copy_db(trained_db, tmp_path)
    with _open(db) as eng, TestClient(create_app(eng)) as client:
        first = client.post("/recommend", json={"user": "1", "k": 10})
        assert first.status_code == 200 and first.json()["basis"] == "model"
        users = [str(u) for u in range(1, 944)]

        start = time.monotonic()
        r = client.put("/items", json={"items": NEW})
        assert r.status_code == 200 and r.json() == {"written": N_NEW}
        # served at once, while the new items are still being encoded
        for user in users[::40]:
            r = client.post("/recommend", json={"user": user, "k": 10})
            assert r.status_code == 200, (user, r.text)
        # encoded in the background, without calling encode
        assert eng.wait_for_encoding(timeout=120)
        waited = time.monotonic() - start
        status = eng.services.arrivals().status()
        assert status["errors"] == [] and status["encoded"] == N_NEW, status
        assert waited < 120
        got = _vectors_of(eng, [n["external_id"] for n in NEW])
        assert all(encs == {"bert"} for encs in got.values()), got  # no kg link: no kg vector

        # the searcher sees the new vectors: dense retrieval finds the new items
        body = client.post("/search", json={"query": "zebras on a frozen planet", "k": 10}).json()
        dense = [h["item"] for h in body["results"] if "dense" in h["ranks"]]
        assert any(i.startswith("live-") for i in dense), body["results"]
        # the recommender's snapshot has the new items and their vectors
        rec = eng.services.recommender()
        snap = rec.refresh(wait=True)  # not the snapshot of a refresh still running
        assert snap.data.n_items == 1682 + N_NEW
        index = snap.data.item_index()
        new_rows = [index[v.id] for v in snap.views if v.external_id.startswith("live-")]
        assert len(new_rows) == N_NEW
        text_vectors, present = snap.data.item_features["text"]
        assert bool(present[new_rows].all()) and float(text_vectors[new_rows].abs().sum()) > 0

        # every user answers 200 over HTTP with 10 items from the model
        for user in users:
            r = client.post("/recommend", json={"user": user, "k": 10})
            assert r.status_code == 200 and r.json()["basis"] == "model", (user, r.text)
            assert len(r.json()["results"]) == 10, (user, r.text)
        scores, top = rec.top_k(torch.arange(len(users)), 10)  # the batch path: all users
        assert top.shape == (943, 10) and bool(torch.isfinite(scores).all())


@pytest.mark.slow
def test_encode_on_arrival_can_be_turned_off(tmp_path, trained_db):
    from conftest import copy_db
    db = copy_db(trained_db, tmp_path)
    with _open(db, encode_on_arrival=False) as eng:
        eng.add_items(NEW[:3])
        assert eng.wait_for_encoding(5)
        assert eng.services.started("arrivals") is None  # no worker was ever started
        assert all(not encs for encs in _vectors_of(eng, ["live-0", "live-1", "live-2"]).values())


def test_a_re_encode_reaches_this_process_s_search_at_once(tmp_path, trained_db):
    """Engine.encode tells the searcher it wrote vectors: an item updated, then encoded by
    hand (encode on arrival off), is found by its new text in the dense space at once."""
    from conftest import copy_db
    db = copy_db(trained_db, tmp_path)
    query = "zebras crossing a frozen planet"
    with _open(db, encode_on_arrival=False) as eng:
        target = eng.items()[0].external_id
        eng.add_items([{"external_id": target, "title": "Zebra Planet",
                        "text": "A documentary about zebras crossing a frozen planet."}])
        before = eng.search(query, 5).results  # the searcher holds the item's old vector
        assert all("dense" not in h.ranks or h.item != target for h in before)
        assert eng.encode(["bert"])["bert"].encoded == 1  # rewritten in place
        hits = {h.item: h.ranks for h in eng.search(query, 5).results}
        assert hits.get(target, {}).get("dense") == 1


def test_another_process_s_re_encode_reaches_search(tmp_path, trained_db):
    """A vector rewritten in place by another process (same count, same newest row) is
    seen through the encoder's written token: the serving Engine finds the item by its
    new text in the dense space at its next search."""
    from conftest import copy_db
    db = copy_db(trained_db, tmp_path)
    query = "zebras crossing a frozen planet"
    with _open(db, encode_on_arrival=False) as serving, \
            _open(db, encode_on_arrival=False) as writer:
        target = serving.items()[0].external_id
        writer.add_items([{"external_id": target, "title": "Zebra Planet",
                           "text": "A documentary about zebras crossing a frozen planet."}])
        before = serving.search(query, 5).results  # loads the item's old vector
        assert all("dense" not in h.ranks or h.item != target for h in before)
        assert writer.encode(["bert"])["bert"].encoded == 1
        hits = {h.item: h.ranks for h in serving.search(query, 5).results}
        assert hits.get(target, {}).get("dense") == 1


@pytest.mark.slow
def test_add_items_encodes_in_the_background_then_close_joins(tmp_path, trained_db):
    from conftest import copy_db
    db = copy_db(trained_db, tmp_path)
    with _open(db) as eng:
        eng.add_items(NEW[:2])
        assert eng.wait_for_encoding(120)
        assert _vectors_of(eng, ["live-0", "live-1"]) == {"live-0": {"bert"}, "live-1": {"bert"}}
        # an updated item is re-encoded; an unchanged one is not
        eng.add_items([{"external_id": "live-0", "title": "Zebra Planet, the sequel"}])
        assert eng.wait_for_encoding(120)
        worker = eng.services.arrivals()
        assert worker.status()["encoded"] == 3 and worker.status()["errors"] == []
        thread = worker._thread
    assert thread is not None and not thread.is_alive()  # Engine.close stopped and joined it


def test_worker_errors_are_recorded_never_raised(engine, monkeypatch):
    import polyrec.encode.pipeline as pipeline

    def broken(*_a, **_k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline, "encode_items", broken)
    assert engine.add_items([{"external_id": "a", "title": "A"}]) == 1
    assert engine.wait_for_encoding(30)
    status = engine.services.arrivals().status()
    assert status["running"] and status["errors"][0]["message"] == "RuntimeError: disk on fire"
    engine.add_items([{"external_id": "b", "title": "B"}])  # the worker keeps going
    assert engine.wait_for_encoding(30)
    assert len(engine.services.arrivals().status()["errors"]) == 2


def test_bursts_coalesce_into_few_batches(engine, monkeypatch):
    import polyrec.encode.pipeline as pipeline
    batches: list[list[int]] = []
    gate = threading.Event()

    def record(_engine, ids, *_a, **_k):
        gate.wait(10)  # the first batch holds the worker while the burst queues up
        batches.append(sorted(ids))
        return pipeline.EncodeReport()

    monkeypatch.setattr(pipeline, "encode_items", record)
    for n in range(50):
        engine.add_items([{"external_id": f"b{n}", "title": f"B {n}"}])
    gate.set()
    assert engine.wait_for_encoding(30)
    assert sum(len(b) for b in batches) == 50
    assert len(batches) <= 3, [len(b) for b in batches]
