"""A running shop changes under a long-lived Engine (a server): items added and updated
through the API, settings changed by another process. What recommend sees, similar
items and search see too, and an updated item is served by its new vectors."""
from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from polyrec import Engine, ValidationError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SEQUEL = {"external_id": "toy-story-4", "title": "Toy Story 4 (2019)",
          "attributes": {"release_year": "2019", "class": ["Animation", "Children's", "Comedy"]}}


def _open(path, **kw) -> Engine:
    return Engine(path, device="cpu", entrypoints=False, progress=False, **kw)


@pytest.mark.slow
def test_similar_items_see_an_item_added_after_the_recommender_loaded(tmp_path, ml100k_default_db):
    """similar(basis auto) reads the trained model's item space from the recommender's data
    snapshot; it used to read the snapshot as the last recommendation left it, so a new
    item had no model vector (basis 'encoders', 'new since training?') and was never a
    neighbour of a catalogue item until some user asked for recommendations. Now the
    snapshot is refreshed in the background: the item is there within seconds."""
    from conftest import copy_db
    db = copy_db(ml100k_default_db[0], tmp_path)
    with _open(db) as eng:
        eng.recommend("1", k=5)  # a serving process: the recommender is loaded
        eng.add_items([SEQUEL])
        assert eng.wait_for_encoding(120)
        deadline = time.monotonic() + 60
        while eng.similar("toy-story-4", k=5).basis != "model":  # no request asks to recommend
            assert time.monotonic() < deadline, eng.similar("toy-story-4", k=5).as_dict()
            time.sleep(0.2)
        assert not eng.similar("toy-story-4", k=5).notes
        assert "toy-story-4" in eng.similar("1", k=1000).ids()  # a neighbour of Toy Story


@pytest.mark.slow
def test_an_updated_item_is_served_by_its_new_vector(tmp_path, ml100k_encoded_db):
    """An item re-encoded after an update keeps its row id (and the vector counts): a
    search that ran between the update and the re-encode used to keep the old vector in
    the searcher's space for good (similar by its old title, not found by its new one)."""
    from conftest import copy_db
    db = copy_db(ml100k_encoded_db, tmp_path)
    with _open(db) as eng:
        eng.add_items([SEQUEL])
        assert eng.wait_for_encoding(120)
        assert eng.similar("1", k=1, basis="bert").ids() == ["toy-story-4"]
        eng.services.arrivals().coalesce = 0.5  # the next search surely runs before it
        eng.add_items([{"external_id": "toy-story-4", "title": "Haunted Carnival Nightmare",
                        "attributes": {"class": ["Horror"]}}])
        eng.search("toy story", k=3)  # a request lands before the re-encode
        assert eng.wait_for_encoding(120)
        assert "toy-story-4" not in eng.similar("1", k=5, basis="bert").ids()
        found = {h.item: h.ranks for h in eng.search("haunted carnival nightmare", k=5).results}
        assert "dense" in found.get("toy-story-4", {}), found


def test_settings_changed_by_another_process_reach_a_running_engine(tmp_path, ml100k_dir):
    """`polyrec feedback config --set` while a server runs: the server's Engine accepts
    the new kind and weighs events by the new weights within ``settings_interval``
    (they used to apply only after a restart: the new kind was refused with 422)."""
    from conftest import ml100k_movies
    from polyrec.cli.main import cli
    db = tmp_path / "shop.db"
    with _open(db) as eng:
        eng.add_items(ml100k_movies(ml100k_dir, 20))
        assert eng.feedback("alice", "1", "click").weight == 1.0  # the settings are loaded
        with pytest.raises(ValidationError, match="unknown event kind 'wishlist'"):
            eng.feedback("alice", "2", "wishlist")
        out = CliRunner().invoke(cli, ["--db", str(db), "feedback", "config",
                                       "--set", "kind_weights.wishlist=1.5",
                                       "--set", "kind_weights.click=2.5"])
        assert out.exit_code == 0, out.output
        time.sleep(1.1)  # FeedbackHub.settings_interval: 1 s
        assert eng.feedback("alice", "2", "wishlist").weight == 1.5
        assert eng.feedback("alice", "3", "click").weight == 2.5


@pytest.mark.slow
def test_items_the_encoder_on_arrival_could_not_encode_are_reported(tmp_path, hm_dir, caplog):
    """A new product whose photo cannot be read gets its other vectors; the image encoder's
    failure is recorded in the worker's status and logged, naming the item and the reason
    (it used to vanish: ``errors`` stayed empty and nothing was logged)."""
    with _open(tmp_path / "shop.db", image_root=hm_dir) as eng:
        eng.add_items([{"external_id": "765948002", "title": "Gaia jumpsuit",
                        "image": "images/0765948002.jpg"},
                       {"external_id": "813519001", "title": "NOAH casual hood TP",
                        "image": "images/0813519001.jpg"}])
        assert eng.encode(["image_cnn"]).encoders[0].encoded == 2  # the encoder in use
        with caplog.at_level("WARNING", logger="polyrec.encode"):
            eng.add_items([{"external_id": "999000001", "title": "Gaia jumpsuit long",
                            "image": "images/0999000001.jpg"}])  # no such photo
            assert eng.wait_for_encoding(120)
        status = eng.services.arrivals().status()
        assert len(status["errors"]) == 1, status
        error = status["errors"][0]
        assert error["encoder"] == "image_cnn"
        assert "'999000001': image file not found" in error["message"], error
        assert "'999000001': image file not found" in caplog.text
        assert status["failed"] == 1


@pytest.mark.slow
def test_training_the_default_on_a_sparse_shop_says_what_to_train_instead(tmp_path, hm_bert_db):
    """The H&M sample (most customers bought once) leaves the default hybrid no
    validation users for its click model: `polyrec train` says so with the counts and a
    ranker that trains, and that command works (the message used to be only 'rerank: not
    enough interactions to carve validation data')."""
    from conftest import copy_db
    from polyrec.cli.main import cli
    db = str(copy_db(hm_bert_db, tmp_path))
    runner = CliRunner()
    out = runner.invoke(cli, ["--db", db, "--quiet", "train"])
    assert out.exit_code == 1
    assert "hybrid: not enough interactions to carve validation data for the click model" \
        in out.output and "of 4,946 users leave no user with a held-out item" in out.output
    hint = out.output.split("e.g. ", 1)[1].split()
    ok = runner.invoke(cli, ["--db", db, "--quiet", "train", *hint])
    assert ok.exit_code == 0, ok.output
    assert "Trained ease_side" in ok.output


def test_events_without_an_event_id_are_told_apart_by_their_time(tmp_path, ml100k_dir):
    """docs/feedback.md: without an event_id, a call without ts stores a new event each
    time, and the same event sent again with the same explicit ts is stored once."""
    from conftest import ml100k_movies
    with _open(tmp_path / "shop.db") as eng:
        eng.add_items(ml100k_movies(ml100k_dir, 5))
        assert [eng.feedback("bob", "1", "click").new for _ in range(2)] == [True, True]
        again = [eng.feedback("bob", "2", "click", ts=1_800_000_000).new for _ in range(2)]
        assert again == [True, False]
        assert eng.feedback("bob", "2", "click", ts=1_800_000_000.5).new
        assert eng.stats()["interactions"] == 4
