"""Engine.search and `polyrec search` on the H&M sample with real BERT vectors: hybrid
retrieval, RRF, query understanding, filters, personalisation, cross-modal CLIP."""
from __future__ import annotations

import json
import warnings

import pytest
from click.testing import CliRunner

from polyrec import ConfigError, Engine, ValidationError
from polyrec.cli.main import cli
from polyrec.retrieve.search import SearchOptions, rrf, searcher
from conftest import copy_db


def is_black_dress(attrs: dict) -> bool:
    return attrs["product_type_name"] == "Dress" and "Black" in (
        attrs["colour_group_name"], attrs["perceived_colour_master_name"])


@pytest.fixture(scope="module")
def hm(hm_bert_db):
    with Engine(hm_bert_db, device="cpu", entrypoints=False, progress=False) as eng:
        yield eng


# -- fusion and options ------------------------------------------------------------------
def test_rrf_is_the_weighted_sum_of_reciprocal_ranks():
    fused = rrf({"a": [1, 2, 3], "b": [3, 1]}, {"a": 1.0, "b": 2.0}, k=60)
    assert fused[1] == pytest.approx(1 / 61 + 2 / 62)
    assert fused[2] == pytest.approx(1 / 62)
    assert fused[3] == pytest.approx(1 / 63 + 2 / 61)
    assert max(fused, key=fused.get) == 3
    assert rrf({"a": [1]}, {"a": 0.0}) == {}
    assert rrf({"x": [5]}, {}, k=1) == {5: 0.5}  # unknown rankings weigh 1


def test_options_are_checked():
    assert SearchOptions.from_kwargs({"weights": {"lexical": 2}}).weights["lexical"] == 2.0
    with pytest.raises(ConfigError, match="unknown search option"):
        SearchOptions.from_kwargs({"bogus": 1})
    with pytest.raises(ConfigError, match="unknown fusion weight"):
        SearchOptions.from_kwargs({"weights": {"bm42": 1}})
    with pytest.raises(ConfigError, match="understanding"):
        SearchOptions.from_kwargs({"understanding": "maybe"})


@pytest.mark.parametrize("query,k,message", [
    ("", 10, "empty"), ("   ", 10, "empty"), ("x" * 1001, 10, "at most 1,000"),
    ("dress", 0, "between 1 and 1000"), ("dress", 1001, "between 1 and 1000"),
    ("dress", "3", "integer"), (None, 10, "string"),
])
def test_bad_requests_are_validation_errors(hm, query, k, message):
    with pytest.raises(ValidationError, match=message):
        hm.search(query, k)


# -- the acceptance query ------------------------------------------------------------------
def test_black_dress_returns_black_dresses_first(hm):
    r = hm.search("black dress", 10)
    assert r.understood == {"colour": "Black", "type": "Dress"}
    assert r.rankings == ["dense", "lexical"]
    assert len(r.results) == 10
    assert all(is_black_dress(h.attributes) for h in r.results)
    assert all(h.matched == ["colour=Black", "type=Dress"] for h in r.results)
    assert all(x.score >= y.score for x, y in zip(r.results, r.results[1:]))
    d = r.as_dict()
    assert d["understood"] == {"colour": "Black", "type": "Dress"}
    assert [x["item"] for x in d["results"]] == r.ids()
    json.dumps(d)  # serialisable as is


def test_cli_search_matches_the_python_api(hm, hm_bert_db):
    expected = hm.search("black dress", 10).ids()
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", str(hm_bert_db), "search", "black dress", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{"):])
    assert [h["item"] for h in data["results"]] == expected
    assert data["understood"] == {"colour": "Black", "type": "Dress"}
    res = runner.invoke(cli, ["--db", str(hm_bert_db), "search", "black dress", "-k", "3"])
    assert res.exit_code == 0, res.output
    assert "understood: colour: Black; type: Dress" in res.output
    assert expected[0] in res.output and "Dress | Black" in res.output
    res = runner.invoke(cli, ["--db", str(hm_bert_db), "search", "dress", "-k", "0"])
    assert res.exit_code == 1 and "k must be between 1 and 1000" in res.output
    res = runner.invoke(cli, ["--db", str(hm_bert_db), "search", "dress", "--filter", "oops"])
    assert res.exit_code == 1 and "field=value" in res.output


def test_dense_retrieval_alone_understands_the_words(hm):
    r = hm.search("black dress", 10, weights={"lexical": 0}, understanding="off")
    assert r.rankings == ["dense"] and r.understood == {}
    assert sum(h.attributes["product_type_name"] == "Dress" for h in r.results) >= 5


def test_lexical_alone(hm):
    r = hm.search("black dress", 10, weights={"dense": 0}, understanding="off")
    assert r.rankings == ["lexical"]
    assert all("dress" in ((h.title or "") + str(h.attributes)).lower() for h in r.results[:5])


def test_understanding_modes(hm):
    full = hm.search("black dress", 50, understanding="filter")
    assert 15 <= len(full.results) < 50
    assert all(is_black_dress(h.attributes) for h in full.results)
    boosted = hm.search("black dress", 50)
    assert len(boosted.results) == 50  # full matches first, then the rest
    assert boosted.ids()[:len(full.results)] == full.ids()


def test_filters_by_attribute_and_by_slot(hm):
    r = hm.search("dress", 10, filters={"colour_group_name": "White"})
    assert r.results and all(h.attributes["colour_group_name"] == "White" for h in r.results)
    r = hm.search("summer", 10, filters={"type": ["Shorts", "Skirt"]})
    assert r.results and all(h.attributes["product_type_name"] in ("Shorts", "Skirt")
                             for h in r.results)
    with pytest.raises(ValidationError, match="unknown filter field 'sleeve'"):
        hm.search("dress", 10, filters={"sleeve": "long"})


def test_intent_is_classified_from_catalogue_labels(hm):
    r = hm.search("warm winter jacket", 10)
    assert r.understanding.intent["slot"] == "type"
    assert r.understanding.intent["value"] == "Jacket"
    assert 0 < r.understanding.intent["confidence"] <= 1
    assert sum(h.attributes["product_type_name"] == "Jacket" for h in r.results) >= 8


def test_personalised_search_by_history(hm):
    from sqlalchemy import func, select

    from polyrec.store.models import Interaction, User
    with hm.store.session() as s:
        user = s.execute(select(User.external_id).join(Interaction, Interaction.user_id == User.id)
                         .group_by(User.id).order_by(func.count().desc())).first()[0]
    plain = hm.search("top", 20)
    personal = hm.search("top", 20, user=user)
    assert personal.personalised in ("history:bert",) or personal.personalised.startswith("model:")
    assert "personal" in personal.rankings
    assert all("personal" in h.ranks for h in personal.results)
    assert set(personal.ids()) <= set(plain.ids()) | set(hm.search("top", 200).ids())
    stranger = hm.search("top", 5, user="nobody-at-all")
    assert stranger.personalised is None
    assert any("unknown user 'nobody-at-all'" in n for n in stranger.notes)
    assert stranger.ids() == plain.ids()[:5]


def test_new_items_are_searchable_at_once(tmp_path, hm_bert_db):
    db = copy_db(hm_bert_db, tmp_path)
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        assert "zz1" not in eng.search("zebra", 5).ids()
        eng.add_items([{"external_id": "zz1", "title": "Zebra print coat",
                        "attributes": {"product_type_name": "Coat", "colour_group_name": "White"}}])
        r = eng.search("zebra", 5)
        hit = r.results[r.ids().index("zz1")]  # found by BM25 before it has any vector
        assert hit.ranks == {"lexical": 1}


def test_cross_modal_clip_with_a_tiny_random_model(tmp_path, hm_bert_db):
    """CLIP's text tower against image vectors. No pretrained CLIP exists offline, so this
    checks the path with a tiny random-weight model; by default such a model is skipped."""
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                          "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    model_dir = tmp_path / "tiny_clip"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    db = copy_db(hm_bert_db, tmp_path)
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = eng.encode(["clip"], options={"clip": {"model": f"local-dir:{model_dir}",
                                                            "pretrained": "none",
                                                            "num_workers": 0}})
        assert report.encoded == 100  # the sample has 100 images
        r = eng.search("black dress", 10)
        assert "clip" not in r.rankings
        assert any("no pretrained weights" in n for n in r.notes)
        r = eng.search("black dress", 10, untrained_clip=True)
        assert r.rankings == ["dense", "clip", "lexical"]
        assert any("clip" in h.ranks for h in r.results) or len(r.results) == 10
        srch = searcher(eng)
        with eng.store.session() as s:
            space = srch.space(s, "clip")
        assert space is not None and space.matrix.shape == (100, 32)
