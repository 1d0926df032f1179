"""`polyrec train` and `polyrec recommend` through click's CliRunner on MovieLens-100k."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from polyrec.cli.main import cli

pytestmark = pytest.mark.slow  # every test here is over ~5 s (make test-fast skips them)


@pytest.fixture(scope="module")
def db(tmp_path_factory, ml100k_encoded_db):
    from conftest import copy_db
    return copy_db(ml100k_encoded_db, tmp_path_factory.mktemp("reccli"))


def _run(db, *args):
    return CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", "--quiet", *args])


@pytest.fixture(scope="module")
def trained(db):
    from conftest import torch_threads
    with torch_threads(1):
        result = _run(db, "train", "--ranker", "two_tower", "--epochs", "1", "--seed", "3",
                      "--set", "validation=false", "--set", "dim=16", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_recommend_before_training_says_what_to_do(db):
    result = _run(db, "recommend", "1")
    assert result.exit_code == 1
    assert "polyrec train" in result.output and "Traceback" not in result.output


def test_train_reports_json(trained):
    assert trained["ranker"] == "two_tower" and trained["version"] == 1
    assert trained["options"]["epochs"] == 1 and trained["options"]["seed"] == 3
    assert trained["options"]["dim"] == 16 and trained["options"]["validation"] is False
    assert set(trained["modalities"]) == {"text", "kg"}
    assert trained["info"]["epochs"] == 1


def test_recommend_text_and_explain(db, trained):
    result = _run(db, "recommend", "1", "-k", "4", "--explain")
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    ranked = [ln for ln in lines if ln.lstrip()[:2].rstrip(".").isdigit()]
    assert len(ranked) == 4 and len([ln for ln in lines if "why:" in ln]) == 4
    assert "because you liked" in result.output and "text" in result.output


def test_recommend_json_filter_and_diversity(db, trained):
    result = _run(db, "recommend", "1", "-k", "5", "--filter", "class=Comedy",
                  "--diversity", "0.3", "--json", "--explain")
    assert result.exit_code == 0, result.output
    recs = json.loads(result.stdout)
    assert len(recs) == 5
    from polyrec import Engine
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        views = {v.external_id: v for v in eng.items()}
    assert all("Comedy" in views[r["item"]].attributes["class"] for r in recs)
    assert all(set(r["explanation"]["modalities"]) <= {"text", "kg"} for r in recs)


def test_either_of_two_filter_values(db, trained):
    recs = json.loads(_run(db, "recommend", "2", "-k", "8", "--filter", "class=Horror",
                           "--filter", "class=Western", "--json").stdout)
    from polyrec import Engine
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        views = {v.external_id: v for v in eng.items()}
    assert all({"Horror", "Western"} & set(views[r["item"]].attributes["class"]) for r in recs)


def test_cli_errors_are_one_line(db, trained):
    for args, needle in [(["recommend", "no-such-user"], "no-such-user"),
                         (["recommend", "1", "--filter", "oops"], "ATTRIBUTE=VALUE"),
                         (["train", "--ranker", "nope"], "nope"),
                         (["train", "--ranker", "two_tower", "--set", "layers=2"], "layers")]:
        result = _run(db, *args)
        assert result.exit_code == 1, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output
