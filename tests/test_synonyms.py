"""The shop's own search synonyms (engine/retrieve/synonyms.py): the file format and its
errors, the rewrite, and search on the H&M sample reading a shopper's word no model
here links to the catalogue ("plaid": the pattern Check) through the CLI, the Python
API and HTTP."""
from __future__ import annotations

import httpx
import pytest
from click.testing import CliRunner
from conftest import copy_db

from polyrec import ConfigError, Engine
from polyrec.cli.main import cli
from polyrec.retrieve.synonyms import Synonyms
from polyrec.serve.app import create_app, start_background

RULES = """# the shop's words
plaid, tartan => check
clothes to sleep in => nightwear
"""


def test_phrases_are_rewritten_longest_first_whole_words_only():
    syn = Synonyms.parse("sleep => nightwear\nclothes to sleep in => nightwear sets\n"
                         "tee => t-shirt")
    assert syn.rewrite("Clothes to SLEEP in, please") == (
        "nightwear sets please", {"clothes to sleep in": "nightwear sets"})
    assert syn.rewrite("sleep mask") == ("nightwear mask", {"sleep": "nightwear"})
    assert syn.rewrite("teeshirt sleeping bag") == ("teeshirt sleeping bag", {})
    assert syn.rewrite("graphic tee") == ("graphic t shirt", {"tee": "t shirt"})
    assert Synonyms().rewrite("anything") == ("anything", {})


@pytest.mark.parametrize("text, message", [
    ("plaid => check\ntartan check", "shop.txt, line 2: expected 'words[, more words] => replacement'"),
    ("plaid =>   ", "shop.txt, line 1: nothing to rewrite to"),
    ("plaid, , tartan => check", "shop.txt, line 1: an empty phrase"),
    ("a => b\n\n# x\na, c => d", "shop.txt, line 4: 'a' is rewritten to 'b' on line 1 already"),
    ("one two three four five six seven => x", "shop.txt, line 1: a phrase of more than 6 words"),
])
def test_bad_lines_are_named(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Synonyms.parse(text, "shop.txt")


@pytest.fixture
def hm(tmp_path, hm_bert_db):
    return copy_db(hm_bert_db, tmp_path)


def _patterns(response) -> list[str]:
    return [h.attributes["graphical_appearance_name"] for h in response.results]


@pytest.mark.slow
def test_cli_import_list_try_and_search(hm, tmp_path):
    run = CliRunner()
    rules = tmp_path / "synonyms.txt"
    rules.write_text(RULES)
    before = run.invoke(cli, ["--db", str(hm), "search", "plaid", "-k", "10"])
    assert "understood: -" in before.output  # no model or dictionary here reads it
    res = run.invoke(cli, ["--db", str(hm), "synonyms", "import", str(rules)])
    assert res.exit_code == 0 and "2 synonym rule(s) stored" in res.output, res.output
    res = run.invoke(cli, ["--db", str(hm), "synonyms", "list"])
    assert res.output.splitlines() == ["plaid, tartan => check",
                                       "clothes to sleep in => nightwear"]
    res = run.invoke(cli, ["--db", str(hm), "synonyms", "try", "red tartan shirt"])
    assert "tartan -> check" in res.output and "search reads: red check shirt" in res.output
    res = run.invoke(cli, ["--db", str(hm), "search", "plaid", "-k", "10"])
    assert "synonyms: plaid -> check" in res.output and "understood: pattern: Check" in res.output
    # a bad file stores nothing: the rules stay as they were
    bad = tmp_path / "bad.txt"
    bad.write_text("plaid => check\nbroken line\n")
    res = run.invoke(cli, ["--db", str(hm), "synonyms", "import", str(bad)])
    assert res.exit_code != 0 and "bad.txt, line 2" in res.output
    assert len(run.invoke(cli, ["--db", str(hm), "synonyms", "list"]).output.splitlines()) == 2
    res = run.invoke(cli, ["--db", str(hm), "synonyms", "clear"])
    assert res.exit_code == 0
    assert "no synonyms" in run.invoke(cli, ["--db", str(hm), "synonyms", "list"]).output


@pytest.mark.slow
def test_python_api_every_engine_on_the_store_reads_them(hm):
    with Engine(hm, device="cpu", entrypoints=False, progress=False) as writer, \
            Engine(hm, device="cpu", entrypoints=False, progress=False) as reader:
        assert "pattern" not in reader.search("plaid", 10).understood
        assert writer.set_synonyms(RULES, source="rules.txt") == 2
        r = reader.search("plaid", 10)  # another Engine: the next search sees them
        assert r.understood == {"pattern": "Check"}
        assert r.as_dict()["synonyms"] == {"plaid": "check"}
        assert len(r.results) == 10 and set(_patterns(r)) == {"Check"}
        off = reader.search("plaid", 10, synonyms=False)
        assert "pattern" not in off.understood and "synonyms" not in off.as_dict()
        sleep = reader.search("clothes to sleep in", 10)
        assert all(h.attributes["product_group_name"] in ("Nightwear", "Underwear/nightwear")
                   or h.attributes["department_name"] == "Nightwear" for h in sleep.results)
        writer.set_synonyms(None)
        assert "pattern" not in reader.search("plaid", 10).understood


def test_http_search_shows_the_rewrite(hm):
    with Engine(hm, device="cpu", entrypoints=False, progress=False) as eng:
        eng.set_synonyms("tartan => check")
        with start_background(create_app(eng)) as server, \
                httpx.Client(base_url=server.url, timeout=120) as client:
            body = client.post("/search", json={"query": "tartan", "k": 10}).json()
    assert body["synonyms"] == {"tartan": "check"} and body["understood"] == {"pattern": "Check"}
    assert {h["attributes"]["graphical_appearance_name"] for h in body["results"]} == {"Check"}
