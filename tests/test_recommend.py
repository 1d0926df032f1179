"""Engine.train / Engine.recommend on MovieLens-100k with BERT and KG vectors: the default
pipeline (two_tower + EASE ensemble), artifacts, filters, exclude-seen, MMR, explanations."""
from __future__ import annotations

import threading
import time

import pytest

from polyrec import Engine
from polyrec.errors import ConfigError, ModelNotTrainedError, NotFoundError

USER = "1"


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: over ~5 s (make test-fast skips)


def _open(path) -> Engine:
    return Engine(path, device="cpu", entrypoints=False, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ml100k_default_db):
    """A copy of the encoded ml-100k store with the default pipeline trained fast
    (conftest.FAST_DEFAULT_PIPELINE) and its TrainReport."""
    from conftest import copy_db
    db, report = ml100k_default_db
    return copy_db(db, tmp_path_factory.mktemp("recommend")), report


@pytest.fixture(scope="module")
def eng(trained):
    with _open(trained[0]) as e:
        yield e


def _seen(eng: Engine, user: str) -> set[str]:
    from sqlalchemy import select

    from polyrec.store.models import Interaction, Item, User
    with eng.store.session() as s:
        rows = s.execute(select(Item.external_id).join(Interaction, Interaction.item_id == Item.id)
                         .join(User, User.id == Interaction.user_id)
                         .where(User.external_id == user)).scalars().all()
    return set(rows)


def test_default_pipeline_is_the_hybrid_click_model(trained):
    _, report = trained
    assert report.ranker == "hybrid"
    assert [s["name"] for s in report.options["scorers"]] == ["two_tower"]
    assert report.options["scorers"][0]["options"]["epochs"] == 2
    theta = report.info["theta"]
    assert {"retrieval_z", "two_tower_z", "text_similarity_max", "kg_similarity_max",
            "log_popularity", "log_age_days"} <= set(theta)
    assert report.info["examples"] > 10_000
    assert set(report.modalities) == {"text", "kg"}
    assert report.version >= 1 and report.interactions > 50_000


def test_recommend_returns_k_unseen_items_in_score_order(eng):
    recs = eng.recommend(USER, k=10)
    assert len(recs) == 10 and len({r.item for r in recs}) == 10
    assert not {r.item for r in recs} & _seen(eng, USER)  # low ratings count as seen too
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    assert all(r.title for r in recs) and all(r.explanation == {} for r in recs)


def test_an_items_click_probability_does_not_depend_on_k(eng):
    """`score` is the click model's probability of the item, the same in a list of 1, 5
    or 20 (one user at a time or in a batch)."""
    for user in (USER, "2"):
        lists = {k: [(r.item, r.score) for r in eng.recommend(user, k=k)] for k in (1, 5, 20)}
        assert lists[1] == lists[5][:1] and lists[5] == lists[20][:5]
        assert all(0 < s < 1 for _, s in lists[20])
        (_, many), = eng.recommend_many([user], 5)
        assert [r.item for r in many] == [i for i, _ in lists[5]]
        assert [r.score for r in many] == pytest.approx([s for _, s in lists[5]], rel=1e-4)


def test_reopened_engine_gives_the_same_list(trained, eng):
    first = [(r.item, round(r.score, 4)) for r in eng.recommend("42", k=10)]
    with _open(trained[0]) as again:
        assert [(r.item, round(r.score, 4)) for r in again.recommend("42", k=10)] == first


def test_pipeline_is_loaded_once_and_cached(eng):
    eng.recommend(USER, k=3)
    cached = eng.services.recommender()
    eng.recommend("2", k=3)
    assert eng.services.recommender() is cached


def test_include_seen_lets_history_back(eng):
    seen = _seen(eng, USER)
    recs = eng.recommend(USER, k=50, exclude_seen=False)
    assert {r.item for r in recs} & seen


def test_attribute_filter_keeps_only_matching_items(eng):
    recs = eng.recommend(USER, k=10, filters={"class": "Horror"})
    assert len(recs) == 10
    views = {v.external_id: v for v in eng.items()}
    assert all("Horror" in views[r.item].attributes["class"] for r in recs)
    assert eng.recommend(USER, k=5, filters={"class": "NoSuchGenre"}) == []


def test_mmr_diversity_lowers_similarity_and_keeps_the_best_first(eng):
    plain = eng.recommend(USER, k=10)
    diverse = eng.recommend(USER, k=10, diversity=0.7)
    assert diverse[0].item == plain[0].item
    assert [r.item for r in diverse] != [r.item for r in plain]
    rec = eng.services.recommender()
    vectors = rec.vectors()
    index = {rec.external[i]: k for k, i in enumerate(rec.data.item_ids)}

    def mean_similarity(items):
        v = vectors[[index[r.item] for r in items]]
        sims = v @ v.T
        return float((sims.sum() - sims.diagonal().sum()) / (len(items) * (len(items) - 1)))

    assert mean_similarity(diverse) < mean_similarity(plain)


def test_explanations_name_modalities_history_and_a_kg_path(eng):
    recs = eng.recommend(USER, k=10, explain=True)
    history = {eng_item for eng_item in _liked(eng, USER)}
    for r in recs:
        e = r.explanation
        weights = e["modalities"]
        assert set(weights) <= {"text", "kg"} and "text" in weights
        assert abs(sum(weights.values()) - 1) < 1e-3
        assert e["because"] and all(b["item"] in history for b in e["because"])
        assert e["because"][0]["similarity"] >= e["because"][-1]["similarity"]
        assert {"ease", "two_tower", "click_probability"} <= set(e["scores"]) and e["text"]
        assert 0 < e["scores"]["click_probability"] < 1
    paths = [r.explanation["kg_path"] for r in recs if "kg_path" in r.explanation]
    assert paths, "no recommendation had a knowledge-graph path to a liked film"
    assert all(p["with"] in history and "you liked" in p["sentence"] for p in paths)


def _liked(eng: Engine, user: str) -> set[str]:
    from sqlalchemy import select

    from polyrec.store.models import Interaction, Item, User
    with eng.store.session() as s:
        rows = s.execute(select(Item.external_id).join(Interaction, Interaction.item_id == Item.id)
                         .join(User, User.id == Interaction.user_id)
                         .where(User.external_id == user, Interaction.value >= 4)).scalars().all()
    return set(rows)


def test_a_user_without_history_gets_popular_items(trained, tmp_path):
    from conftest import copy_db
    with _open(copy_db(trained[0], tmp_path)) as e:
        e.add_users([{"external_id": "nobody"}])
        recs = e.recommend("nobody", k=5, explain=True)
        assert len(recs) == 5
        assert recs[0].explanation["text"].startswith("popular with other users")
        assert "because" not in recs[0].explanation
        e.add_interactions([{"user": "nobody", "item": recs[0].item, "kind": "click"}])
        after = e.recommend("nobody", k=5)
        assert recs[0].item not in {r.item for r in after}  # the click made it seen


def test_a_new_user_never_queues_behind_a_refresh(trained, tmp_path):
    """While another thread holds the refresh (a long rebuild under writes), a user newer
    than the data snapshot is answered after at most ``new_user_wait`` as a guest: popular
    items blended with the session, their click excluded; once the refresh has run the
    same user is served by the model from their history."""
    from conftest import copy_db
    with _open(copy_db(trained[0], tmp_path)) as e:
        rec = e.services.recommender()
        rec.new_user_wait = 0.2
        film = e.recommend(USER, k=1)[0].item
        assert rec._refresh_lock.acquire(timeout=30)  # a refresh "running" elsewhere
        try:
            e.feedback("walk-in", film, "click")
            guest = e.recommend("walk-in", k=5, explain=True)
            assert len(guest) == 5 and film not in {r.item for r in guest}
            assert "guest" in guest[0].explanation
        finally:
            rec._refresh_lock.release()
        rec.refresh(wait=True)
        served = e.recommend("walk-in", k=5, explain=True)
        assert len(served) == 5 and "guest" not in served[0].explanation


def test_a_request_after_this_process_s_write_waits_a_bounded_time_for_a_running_refresh(
        trained, tmp_path):
    """A refresh another thread started before this process's write (a background one
    queued by /similar) does not make the next request serve the snapshot from before the
    write: it waits for that refresh (at most ``write_wait``) and looks again. One that
    outlasts the bound is not waited for."""
    from conftest import copy_db
    with _open(copy_db(trained[0], tmp_path)) as e:
        rec = e.services.recommender()
        top = e.recommend(USER, k=1)[0].item
        held, release = threading.Event(), threading.Event()

        def a_running_refresh() -> None:
            with rec._refresh_lock:
                held.set()
                release.wait(30)

        runner = threading.Thread(target=a_running_refresh)
        runner.start()
        assert held.wait(10)
        e.retire_items([top])
        threading.Timer(0.3, release.set).start()
        assert top not in {r.item for r in e.recommend(USER, k=10)}
        runner.join()

        rec.write_wait = 0.2
        held.clear(), release.clear()
        runner = threading.Thread(target=a_running_refresh)
        runner.start()
        assert held.wait(10)
        e.restore_items([top])
        start = time.monotonic()
        served = e.recommend(USER, k=10)  # from the previous snapshot: top still retired
        took = time.monotonic() - start
        release.set()
        runner.join()
        assert took < 15 and len(served) == 10 and top not in {r.item for r in served}
        assert top in {r.item for r in e.recommend(USER, k=10)}  # the next one has it


def test_checks_for_other_processes_writes_take_a_bounded_share_of_the_time(trained, tmp_path):
    """When reading the change keys is slow (COUNTs over a large store), the periodic
    checks are spaced so they take at most ``check_share`` of the time."""
    from conftest import copy_db
    with _open(copy_db(trained[0], tmp_path)) as e:
        rec = e.services.recommender()
        e.recommend(USER, k=1)
        reads, read = [], rec._read_keys

        def slow_read(session=None):
            reads.append(time.monotonic())
            time.sleep(0.05)
            return read(session)

        rec._read_keys = slow_read
        rec.refresh_interval, rec.check_share = 0.01, 0.1
        start = time.monotonic()
        while time.monotonic() - start < 1.5:
            rec.refresh()
            time.sleep(0.005)
        assert rec.check_every() >= 0.45  # 0.05 s a check, at most a tenth of the time
        assert 1 <= len(reads) <= 5, len(reads)  # every 10 ms otherwise: ~100
        rec.check_share = 0  # off: every refresh_interval
        reads.clear()
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            rec.refresh()
            time.sleep(0.005)
        assert len(reads) >= 8


def test_errors_are_clear(eng, engine):
    with pytest.raises(NotFoundError, match="no-such-user"):
        eng.recommend("no-such-user")
    with pytest.raises(ConfigError):
        eng.recommend(USER, k=0)
    with pytest.raises(ConfigError):
        eng.recommend(USER, diversity=1.5)
    with pytest.raises(ModelNotTrainedError, match="polyrec train"):
        engine.recommend("anyone")


def test_the_online_item_space_pairs_vectors_and_ids_of_one_snapshot(trained, tmp_path):
    """The online learner's model space is built while other threads refresh the data:
    its vectors and item ids come from one snapshot even when a refresh with new items
    lands in between (under live writes this paired 1,932 vectors with more ids)."""
    from conftest import copy_db

    from polyrec.feedback.events import model_space
    with _open(copy_db(trained[0], tmp_path)) as e:
        rec = e.services.recommender()
        real = rec.vectors

        def vectors_then_a_refresh():
            out = real()
            e.add_items([{"external_id": "late-arrival", "title": "A film added meanwhile"}])
            rec.refresh(force=True)  # swapped in while the space is being built
            return out

        rec.vectors = vectors_then_a_refresh
        space = model_space(e, rec)
        rec.vectors = real
        assert space is not None and space.vectors.shape[0] == len(space.item_ids)
        assert len(rec.data.item_ids) == len(space.item_ids) + 1  # the refresh did land


def test_a_retrain_of_the_default_pipeline_warm_starts_its_two_tower(trained, tmp_path):
    """Engine.train(warm_start=live version) hands the stored state to the hybrid, which
    passes its two_tower part on; the version records that the warm start was used."""
    from conftest import copy_db
    db, first = trained
    options = {"base_options": {"l2": 500.0},
               "scorers": [{"name": "two_tower", "options": {"dim": 32, "validation": False}}]}
    with _open(copy_db(db, tmp_path)) as e:
        report = e.train(epochs=1, seed=0, options=options, warm_start=first.version, force=True)
        assert report.warm_start == {"from": first.version, "used": True}
        assert e.model(report.version)["warm_start"]["used"] is True
        assert len(e.recommend(USER, k=5)) == 5
