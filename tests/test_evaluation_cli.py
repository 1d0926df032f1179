"""`polyrec evaluate` through click's CliRunner on MovieLens-100k, and Engine.evaluate."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from polyrec import Engine
from polyrec.cli.main import cli

pytestmark = pytest.mark.slow  # every test here is over ~5 s (make test-fast skips them)


def _run(db, *args):
    return CliRunner().invoke(cli, ["--db", str(db), "-q", "evaluate", *args])


@pytest.mark.slow
def test_evaluate_json_random_split(ml100k_db):
    res = _run(ml100k_db, "--models", "popular,ease", "-o", "ease.l2=500", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["ks"] == [10, 20]
    assert out["split"]["split"] == "random" and out["split"]["seed"] == 0
    assert out["split"]["eval_users"] == 938  # 943 users, 5 with fewer than 5 positives
    assert out["split"]["train_interactions"] + out["split"]["test_interactions"] == 55375
    rows = {r["model"]: r for r in out["models"]}
    assert set(rows) == {"popular", "ease"}
    for r in rows.values():
        assert set(r["metrics"]) >= {"recall@10", "ndcg@20", "hitrate@20", "mrr", "coverage@10"}
        assert all(0 <= v <= 1 for v in r["metrics"].values())
    assert rows["ease"]["metrics"]["recall@20"] > rows["popular"]["metrics"]["recall@20"]
    assert rows["ease"]["info"]["chosen"] == {"l2": 500}


def test_evaluate_cold_split_id_models_cannot_score(ml100k_db):
    res = _run(ml100k_db, "--split", "cold", "--models", "random,popular,ease",
               "-o", "ease.l2=500", "--k", "20", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["split"]["n_candidates"] == out["split"]["cold_items"] == 289
    rows = {r["model"]: r for r in out["models"]}
    for name in ("popular", "ease"):
        assert rows[name]["handles_cold_items"] is False
        assert rows[name]["metrics"]["recall@20"] == 0.0
        assert rows[name]["metrics"]["coverage@20"] == 0.0
    assert rows["random"]["metrics"]["recall@20"] > 0


def test_evaluate_table_and_errors(ml100k_db):
    res = _run(ml100k_db, "--models", "popular", "--split", "time", "--k", "5")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("split=time seed=0 users=938")
    assert "recall@5" in lines[1] and lines[3].startswith("popular")
    bad = _run(ml100k_db, "--models", "nosuch")
    assert bad.exit_code == 1
    assert "no ranker named 'nosuch'" in bad.output
    bad = _run(ml100k_db, "--models", "ease", "-o", "ease=1")
    assert bad.exit_code == 1 and "LABEL.KEY=VALUE" in bad.output


@pytest.mark.slow
def test_engine_evaluate_is_deterministic(ml100k_db):
    with Engine(ml100k_db, device="cpu", entrypoints=False, progress=False) as eng:
        a = eng.evaluate("popular,random", seed=3, options=["random.seed=1"])
        b = eng.evaluate("popular,random", seed=3, options=["random.seed=1"])
        c = eng.evaluate("popular", seed=4)
    assert [r["metrics"] for r in a.rows] == [r["metrics"] for r in b.rows]
    assert a.rows[0]["metrics"] != c.rows[0]["metrics"]  # another seed, another split
    assert a.split["seed"] == 3
    assert "random" in a.table().splitlines()[-1]
