"""Engine.similar and `polyrec similar`: neighbours by vectors, with filters and a basis."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from polyrec import ConfigError, Engine, NotFoundError, ValidationError
from polyrec.cli.main import cli

DRESS = "731960001"  # Flora maxi dress, black


@pytest.fixture(scope="module")
def hm(hm_bert_db):
    with Engine(hm_bert_db, device="cpu", entrypoints=False, progress=False) as eng:
        yield eng


def test_neighbours_by_encoder_vectors(hm):
    r = hm.similar(DRESS, 10)
    assert r.item == DRESS and len(r.results) == 10
    assert DRESS not in r.ids()
    assert r.spaces == ["bert"]
    if r.basis == "encoders":
        assert any("no trained model" in n for n in r.notes)
    scores = [h.score for h in r.results]
    assert scores == sorted(scores, reverse=True)
    assert sum(h.attributes["product_type_name"] == "Dress" for h in r.results) >= 6


def test_scores_are_cosines_of_the_stored_vectors(hm):
    from polyrec.store.vectors import load_vectors
    with hm.store.session() as s:
        ids, vecs = load_vectors(s, "bert")
        ext = {v.id: v.external_id for v in hm.items()}
    vecs = torch.nn.functional.normalize(vecs, dim=1)
    row = {ext[i]: n for n, i in enumerate(ids)}
    r = hm.similar(DRESS, 3, basis="bert")
    assert r.basis == "bert"
    for h in r.results:
        assert h.score == pytest.approx(float(vecs[row[h.item]] @ vecs[row[DRESS]]), abs=1e-5)
        assert h.by["bert"] == pytest.approx(h.score)


def test_filters_and_errors(hm, hm_bert_db):
    r = hm.similar(DRESS, 5, filters={"colour_group_name": "White"})
    assert all(h.attributes["colour_group_name"] == "White" for h in r.results)
    r = hm.similar(DRESS, 5, filters={"type": "Trousers"})
    assert all(h.attributes["product_type_name"] == "Trousers" for h in r.results)
    with pytest.raises(NotFoundError, match="unknown item 'nope'"):
        hm.similar("nope")
    with pytest.raises(ValidationError):
        hm.similar(DRESS, 0)
    with pytest.raises(ConfigError, match="no vectors stored for encoder 'kg'"):
        hm.similar(DRESS, basis="kg")
    with pytest.raises(ValidationError, match="unknown filter field"):
        hm.similar(DRESS, filters={"nope": 1})


def test_item_without_vectors(tmp_path):
    with Engine(tmp_path / "x.db", device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items([{"external_id": "a", "title": "A"}])
        with pytest.raises(NotFoundError, match="no vectors to compare"):
            eng.similar("a")


def test_cli_similar(hm, hm_bert_db):
    expected = hm.similar(DRESS, 5).ids()
    res = CliRunner().invoke(cli, ["--db", str(hm_bert_db), "similar", DRESS, "-k", "5", "--json"])
    assert res.exit_code == 0, res.output
    assert [h["item"] for h in json.loads(res.output[res.output.index("{"):])["results"]] == expected
    res = CliRunner().invoke(cli, ["--db", str(hm_bert_db), "similar", "nope"])
    assert res.exit_code == 1 and "unknown item 'nope'" in res.output
