"""Semantic facet matching (issue 13, part 1) on the H&M sample with real BERT vectors:
words that name no catalogue value exactly are matched to values by meaning (the text
encoder's similarity to value names and item centroids; colour names through a colour
table), misspellings are read as catalogue words, and exact matches keep winning."""
from __future__ import annotations

import pytest

from polyrec import Engine
from polyrec.retrieve.query_understanding import ColourSpace, Facet, Vocabulary
from polyrec.retrieve.search import searcher


@pytest.fixture(scope="module")
def hm(hm_bert_db):
    with Engine(hm_bert_db, device="cpu", entrypoints=False, progress=False) as eng:
        yield eng


def types(response) -> list[str]:
    return [h.attributes["product_type_name"] for h in response.results]


def entity(response, slot: str) -> dict:
    found = [e for e in response.as_dict()["entities"] if e["slot"] == slot]
    assert found, response.as_dict()["entities"]
    return found[0]


# -- units --------------------------------------------------------------------------------
def test_colour_names_are_grounded_in_colour_space():
    space = ColourSpace([("Dark Red", 20), ("Dark Pink", 8), ("Dark Grey", 20), ("Light Pink", 60),
                         ("Dark Blue", 130), ("Dark Purple", 2), ("Black", 200), ("Dark", 400)])
    assert "Dark" not in space.values  # a shade names no colour
    assert space.distribution("maroon")[0][0] == "Dark Red"
    assert space.distribution("burgundy")[0][0] == "Dark Red"
    assert space.distribution("charcoal")[0][0] == "Dark Grey"
    assert space.distribution("pale pink")[0][0] == "Light Pink"
    assert space.distribution("navy blue")[0][0] == "Dark Blue"
    assert space.distribution("winter") == [] and space.distribution("dark") == []
    probs = [p for _, p in space.distribution("maroon")]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_misspellings_are_corrected_to_attribute_words_only():
    vocab = Vocabulary([Facet("type", "Jacket", {"t"}, {"attribute"}, {1}),
                        Facet("colour", "Black", {"c"}, {"attribute"}, {1}),
                        Facet("type", "T-shirt", {"t"}, {"attribute"}, {2}),
                        Facet("type", "Hair/alice band", {"t"}, {"attribute"}, {3})],
                       {"jacket": 5, "black": 9, "t": 2, "shirt": 2, "band": 1, "hair": 1,
                        "alice": 1}, known={"pola"})
    assert vocab.correct("jaket") == "jacket" and vocab.correct("blak") == "black"
    assert vocab.correct("hand") is None      # a 4-letter word: only a missing letter
    assert vocab.correct("pola") is None      # known (a title word) is never corrected
    assert vocab.correct("jacket") is None and vocab.correct("zzzzzz") is None
    und = vocab.understand("blak tshirt")
    assert und.summary() == {"colour": "Black", "type": "T-shirt"}
    assert und.corrected == {"blak": "black", "tshirt": "t shirt"}


# -- on the catalogue -----------------------------------------------------------------------
def test_exact_matches_keep_winning(hm):
    r = hm.search("black dress", 10)
    assert all(e["source"] == "attribute" and e["confidence"] == 1.0
               for e in r.as_dict()["entities"])
    assert all(h.attributes["product_type_name"] == "Dress" and "Black" in (
        h.attributes["colour_group_name"], h.attributes["perceived_colour_master_name"])
        for h in r.results)


@pytest.mark.parametrize("query, slot, value, wanted", [
    ("trainers", "type", "Sneakers", {"product_type_name": {"Sneakers"}}),
    ("pants", "type", "Trousers", {"product_type_name": {"Trousers"}}),
    ("tank top", "type", "Vest top", {"product_type_name": {"Vest top"}}),
    ("maroon", "colour", "Dark Red", {"colour_group_name": {"Dark Red"}}),
    ("checked", "pattern", "Check", {"graphical_appearance_name": {"Check"}}),
    ("gym clothes", "category", "Sport", {"index_group_name": {"Sport"}}),
])
def test_words_are_matched_by_meaning(hm, query, slot, value, wanted):
    r = hm.search(query, 10)
    e = entity(r, slot)
    assert e["value"] == value and e["source"] in ("semantic", "colour", "attribute", "catalogue", "word-form")
    assert 0 < e["confidence"] <= 1 and e["text"]
    good = sum(all(h.attributes[f] in vals for f, vals in wanted.items()) for h in r.results)
    assert good >= 8, [h.attributes["product_type_name"] for h in r.results]


def test_a_longer_span_takes_over_an_exact_word(hm):
    """'tank top' means Vest top, not Top; 'navy blue' is Dark Blue, not Blue."""
    r = hm.search("tank top", 10)
    assert r.understood == {"type": "Vest top"}
    assert entity(r, "type")["text"] == "tank top" and entity(r, "type")["confidence"] < 1
    r = hm.search("navy blue sweater", 10)
    assert r.understood["colour"] == "Dark Blue" and r.understood["type"] == "Sweater"
    assert types(r).count("Sweater") == 10
    assert sum(h.attributes["colour_group_name"] == "Dark Blue" for h in r.results) >= 8


def test_misspelt_queries_find_the_catalogue_word(hm):
    r = hm.search("jaket", 10)
    assert r.as_dict()["corrected"] == {"jaket": "jacket"} and r.understood == {"type": "Jacket"}
    assert types(r).count("Jacket") == 10
    assert searcher(hm).search("tshirt", 10).understood == {"type": "T-shirt"}


def test_semantic_matching_can_be_turned_off(hm):
    assert hm.search("trainers", 10, semantic=False).understood == {}
    assert hm.search("trainers", 10, understanding="off").understood == {}


def test_values_are_embedded_once_per_catalogue_and_encoder(hm):
    s = searcher(hm)
    hm.search("trainers", 5)
    with hm.store.snapshot() as session:
        state = s.state(session)
        snap, space = s.catalog(session, state), s.space(session, "bert", state)
    first = s.semantic_matcher(snap, space, 0.5)
    assert s.semantic_matcher(snap, space, 0.5) is first
    assert {"colour", "type", "pattern", "category"} <= set(first.slots)
    names = first.slots["type"][1]
    assert names.shape[0] == len(first.slots["type"][0]) and names.shape[1] == space.matrix.shape[1]


def test_cli_shows_what_each_span_matched(hm_bert_db):
    from click.testing import CliRunner
    from polyrec.cli.main import cli
    res = CliRunner().invoke(cli, ["--db", str(hm_bert_db), "search", "tank top in maroon", "-k", "3"])
    assert res.exit_code == 0, res.output
    assert "matched: 'tank top' -> type: Vest top (semantic 0." in res.output
    assert "'maroon' -> colour: Dark Red (colour 0." in res.output
    res = CliRunner().invoke(cli, ["--db", str(hm_bert_db), "search", "jaket", "-k", "1"])
    assert "corrected: jaket -> jacket" in res.output and "understood: type: Jacket" in res.output


def test_prepositions_name_no_value_and_shared_words_say_so(hm, hm_bert_db):
    """"under" in "dress under 30" is no reading of the category "Under-, Nightwear";
    "mens", a word inside every Men section's name, is shown as one of several alike."""
    from click.testing import CliRunner

    from polyrec.cli.main import cli
    r = hm.search("dress under 30", 10)
    assert r.understood == {"type": "Dress"}
    res = CliRunner().invoke(cli, ["--db", str(hm_bert_db), "search", "mens shirt", "-k", "3"])
    assert res.exit_code == 0, res.output
    assert "'mens' -> category: " in res.output and "more alike (partial 1.00)" in res.output
