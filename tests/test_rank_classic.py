"""Classical rankers: popular, item-kNN and EASE (formulas, cold items, state, ml-100k)."""
from __future__ import annotations

import math

import pytest
import torch

from polyrec import Engine
from polyrec.rank.dataset import build_training_data
from polyrec.errors import ModelNotTrainedError
from polyrec.rank.evaluation import evaluate_ranker, make_split, validation_split
from polyrec.training_data import TrainingData
from polyrec.plugins.rank_classic import EASERanker, ItemKNNRanker, PopularRanker, RandomRanker


def _tiny() -> TrainingData:
    """4 users x 5 items; item 4 has no interactions (cold)."""
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2), (3, 0), (3, 3)]
    users, items = zip(*pairs)
    return TrainingData(user_ids=[1, 2, 3, 4], item_ids=[10, 11, 12, 13, 14],
                        users=torch.tensor(users), items=torch.tensor(items),
                        weights=torch.ones(len(pairs)), ts=torch.zeros(len(pairs), dtype=torch.float64))


def test_popular_counts_and_cold_items():
    data = _tiny()
    r = PopularRanker()
    r.fit(data)
    scores = r.score_users(torch.tensor([0, 2]), data)
    assert scores[0, :4].tolist() == [3.0, 3.0, 2.0, 1.0]
    assert scores[:, 4].tolist() == [-math.inf, -math.inf]


def test_ease_matches_closed_form():
    data = _tiny()
    r = EASERanker(l2=2.0)
    r.fit(data)
    x = data.matrix().double()
    p = torch.linalg.inv(x.T @ x + 2.0 * torch.eye(5, dtype=torch.float64))
    b = torch.eye(5, dtype=torch.float64) - p / torch.diag(p)[None, :]
    assert torch.allclose(r.weights.double(), b, atol=1e-5)
    assert torch.all(torch.diagonal(r.weights) == 0)
    scores = r.score_users(torch.arange(4), data)
    assert torch.allclose(scores[:, :4].double(), (x @ b)[:, :4], atol=1e-5)
    assert r.info["chosen"] == {"l2": 2.0} and "tuned_on" not in r.info


def test_itemknn_cosine_with_shrinkage():
    data = _tiny()
    r = ItemKNNRanker(neighbors=4, shrink=1.0)
    r.fit(data)
    # items 0 and 1 share users 0 and 1; |U0| = 3, |U1| = 3 -> 2 / (3 + 1)
    # user 2 has items 1, 2: score(item 0) = sim(1, 0) + sim(2, 0)
    sim10 = 2 / (3 + 1)
    sim20 = 1 / (math.sqrt(2) * math.sqrt(3) + 1)  # item 2: users 1, 2; shares user 1
    scores = r.score_users(torch.tensor([2]), data)
    assert scores[0, 0].item() == pytest.approx(sim10 + sim20, rel=1e-5)
    one = ItemKNNRanker(neighbors=1, shrink=0.0)
    one.fit(data)  # each item keeps only its single nearest neighbour
    i, j, _ = one.neighbors
    assert torch.bincount(j, minlength=5).max() <= 1


@pytest.mark.parametrize("cls,opts", [(PopularRanker, {}), (ItemKNNRanker, {"neighbors": 3, "shrink": 0.0}),
                                      (EASERanker, {"l2": 1.0})])
def test_id_rankers_never_rank_cold_items_above_warm_ones(cls, opts):
    data = _tiny()
    r = cls(**opts)
    assert r.handles_cold_items is False
    with pytest.raises(ModelNotTrainedError):
        r.score_users(torch.tensor([0]), data)
    r.fit(data)
    scores = r.score_users(torch.arange(4), data)
    assert torch.all(scores[:, 4] == -math.inf)
    assert torch.all(torch.isfinite(scores[:, :4]))
    restored = cls(**opts)
    restored.load_state(r.state())
    assert torch.equal(restored.score_users(torch.arange(4), data), scores)


def test_random_ranker_is_seeded_and_scores_everything():
    data = _tiny()
    a, b, c = RandomRanker(seed=1), RandomRanker(seed=1), RandomRanker(seed=2)
    for r in (a, b, c):
        r.fit(data)
    users = torch.tensor([0, 3])
    assert torch.equal(a.score_users(users, data), b.score_users(users, data))
    assert not torch.equal(a.score_users(users, data), c.score_users(users, data))
    assert torch.equal(a.score_users(users, data)[1], a.score_users(torch.tensor([3]), data)[0])
    assert a.handles_cold_items


@pytest.fixture(scope="module")
def ml_split(ml100k_db):
    with Engine(ml100k_db, device="cpu", entrypoints=False, progress=False) as eng:
        data = build_training_data(eng, features=False)
    return make_split(data, "random", seed=0)


@pytest.mark.slow
def test_ease_beats_popular_on_ml100k_with_l2_tuned_on_validation(ml_split):
    grid = [100.0, 500.0, 3000.0]
    ease = EASERanker(l2=grid)
    ease.fit(ml_split.train)
    assert ease.info["tuned_on"] == "validation"
    # the choice is the best of the grid on validation carved from train (not on test)
    val = validation_split(ml_split.train)
    on_val = {}
    for l2 in grid:
        r = EASERanker(l2=l2)
        r.fit(val.train)
        on_val[l2] = evaluate_ranker(r, val, ks=(20,))["ndcg@20"]
    assert ease.l2 == max(on_val, key=on_val.get)
    assert [g["ndcg@20"] for g in ease.info["grid"]] == pytest.approx([on_val[g] for g in grid])
    popular = PopularRanker()
    popular.fit(ml_split.train)
    e = evaluate_ranker(ease, ml_split)
    p = evaluate_ranker(popular, ml_split)
    assert e["recall@20"] > 1.5 * p["recall@20"]
    assert e["ndcg@20"] > 1.5 * p["ndcg@20"]
    assert e["recall@20"] > 0.35  # published EASE figures on this protocol are ~0.4
    assert e["coverage@20"] > p["coverage@20"]
