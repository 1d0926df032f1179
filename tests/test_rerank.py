"""The click-probability re-ranker over a retrieval ranker's top candidates."""
from __future__ import annotations

import pytest
import torch

from polyrec.store.artifacts import from_bytes, to_bytes
from polyrec.errors import ConfigError
from polyrec.rank.evaluation import evaluate_ranker, make_ranker, make_split
from polyrec.plugins.rank_classic import EASERanker
from polyrec.plugins.rank_rerank import CANDIDATE_OFFSET, RerankRanker
from test_two_tower import build_ml_data

C = 50


@pytest.fixture(scope="module")
def split(ml100k_dir):
    return make_split(build_ml_data(ml100k_dir), "random", seed=0)


@pytest.fixture(scope="module")
def fitted(split):
    from conftest import torch_threads
    with torch_threads(1):
        ranker = RerankRanker(base=EASERanker(l2=200.0), candidates=C)
        ranker.fit(split.train)
    return ranker


def test_fit_learns_a_weight_per_feature(fitted):
    info = fitted.info
    names = info["features"]
    assert names[:5] == ["retrieval_z", "retrieval_rank", "log_popularity",
                         "log_recent_popularity", "log_age_days"]
    assert {"genre_similarity_max", "kg_similarity_mean", "kg_similarity_recent"} <= set(names)
    assert set(info["theta"]) == {"bias", *names}
    assert info["examples"] > 10_000 and 0 < info["positives"] < info["examples"]
    # a higher retrieval score must mean a likelier click
    assert info["theta"]["retrieval_z"] + info["theta"]["retrieval_rank"] > 0
    assert info["log_loss"] < 0.69  # better than a coin


def test_candidates_are_rescored_by_click_probability(split, fitted):
    data = split.train
    users = torch.arange(6)
    scores = fitted.score_users(users, data)
    assert scores.shape == (6, data.n_items)
    base = fitted.base.score_users(users, data)
    history = data.user_items()
    for r, u in enumerate(users.tolist()):
        base[r, history[u]] = -float("inf")
        cand = torch.topk(base[r], C).indices
        above = scores[r] > CANDIDATE_OFFSET / 2
        assert set(torch.nonzero(above).flatten().tolist()) == set(cand.tolist())
        probs = fitted.click_probability(users[r:r + 1], cand[None, :], data)[0]
        assert ((probs > 0) & (probs < 1)).all()
        # the candidate's score is its click logit (above the offset)
        assert torch.allclose(torch.sigmoid(scores[r, cand] - CANDIDATE_OFFSET), probs, atol=2e-3)


def test_click_probability_of_an_item_does_not_depend_on_the_list(split, fitted):
    """An item's probability is the one it was ranked with, whether it is asked for
    alone, in the top 5 or the top 20, with a user's candidates or with items that were
    not re-scored (its features are centred over the candidates, not over the list)."""
    data = split.train
    users = torch.arange(4)
    scores = fitted.score_users(users, data)
    for r in range(len(users)):
        top = torch.topk(scores[r], 20).indices
        got = {k: fitted.click_probability(users[r:r + 1], top[None, :k], data)[0]
               for k in (1, 5, 20)}
        assert torch.equal(got[1], got[5][:1]) and torch.equal(got[5], got[20][:5])
        # the logit it was ranked with (float32 around the offset: ~1e-3)
        assert torch.allclose(got[20], torch.sigmoid(scores[r, top] - CANDIDATE_OFFSET),
                              atol=2e-3)
        below = torch.topk(scores[r], C + 10).indices[C:]  # not re-scored: retrieval order
        alone = fitted.click_probability(users[r:r + 1], below[None, :1], data)[0]
        mixed = fitted.click_probability(users[r:r + 1], torch.cat([top, below])[None, :], data)[0]
        assert torch.allclose(alone, mixed[20:21], rtol=0, atol=1e-6)  # float rounding only
        assert ((mixed > 0) & (mixed < 1)).all()
    # several users at once: the same as one at a time
    top = torch.topk(scores, 5, dim=1).indices
    rows = fitted.click_probability(users, top, data)
    assert torch.allclose(rows[2], fitted.click_probability(users[2:3], top[2:3], data)[0],
                          rtol=0, atol=1e-6)


@pytest.mark.slow
def test_rerank_keeps_retrieval_quality(split, fitted):
    base = EASERanker(l2=200.0)
    base.fit(split.train)
    ours = evaluate_ranker(fitted, split, ks=(20,))
    ref = evaluate_ranker(base, split, ks=(20,))
    assert ours["recall@20"] >= 0.95 * ref["recall@20"], (ours, ref)
    assert ours["ndcg@20"] >= 0.95 * ref["ndcg@20"], (ours, ref)


def test_state_round_trip(split, fitted):
    other = RerankRanker(base=EASERanker(l2=200.0), candidates=C)
    other.load_state(from_bytes(to_bytes(fitted.state())))
    users = torch.arange(4)
    assert torch.allclose(other.score_users(users, split.train),
                          fitted.score_users(users, split.train))


def test_built_from_the_registry_by_name(engine):
    ranker = make_ranker(engine.registry("rankers"), "rerank",
                         {"base": "ease", "base_options": {"l2": 100.0}, "candidates": 20})
    assert ranker.base.name == "ease" and ranker.options["candidates"] == 20
    with pytest.raises(ConfigError, match="unknown option"):
        RerankRanker(base=EASERanker(), depth=3)
    with pytest.raises(ConfigError, match="factory"):
        RerankRanker(base="ease")


@pytest.mark.slow
def test_scorers_become_features_and_items_only_they_score_come_second(split):
    """A scorer that scores items the base cannot (here: random scores everything, the
    base knows no item without training interactions) ranks those items in tier two."""
    from polyrec.plugins.rank_classic import PopularRanker, RandomRanker
    ranker = RerankRanker(base=PopularRanker(), scorers=[RandomRanker(seed=1)], candidates=20)
    ranker.fit(split.train)
    assert "random_z" in ranker.info["features"] and "random" in ranker.info["scorers"]
    assert ranker.handles_cold_items
    data = split.train
    scores = ranker.score_users(torch.arange(3), data)
    cold = data.item_counts() == 0
    assert cold.any() and torch.isfinite(scores[:, cold]).all()
    top = scores > CANDIDATE_OFFSET / 2
    assert (top.sum(1) == 20).all()
    assert (scores[:, cold].max() < scores[top].min())  # below the candidates
    warm_rest = ~cold & ~top[0]
    assert scores[0, cold].min() > scores[0, warm_rest].max()  # above the other warm items
    other = RerankRanker(base=PopularRanker(), scorers=[RandomRanker(seed=1)], candidates=20)
    other.load_state(from_bytes(to_bytes(ranker.state())))
    assert torch.allclose(other.score_users(torch.arange(3), data), scores)


def test_history_similarity_equals_the_per_user_loop():
    """The batched max/mean cosine to the history matches the plain per-user products,
    for empty, short and long histories and items without a vector, across chunks."""
    import torch.nn.functional as F

    from polyrec.plugins.rank_rerank import _history_similarity
    gen = torch.Generator().manual_seed(0)
    unit = F.normalize(torch.randn(300, 16, generator=gen), dim=-1)
    present = torch.rand(300, generator=gen) > 0.2
    unit = unit * present[:, None]
    cand = torch.randint(0, 300, (7, 12), generator=gen)
    hists = [torch.randperm(300, generator=gen)[:n] for n in (0, 1, 5, 40, 3, 200, 17)]
    mx, mean = _history_similarity(unit, present, cand, hists, budget=12 * 60)  # many chunks
    for r, h in enumerate(hists):
        h = h[present[h]]
        if len(h) == 0:
            assert torch.equal(mx[r], torch.zeros(12)) and torch.equal(mean[r], torch.zeros(12))
            continue
        sims = unit[cand[r]] @ unit[h].T
        assert torch.allclose(mx[r], sims.max(1).values, atol=1e-5)
        assert torch.allclose(mean[r], sims.mean(1), atol=1e-5)


def test_refit_keeps_what_validation_chose(split):
    """refit trains the parts on more data without tuning again: EASE keeps its l2, the
    click model keeps its weights."""
    from conftest import torch_threads
    with torch_threads(1):
        ranker = RerankRanker(base=EASERanker(l2=[100.0, 500.0]), candidates=C, refit=False)
        ranker.fit(split.train)
        l2, theta = ranker.base.l2, ranker.theta.clone()
        ranker.refit(split.train)
    assert ranker.base.l2 == l2 and ranker.base.info.get("refit") is True
    assert torch.equal(ranker.theta, theta)


@pytest.mark.slow
def test_items_the_retrieval_ranker_cannot_score_get_their_content_neighbours_score(ml100k_dir):
    """On the cold-start split EASE gives the cold items -inf (it never saw a positive of
    theirs); the re-ranker orders them by their content neighbours' EASE scores, well
    above chance (before: -inf, recall 0), and never ahead of the warm items."""
    from conftest import torch_threads

    from polyrec.plugins.rank_classic import RandomRanker
    cold = make_split(build_ml_data(ml100k_dir), "cold", seed=0)
    with torch_threads(1):
        ranker = RerankRanker(base=EASERanker(l2=200.0), candidates=C)
        ranker.fit(cold.train)
        users = cold.eval_users[:50]
        scores = ranker.score_users(users, cold.train)
        base = ranker.base.score_users(users, cold.train)
    cold_items = torch.nonzero(~torch.isfinite(base).any(0)).flatten()
    assert len(cold_items) > 100
    assert bool(torch.isfinite(scores[:, cold_items]).all())  # defined, ordered
    warm_best = scores[:, ~torch.isin(torch.arange(scores.shape[1]), cold_items)].max(1).values
    assert bool((scores[:, cold_items].max(1).values < warm_best).all())  # below candidates
    ours = evaluate_ranker(ranker, cold, ks=(20,))["recall@20"]
    chance = evaluate_ranker(RandomRanker(seed=0), cold, ks=(20,))["recall@20"]
    # this data's only content is genres (and KG): weak neighbours, still above chance
    # (with BERT text + KG, docs/evaluation.md: 0.19 against 0.08)
    assert ours > 1.1 * chance, (ours, chance)


def test_a_click_model_stored_with_fewer_features_still_scores(split, fitted):
    """A state saved by an earlier version (without the features added since) is scored
    with its own features in its own order; a feature it needs that no longer exists
    is one ConfigError saying to train again."""
    state = fitted.state()
    names = list(state["features"])
    keep = [j for j, n in enumerate(names) if "recent" not in n]  # as before they existed
    old = {**state, "features": [names[j] for j in keep], "theta": state["theta"][[0] + [j + 1 for j in keep]],
           "mean": state["mean"][keep], "std": state["std"][keep]}
    other = RerankRanker(base=EASERanker(l2=200.0), candidates=C)
    other.load_state(from_bytes(to_bytes(old)))
    scores = other.score_users(torch.arange(5), split.train)
    assert scores.shape == (5, split.train.n_items) and bool(torch.isfinite(scores).any(1).all())
    assert other.feature_names == old["features"]
    gone = {**old, "features": old["features"][:-1] + ["a_feature_that_is_gone"]}
    broken = RerankRanker(base=EASERanker(l2=200.0), candidates=C)
    broken.load_state(from_bytes(to_bytes(gone)))
    with pytest.raises(ConfigError, match="train again"):
        broken.score_users(torch.arange(2), split.train)


@pytest.mark.slow
def test_default_pipeline_trains_and_beats_ease_through_the_cli(tmp_path, ml100k_encoded_db):
    """`polyrec train` with no ranker fits the hybrid with its ease_side scorer, and
    `polyrec evaluate` ranks it above EASE on the docs split (docs/evaluation.md)."""
    import json

    from click.testing import CliRunner

    from conftest import copy_db
    from polyrec.cli.main import cli
    db = copy_db(ml100k_encoded_db, tmp_path)
    trained = CliRunner().invoke(cli, ["--db", str(db), "-q", "--device", "cpu", "train"])
    assert trained.exit_code == 0, trained.output
    assert "Trained hybrid" in trained.output and "ease_side_z=" in trained.output
    res = CliRunner().invoke(cli, ["--db", str(db), "-q", "evaluate", "--models", "ease,hybrid",
                                   "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["model"]: r for r in json.loads(res.output)["models"]}
    hybrid, ease = rows["hybrid"]["metrics"], rows["ease"]["metrics"]
    assert "ease_side_z" in rows["hybrid"]["info"]["features"]
    assert rows["hybrid"]["info"]["scorers"]["ease_side"]["tuned_on"] == "validation"
    assert hybrid["recall@20"] > 1.02 * ease["recall@20"]
    assert hybrid["ndcg@20"] > 1.02 * ease["ndcg@20"]


def test_a_pipeline_stored_under_other_default_scorers_loads_as_it_was_trained(split, fitted):
    """A hybrid saved before ease_side became its default scorer has no scorer in its
    state and none in its saved options: built again with today's defaults, it loads
    with the scorers it was trained with (none) and scores as before."""
    from polyrec.plugins.rank_classic import SideEASERanker
    from polyrec.plugins.rank_rerank import HybridRanker
    built = []

    def factory(name, options=None):  # type: ignore[no-untyped-def]
        built.append(name)
        return SideEASERanker(**(options or {}))

    today = HybridRanker(base=EASERanker(l2=200.0), candidates=C, factory=factory)
    assert [s["name"] for s in today.scorer_specs] == ["ease_side"]
    today.load_state(from_bytes(to_bytes(fitted.state())))
    assert today.scorers == [] and today.scorer_specs == [] and built == ["ease_side"]
    users = torch.arange(4)
    assert torch.equal(today.score_users(users, split.train),
                       fitted.score_users(users, split.train))
