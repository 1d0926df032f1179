"""The model registry on MovieLens-100k: versions of the pipeline, the live pointer, the
gate a new version passes before it goes live, rollback, prune, the serving fallback
for a broken ranker plugin, and retrain refitting the live ranker. Fast rankers only
(popular, ease with a fixed l2, random)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import _checkpoint, copy_db

from polyrec import Engine, Ranker, hookimpl
from polyrec.cli.main import cli
from polyrec.errors import NotFoundError

pytestmark = [pytest.mark.slow,  # every test here is over ~5 s (make test-fast skips them)
              pytest.mark.usefixtures("one_thread")]  # tests/conftest.py

USER = "1"
EASE = {"l2": 500.0}




class BrokenRanker(Ranker):
    """A plugin ranker with a bug: one score column short of the catalogue."""

    name = "broken"

    def fit(self, data) -> None:  # type: ignore[no-untyped-def]
        self.n = data.n_items

    def score_users(self, user_index: torch.Tensor, data) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return torch.zeros(len(user_index), data.n_items - 1)

    def state(self) -> dict:
        return {"n": self.n}

    def load_state(self, state: dict) -> None:
        self.n = int(state["n"])


class BrokenPlugin:
    @hookimpl
    def register_rankers(self, register):  # type: ignore[no-untyped-def]
        register(BrokenRanker)


def _open(path, *plugins) -> Engine:
    return Engine(path, device="cpu", entrypoints=False, progress=False,
                  plugins=list(plugins))


@pytest.fixture(scope="module")
def base(tmp_path_factory, ml100k_db):
    """ml-100k with two versions: v1 popular, v2 EASE (l2 500, live)."""
    torch.set_num_threads(1)
    db = copy_db(ml100k_db, tmp_path_factory.mktemp("models"))
    with _open(db) as eng:
        reports = [eng.train("popular"), eng.train("ease", options=EASE)]
    _checkpoint(db)
    return db, reports


@pytest.fixture
def db(base, tmp_path):
    return copy_db(base[0], tmp_path)


def _cli(db, *args: str):
    return CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", "--quiet", *args])


def test_train_goes_through_the_gate_and_records_it(base):
    _, (first, second) = base
    assert first.activated and second.activated and second.live_version == 2
    gate = first.gate
    assert gate["passed"] and gate["checks"]["scores"]["passed"] and gate["checks"]["smoke"]["passed"]
    assert gate["checks"]["metric"]["passed"] is None  # nothing was live to compare with
    metric = second.gate["checks"]["metric"]
    assert metric["passed"] is True and metric["live_version"] == 1
    assert metric["new"] > metric["live"]  # EASE beats popularity on the same holdout
    assert second.metrics["recall@20"] == metric["new"] and second.metrics["pairs"] > 500


def test_models_api_lists_versions_with_what_they_are(db):
    with _open(db) as eng:
        models = eng.models()
        assert [m["version"] for m in models] == [1, 2]
        assert [m["live"] for m in models] == [False, True]
        v2 = eng.model(2)
        assert v2["ranker"] == "ease" and v2["options"] == EASE
        assert v2["data"]["users"] == 943 and v2["data"]["items"] == 1682
        assert 0 < v2["data"]["interactions"] < 55_375  # the positives less the holdout
        assert v2["holdout"]["share"] == 0.02 and v2["metrics"]["recall@20"] > 0.1
        assert v2["bytes"] > 1_000_000 and v2["created_at"] > 0
        assert v2["verdict"] == "passed" and v2["good"]
        with pytest.raises(NotFoundError):
            eng.model(9)


def test_cli_list_show_activate_rollback_prune(db):
    res = _cli(db, "models", "list")
    assert res.exit_code == 0, res.output
    assert "* v2" in res.output and "  v1" in res.output
    listed = json.loads(_cli(db, "models", "list", "--json").output)
    assert [(m["version"], m["live"]) for m in listed] == [(1, False), (2, True)]
    shown = _cli(db, "models", "show", "2")
    assert "ranker:   ease" in shown.output and "gate:     passed" in shown.output
    assert json.loads(_cli(db, "models", "show", "1", "--json").output)["ranker"] == "popular"

    res = _cli(db, "models", "activate", "1")
    assert res.exit_code == 0 and "Version 1 (popular) is live" in res.output
    with _open(db) as eng:
        assert eng.services.recommender().version == 1
        assert len(eng.recommend(USER, k=5)) == 5
    res = _cli(db, "models", "rollback")  # nothing good before v1
    assert res.exit_code == 1 and "no good version before" in res.output
    assert _cli(db, "models", "activate", "2").exit_code == 0
    res = _cli(db, "models", "rollback", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["to"] == 1

    res = _cli(db, "models", "prune", "--keep", "1")  # v1 is live: kept with the newest
    assert res.exit_code == 0 and "Nothing to prune" in res.output
    assert _cli(db, "models", "activate", "2").exit_code == 0
    res = _cli(db, "models", "prune", "--keep", "1", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["deleted"] == [1]
    assert [m["version"] for m in json.loads(_cli(db, "models", "list", "--json").output)] == [2]
    assert _cli(db, "models", "activate", "7").exit_code == 1


def test_a_worse_model_is_stored_but_not_made_live(db):
    with _open(db) as eng:
        before = eng.recommend(USER, k=10)
        report = eng.train("random")
        assert not report.activated and report.version == 3 and report.live_version == 2
        assert "worse than the live model" in report.gate["reasons"][0]
        assert eng.model(3)["verdict"] == "failed" and not eng.model(3)["good"]
        assert [r.item for r in eng.recommend(USER, k=10)] == [r.item for r in before]
    res = _cli(db, "train", "--ranker", "random")
    assert res.exit_code == 3, res.output
    assert "Version 4 is NOT live" in res.output and "version 2 still serves" in res.output
    res = _cli(db, "train", "--ranker", "random", "--force")
    assert res.exit_code == 0 and "Version 5 is live (--force)" in res.output
    # rollback skips the versions that failed the gate
    assert json.loads(_cli(db, "models", "rollback", "--json").output)["to"] == 2


def test_broken_plugin_ranker_is_not_activated_and_serving_falls_back(db):
    with _open(db, BrokenPlugin()) as eng:
        report = eng.train("broken")
        assert not report.activated and report.live_version == 2
        reason = report.gate["reasons"][0]
        assert "ranker 'broken' (plugin 'BrokenPlugin')" in reason and "shape (64, 1681)" in reason
        assert report.gate["checks"]["smoke"].get("skipped")
        assert len(eng.recommend(USER, k=10)) == 10
        assert eng.services.recommender().version == 2

        forced = eng.train("broken", force=True)
        assert forced.activated and forced.forced and forced.live_version == 4
        recs = eng.recommend(USER, k=10)  # the request still answers
        assert len(recs) == 10
        rec = eng.services.recommender()
        assert rec.live == 4 and rec.version == 2 and rec.fallback["to"] == 2
        assert "ranker 'broken' (plugin 'BrokenPlugin')" in rec.errors[-1]["error"]
        assert rec.errors[-1]["stage"] == "score_users"

        with _open(db) as plain:  # an engine without the plugin cannot even load it
            assert len(plain.recommend(USER, k=3)) == 3
            other = plain.services.recommender()
            assert other.version == 2 and other.errors[-1]["stage"] == "load"

        res = _cli(db, "models", "rollback")
        assert res.exit_code == 0 and "from version 4 to version 2" in res.output, res.output
        rec.check_interval = 0.0  # the other "process" notices the new pointer at once
        assert len(eng.recommend(USER, k=10)) == 10
        rec = eng.services.recommender()
        assert rec.live == 2 and rec.version == 2 and rec.fallback is None


def test_popularity_when_no_good_version_is_left(db):
    with _open(db, BrokenPlugin()) as eng:
        eng.train("broken", force=True)
        eng.prune_models(1)  # only the broken live version is left
        assert [m["version"] for m in eng.models()] == [3]
        recs = eng.recommend(USER, k=5, explain=True)
        assert len(recs) == 5 and recs[0].explanation["text"] == "popular with other users"
        assert eng.services.recommender().fallback["to"] == "popularity"


def test_http_reads_the_registry(db):
    from fastapi.testclient import TestClient

    from polyrec.serve.app import create_app
    with _open(db) as eng, TestClient(create_app(eng)) as client:
        eng.recommend(USER, k=3)
        body = client.get("/models").json()
        assert body["live"] == 2 and [m["version"] for m in body["models"]] == [1, 2]
        assert body["serving"]["version"] == 2 and body["serving"]["errors"] == []
        one = client.get("/models/1")
        assert one.status_code == 200 and one.json()["ranker"] == "popular"
        assert client.get("/models/42").status_code == 404
        assert "/models/{version}" in client.get("/openapi.json").json()["paths"]


def test_retrain_refits_the_live_ranker_with_its_options(db):
    from polyrec.feedback.retrain import retrain
    with _open(db) as eng:
        report = retrain(eng, encode=False)
        assert report["retrained"] and report["ranker"] == "ease" and report["activated"]
        assert report["refit_of"]["version"] == 2
        new = eng.model(3)
        assert new["ranker"] == "ease" and new["options"] == EASE and new["live"]
        assert new["warm_start"] == {"from": 2, "used": False,
                                     "reason": "ranker 'ease' does not warm-start: "
                                               "fitted from scratch"}
        metric = new["gate"]["checks"]["metric"]
        assert metric["passed"] and metric["new"] == pytest.approx(metric["live"])


def test_a_live_model_from_before_the_registry(db):
    """An old database: no live pointer, the live model has no holdout in its meta."""
    from sqlalchemy import delete, select

    from polyrec.store.models import Artifact, Setting
    with _open(db) as eng:
        with eng.store.session() as s:
            s.execute(delete(Setting).where(Setting.key == "models.live"))
            row = s.execute(select(Artifact).where(Artifact.version == 2)).scalars().one()
            row.meta = {k: v for k, v in row.meta.items() if k not in ("holdout", "metrics", "gate")}
        assert eng.models()[-1]["live"] and eng.model(2)["verdict"] == "unchecked"
        report = eng.train("random")  # much worse, but not comparable: (c) is skipped
        metric = report.gate["checks"]["metric"]
        assert metric["passed"] is None and "trained before the gate" in metric["reason"]
        assert report.activated and report.live_version == 3


def test_one_failure_moves_one_version_back_however_many_requests_saw_it(db):
    """Requests that saw the same broken ranker report it after the first one already
    fell back: the fallback stands (v2), it does not cascade to v1 or popularity."""
    import threading
    with _open(db, BrokenPlugin()) as eng:
        eng.train("broken", force=True)  # v3: live and broken
        rec = eng.services.recommender()
        broken = rec.ranker
        assert rec.version == 3
        rec._fail("score_users", "first report", broken)
        assert rec.version == 2
        for _ in range(5):  # late reports of the same failure
            rec._fail("score_users", "late report", broken)
        assert rec.version == 2 and rec.ranker is not broken
    with _open(db, BrokenPlugin()) as eng:  # and with requests racing for real
        answers: list[int] = []
        threads = [threading.Thread(target=lambda: answers.append(len(eng.recommend(USER, k=5))))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers == [5] * 8 and eng.services.recommender().version == 2


def test_a_bad_gate_setting_fails_before_anything_is_stored(db):
    with _open(db) as eng:
        before = [m["version"] for m in eng.models()]
        with pytest.raises(Exception, match="tolerance"):
            eng.train("popular", gate={"tolerance": "x"})
        assert [m["version"] for m in eng.models()] == before
