"""Query understanding: facets from attributes and the knowledge graph, longest-phrase
matching, AND/OR semantics, and intent classification from catalogue labels."""
from __future__ import annotations

import pytest
import torch

from polyrec import Engine
from polyrec.retrieve.query_understanding import (IntentClassifier, Vocabulary, intent_slot, slot_of)
from polyrec.knowledge_graph.store import add_triples, link_items


@pytest.fixture(scope="module")
def hm_vocab(hm_db) -> tuple[Vocabulary, dict[int, dict]]:
    with Engine(hm_db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            vocab = Vocabulary.build(s)
        attrs = {v.id: v.attributes for v in eng.items()}
    return vocab, attrs


def test_slot_names():
    assert slot_of("colour_group_name") == "colour"
    assert slot_of("perceived_colour_master_name") == "colour"
    assert slot_of("product_type_name") == "type"
    assert slot_of("product_group_name") == "category"
    assert slot_of("department_name") == "department"
    assert slot_of("class") == "genre"
    assert slot_of("film.film.directed_by") == "person"
    assert slot_of("has_colour") == "colour"
    assert slot_of("release_year") == "year"
    assert slot_of("sleeve") == "sleeve"


def test_black_dress_on_hm(hm_vocab):
    vocab, attrs = hm_vocab
    und = vocab.understand("black dress")
    assert und.summary() == {"colour": "Black", "type": "Dress"}
    full = und.full_matches()
    assert len(full) >= 15
    for i in full:  # every full match is a black dress by some colour field
        a = attrs[i]
        assert a["product_type_name"] == "Dress"
        assert "Black" in (a["colour_group_name"], a["perceived_colour_master_name"])
    assert und.residual == ""
    d = und.as_dict()
    assert d["understood"] == {"colour": "Black", "type": "Dress"}
    assert {e["text"] for e in d["entities"]} == {"black", "dress"}


def test_longest_phrase_wins_and_plurals(hm_vocab):
    vocab, attrs = hm_vocab
    und = vocab.understand("Dark Blue TROUSERS please")
    assert und.summary() == {"colour": "Dark Blue", "type": "Trousers"}
    assert und.residual == "please"
    assert all(attrs[i]["product_type_name"] == "Trousers" for i in und.full_matches())


def test_two_values_of_a_single_valued_field_are_alternatives(hm_vocab):
    vocab, attrs = hm_vocab
    und = vocab.understand("black or white sweater")
    assert und.summary() == {"colour": ["Black", "White"], "type": "Sweater"}
    colours = {attrs[i]["perceived_colour_master_name"] for i in und.full_matches()} | \
        {attrs[i]["colour_group_name"] for i in und.full_matches()}
    assert {"Black", "White"} <= colours
    assert und.match_fraction(next(iter(und.full_matches()))) == 1.0


def test_nothing_recognised(hm_vocab):
    vocab, _ = hm_vocab
    und = vocab.understand("zzz qqq")
    assert und.summary() == {} and und.full_matches() == set() and und.match_fraction(1) == 0.0


def test_genres_on_movielens_are_and_ed(ml100k_db):
    with Engine(ml100k_db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            vocab = Vocabulary.build(s)
        und = vocab.understand("children's animation")
        assert und.summary() == {"genre": ["Children's", "Animation"]}
        full = und.full_matches()
        genres = {v.id: v.attributes["class"] for v in eng.items(sorted(full))}
    assert len(full) > 10
    assert all({"Children's", "Animation"} <= set(g) for g in genres.values())
    assert "year" in vocab.slots() and "genre" in vocab.slots()
    assert vocab.understand("a thriller from 1995").summary() == {"genre": "Thriller",
                                                                  "year": "1995"}


def test_graph_entities_become_facets(engine: Engine):
    engine.add_items([{"external_id": "m1", "title": "Film one"},
                      {"external_id": "m2", "title": "Film two"},
                      {"external_id": "m3", "title": "Film three"}])
    with engine.store.session() as s:
        link_items(s, {"m1": "e:m1", "m2": "e:m2", "m3": "e:m3"})
        add_triples(s, [("e:m1", "film.film.directed_by", "p:kubrick"),
                        ("e:m2", "film.film.directed_by", "p:kubrick"),
                        ("e:m3", "film.film.directed_by", "p:nolan")])
        from sqlalchemy import update

        from polyrec.store.models import Entity
        s.execute(update(Entity).where(Entity.external_id == "p:kubrick")
                  .values(label="Stanley Kubrick", type="person"))
        s.execute(update(Entity).where(Entity.external_id == "p:nolan").values(label="Christopher Nolan"))
    with engine.store.session() as s:
        vocab = Vocabulary.build(s)
    und = vocab.understand("films by stanley kubrick")
    assert und.summary() == {"person": "Stanley Kubrick"}
    assert und.matches[0].source == "graph"
    ids = {v.external_id for v in engine.items(sorted(und.full_matches()))}
    assert ids == {"m1", "m2"}


def test_intent_classifier_picks_the_nearest_label_centroid():
    torch.manual_seed(0)
    base = {"Dress": torch.tensor([1.0, 0, 0]), "Shoe": torch.tensor([0, 1.0, 0])}
    ids, vecs, labels = [], [], {"Dress": set(), "Shoe": set(), "Rare": set()}
    for n in range(20):
        label = "Dress" if n % 2 else "Shoe"
        ids.append(n)
        vecs.append(base[label] + 0.1 * torch.randn(3))
        labels[label].add(n)
    labels["Rare"] = {0}  # fewer than min_items: not a class
    clf = IntentClassifier("type", labels, ids, torch.stack(vecs))
    assert clf.labels == ["Dress", "Shoe"]
    out = clf.classify(torch.tensor([0.9, 0.1, 0.0]))
    assert out["value"] == "Dress" and out["confidence"] > 0.9 and out["slot"] == "type"
    assert clf.classify(torch.tensor([0.1, 0.9, 0.0]))["value"] == "Shoe"
    empty = IntentClassifier("type", {}, ids, torch.stack(vecs))
    assert empty.classify(torch.ones(3)) is None


def test_intent_slot_prefers_type_then_genre(hm_vocab, ml100k_db):
    assert intent_slot(hm_vocab[0]) == "type"
    with Engine(ml100k_db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            assert intent_slot(Vocabulary.build(s)) == "genre"


def test_attribute_graph_built_by_the_kg_builders_is_understood(engine: Engine):
    from polyrec.knowledge_graph.builders import build_from_attributes
    engine.add_items([
        {"external_id": "1", "title": "A", "attributes": {"class": ["Comedy", "Drama"], "release_year": "1995"}},
        {"external_id": "2", "title": "B", "attributes": {"class": ["Comedy"], "release_year": "1988"}},
        {"external_id": "3", "title": "C", "attributes": {"class": ["Drama"], "release_year": "1997"}},
        {"external_id": "4", "title": "D", "attributes": {"class": ["Comedy"], "release_year": "2005"}},
    ])
    with engine.store.session() as s:
        build_from_attributes(s)
    with engine.store.session() as s:
        vocab = Vocabulary.build(s)
    und = vocab.understand("comedy drama from the 1990s")
    assert und.summary() == {"genre": ["Comedy", "Drama"], "decade": "1990s"}
    decade = [m for m in und.matches if m.slot == "decade"][0]
    assert decade.source == "graph" and decade.fields == ("released_in",)
    genre = vocab.facets[("genre", "comedy")]
    assert genre.sources == {"attribute", "graph"} and genre.multi  # merged, AND-ed
    assert {v.external_id for v in engine.items(sorted(und.full_matches()))} == {"1"}
