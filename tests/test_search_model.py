"""Search, similar items and serving with a trained model: fused vectors, personal
re-ranking from the model's user state, and a retrain swapped in while requests run."""
from __future__ import annotations

import threading

import httpx
import pytest
import torch
from conftest import copy_db
from sqlalchemy import func, select

from polyrec import Engine
from polyrec.retrieve.search import trained_pipeline
from polyrec.serve.app import create_app, start_background
from polyrec.store.models import Interaction, User

DRESS = "731960001"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hm_bert_db):
    db = copy_db(hm_bert_db, tmp_path_factory.mktemp("hm_trained"))
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        eng.train("two_tower", epochs=1, seed=0)
        with eng.store.session() as s:
            users = [u for (u,) in s.execute(
                select(User.external_id).join(Interaction, Interaction.user_id == User.id)
                .group_by(User.id).order_by(func.count().desc(), User.id).limit(20))]
        yield eng, users


def test_similar_uses_the_fused_vectors_of_the_trained_model(trained):
    eng, _ = trained
    r = eng.similar(DRESS, 10)
    assert r.basis == "model" and r.spaces == ["model:pipeline:v1"] and not r.notes
    assert DRESS not in r.ids() and len(r.results) == 10
    rec = trained_pipeline(eng)
    vecs = torch.nn.functional.normalize(rec.vectors(), dim=1)
    index = {v.external_id: n for n, v in enumerate(eng.items(list(rec.data.item_ids)))}
    target = vecs[index[DRESS]]
    for h in r.results:
        assert h.score == pytest.approx(float(vecs[index[h.item]] @ target), abs=1e-4)
    assert eng.similar(DRESS, 5, basis="encoders").basis == "encoders"


def test_search_is_reranked_with_the_models_user_state(trained):
    eng, users = trained
    user = users[0]
    r = eng.search("top", 20, user=user)
    assert r.personalised == "model:pipeline:v1"
    assert "personal" in r.rankings
    rec = trained_pipeline(eng)
    with eng.store.session() as s:
        uid = s.execute(select(User.id).where(User.external_id == user)).scalar_one()
    scores = rec.scores(torch.tensor([rec.user_index[uid]]))[0]
    index = {v.external_id: n for n, v in enumerate(eng.items(list(rec.data.item_ids)))}
    ranked = sorted((h for h in r.results if "personal" in h.ranks), key=lambda h: h.ranks["personal"])
    model_order = [float(scores[index[h.item]]) for h in ranked]
    assert model_order == sorted(model_order, reverse=True)  # personal ranks follow the model


def test_http_recommend_uses_the_model_for_known_users(trained):
    eng, users = trained
    with start_background(create_app(eng, token="t")) as server, \
            httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/recommend", json={"user": users[1], "k": 5})
        assert r.status_code == 200 and r.json()["basis"] == "model"
        assert [h["item"] for h in r.json()["results"]] == [x.item for x in eng.recommend(users[1], 5)]
        r = client.put("/users", json={"users": [{"external_id": "fresh-user"}]},
                       headers={"Authorization": "Bearer t"})
        assert r.status_code == 200
        r = client.post("/recommend", json={"user": "fresh-user", "k": 5})  # no history at all
        assert r.status_code == 200 and len(r.json()["results"]) == 5
        r = client.post("/recommend", json={"user": users[1], "k": 5, "filters": {"type": "Dress"}})
        assert r.status_code == 200


def test_a_retrain_is_swapped_in_while_requests_are_served(trained):
    eng, users = trained
    errors: list[BaseException] = []
    served: list[str] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        for n in range(1000):  # bounded
            if stop.is_set():
                return
            user = users[(n + offset) % len(users)]
            try:
                assert len(eng.recommend(user, 5)) == 5
                r = eng.search("black dress", 5, user=user)
                served.append(r.personalised or "")
                eng.similar(DRESS, 3)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)
                return

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        report = eng.train("two_tower", epochs=1, seed=1)
        for _ in range(200):  # the next requests see the new version
            if served and served[-1] == f"model:pipeline:v{report.version}":
                break
            threading.Event().wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, repr(errors[0])
    assert report.version == 2
    assert eng.similar(DRESS, 3).spaces == ["model:pipeline:v2"]
    assert eng.search("black dress", 5, user=users[0]).personalised == "model:pipeline:v2"
