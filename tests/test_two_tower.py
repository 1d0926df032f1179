"""The two-tower ranker on real MovieLens-100k positives with cheap real item features
(genre multi-hot, and the Freebase neighbours of each linked film through a fixed random
projection as the KG modality: 84 films have no link, so that modality is missing there)."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from polyrec.store.artifacts import from_bytes, to_bytes
from polyrec.errors import ConfigError, ModelNotTrainedError
from polyrec.rank.evaluation import evaluate_ranker, make_split
from polyrec.training_data import TrainingData
from polyrec.plugins.rank_classic import PopularRanker
from polyrec.plugins.rank_two_tower import TwoTowerRanker

FAST = {"device": "cpu", "dim": 32, "batch_size": 512, "lr": 1e-3, "n_random": 512,
        "negatives": "random", "validation": False}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _read(path):
    with open(path, newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = [c.split(":")[0] for c in next(rows)]
        return [dict(zip(header, r)) for r in rows]


@pytest.fixture(scope="session")
def ml_data(ml100k_dir) -> TrainingData:
    return build_ml_data(ml100k_dir)


def build_ml_data(ml100k_dir, max_user: int = 400) -> TrainingData:
    """Positives (rating >= 4) of the first ``max_user`` users, all 1,682 items, two
    modalities: 'genre' (multi-hot) and 'kg' (missing for the 84 unlinked films)."""
    items = _read(ml100k_dir / "ml-100k.item")
    item_ids = [int(r["item_id"]) for r in items]
    genres = sorted({g for r in items for g in r["class"].split()})
    genre = torch.zeros(len(items), len(genres))
    for k, r in enumerate(items):
        for g in r["class"].split():
            genre[k, genres.index(g)] = 1.0
    links = {r["item_id"]: r["entity_id"] for r in _read(ml100k_dir / "ml-100k.link")}
    neighbours: dict[str, set[str]] = {}
    for t in _read(ml100k_dir / "ml-100k.kg"):
        neighbours.setdefault(t["head_id"], set()).add(t["tail_id"])
        neighbours.setdefault(t["tail_id"], set()).add(t["head_id"])
    entities = sorted({e for r in items for e in neighbours.get(links.get(r["item_id"], ""), ())})
    col = {e: j for j, e in enumerate(entities)}
    gen = torch.Generator().manual_seed(0)
    projection = torch.randn(len(entities), 48, generator=gen) / math.sqrt(48)
    kg = torch.zeros(len(items), 48)
    has_kg = torch.zeros(len(items), dtype=torch.bool)
    for k, r in enumerate(items):
        cols = [col[e] for e in neighbours.get(links.get(r["item_id"], ""), ())]
        if cols:
            kg[k] = projection[cols].sum(0)
            has_kg[k] = True
    inter = [r for r in _read(ml100k_dir / "ml-100k.inter")
             if float(r["rating"]) >= 4 and int(r["user_id"]) <= max_user]
    user_ids = sorted({int(r["user_id"]) for r in inter})
    uidx = {u: k for k, u in enumerate(user_ids)}
    iidx = {i: k for k, i in enumerate(item_ids)}
    return TrainingData(
        user_ids=user_ids, item_ids=item_ids,
        users=torch.tensor([uidx[int(r["user_id"])] for r in inter]),
        items=torch.tensor([iidx[int(r["item_id"])] for r in inter]),
        weights=torch.ones(len(inter)), ts=torch.tensor([float(r["timestamp"]) for r in inter],
                                                       dtype=torch.float64),
        item_features={"genre": (genre, torch.ones(len(items), dtype=torch.bool)),
                       "kg": (kg, has_kg)})


@pytest.fixture(scope="session")
def random_split(ml_data):
    return make_split(ml_data, "random", seed=0)


@pytest.fixture(scope="session")
def fitted(random_split):
    torch.set_num_threads(1)
    ranker = TwoTowerRanker(**FAST, epochs=8)
    ranker.fit(random_split.train)
    return ranker


@pytest.mark.slow
def test_two_tower_learns_and_beats_popular(random_split, fitted):
    popular = PopularRanker()
    popular.fit(random_split.train)
    base = evaluate_ranker(popular, random_split, ks=(20,))
    ours = evaluate_ranker(fitted, random_split, ks=(20,))
    assert ours["ndcg@20"] > base["ndcg@20"] * 1.05, (ours, base)
    assert ours["recall@20"] > base["recall@20"], (ours, base)
    assert fitted.info["epochs"] == 8 and fitted.info["throughput"] > 0


@pytest.mark.slow
def test_scores_and_vectors_have_catalogue_shape(random_split, fitted):
    data = random_split.train
    scores = fitted.score_users(torch.tensor([0, 1, 2]), data)
    assert scores.shape == (3, data.n_items) and torch.isfinite(scores).all()
    vectors = fitted.item_vectors(data)
    assert vectors.shape == (data.n_items, 32)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(data.n_items), atol=1e-4)
    names, weights = fitted.modality_weights(data)
    assert names == ["genre", "kg"]
    assert torch.allclose(weights.sum(1), torch.ones(data.n_items), atol=1e-4)
    no_kg = ~data.item_features["kg"][1]
    assert (weights[no_kg, 1] == 0).all()
    assert torch.allclose(weights[no_kg, 0], torch.ones(int(no_kg.sum())))


@pytest.mark.slow
def test_state_round_trips_through_bytes(random_split, fitted):
    data = random_split.train
    restored = TwoTowerRanker(device="cpu")
    restored.load_state(from_bytes(to_bytes(fitted.state())))
    users = torch.arange(10)
    assert torch.allclose(restored.score_users(users, data), fitted.score_users(users, data), atol=1e-5)
    assert restored.options["dim"] == 32


@pytest.mark.slow
def test_state_keeps_ids_and_weights_as_tensors_and_still_reads_older_states(random_split, fitted):
    data = random_split.train
    state = fitted.state()
    # tensors: torch's weights-only unpickler takes seconds over a list of 1M ints
    assert all(isinstance(state[k], torch.Tensor) for k in ("item_ids", "user_ids", "warm"))
    # the weights as tensors too (not nested bytes), so a mapped artifact maps them
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    older = {**state, "item_ids": state["item_ids"].tolist(),
             "user_ids": state["user_ids"].tolist(), "warm": state["warm"].tolist(),
             "model": to_bytes(state["model"])}
    restored = TwoTowerRanker(device="cpu")
    restored.load_state(from_bytes(to_bytes(older)))
    users = torch.arange(10)
    assert restored.item_ids == fitted.item_ids and restored.user_ids == fitted.user_ids
    assert torch.allclose(restored.score_users(users, data), fitted.score_users(users, data), atol=1e-5)


@pytest.mark.slow
def test_user_vectors_from_history_items_alone_equal_the_whole_catalogue_path(random_split,
                                                                              fitted):
    """A server that persisted the item side runs the item tower only over a user's
    history items; the result must be the full path's, new (unseen) items included."""
    base = random_split.train
    new_ids = [max(base.item_ids) + 1, max(base.item_ids) + 2]
    feats = {m: (torch.cat([v, v[:2] * 0.5]), torch.cat([p, p[:2]]))
             for m, (v, p) in base.item_features.items()}
    extra_u, extra_i = torch.tensor([0, 1, 2, 3]), torch.tensor([base.n_items, base.n_items + 1] * 2)
    data = TrainingData(user_ids=base.user_ids, item_ids=base.item_ids + new_ids,
                        users=torch.cat([base.users, extra_u]),
                        items=torch.cat([base.items, extra_i]),
                        weights=torch.cat([base.weights, torch.ones(4)]),
                        ts=torch.cat([base.ts, torch.full((4,), 9e9, dtype=torch.float64)]),
                        item_features=feats)
    state = from_bytes(to_bytes(fitted.state()))
    partial, full = TwoTowerRanker(device="cpu"), TwoTowerRanker(device="cpu")
    partial.load_state(state)
    full.load_state(state)
    full.item_vectors(data)  # the whole catalogue through the tower, cached
    users = torch.tensor([0, 3, 7, 25])
    got = partial.user_vectors(users, data)
    assert partial._cache == {}  # never ran the tower over every item
    assert torch.allclose(got, full.user_vectors(users, data), atol=1e-5)
    assert torch.allclose(partial.retrieval_queries(users, data),
                          full.retrieval_queries(users, data), atol=1e-5)


@pytest.mark.slow
def test_cold_items_get_content_scores_and_id_only_cannot(ml_data):
    split = make_split(ml_data, "cold", seed=0)
    cold = split.cold_items
    fused = TwoTowerRanker(**FAST, epochs=4)
    fused.fit(split.train)
    scores = fused.score_users(torch.arange(5), split.train)
    assert torch.isfinite(scores[:, cold]).all()
    result = evaluate_ranker(fused, split, ks=(20,))
    chance = 20 / len(cold)  # a random ranking of the cold candidates hits about this
    assert result["recall@20"] > 2 * chance, (result, chance)

    id_only = TwoTowerRanker(**{**FAST, "modalities": "none"}, epochs=1)
    id_only.fit(split.train)
    assert torch.isinf(id_only.score_users(torch.arange(3), split.train)[:, cold]).all()
    assert evaluate_ranker(id_only, split, ks=(20,))["recall@20"] == 0.0


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch_and_seed_reproduces(random_split):
    opts = {**FAST, "validation": True, "refit": False, "epochs": 3, "patience": 1, "seed": 7}
    a = TwoTowerRanker(**opts)
    a.fit(random_split.train)
    history = a.info["validation"]
    assert 1 <= len(history) <= 3
    assert a.info["epochs"] == history.index(max(history)) + 1
    b = TwoTowerRanker(**opts)
    b.fit(random_split.train)
    assert b.info["validation"] == history
    users = torch.arange(5)
    assert torch.allclose(a.score_users(users, random_split.train),
                          b.score_users(users, random_split.train), atol=1e-5)


@pytest.mark.parametrize("loss,negatives", [("bpr", "both"), ("softmax", "in_batch")])
def test_other_losses_and_negatives_train(random_split, loss, negatives):
    ranker = TwoTowerRanker(**{**FAST, "loss": loss, "negatives": negatives, "fuser": "mean",
                               "use_user_id": True, "modalities": "genre"}, epochs=1)
    ranker.fit(random_split.train)
    scores = ranker.score_users(torch.arange(4), random_split.train)
    assert torch.isfinite(scores).all() and scores.std() > 0
    assert ranker.info["modalities"] == ["genre"]


def test_bad_options_are_config_errors(random_split):
    with pytest.raises(ConfigError, match="unknown option"):
        TwoTowerRanker(layers=3)
    with pytest.raises(ConfigError, match="loss"):
        TwoTowerRanker(loss="hinge")
    with pytest.raises(ConfigError, match="image"):
        TwoTowerRanker(**FAST, modalities="image", epochs=1).fit(random_split.train)
    with pytest.raises(ModelNotTrainedError):
        TwoTowerRanker().score_users(torch.arange(2), random_split.train)


@pytest.mark.slow
def test_warm_start_begins_from_the_stored_model(random_split, fitted):
    """A retrain that warm-starts from the live state is already good after one epoch
    (a cold one-epoch fit is not), and ID embeddings are carried over by id, not by
    position."""
    state = from_bytes(to_bytes(fitted.state()))
    warm = TwoTowerRanker(**FAST, epochs=1)
    assert warm.warm_start(state) is True
    warm.fit(random_split.train)
    cold = TwoTowerRanker(**FAST, epochs=1)
    cold.fit(random_split.train)
    ours = evaluate_ranker(warm, random_split, ks=(20,))["ndcg@20"]
    before = evaluate_ranker(fitted, random_split, ks=(20,))["ndcg@20"]
    scratch = evaluate_ranker(cold, random_split, ks=(20,))["ndcg@20"]
    print(f"ndcg@20 warm 1 epoch {ours:.4f}, cold 1 epoch {scratch:.4f}, stored 8 epochs {before:.4f}")
    assert ours > scratch * 1.05 and ours > before * 0.9, (ours, scratch, before)
    assert warm.info["warm_start"]["used"] and warm.info["warm_start"]["id_rows"] > 0

    from dataclasses import replace
    data = random_split.train
    order = torch.randperm(data.n_items, generator=torch.Generator().manual_seed(0))
    inverse = torch.argsort(order)  # the same items, listed in another order
    shuffled = replace(data, item_ids=[data.item_ids[i] for i in order.tolist()],
                       items=inverse[data.items],
                       item_features={m: (v[order], p[order]) for m, (v, p) in data.item_features.items()})
    moved = TwoTowerRanker(**{**FAST, "lr": 1e-12}, epochs=1)  # (almost) no step: as copied
    moved.warm_start(state)
    moved.fit(shuffled)
    old = fitted.model.item_id.weight.detach()
    new = moved.model.item_id.weight.detach()
    assert torch.allclose(new[inverse], old, atol=1e-4)


@pytest.mark.parametrize("negatives", ["random", "both"])
def test_steps_over_their_own_items_train_the_same_model_as_the_whole_catalogue(
        random_split, monkeypatch, negatives):
    """A step's item tower over only its targets, negatives and the batch users' history
    items (how training scales to 1M items) gives the model the whole-catalogue tower
    gives: the same loss on the same draws, so the same trained scores."""
    from polyrec.plugins import rank_two_tower
    rows_seen: list[int] = []
    original = rank_two_tower.TwoTowerModel.items

    def recording(self, tokens, present, id_index, id_keep, id_mix=None):
        if self.training:
            rows_seen.append(len(id_index))
        return original(self, tokens, present, id_index, id_keep, id_mix)

    monkeypatch.setattr(rank_two_tower.TwoTowerModel, "items", recording)
    opts = {**FAST, "dropout": 0.0, "epochs": 2, "batch_size": 64, "n_random": 64,
            "negatives": negatives}
    n_items = random_split.train.n_items
    trained = {}
    for name, fraction in (("whole", 1e9), ("own", 0)):
        monkeypatch.setattr(rank_two_tower, "STEP_ITEMS_FRACTION", fraction)
        rows_seen.clear()
        ranker = TwoTowerRanker(**opts)
        ranker.fit(random_split.train)
        trained[name] = (ranker, list(rows_seen))
    assert set(trained["whole"][1]) == {n_items}
    assert max(trained["own"][1]) < n_items  # the steps saw only their own items
    users = torch.arange(30)
    whole = trained["whole"][0].score_users(users, random_split.train)
    own = trained["own"][0].score_users(users, random_split.train)
    finite = torch.isfinite(whole)
    assert torch.equal(finite, torch.isfinite(own))
    # equal up to one constant: the sampled softmax ignores a shift of every logit, so the
    # content bias's intercept has a zero gradient whose float noise Adam scales to steps
    diff = torch.where(finite, whole - own, torch.zeros_like(whole))
    shift = diff[finite].mean()
    assert (diff[finite] - shift).abs().max() < 1e-3, (diff[finite] - shift).abs().max()


def test_positive_lookup_narrowed_to_the_users_items_equals_the_full_lookup():
    """At catalogue sizes where the dense users x items table does not fit, negatives
    are checked against the positives by a sorted lookup, narrowed to the items the
    batch users have; it marks exactly what the dense table marks."""
    gen = torch.Generator().manual_seed(3)
    n_users, n_items = 50, 400
    pairs = torch.unique(torch.randint(0, n_users, (900,), generator=gen) * n_items
                         + torch.randint(0, n_items, (900,), generator=gen))
    u = torch.randint(0, n_users, (64,), generator=gen)
    cand = torch.randint(0, n_items, (300,), generator=gen)
    dense = torch.zeros(n_users, n_items, dtype=torch.bool)
    dense[pairs // n_items, pairs % n_items] = True
    expected = dense[u][:, cand]
    mine = torch.isin(pairs // n_items, u)
    theirs = pairs[mine] % n_items
    ranker = TwoTowerRanker(device="cpu")
    ranker._cache["positives"] = torch.zeros(0, n_items, dtype=torch.bool)  # force the lookup
    assert expected.any() and not expected.all()
    assert torch.equal(ranker._is_positive(u, cand, pairs, n_items), expected)
    assert torch.equal(ranker._is_positive(u, cand, pairs, n_items, theirs), expected)


def test_sparse_id_tables_update_only_the_rows_a_step_used_and_still_learn(random_split):
    """sparse_ids 'on' (automatic from SPARSE_ID_ROWS items): the ID tables get sparse
    gradients and a lazy Adam, so rows no step touched keep their initial values exactly,
    while the model still learns (beats popularity on held-out data)."""
    from polyrec.plugins import rank_two_tower
    opts = {**FAST, "modalities": "none", "epochs": 3, "batch_size": 64, "n_random": 32,
            "negatives": "random", "validation": False}
    with pytest.raises(ConfigError, match="sparse_ids"):
        TwoTowerRanker(**opts, sparse_ids="maybe")
    ranker = TwoTowerRanker(**opts, sparse_ids="on")
    data = random_split.train
    ranker._build(data)
    assert ranker.model.item_id.sparse and ranker.model.id_bias.sparse
    assert not TwoTowerRanker(**opts)._sparse_ids(data.n_items)  # auto: small catalogue
    assert TwoTowerRanker(**opts)._sparse_ids(rank_two_tower.SPARSE_ID_ROWS)
    before = ranker.model.item_id.weight.detach().clone()
    touched = torch.zeros(data.n_items, dtype=torch.bool)
    original = rank_two_tower.TwoTowerModel.items

    def recording(self, tokens, present, id_index, id_keep, id_mix=None):
        if self.training:
            touched[id_index] = True
        return original(self, tokens, present, id_index, id_keep, id_mix)

    class OneStep(Exception):
        pass

    real_step = rank_two_tower._Optimizer.step

    def one_step(self):
        real_step(self)
        raise OneStep

    rank_two_tower.TwoTowerModel.items = recording
    rank_two_tower._Optimizer.step = one_step
    saved_fraction = rank_two_tower.STEP_ITEMS_FRACTION
    rank_two_tower.STEP_ITEMS_FRACTION = 0  # the step's own items (as at 1M items)
    try:
        with pytest.raises(OneStep):
            ranker._train(data, None, epochs=1)
    finally:
        rank_two_tower.TwoTowerModel.items = original
        rank_two_tower._Optimizer.step = real_step
        rank_two_tower.STEP_ITEMS_FRACTION = saved_fraction
    after = ranker.model.item_id.weight.detach()
    assert bool((~touched).any()) and bool(touched.any())
    assert torch.equal(after[~touched], before[~touched])
    assert not torch.equal(after[touched], before[touched])

    # where every step touches every row (the whole-catalogue tower of a small catalogue)
    # the lazy optimizer is Adam: the same quality as the dense path
    quality = {}
    for mode in ("off", "on"):
        trained = TwoTowerRanker(**{**FAST, "modalities": "none", "epochs": 3},
                                 sparse_ids=mode)
        trained.fit(data)
        quality[mode] = evaluate_ranker(trained, random_split, ks=(20,))["ndcg@20"]
    assert quality["on"] > 0.05 and abs(quality["on"] - quality["off"]) < 0.02 * quality["off"], \
        quality


def test_history_sampling_draws_at_most_cap_items_of_each_user_uniformly():
    """_sample_history: per user at most ``cap`` of their own entries, no repeats, every
    entry of a heavy user drawn about equally often (an unbiased history mean)."""
    rows = torch.tensor([0] * 10 + [1] * 2 + [2] * 5)
    items = torch.cat([torch.arange(10), torch.tensor([20, 21]), torch.arange(30, 35)])
    lengths = torch.tensor([10, 2, 5])
    gen = torch.Generator().manual_seed(0)
    hits = torch.zeros(40)
    for _ in range(3000):
        r, i = TwoTowerRanker._sample_history(rows, items, lengths, 3, gen)
        assert torch.equal(torch.bincount(r, minlength=3), torch.tensor([3, 2, 3]))
        assert bool((r[1:] >= r[:-1]).all())  # row order kept
        for user, own in ((0, set(range(10))), (1, {20, 21}), (2, set(range(30, 35)))):
            mine = i[r == user].tolist()
            assert len(set(mine)) == len(mine) and set(mine) <= own
        hits.index_add_(0, i, torch.ones(len(i)))
    share = hits[:10] / 3000  # each of user 0's 10 items: drawn 3 times in 10
    assert torch.allclose(share, torch.full((10,), 0.3), atol=0.04)
    assert torch.equal(hits[20:22], torch.full((2,), 3000.0))  # under the cap: always


@pytest.mark.slow
def test_history_sampling_bounds_a_step_and_still_learns(random_split, fitted):
    """A cap above every history trains exactly the model without one; a small cap
    (heavy users' means from a few items each step) still learns: better than popularity,
    close to the full mean (the `fitted` model: the same options, no cap)."""
    with pytest.raises(ConfigError, match="history_sample"):
        TwoTowerRanker(**FAST, history_sample=-1)
    assert TwoTowerRanker(**FAST)._history_cap(random_split.train.n_items) == 0  # auto: small
    from polyrec.plugins.rank_two_tower import HISTORY_SAMPLE, SPARSE_ID_ROWS
    assert TwoTowerRanker(**FAST)._history_cap(SPARSE_ID_ROWS) == HISTORY_SAMPLE
    longest = int(torch.bincount(random_split.train.users).max())
    above = TwoTowerRanker(**FAST, epochs=8, history_sample=longest + 1)
    above.fit(random_split.train)
    assert all(torch.equal(a, b) for a, b in zip(fitted.model.state_dict().values(),
                                                  above.model.state_dict().values()))
    small = TwoTowerRanker(**FAST, epochs=8, history_sample=16)
    small.fit(random_split.train)
    pop = PopularRanker()
    pop.fit(random_split.train)
    ndcg = {name: evaluate_ranker(r, random_split, ks=(20,))["ndcg@20"]
            for name, r in (("all", fitted), ("small", small), ("popular", pop))}
    assert ndcg["small"] > ndcg["popular"] and ndcg["small"] >= 0.9 * ndcg["all"], ndcg
