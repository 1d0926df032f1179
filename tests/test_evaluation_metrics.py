"""Metrics on hand-computed cases, splits on small synthetic data, masking, ensembles."""
from __future__ import annotations

import math

import pytest
import torch

from polyrec.contracts import Ranker
from polyrec.errors import ConfigError
from polyrec.rank.evaluation import (Split, cold_item_split, evaluate_ranker, make_split, mask_scores,
                               parse_models, random_split, time_split, user_metrics,
                               validation_split)
from polyrec.training_data import TrainingData

INF = math.inf


def _data(per_user: list[int], n_items: int = 40, seed: int = 0) -> TrainingData:
    """Users with the given numbers of distinct positives; ts increasing per user."""
    gen = torch.Generator().manual_seed(seed)
    users, items, ts = [], [], []
    for u, n in enumerate(per_user):
        chosen = torch.randperm(n_items, generator=gen)[:n].tolist()
        for k, it in enumerate(chosen):
            users.append(u)
            items.append(it)
            ts.append(1000.0 * u + k)
    return TrainingData(user_ids=list(range(100, 100 + len(per_user))),
                        item_ids=list(range(500, 500 + n_items)),
                        users=torch.tensor(users), items=torch.tensor(items),
                        weights=torch.ones(len(users)), ts=torch.tensor(ts, dtype=torch.float64))


def _pairs(data: TrainingData) -> set[tuple[int, int]]:
    return set(zip(data.users.tolist(), data.items.tolist()))


def _test_pairs(split: Split) -> set[tuple[int, int]]:
    return {(u, i) for u, t in enumerate(split.test) for i in t.tolist()}


# -- metrics ------------------------------------------------------------------------------
def test_metrics_hand_computed():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    relevant = torch.tensor([[False, True, False, False, True, False]])
    m, tops = user_metrics(scores, relevant, ks=(2, 5))
    assert m["recall@2"].item() == pytest.approx(0.5)  # 1 hit / min(2, 2)
    assert m["recall@5"].item() == pytest.approx(1.0)
    assert m["ndcg@2"].item() == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["ndcg@5"].item() == pytest.approx((1 / math.log2(3) + 1 / math.log2(6))
                                               / (1 + 1 / math.log2(3)))
    assert m["mrr"].item() == pytest.approx(0.5)
    assert m["hitrate@2"].item() == 1.0
    assert tops[2].tolist() == [[0, 1]]


def test_recall_divides_by_min_of_relevant_and_k():
    scores = torch.arange(10, 0, -1).float()[None, :]  # item 0 best
    relevant = torch.zeros(1, 10, dtype=torch.bool)
    relevant[0, [0, 1, 5, 6, 7]] = True  # 5 relevant, K = 2: both top items hit
    m, _ = user_metrics(scores, relevant, ks=(2, 4))
    assert m["recall@2"].item() == pytest.approx(1.0)
    assert m["ndcg@2"].item() == pytest.approx(1.0)
    assert m["recall@4"].item() == pytest.approx(2 / 4)


def test_unscored_items_are_never_hits_and_ties_break_by_index():
    scores = torch.tensor([[1.0, -INF, 1.0, float("nan")], [-INF, -INF, -INF, -INF]])
    relevant = torch.tensor([[False, True, True, True], [True, False, False, False]])
    m, tops = user_metrics(scores, relevant, ks=(3,))
    assert tops[3].tolist() == [[0, 2, -1], [-1, -1, -1]]
    assert m["recall@3"].tolist() == pytest.approx([1 / 3, 0.0])
    assert m["mrr"].tolist() == pytest.approx([0.5, 0.0])
    assert m["hitrate@3"].tolist() == [1.0, 0.0]


def test_mask_scores_hides_training_items_and_non_candidates():
    scores = torch.ones(2, 5)
    cand = torch.tensor([True, True, True, True, False])
    out = mask_scores(scores, torch.tensor([1, 0]), [torch.tensor([3]), torch.tensor([0, 2])], cand)
    assert torch.isinf(out).tolist() == [[True, False, True, False, True],
                                         [False, False, False, True, True]]


class _Oracle(Ranker):
    """Scores training items highest, then the held-out items: only masking lets the
    held-out items reach the top."""

    name = "oracle"

    def __init__(self, split: Split) -> None:
        super().__init__()
        self.split = split

    def fit(self, data):
        pass

    def score_users(self, user_index, data):
        out = data.history(user_index) * 10
        for r, u in enumerate(user_index.tolist()):
            out[r, self.split.test[u]] = 1.0
        return out


def test_training_items_are_masked_in_evaluation():
    split = random_split(_data([20] * 6), seed=3)
    metrics = evaluate_ranker(_Oracle(split), split, ks=(4,))
    assert metrics["recall@4"] == pytest.approx(1.0)
    assert metrics["ndcg@4"] == pytest.approx(1.0)
    assert metrics["mrr"] == pytest.approx(1.0)
    assert 0 < metrics["coverage@4"] <= 1


# -- splits -------------------------------------------------------------------------------
def test_random_split_holds_out_20_percent_and_keeps_small_users():
    data = _data([3, 4, 5, 10, 20])
    split = random_split(data, seed=1)
    held = [len(t) for t in split.test]
    assert held == [0, 0, 1, 2, 4]
    assert _pairs(split.train).isdisjoint(_test_pairs(split))
    assert _pairs(split.train) | _test_pairs(split) == _pairs(data)
    assert split.eval_users.tolist() == [2, 3, 4]
    assert split.train.n_items == data.n_items and split.train.item_ids == data.item_ids


def test_splits_are_seeded():
    data = _data([12] * 8)
    a, b, c = (random_split(data, seed=s) for s in (5, 5, 6))
    assert _test_pairs(a) == _test_pairs(b)
    assert _test_pairs(a) != _test_pairs(c)
    ca, cb = cold_item_split(data, seed=2), cold_item_split(data, seed=2)
    assert ca.cold_items.tolist() == cb.cold_items.tolist()


def test_time_split_holds_out_each_users_latest():
    data = _data([3, 6, 8])
    split = time_split(data)
    assert len(split.test[0]) == 0
    for u in (1, 2):
        mine = data.users == u
        latest = data.items[mine][torch.argmax(data.ts[mine])].item()
        assert split.test[u].tolist() == [latest]
    assert _pairs(split.train).isdisjoint(_test_pairs(split))


def test_cold_split_items_have_no_training_interactions():
    data = _data([15] * 10, n_items=50)
    split = cold_item_split(data, item_share=0.2, seed=0)
    active = int((data.item_counts() > 0).sum())
    assert len(split.cold_items) == round(active * 0.2)
    assert split.train.item_counts()[split.cold_items].sum() == 0
    assert all(set(t.tolist()) <= set(split.cold_items.tolist()) for t in split.test)
    assert _pairs(split.train) | _test_pairs(split) == _pairs(data)
    assert split.candidates.sum() == len(split.cold_items)
    assert cold_item_split(data, candidates="all").candidates is None


def test_validation_is_carved_from_train_with_the_same_protocol():
    data = _data([10] * 12)
    for name in ("random", "time", "cold"):
        split = make_split(data, name, seed=4)
        val = validation_split(split.train)
        assert val.name == name
        assert _pairs(val.train) | _test_pairs(val) == _pairs(split.train)
        assert _test_pairs(val).isdisjoint(_test_pairs(split))
        assert val.params["seed"] == 5
    cold = make_split(data, "cold", seed=4)
    assert validation_split(cold.train, warm_only=True).name == "random"
    assert validation_split(make_split(data, "time").train, warm_only=True).name == "time"


def test_bad_split_arguments():
    data = _data([10])
    with pytest.raises(ConfigError):
        make_split(data, "nope")
    with pytest.raises(ConfigError):
        random_split(data, test_share=1.5)


def test_parse_models_labels_and_options():
    specs = parse_models("popular, text=two_tower", ["text.modalities=[\"text\"]", "popular.x=abc"])
    assert [(s.label, s.name) for s in specs] == [("popular", "popular"), ("text", "two_tower")]
    assert specs[1].options == {"modalities": ["text"]}
    assert specs[0].options == {"x": "abc"}
    with pytest.raises(ConfigError):
        parse_models("ease,ease")
    with pytest.raises(ConfigError):
        parse_models("ease", ["other.l2=1"])


def test_top_k_and_mrr_agree_with_a_full_stable_sort():
    from polyrec.rank.evaluation import top_k
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        n = int(torch.randint(1, 50, (1,), generator=gen))
        scores = torch.randint(0, 4, (6, n), generator=gen).float()  # many ties
        scores[torch.rand(6, n, generator=gen) < 0.2] = -INF
        relevant = torch.rand(6, n, generator=gen) < 0.3
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        assert torch.equal(top_k(scores, k), order[:, :k])
        hits = torch.gather(relevant, 1, order) & (torch.gather(scores, 1, order) > -INF)
        expected = torch.where(hits.any(1), 1.0 / (torch.argmax(hits.int(), 1) + 1).float(),
                               torch.zeros(6))
        assert torch.allclose(user_metrics(scores, relevant, ks=(k,))[0]["mrr"], expected)


def test_top_k_fast_path_and_tie_rows_mixed_agree_with_a_full_stable_sort():
    """Rows without a tie at the k-th place take the one-topk path, the others the
    whole-row one; mixed in one batch, with NaN as unscored, both equal a stable sort."""
    from polyrec.rank.evaluation import top_k
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        n = int(torch.randint(2, 80, (1,), generator=gen))
        scores = torch.randn(8, n, generator=gen)
        scores[1] = torch.randint(0, 3, (n,), generator=gen).float()  # ties everywhere
        scores[2] = 0.0  # an unknown user: all equal
        scores[3, torch.rand(n, generator=gen) < 0.5] = -INF  # few scored items
        scores[4, :n // 2] = scores[4, n // 2:n // 2 * 2]  # each value twice
        scores[5, torch.rand(n, generator=gen) < 0.3] = float("nan")
        relevant = torch.rand(8, n, generator=gen) < 0.2
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
        clean = torch.where(torch.isnan(scores), -INF, scores)
        order = torch.argsort(clean, dim=1, descending=True, stable=True)
        assert torch.equal(top_k(clean, k), order[:, :k])
        hits = torch.gather(relevant, 1, order) & (torch.gather(clean, 1, order) > -INF)
        expected = torch.where(hits.any(1), 1.0 / (torch.argmax(hits.int(), 1) + 1).float(),
                               torch.zeros(8))
        metrics, tops = user_metrics(scores, relevant, ks=(k,))
        assert torch.allclose(metrics["mrr"], expected)
        ranked = torch.gather(clean, 1, order[:, :k]) > -INF
        assert torch.equal(tops[k], torch.where(ranked, order[:, :k], -1))
        without, _ = user_metrics(scores, relevant, ks=(k,), mrr=False)  # the gate's call
        assert "mrr" not in without
        assert all(torch.equal(without[m], metrics[m]) for m in without)
