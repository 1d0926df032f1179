"""The learned intent model (issue 13, part 2): plugin 'multitask' trained from the
catalogue (H&M attributes, MovieLens genres), stored with the encoder fingerprint,
refused once the encoder changes; `polyrec train-intent` and `polyrec intent`."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from polyrec import ConfigError, Engine, EncoderContext, IntentModel, list_artifacts
from polyrec.cli.main import cli
from polyrec.retrieve.intent_model import intent_status, load_intent, train_intent
from conftest import copy_db, torch_threads

#: small torch ops on a shared 2-core machine run far faster on one thread
pytestmark = pytest.mark.usefixtures("one_thread")

#: Tiny trainings: a few hundred items, few queries each, a few epochs (heads only).
TINY = ["--set", "max_items=300", "--set", "queries_per_item=4", "--set", "epochs=6"]


def _cli(db, *args):
    return CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", "--quiet", *args])


@pytest.fixture(scope="module")
def hm_intent(hm_bert_db, tmp_path_factory):
    """A copy of the H&M store with an intent model trained by the CLI: (db, report)."""
    db = copy_db(hm_bert_db, tmp_path_factory.mktemp("hm_intent"))
    with torch_threads(1):
        result = _cli(db, "train-intent", *TINY, "--json")
    assert result.exit_code == 0, result.output
    return db, json.loads(result.stdout)


@pytest.fixture(scope="module")
def ml_intent(ml100k_encoded_db, tmp_path_factory):
    """A copy of the MovieLens store with an intent model trained through the Python API."""
    db = copy_db(ml100k_encoded_db, tmp_path_factory.mktemp("ml_intent"))
    with torch_threads(1), Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        report = train_intent(eng, options={"max_items": 400, "queries_per_item": 4,
                                            "epochs": 6})
    return db, report


def _predict(eng: Engine, query: str):
    loaded = load_intent(eng)
    enc = eng.encoder(loaded.encoder)
    vec = enc.encode_query(query, EncoderContext(eng, torch.device("cpu"), progress=False))
    return loaded.predict(vec)


@pytest.mark.slow
def test_train_intent_stores_an_artifact_with_the_encoder_fingerprint(hm_intent):
    db, report = hm_intent
    assert report["artifact"] == "intent" and report["version"] == 1
    info = report["info"]
    # categorical attributes discovered from the catalogue; names and descriptions left out
    assert {"product_type_name", "colour_group_name", "index_group_name",
            "graphical_appearance_name"} <= set(info["fields"])
    assert "prod_name" not in info["fields"] and "detail_desc" not in info["fields"]
    assert info["items"] == 300 and info["synthetic_queries"] >= 900
    assert info["demand"] is True  # the purchases give every item a popularity target
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            (art,) = list_artifacts(s, "intent")
        assert art["kind"] == "intent_model"
        assert art["meta"]["fingerprint"] == eng.encoder("bert").fingerprint()
        assert art["meta"]["options"]["epochs"] == 6


@pytest.mark.slow
def test_obvious_queries_read_the_right_type_colour_and_audience(hm_intent):
    db, _ = hm_intent
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        black_dress = _predict(eng, "black dress")
        assert black_dress.top("product_type_name")[0] == "Dress"
        assert black_dress.top("colour_group_name")[0] == "Black"
        # an untrained head spreads ~1/70 over the types; this one is sure
        assert black_dress.top("product_type_name")[1] > 0.3
        mens = _predict(eng, "shirt for men")
        assert mens.top("index_group_name")[0] == "Menswear"
        assert "Shirt" in [v for v, _ in mens.facets["product_type_name"][:3]]
        # shoppers' words: a tee is the catalogue's T-shirt, jeans are Trousers
        assert _predict(eng, "tee").top("product_type_name")[0] == "T-shirt"
        assert _predict(eng, "jeans").top("product_type_name")[0] == "Trousers"


@pytest.mark.slow
def test_cli_intent_shows_soft_facets(hm_intent):
    db, _ = hm_intent
    result = _cli(db, "intent", "black dress", "--json", "--top", "2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == "intent v1"
    assert out["facets"]["product_type_name"][0]["value"] == "Dress"
    assert len(out["facets"]["colour_group_name"]) == 2
    text = _cli(db, "intent", "black dress").stdout
    assert "product_type_name: Dress (" in text


@pytest.mark.slow
def test_intent_model_is_refused_once_the_encoder_changes(hm_intent, tmp_path):
    db = copy_db(hm_intent[0], tmp_path)
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        assert intent_status(eng)[0] is not None
        before = eng.encoder("bert").fingerprint()
        # other encoder settings: new fingerprint, vectors re-encoded
        report = eng.encode(["bert"], options={"bert": {"max_length": 8}})
        assert report["bert"].encoded == 1000
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        assert eng.encoder("bert").fingerprint() != before
        with pytest.raises(ConfigError, match="run polyrec train-intent again"):
            load_intent(eng)
        loaded, why = intent_status(eng)
        assert loaded is None and "was trained on bert vectors" in why
    result = _cli(db, "intent", "black dress")
    assert result.exit_code == 1
    assert result.output.startswith("Error: intent model 'intent' v1 was trained on bert")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_movielens_genres_are_the_intent(ml_intent):
    db, report = ml_intent
    assert "class" in report.info["fields"]  # the genres list
    assert "release_year" not in report.info["fields"]  # numbers are not labels
    assert report.info["rec"] is True and report.info["rec_pairs"] > 1000
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        assert _predict(eng, "scary horror film").top("class")[0] == "Horror"
        assert _predict(eng, "animated cartoon").top("class")[0] == "Animation"
        loaded = load_intent(eng)
        from polyrec.store.vectors import load_vectors
        with eng.store.session() as s:
            ids, vecs = load_vectors(s, "bert")
        demand = loaded.model.item_demand(vecs)
        assert demand.shape == (len(ids),) and torch.isfinite(demand).all()
        # the user tower: a user's own held items score above random items
        match = loaded.model.user_match(vecs[:50], vecs[:20])
        assert match.shape == (50,) and float(match[:20].mean()) > float(match[20:].mean())


def test_options_are_checked(engine):
    cls = engine.registry("intent_models").get("multitask")
    assert issubclass(cls, IntentModel)
    assert cls(epochs="2").options["epochs"] == 2  # command-line text converted
    with pytest.raises(ConfigError, match="has no option 'bogus'"):
        cls(bogus=1)
    with pytest.raises(ConfigError, match="option 'alpha' expects float"):
        cls(alpha="much")


def test_cli_errors_are_one_line(tmp_path):
    db = tmp_path / "empty.db"
    assert _cli(db, "init").exit_code == 0
    result = _cli(db, "intent", "black dress")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: no artifact named 'intent' in the store"
    result = _cli(db, "train-intent", "--set", "bogus")
    assert result.exit_code == 1 and "--set expects KEY=VALUE" in result.output
