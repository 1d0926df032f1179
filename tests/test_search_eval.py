"""`polyrec evaluate-search`: labelled query files, P@k / NDCG@k / MRR, the BM25-only and
dense-only runs beside the default search, and the development set of issue 13 on the
H&M sample (tests/data/hm_queries_tune.jsonl, the held-out part kept aside)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from polyrec import Engine, ValidationError
from polyrec.cli.main import cli
from polyrec.retrieve.search_eval import (evaluate_search, load_queries, metrics,
                                          parse_queries, relevant_sets)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def hm(hm_bert_db):
    with Engine(hm_bert_db, device="cpu", entrypoints=False, progress=False) as eng:
        yield eng


# -- metrics ------------------------------------------------------------------------------
def test_metrics_by_hand():
    m = metrics(["x", "a", "y", "b"], {"a", "b", "c"}, k=4)
    assert m["p"] == pytest.approx(2 / 3)          # 2 hits over min(4, 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg"] == pytest.approx(dcg / idcg)
    assert m["mrr"] == pytest.approx(0.5)
    assert metrics(["a", "b"], {"a", "b"}, k=10) == {"p": 1.0, "ndcg": 1.0, "mrr": 1.0}
    assert metrics(["x"], {"a"}, k=10) == {"p": 0.0, "ndcg": 0.0, "mrr": 0.0}
    assert metrics(["x"] * 10 + ["a"], {"a"}, k=10)["mrr"] == 0.0  # beyond k


# -- the query file -------------------------------------------------------------------------
def test_query_file_forms():
    qs = parse_queries([
        '{"query": "black dress", "relevant": {"product_type_name": "Dress", "colour_group_name": "Black"}}',
        "",
        "# a comment",
        '{"query": "beach", "relevant": [{"product_group_name": "Swimwear"}, {"product_type_name": ["Sandals"]}], "kind": "descriptive"}',
        '{"query": "boys", "relevant": {"department_name": {"contains": "Boy"}}}',
        '{"query": "these", "relevant_ids": ["1", 2]}',
    ])
    assert [q.line for q in qs] == [1, 4, 5, 6]
    assert qs[0].matches({"product_type_name": "dress", "colour_group_name": "Black"})
    assert not qs[0].matches({"product_type_name": "Dress", "colour_group_name": "White"})
    assert qs[1].matches({"product_type_name": "Sandals"}) and qs[1].extra == {"kind": "descriptive"}
    assert qs[2].matches({"department_name": "Kids Boy Shoes"})
    assert qs[3].ids == ("1", "2")


@pytest.mark.parametrize("line, field", [
    ("{not json", "-"),
    ('["a list"]', "-"),
    ('{"relevant": {"a": "b"}}', "query"),
    ('{"query": "  ", "relevant": {"a": "b"}}', "query"),
    ('{"query": "x"}', "relevant"),
    ('{"query": "x", "relevant": {"a": "b"}, "relevant_ids": ["1"]}', "relevant"),
    ('{"query": "x", "relevant": {}}', "relevant"),
    ('{"query": "x", "relevant": {"colour": 3}}', "relevant.colour"),
    ('{"query": "x", "relevant": [{"a": "b"}, {"colour": []}]}', "relevant[1].colour"),
    ('{"query": "x", "relevant_ids": []}', "relevant_ids"),
])
def test_bad_lines_name_the_line_and_the_field(line, field):
    with pytest.raises(ValidationError) as err:
        parse_queries(['{"query": "ok", "relevant_ids": ["1"]}', line], "q.jsonl")
    assert err.value.row == 2 and err.value.field == field
    assert str(err.value).startswith(f"q.jsonl, line 2, field '{field}': ")


def test_catalogue_checks_name_the_line(hm, tmp_path):
    for body, field, words in [
        ('{"query": "x", "relevant": {"sleeve": "long"}}', "relevant.sleeve", "no item has this attribute"),
        ('{"query": "x", "relevant": {"product_type_name": "Spaceship"}}', "relevant", "no item"),
        ('{"query": "x", "relevant_ids": ["nope"]}', "relevant_ids", "unknown item id"),
    ]:
        path = tmp_path / "q.jsonl"
        path.write_text('{"query": "dress", "relevant": {"product_type_name": "Dress"}}\n' + body + "\n")
        with pytest.raises(ValidationError) as err:
            relevant_sets(hm, load_queries(path), path)
        assert f"line 2, field '{field}'" in str(err.value) and words in str(err.value)


def test_the_development_set_is_split_and_well_formed(hm):
    tune, held = load_queries(DATA / "hm_queries_tune.jsonl"), load_queries(DATA / "hm_queries_heldout.jsonl")
    assert len(tune) + len(held) >= 60 and len(held) >= 0.2 * (len(tune) + len(held))
    assert not {q.query for q in tune} & {q.query for q in held}
    kinds = {q.extra["kind"] for q in tune + held}
    assert {"british", "american", "synonym", "colour", "audience", "pattern", "misspelling",
            "descriptive"} <= kinds
    assert all(len(r) > 0 for r in relevant_sets(hm, tune + held))


# -- runs ----------------------------------------------------------------------------------
def test_cli_prints_each_run_per_query_and_overall(hm_bert_db, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"query": "black dress", "relevant": {"product_type_name": "Dress", "colour_group_name": "Black"}}\n'
                    '{"query": "tank top", "relevant": {"product_type_name": "Vest top"}}\n')
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", str(hm_bert_db), "evaluate-search", str(path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert list(data["means"]) == ["default", "bm25", "dense"]
    black = data["queries"][0]
    assert black["relevant"] == 21 and black["runs"]["default"]["p"] == 1.0
    assert len(black["runs"]["bm25"]["top"]) == 10
    assert {"p", "ndcg", "mrr"} == set(data["means"]["dense"])
    tank = data["queries"][1]
    assert any(e["source"] == "semantic" for e in tank["understood"])
    res = runner.invoke(cli, ["--db", str(hm_bert_db), "evaluate-search", str(path),
                              "--set", "semantic=false", "--no-baselines"])
    assert res.exit_code == 0, res.output
    assert "P:default" in res.output and "P:bm25" not in res.output and "mean (2 queries)" in res.output
    res = runner.invoke(cli, ["--db", str(hm_bert_db), "evaluate-search", str(tmp_path / "none.jsonl")])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "none.jsonl" in res.output
    path.write_text('{"query": "x", "relevant": {"colour_group_name": 1}}\n')
    res = runner.invoke(cli, ["--db", str(hm_bert_db), "evaluate-search", str(path)])
    assert res.exit_code == 1 and "line 1, field 'relevant.colour_group_name'" in res.output


@pytest.mark.slow
def test_default_search_beats_bm25_and_dense_on_the_tuning_set(hm):
    """The 'Done when' of issue 13 on the tuning part (figures in docs/search.md)."""
    report = evaluate_search(hm, DATA / "hm_queries_tune.jsonl")
    p = {run: m["p"] for run, m in report.means.items()}
    assert p["default"] >= 0.88
    assert p["default"] >= p["bm25"] + 0.2 and p["default"] >= p["dense"] + 0.2
    black = next(q for q in report.queries if q["query"] == "black dress")
    assert black["runs"]["default"]["p"] == 1.0
