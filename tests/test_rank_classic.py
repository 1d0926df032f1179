"""Classical rankers: popular, item-kNN, EASE, EDLAE, EASE with side information and
RP3beta (formulas against brute force, cold items, state, ml-100k)."""
from __future__ import annotations

import math

import pytest
import torch

from polyrec import Engine
from polyrec.rank.dataset import build_training_data
from polyrec.errors import ConfigError, ModelNotTrainedError
from polyrec.rank.evaluation import evaluate_ranker, make_split, validation_split
from polyrec.training_data import TrainingData
from polyrec.plugins.rank_classic import (EASERanker, EDLAERanker, ItemKNNRanker, PopularRanker,
                                          RandomRanker, RP3betaRanker, SideEASERanker,
                                          edlae_weights)


def _tiny() -> TrainingData:
    """4 users x 5 items; item 4 has no interactions (cold)."""
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2), (3, 0), (3, 3)]
    users, items = zip(*pairs)
    return TrainingData(user_ids=[1, 2, 3, 4], item_ids=[10, 11, 12, 13, 14],
                        users=torch.tensor(users), items=torch.tensor(items),
                        weights=torch.ones(len(pairs)), ts=torch.zeros(len(pairs), dtype=torch.float64))


def test_tuning_on_data_too_sparse_for_validation_says_so_and_what_to_do():
    """One interaction per user: no user keeps a held-out validation item, so a grid
    cannot be tuned; the error says that and how to fix the value (not 'unknown metric')."""
    pairs = [(u, u % 7) for u in range(40)]
    users, items = zip(*pairs)
    data = TrainingData(user_ids=list(range(1, 41)), item_ids=list(range(100, 107)),
                        users=torch.tensor(users), items=torch.tensor(items),
                        weights=torch.ones(len(pairs)), ts=torch.zeros(len(pairs), dtype=torch.float64))
    with pytest.raises(ConfigError) as err:
        EASERanker().fit(data)
    message = str(err.value)
    assert "not enough interactions to carve validation data for tuning l2" in message
    assert "--set l2=500" in message and "unknown tuning metric" not in message
    fixed = EASERanker(l2=500.0)  # the suggested fix trains
    fixed.fit(data)
    assert fixed.info["chosen"] == {"l2": 500.0}


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


def _ridge_zero_diagonal(x: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Brute force: column by column, the ridge regression of item j on the other items
    (penalty[i] on weight i), solved as least squares on the stacked system."""
    n = x.shape[1]
    b = torch.zeros(n, n, dtype=torch.float64)
    for j in range(n):
        others = [i for i in range(n) if i != j]
        a = torch.cat([x[:, others], torch.diag(penalty[others].sqrt())])
        y = torch.cat([x[:, j], torch.zeros(len(others), dtype=torch.float64)])
        b[others, j] = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
    return b


def test_edlae_zero_diagonal_is_ridge_per_item_with_the_dropout_penalty():
    data = _tiny()
    r = EDLAERanker(l2=0.5, dropout=0.25)
    r.fit(data)
    x = data.matrix().double()
    penalty = 0.25 / 0.75 * (x.T @ x).diagonal() + 0.5
    assert torch.allclose(r.weights.double(), _ridge_zero_diagonal(x, penalty), atol=1e-5)
    assert r.info["chosen"] == {"l2": 0.5, "dropout": 0.25}
    scores = r.score_users(torch.arange(4), data)
    assert torch.allclose(scores[:, :4].double(), (x @ r.weights.double())[:, :4], atol=1e-5)


def test_edlae_free_diagonal_is_the_denoising_autoencoder_over_every_dropout_mask():
    """The closed form without the zero-diagonal constraint equals the least-squares
    fit of X from its dropped-out copies, every mask enumerated with its probability."""
    data = _tiny()
    p, l2 = 0.3, 0.5
    x = data.matrix().double()
    ones = torch.nonzero(x)
    rows, targets, weights = [], [], []
    for mask in range(2 ** len(ones)):
        kept = x.clone()
        dropped = [k for k in range(len(ones)) if mask >> k & 1]
        for k in dropped:
            kept[tuple(ones[k])] = 0.0
        prob = p ** len(dropped) * (1 - p) ** (len(ones) - len(dropped))
        rows.append(kept / (1 - p))
        targets.append(x)
        weights.append(torch.full((len(x),), prob, dtype=torch.float64))
    a, y, w = torch.cat(rows), torch.cat(targets), torch.cat(weights).sqrt()[:, None]
    a = torch.cat([a * w, math.sqrt(l2) * torch.eye(5, dtype=torch.float64)])
    y = torch.cat([y * w, torch.zeros(5, 5, dtype=torch.float64)])
    brute = torch.linalg.lstsq(a, y).solution
    closed = edlae_weights(x.T @ x, l2, p, zero_diagonal=False)
    assert torch.allclose(closed, brute, atol=1e-8)
    r = EDLAERanker(l2=l2, dropout=p, zero_diagonal=False)
    r.fit(data)
    assert torch.allclose(r.weights.double(), brute, atol=1e-5)


def test_edlae_without_dropout_is_ease_and_bad_options_fail():
    data = _tiny()
    e, d = EASERanker(l2=2.0), EDLAERanker(l2=2.0, dropout=0.0)
    e.fit(data)
    d.fit(data)
    assert torch.allclose(e.weights, d.weights, atol=1e-6)
    from polyrec import ConfigError
    for bad in ({"l2": 1.0, "dropout": 1.0}, {"l2": 0.0, "dropout": 0.1}):
        with pytest.raises(ConfigError):
            EDLAERanker(**bad).fit(data)


def _with_text(data: TrainingData) -> TrainingData:
    """_tiny with 3-d 'text' vectors; item 3 has none."""
    from dataclasses import replace
    vecs = torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [0, 1.0, 0], [0, 0, 0], [0, 0.5, 1.0]])
    present = torch.tensor([True, True, True, False, True])
    return replace(data, item_features={"text": (vecs, present)})


def test_ease_side_is_ease_over_the_content_dimensions_as_pseudo_users():
    data = _with_text(_tiny())
    r = SideEASERanker(l2=1.0, side=4.0, dropout=0.0, zero_diagonal=True)
    r.fit(data)
    x = data.matrix().double()
    vecs, present = data.item_features["text"]
    unit = torch.nn.functional.normalize(vecs.double(), dim=-1) * present[:, None]
    stacked = torch.cat([x, 2.0 * unit.T])  # sqrt(side) U^T: one pseudo-user per dimension
    brute = _ridge_zero_diagonal(stacked, torch.full((5,), 1.0, dtype=torch.float64))
    assert torch.allclose(r.weights.double(), brute, atol=1e-5)
    # the default form: EDLAE's penalty from the stacked Gram's diagonal, free diagonal:
    # least squares of X' from X' with that ridge penalty
    free = SideEASERanker(l2=1.0, side=4.0, dropout=0.25)
    free.fit(data)
    penalty = 0.25 / 0.75 * (stacked ** 2).sum(0) + 1.0
    a = torch.cat([stacked, torch.diag(penalty.sqrt())])
    y = torch.cat([stacked, torch.zeros(5, 5, dtype=torch.float64)])
    assert torch.allclose(free.weights.double(), torch.linalg.lstsq(a, y).solution, atol=1e-5)
    # the content links item 4 (no interaction) to items 1 and 2, but ID rankers leave it out
    assert float(r.weights[4, 2].abs()) > 0
    assert torch.all(r.score_users(torch.arange(4), data)[:, 4] == -math.inf)
    plain = SideEASERanker(l2=1.0, side=0.0, dropout=0.0, zero_diagonal=True)
    plain.fit(data)
    ease = EASERanker(l2=1.0)
    ease.fit(data)
    assert torch.allclose(plain.weights, ease.weights, atol=1e-6)


def test_ease_side_modalities_are_names_not_substrings():
    """One name (as `--set modalities=text` gives it), a list and "all" select the same
    vectors here; a name that is only part of one ("tex") selects none."""
    data = _with_text(_tiny())

    def weights(modalities):  # type: ignore[no-untyped-def]
        r = SideEASERanker(l2=1.0, side=4.0, dropout=0.0, zero_diagonal=True,
                           modalities=modalities)
        r.fit(data)
        return r.weights
    listed = weights(["text"])
    assert torch.equal(weights("text"), listed) and torch.equal(weights("all"), listed)
    ease = EASERanker(l2=1.0)
    ease.fit(data)
    assert torch.allclose(weights("tex"), ease.weights, atol=1e-6)
    assert not torch.allclose(listed, ease.weights, atol=1e-3)


def test_ease_side_without_vectors_tunes_no_side_weight():
    gen = torch.Generator().manual_seed(0)  # 30 users with 5 of 8 items each, no vectors
    items = torch.cat([torch.randperm(8, generator=gen)[:5] for _ in range(30)])
    data = TrainingData(user_ids=list(range(30)), item_ids=list(range(8)),
                        users=torch.arange(30).repeat_interleave(5), items=items,
                        weights=torch.ones(150), ts=torch.zeros(150, dtype=torch.float64))
    r = SideEASERanker(l2=[1.0, 5.0])
    r.fit(data)
    assert all("side" not in g["params"] for g in r.info["grid"]) and len(r.info["grid"]) == 4
    assert r.chosen["side"] == 0.0
    assert r.params["side"] == [50.0, 100.0]  # the grid is kept for the next fit


def test_rp3beta_matches_the_random_walk_by_hand():
    data = _tiny()
    r = RP3betaRanker(alpha=0.5, beta=0.3, neighbors=4)
    r.fit(data)
    x = data.matrix().double()
    deg_u, deg_i = x.sum(1), x.sum(0)
    w = torch.zeros(5, 5, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            if i == j or deg_i[j] == 0:
                continue
            walk = sum((x[u, i] / deg_i[i]) ** 0.5 * (x[u, j] / deg_u[u]) ** 0.5
                       for u in range(4) if x[u, i] and x[u, j])
            w[i, j] = walk / deg_i[j] ** 0.3
    assert torch.allclose(r.weights.double(), w, atol=1e-6)
    scores = r.score_users(torch.arange(4), data)
    assert torch.allclose(scores[:, :4].double(), (x @ w)[:, :4], atol=1e-5)
    one = RP3betaRanker(alpha=1.0, beta=0.0, neighbors=1)
    one.fit(data)
    assert int((one.weights > 0).sum(1).max()) <= 1
    from polyrec import ConfigError
    for alpha in (0.0, -0.5, float("nan")):  # 0 ** 0 = 1: every pair would be a walk
        with pytest.raises(ConfigError, match="alpha"):
            RP3betaRanker(alpha=alpha, beta=0.0).fit(data)


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
                                      (EASERanker, {"l2": 1.0}),
                                      (EDLAERanker, {"l2": 1.0, "dropout": 0.3}),
                                      (SideEASERanker, {"l2": 1.0, "side": 2.0, "dropout": 0.3}),
                                      (RP3betaRanker, {"alpha": 1.0, "beta": 0.5})])
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
