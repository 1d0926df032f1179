"""The ensemble ranker: standardised weighted sums, weights tuned on validation, cold items."""
from __future__ import annotations

import math

import pytest
import torch

from polyrec.errors import ConfigError
from polyrec.rank.evaluation import evaluate_ranker, make_ranker, random_split
from polyrec.training_data import TrainingData
from polyrec.plugins.rank_ensemble import EnsembleRanker, combine, standardise, weight_grid


def _data(n_users: int = 30, n_items: int = 25, seed: int = 0) -> TrainingData:
    """Two taste groups: even users like low items, odd users high items; item 24 unseen."""
    gen = torch.Generator().manual_seed(seed)
    users, items = [], []
    for u in range(n_users):
        pool = torch.arange(0, 12) if u % 2 == 0 else torch.arange(12, 24)
        chosen = pool[torch.randperm(12, generator=gen)[:8]]
        users += [u] * 8
        items += chosen.tolist()
    n = len(users)
    return TrainingData(user_ids=list(range(n_users)), item_ids=list(range(n_items)),
                        users=torch.tensor(users), items=torch.tensor(items),
                        weights=torch.ones(n), ts=torch.arange(n, dtype=torch.float64))


def test_standardise_and_combine():
    z = standardise(torch.tensor([[1.0, 2.0, 3.0, -math.inf]]))
    assert z[0, :3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-4)
    assert math.isnan(z[0, 3])
    other = torch.tensor([[0.5, float("nan"), float("nan"), 2.0]])
    out = combine([z, other], [1.0, 2.0])
    assert out[0].tolist() == pytest.approx([-1.2247 + 1.0, 0.0, 1.2247, 4.0], abs=1e-4)
    assert combine([torch.full((1, 2), float("nan"))], [1.0])[0].tolist() == [-math.inf, -math.inf]


def test_weight_grid_drops_zero_and_scaled_duplicates():
    grid = weight_grid(2, [0.0, 1.0, 2.0])
    assert (0.0, 0.0) not in grid
    assert (1.0, 1.0) in grid and (2.0, 2.0) not in grid
    assert len(grid) == 5  # (0,1) (1,0) (1,1) (1,2) (2,1)


def test_members_by_name_need_the_registry(engine):
    with pytest.raises(ConfigError):
        EnsembleRanker(members=["ease"])
    with pytest.raises(ConfigError):
        make_ranker(engine.registry("rankers"), "ensemble", {"members": []})
    with pytest.raises(ConfigError):
        make_ranker(engine.registry("rankers"), "ensemble", {"members": ["ease", "popular"],
                                                             "weights": [1.0]})


def test_weights_tuned_on_validation_and_state_round_trip(engine):
    data = _data()
    split = random_split(data, seed=0)
    reg = engine.registry("rankers")
    ens = make_ranker(reg, "ensemble", {"members": [{"name": "ease", "options": {"l2": 5.0}},
                                                    "popular"], "grid": [0.0, 1.0]})
    assert ens.handles_cold_items is False
    ens.fit(split.train)
    assert ens.info["tuned_on"] == "validation"
    tried = {tuple(g["weights"]): g["ndcg@20"] for g in ens.info["grid"]}
    assert tuple(ens.weights) == max(tried, key=tried.get)
    # the taste groups make EASE far better than popularity here
    assert ens.info["weights"]["ease"] == 1.0 and tried[(1.0, 0.0)] > tried[(0.0, 1.0)]
    scores = ens.score_users(torch.arange(4), split.train)
    assert torch.all(scores[:, 24] == -math.inf)  # no member can score the cold item
    again = make_ranker(reg, "ensemble", {"members": [{"name": "ease", "options": {"l2": 5.0}},
                                                      "popular"]})
    again.load_state(ens.state())
    assert torch.equal(again.score_users(torch.arange(4), split.train), scores)
    m = evaluate_ranker(ens, split, ks=(5,))
    assert m["recall@5"] > 0.3


def test_cold_items_scored_by_members_that_can(engine):
    data = _data()
    ens = make_ranker(engine.registry("rankers"), "ensemble",
                      {"members": ["popular", {"name": "random", "options": {"seed": 3}}],
                       "weights": [1.0, 0.5]})
    assert ens.handles_cold_items is True
    ens.fit(data)
    scores = ens.score_users(torch.arange(3), data)
    assert torch.all(torch.isfinite(scores))
    assert ens.info["weights"] == {"popular": 1.0, "random": 0.5}
