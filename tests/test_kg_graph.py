"""Knowledge graph on small hand-made graphs: the networkx view, fingerprints, paths,
neighbours, attribute builders and the `polyrec kg` commands."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.errors import ConfigError, NotFoundError
from polyrec.knowledge_graph.builders import DEFAULT_RULES, AttributeRule, build_from_attributes, parse_rule
from polyrec.knowledge_graph.graph import describe, load_tables, to_networkx
from polyrec.knowledge_graph.paths import explain, item_entity, neighbours
from polyrec.knowledge_graph.store import add_triples, link_items

FILMS = {"f1": "Alien", "f2": "Blade Runner", "f3": "Gladiator", "f4": "Heat", "f5": "Solo Film"}
TRIPLES = [
    ("m.alien", "film.film.directed_by", "p.scott"),
    ("m.blade", "film.film.directed_by", "p.scott"),
    ("m.glad", "film.film.directed_by", "p.scott"),
    ("p.scott", "film.director.film", "m.alien"),
    ("p.scott", "film.director.film", "m.blade"),
    ("m.heat", "film.film.directed_by", "p.mann"),
    ("m.alien", "film.film.actor", "p.weaver"),
    ("m.heat", "film.film.actor", "p.pacino"),
    ("m.blade", "film.film.actor", "p.ford"),
    ("m.heat", "film.film.actor", "p.ford"),
    *[(m, "film.film.genre", "g.drama") for m in ("m.alien", "m.blade", "m.glad", "m.heat",
                                                  "m.x1", "m.x2", "m.x3", "m.x4")],
]
LINKS = {"f1": "m.alien", "f2": "m.blade", "f3": "m.glad", "f4": "m.heat"}


def _fill(eng: Engine, triples=TRIPLES) -> None:
    eng.add_items([{"external_id": k, "title": v} for k, v in FILMS.items()])
    with eng.store.session() as s:
        add_triples(s, list(triples), source="test")
        link_items(s, LINKS)


@pytest.fixture
def films(engine: Engine) -> Engine:
    _fill(engine)
    return engine


def test_graph_view_nodes_edges_and_attributes(films: Engine) -> None:
    g = films.graph()
    assert g.number_of_edges() == len(TRIPLES)
    assert g.number_of_nodes() == len({t[0] for t in TRIPLES} | {t[2] for t in TRIPLES})
    assert g.nodes["m.alien"]["label"] == "Alien" and g.nodes["m.alien"]["item"] == "f1"
    assert g.nodes["p.scott"]["item"] is None and g.nodes["p.scott"]["label"] is None
    assert set(g["m.alien"]["p.scott"]) == {"film.film.directed_by"}
    assert set(g["p.scott"]["m.alien"]) == {"film.director.film"}
    assert g.graph["item_entities"] == LINKS
    assert g.graph["relation_counts"]["film.film.genre"] == 8


def test_tables_and_fingerprint(films: Engine, tmp_path) -> None:
    with films.store.session() as s:
        tables = load_tables(s)
    assert tables.n_triples == len(TRIPLES) and tables.n_relations == 4
    assert tables.degrees[tables.entity_index["p.scott"]] == 5
    ptr, nbr = tables.neighbour_lists()
    scott = tables.entity_index["p.scott"]
    assert sorted(tables.entities[n] for n in nbr[ptr[scott]:ptr[scott + 1]]) == \
        ["m.alien", "m.alien", "m.blade", "m.blade", "m.glad"]
    # the same graph stored in another order has the same fingerprint; a new triple changes it
    with Engine(tmp_path / "other.db", device="cpu", entrypoints=False, progress=False) as other:
        _fill(other, list(reversed(TRIPLES)))
        assert other.graph().graph["fingerprint"] == tables.fingerprint
        with other.store.session() as s:
            add_triples(s, [("m.glad", "film.film.actor", "p.crowe")])
        assert other.graph().graph["fingerprint"] != tables.fingerprint
    assert to_networkx(tables).graph["fingerprint"] == tables.fingerprint


def test_path_returns_the_shared_director(films: Engine) -> None:
    g = films.graph()
    paths = explain(g, "f1", "f3")
    best = paths[0]
    assert best.hops == 2 and best.via == ["p.scott"]
    assert [s.relation for s in best.steps] == ["film.film.directed_by", "film.film.directed_by"]
    assert [s.forward for s in best.steps] == [True, False]
    assert best.text() == "Alien -film.film.directed_by-> p.scott <-film.film.directed_by- Gladiator"
    assert best.as_dict()["steps"][1]["direction"] == "backward"


def test_path_avoids_hubs_when_it_can(films: Engine) -> None:
    g = films.graph()
    # Blade Runner and Heat share a genre (degree 8) and an actor (degree 2)
    with_hub = explain(g, "f2", "f4", hub_degree=None, limit=5)
    assert {tuple(p.via) for p in with_hub} >= {("p.ford",), ("g.drama",)}
    assert with_hub[0].via == ["p.ford"]  # the more specific node first
    no_hub = explain(g, "f2", "f4", hub_degree=3, limit=5)
    assert all("g.drama" not in p.via for p in no_hub)
    # Gladiator and Heat share only the genre: the hub is used when nothing else links them
    only_hub = explain(g, "f3", "f4", hub_degree=3, max_hops=2)
    assert [p.via for p in only_hub] == [["g.drama"]]
    assert explain(g, "f1", "f1") == []


def test_path_errors_name_the_item(films: Engine) -> None:
    g = films.graph()
    with pytest.raises(NotFoundError, match="f5"):
        explain(g, "f1", "f5")  # an item without a linked entity
    with pytest.raises(NotFoundError, match="nope"):
        explain(g, "nope", "f1")
    assert item_entity(g, "f2") == "m.blade" and item_entity(g, "m.blade") == "m.blade"
    with pytest.raises(NotFoundError, match="p.scott"):
        item_entity(g, "p.scott")  # an entity, but no item's


def test_neighbours_hops_and_hubs(films: Engine) -> None:
    g = films.graph()
    one = neighbours(g, "f1", hops=1)
    assert {n.entity for n in one} == {"p.scott", "p.weaver", "g.drama"}
    assert all(n.hops == 1 for n in one)
    # rarer relations first; equally frequent ones (actor, directed_by: 4) by name
    assert [n.entity for n in one] == ["p.weaver", "p.scott", "g.drama"]
    two = neighbours(g, "f1", hops=2, hub_degree=6)  # p.scott (5 edges) walked, g.drama (8) not
    reached = {n.entity: n for n in two}
    assert reached["m.glad"].hops == 2 and reached["m.glad"].item == "f3"
    assert reached["m.glad"].path.via == ["p.scott"]
    assert "m.heat" not in reached  # only reachable through the genre hub, not walked
    everything = neighbours(g, "f1", hops=2, hub_degree=None)
    assert "m.heat" in {n.entity for n in everything}
    assert len(neighbours(g, "f1", hops=2, limit=2)) == 2


def test_describe_counts(films: Engine) -> None:
    with films.store.session() as s:
        stats = describe(s, top=2)
    assert stats["triples"] == len(TRIPLES) and stats["linked_items"] == 4
    assert list(stats["top_relations"]) == ["film.film.genre", "film.film.actor"]
    assert stats["triples_by_source"] == {"test": len(TRIPLES)}


# -- builders ----------------------------------------------------------------------------
ARTICLES = [
    {"external_id": "a1", "title": "Pola leggings",
     "attributes": {"colour_group_name": "Black", "department_name": "Jersey Basic",
                    "product_type_name": "Leggings/Tights", "detail_desc": "High-waisted"}},
    {"external_id": "a2", "title": "Cusco sweater",
     "attributes": {"colour_group_name": "Dark Blue", "department_name": "Tops Knitwear",
                    "product_type_name": "Sweater"}},
    {"external_id": "a3", "title": "Basic tee",
     "attributes": {"colour_group_name": "Black", "department_name": "Jersey Basic",
                    "product_type_name": "T-shirt"}},
    {"external_id": "a4", "title": "No attributes", "attributes": {}},
]


def test_build_from_hm_like_attributes(engine: Engine) -> None:
    engine.add_items(ARTICLES)
    with engine.store.session() as s:
        report = build_from_attributes(s)
    assert report.items == 3 and report.new_item_entities == 3
    assert report.relations == {"has_colour": 3, "in_department": 3, "has_type": 3}
    g = engine.graph()
    assert g.graph["item_entities"] == {"a1": "item:a1", "a2": "item:a2", "a3": "item:a3"}
    assert set(g["item:a1"]) == {"colour:black", "department:jersey_basic", "type:leggings/tights"}
    assert g.nodes["colour:dark_blue"] == {"label": "Dark Blue", "type": "colour", "item": None}
    assert g.nodes["item:a1"]["label"] == "Pola leggings" and g.nodes["item:a1"]["type"] == "item"
    paths = explain(g, "a1", "a3", limit=5)
    assert {tuple(p.via) for p in paths} == {("colour:black",), ("department:jersey_basic",)}
    assert paths[0].steps[0].relation in ("has_colour", "in_department")

    # building again is idempotent; a changed attribute replaces its triple, and the
    # value entity nobody uses any more disappears
    with engine.store.session() as s:
        again = build_from_attributes(s)
    assert again.triples == 9 and again.removed == 9 and again.new_item_entities == 0
    engine.add_items([{**ARTICLES[1], "attributes": {**ARTICLES[1]["attributes"],
                                                     "colour_group_name": "Black"}}])
    with engine.store.session() as s:
        build_from_attributes(s)
    g = engine.graph()
    assert "colour:dark_blue" not in g and set(g["item:a2"]) >= {"colour:black"}
    assert g.number_of_edges() == 9


def test_build_keeps_existing_links_and_splits_lists(engine: Engine) -> None:
    engine.add_items([{"external_id": "1", "title": "Toy Story",
                       "attributes": {"class": ["Animation", "Children's", "Comedy"],
                                      "release_year": "1995"}},
                      {"external_id": "2", "title": "Heat",
                       "attributes": {"class": "Action Crime", "release_year": 1995.0}}])
    with engine.store.session() as s:
        add_triples(s, [("m.toy", "film.film.genre", "m.anim")])
        link_items(s, {"1": "m.toy"})
        report = build_from_attributes(s)
    g = engine.graph()
    assert report.new_item_entities == 1  # item 2 only
    assert set(g["m.toy"]) == {"m.anim", "genre:animation", "genre:children's", "genre:comedy",
                               "decade:1990s"}
    assert set(g["item:2"]) == {"genre:action", "genre:crime", "decade:1990s"}
    assert g.nodes["decade:1990s"]["label"] == "1990s"
    assert report.relations == {"has_genre": 5, "released_in": 2}


def test_parse_rule() -> None:
    assert parse_rule("class=genre_of") == AttributeRule("class", "genre_of", "genre", split=" ")
    assert parse_rule("material=has_material") == AttributeRule("material", "has_material", "material")
    assert parse_rule("maker=made_by").prefix == "made"
    for bad in ("colour", "=x", "colour="):
        with pytest.raises(ConfigError):
            parse_rule(bad)
    with pytest.raises(ConfigError):
        AttributeRule("a", "b", "c", transform="century")
    assert {r.relation for r in DEFAULT_RULES} >= {"has_colour", "in_department", "has_type",
                                                   "has_genre", "released_in"}


# -- CLI ---------------------------------------------------------------------------------
def test_kg_commands(tmp_path) -> None:
    db = tmp_path / "cli.db"
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        _fill(eng)
        eng.add_items(ARTICLES)
    run = lambda *args: CliRunner().invoke(cli, ["--db", str(db), "--quiet", "kg", *args])  # noqa: E731

    res = run("build", "--from-attributes", "colour_group_name=has_colour")
    assert res.exit_code == 0, res.output
    assert "Built 3 triples for 3 items" in res.output and "has_colour" in res.output

    res = run("stats", "--json")
    stats = json.loads(res.output)
    assert stats["triples"] == len(TRIPLES) + 3 and stats["linked_items"] == 7
    assert stats["triples_by_source"] == {"test": len(TRIPLES), "attributes": 3}
    assert "film.film.directed_by" in run("stats").output

    res = run("path", "f1", "f2")
    assert res.exit_code == 0
    assert res.output.splitlines()[0] == \
        "2 hops: Alien -film.film.directed_by-> p.scott <-film.film.directed_by- Blade Runner"
    paths = json.loads(run("path", "a1", "a3", "--json").output)
    assert paths[0]["via"] == ["colour:black"]

    res = run("neighbours", "f1", "--hops", "2", "--json")
    found = {n["entity"]: n for n in json.loads(res.output)}
    assert found["m.blade"]["item"] == "f2" and found["m.blade"]["hops"] == 2
    assert "Blade Runner (item f2)" in run("neighbours", "f1", "--hops", "2").output

    res = run("path", "f1", "zzz")
    assert res.exit_code == 1 and "zzz" in res.output
    res = run("build", "--from-attributes", "nonsense")
    assert res.exit_code == 1 and "ATTR=RELATION" in res.output
