"""Recommend through a vector index (polyrec.rank.retrieval): a ranker whose scores are
inner products (the two-tower) hands its item side to the Recommender, which asks a
vector index (its default kind, an inverted file) for each user's candidates instead of scoring every item. On MovieLens-100k
the answers must be those of full scoring: same items, same scores, same filters and
seen-item exclusion, and a failing retrieval falls back to full scoring."""
from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from sqlalchemy import select

from conftest import copy_db, torch_threads
from polyrec import Engine
from polyrec.rank.recommend import Recommender
from polyrec.rank.vector_index import IndexSettings, faiss_available
from polyrec.store.models import Interaction, Item, User

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not faiss_available(), reason="FAISS is not installed")]

#: the Recommender's index settings, forced below the threshold (1,682 items)
INDEX = replace(Recommender.index_settings, backend="faiss")
USERS = [str(u) for u in range(1, 944, 9)]  # 105 users


@pytest.fixture(scope="module")
def two_tower_db(tmp_path_factory, ml100k_db):
    """ml100k (no content vectors: ID embeddings) with a two-tower pipeline live."""
    db = copy_db(ml100k_db, tmp_path_factory.mktemp("retrieval"))
    with torch_threads(1), Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        report = eng.train("two_tower", options={"dim": 32, "epochs": 3, "batch_size": 1024,
                                                 "n_random": 512, "validation": False},
                           force=True, seed=0)
        assert report.activated
    return db


def _engine(db, settings: IndexSettings | None) -> Engine:
    eng = Engine(db, device="cpu", entrypoints=False, progress=False)
    rec = eng.services.recommender()
    if settings is not None:
        rec.index_settings = settings
    return eng


@pytest.fixture(scope="module")
def engines(two_tower_db):
    """(full scoring, indexed retrieval) over the same database."""
    full, indexed = _engine(two_tower_db, None), _engine(two_tower_db, INDEX)
    rec = indexed.services.recommender()
    retrieval = rec._retrieval()
    assert retrieval is not None, "the two-tower pipeline should be retrieved through an index"
    assert retrieval.slot.wait(120) and retrieval.slot.kind == "ivf", retrieval.slot.error
    assert full.services.recommender()._retrieval() is None  # 1,682 items: below threshold
    yield full, indexed
    full.close()
    indexed.close()


def test_two_tower_keys_and_queries_reproduce_its_scores(engines):
    full, _ = engines
    rec = full.services.recommender()
    data, ranker = rec.data, rec.ranker
    users = torch.tensor([rec.user_index[u] for u in sorted(rec.user_index)[:50]])
    keys = ranker.retrieval_keys(data)
    queries = ranker.retrieval_queries(users, data)
    scores = ranker.score_users(users, data)
    valid = keys.valid
    assert 0 < int(valid.sum()) < data.n_items  # films nobody rated have no ID embedding
    product = queries @ keys.keys.T
    assert torch.allclose(product[:, valid], scores[:, valid], atol=1e-4, rtol=1e-4)
    rest, low = scores[:, ~valid], scores[:, valid].min(1, keepdim=True).values
    assert bool((torch.isinf(rest) | (rest <= low)).all())  # -inf, or after every valid item


def _compare(full: Engine, indexed: Engine, users, **options) -> float:
    """Mean share of full scoring's top 10 that the indexed path returns (scores equal
    for the items both return)."""
    overlap = []
    for user in users:
        want = {r.item: r.score for r in full.recommend(user, 10, **options)}
        got = {r.item: r.score for r in indexed.recommend(user, 10, **options)}
        assert len(got) == len(want), (user, options)
        for item in set(want) & set(got):
            assert got[item] == pytest.approx(want[item], rel=1e-4, abs=1e-4)
        overlap.append(len(set(want) & set(got)) / max(1, len(want)))
    return sum(overlap) / len(overlap)


def test_indexed_recommendations_equal_full_scoring(engines):
    full, indexed = engines
    assert _compare(full, indexed, USERS) >= 0.98


def test_filters_and_seen_items_hold_and_a_rare_filter_widens_the_pool(engines):
    full, indexed = engines
    assert _compare(full, indexed, USERS[:40], filters={"class": "Comedy"}) >= 0.98
    # 50 documentaries among 1,682 films: the first candidate pool rarely holds 10 of them
    assert _compare(full, indexed, USERS[:40], filters={"class": "Documentary"}) >= 0.98
    assert _compare(full, indexed, USERS[:20], diversity=0.3) >= 0.98  # MMR over the pool
    with indexed.store.session() as s:
        rated = set(s.execute(select(Item.external_id)
                              .join(Interaction, Interaction.item_id == Item.id)
                              .join(User, User.id == Interaction.user_id)
                              .where(User.external_id == "1")).scalars())
    assert len(rated) > 200
    assert not rated & {r.item for r in indexed.recommend("1", 50)}


def test_retired_items_are_filtered_from_the_index_and_the_pool_widens(engines):
    """Retiring items keeps the index (no rebuild: the same retrieval object) and drops
    them from each user's candidates; the pool widens so that k live items come back,
    those of full scoring."""
    full, indexed = engines
    rec = indexed.services.recommender()
    retrieval = rec._retrieval()
    users = USERS[:30]
    tops = {u: [r.item for r in full.recommend(u, 10)] for u in users}
    mine = [r.item for r in indexed.recommend(users[0], 10)]
    retired = sorted({i for top in tops.values() for i in top[:6]})  # most of every top 10
    assert len(retired) >= 12
    full.retire_items(retired)
    try:
        rec.refresh(wait=True)  # the other Engine's write, seen now instead of within 0.5 s
        assert rec._retrieval() is retrieval  # the same index, filtered
        for user in users:
            got = [r.item for r in indexed.recommend(user, 10)]
            assert len(got) == 10 and not set(retired) & set(got)
        assert _compare(full, indexed, users) >= 0.98
    finally:
        full.restore_items(retired)
    rec.refresh(wait=True)
    assert [r.item for r in indexed.recommend(users[0], 10)] == mine


def test_a_failing_retrieval_is_recorded_and_full_scoring_answers(two_tower_db):
    with _engine(two_tower_db, INDEX) as eng:
        rec = eng.services.recommender()
        rec._retrieval().slot.wait(120)

        def broken(*_args, **_kwargs):
            raise RuntimeError("index side broken")

        rec.ranker.retrieval_queries = broken  # this loaded instance only
        with _engine(two_tower_db, None) as full:
            assert [r.item for r in eng.recommend("7", 10)] == \
                   [r.item for r in full.recommend("7", 10)]
        assert any(e["stage"] == "retrieval_queries" and "index side broken" in e["error"]
                   for e in rec.errors)
        assert rec._retrieval() is None  # dropped for this snapshot: no retry per request


def test_a_fresh_process_maps_the_saved_item_side_and_never_runs_the_item_tower(
        engines, two_tower_db, monkeypatch):
    """The keys and item vectors saved by the first process (engines fixture) are read
    by the next one for the same model and catalogue; its answers equal full scoring; a
    new item (a new catalogue state) makes the ranker give its keys again."""
    from polyrec.plugins.rank_two_tower import TwoTowerRanker
    full, indexed = engines
    indexed.services.recommender().vectors()  # the online learners' item space: saved too
    directory = two_tower_db.parent / f"{two_tower_db.name}.polyrec-index"
    assert len(list(directory.glob("keys-recommend-*.matrix.npy"))) == 1
    assert len(list(directory.glob("itemvectors-recommend-*.matrix.npy"))) == 1
    users = USERS[:30]
    want = {u: [(r.item, r.score) for r in full.recommend(u, 10)] for u in users}

    def no_tower(*_args, **_kwargs):
        raise AssertionError("the item side was saved: the ranker must not compute it again")

    monkeypatch.setattr(TwoTowerRanker, "retrieval_keys", no_tower)
    monkeypatch.setattr(TwoTowerRanker, "_prepared", no_tower)
    with _engine(two_tower_db, INDEX) as fresh:
        rec = fresh.services.recommender()
        assert rec._retrieval() is not None and not rec.errors
        got = {u: [(r.item, r.score) for r in fresh.recommend(u, 10)] for u in users}
        assert not rec.errors
    overlap = [len({i for i, _ in want[u]} & {i for i, _ in got[u]}) / 10 for u in users]
    assert sum(overlap) / len(overlap) >= 0.98
    for u in users:
        mine = dict(got[u])
        for item, score in want[u]:
            if item in mine:
                assert mine[item] == pytest.approx(score, rel=1e-4, abs=1e-4)
    monkeypatch.undo()

    grown_dir = two_tower_db.parent / "grown"
    grown_dir.mkdir()
    db = copy_db(two_tower_db, grown_dir)
    shutil.copytree(directory, grown_dir / directory.name)  # the saved keys come along
    with Engine(db, device="cpu", entrypoints=False, progress=False,
                encode_on_arrival=False) as grown:
        grown.services.recommender().index_settings = INDEX
        grown.add_items([{"external_id": "new-film", "title": "A film added today"}])
        asked = []
        original = TwoTowerRanker.retrieval_keys

        def counted(self, data):
            asked.append(data.n_items)
            return original(self, data)

        monkeypatch.setattr(TwoTowerRanker, "retrieval_keys", counted)
        grown.recommend("1", 10)
        assert asked == [1683]
