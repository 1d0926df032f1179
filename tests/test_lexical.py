"""Lexical retrieval: FTS5 BM25 kept in sync with the items table, and the portable
in-memory BM25 that ranks alike."""
from __future__ import annotations

from typing import Iterator

import pytest
from sqlalchemy import delete, text

from polyrec import Engine
from polyrec.retrieve.lexical import (Fts5Index, MemoryBM25Index, flatten_attributes, fts5_available,
                            make_index, stem, terms, tokens)
from polyrec.store.models import Item

ITEMS = [
    {"external_id": "a", "title": "Black jersey dress", "text": "A short dress in soft jersey.",
     "attributes": {"colour": "Black", "type": "Dress"}},
    {"external_id": "b", "title": "White shirt", "text": "Cotton shirt with a black collar.",
     "attributes": {"colour": "White", "type": "Shirt"}},
    {"external_id": "c", "title": "Summer sandals", "text": "Leather sandals.",
     "attributes": {"colour": "Beige", "type": "Sandals", "tags": ["summer", "beach"]}},
    {"external_id": "d", "title": "Jersey top", "text": "Striped top.",
     "attributes": {"colour": "Blue", "type": "Top"}},
]


def ids(engine: Engine, hits: list[tuple[int, float]]) -> list[str]:
    by_id = {v.id: v.external_id for v in engine.items()}
    return [by_id[i] for i, _ in hits]


@pytest.fixture
def shop(engine: Engine) -> Engine:
    engine.add_items(ITEMS)
    return engine


#: (index backend, store): each backend on the store it runs on; memory BM25 on both.
BACKENDS = [("fts5", "sqlite"), ("memory", "sqlite"), ("memory", "postgresql"),
            ("postgres", "postgresql")]


@pytest.fixture(params=BACKENDS, ids=["-".join(b) for b in BACKENDS])
def backend_shop(request, tmp_path) -> Iterator[tuple[Engine, str]]:
    """The shop on SQLite or PostgreSQL (tests/conftest.py), with the backend to test."""
    backend, store = request.param
    url = f"sqlite:///{tmp_path / 's.db'}" if store == "sqlite" else request.getfixturevalue("pg_url")
    with Engine(url, device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items(ITEMS)
        yield eng, backend


def test_tokens_and_stems():
    assert tokens("Children's Sci-Fi: DRESSES!") == ["children", "sci", "fi", "dresses"]
    assert [stem(w) for w in ("dresses", "trousers", "glasses", "berries", "bus", "jeans")] == \
        ["dress", "trouser", "glass", "berry", "bus", "jean"]
    assert terms("Black dresses") == ["black", "dress"]
    assert flatten_attributes({"a": "Black", "n": 3, "l": ["x", "y"], "d": {"k": "z"},
                               "none": None}) == "Black 3 x y z"


def test_bm25_ranks_title_matches_first(backend_shop):
    shop, backend = backend_shop
    with shop.store.session() as s:
        index = make_index(s, backend)
        hits = index.search(s, "black dress", 10)
    assert ids(shop, hits)[0] == "a"          # both words, 'dress' twice
    assert set(ids(shop, hits)) == {"a", "b"}  # 'black' also in b's text
    assert all(x[1] >= y[1] for x, y in zip(hits, hits[1:]))


def test_attributes_and_allowed_ids(backend_shop):
    shop, backend = backend_shop
    with shop.store.session() as s:
        index = make_index(s, backend)
        assert ids(shop, index.search(s, "beach", 5)) == ["c"]  # a list attribute value
        jersey = ids(shop, index.search(s, "jersey", 5))
        assert set(jersey) == {"a", "d"}
        d_only = {v.id for v in shop.items() if v.external_id == "d"}
        assert ids(shop, index.search(s, "jersey", 5, allowed=d_only)) == ["d"]
        assert index.search(s, "nothingmatches", 5) == []
        assert index.search(s, "jersey", 0) == []


def test_excluded_ids_are_left_out_and_the_limit_still_filled(backend_shop):
    """``exclude`` (search passes the retired items) drops ids from the answer and the
    next ones fill their places, with and without ``allowed``."""
    shop, backend = backend_shop
    by_ext = {v.external_id: v.id for v in shop.items()}
    with shop.store.session() as s:
        index = make_index(s, backend)
        both = ids(shop, index.search(s, "black jersey", 10))
        assert both[0] == "a" and len(both) == 3  # a (both words), then b and d
        assert ids(shop, index.search(s, "black jersey", 2, exclude={by_ext["a"]})) == both[1:]
        assert ids(shop, index.search(s, "jersey", 5, allowed={by_ext["a"], by_ext["d"]},
                                      exclude={by_ext["a"]})) == ["d"]
        assert index.search(s, "jersey", 5, exclude={by_ext["a"], by_ext["d"]}) == []


def test_fts5_is_chosen_on_sqlite_and_syncs_lazily(shop: Engine):
    with shop.store.session() as s:
        assert fts5_available(s)
        index = make_index(s)
        assert isinstance(index, Fts5Index)
        assert index.search(s, "velvet", 5) == []
    shop.add_items([{"external_id": "e", "title": "Green velvet blazer"}])
    with shop.store.session() as s:
        assert ids(shop, index.search(s, "velvet", 5)) == ["e"]
    shop.add_items([{"external_id": "e", "title": "Green linen blazer"}])  # an update
    with shop.store.session() as s:
        assert index.search(s, "velvet", 5) == []
        assert ids(shop, index.search(s, "linen", 5)) == ["e"]
        s.execute(delete(Item).where(Item.external_id == "a"))  # a deletion: rebuilt
    with shop.store.session() as s:
        assert ids(shop, index.search(s, "black dress", 5)) == ["b"]
        n = s.execute(text(f"SELECT count(*) FROM {Fts5Index.TABLE}")).scalar_one()
        assert n == 4


def test_a_second_index_object_reuses_the_stored_sync_state(shop: Engine):
    with shop.store.session() as s:
        assert Fts5Index().sync(s) is True
    with shop.store.session() as s:
        assert Fts5Index().sync(s) is False  # nothing changed since: no rebuild


@pytest.mark.parametrize("query", ['"dress', "dress OR", "NEAR(", "col:dress", "*", "dress AND -x",
                                   "dress & !x | (", "dress:* <-> 'x"])
def test_query_syntax_is_never_interpreted(backend_shop, query: str):
    shop, backend = backend_shop
    with shop.store.session() as s:
        index = make_index(s, backend)
        hits = index.search(s, query, 5)
    if "dress" in query:
        assert ids(shop, hits)[0] == "a"
    else:
        assert hits == []


def test_memory_index_rebuilds_when_items_change(shop: Engine):
    index = MemoryBM25Index()
    with shop.store.session() as s:
        assert index.search(s, "velvet", 5) == []
    shop.add_items([{"external_id": "e", "title": "Velvet blazer"}])
    with shop.store.session() as s:
        assert ids(shop, index.search(s, "velvet", 5)) == ["e"]


def test_backends_agree_on_movielens(ml100k_db):
    with Engine(ml100k_db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            fts = Fts5Index().search(s, "toy story", 5)
            mem = MemoryBM25Index().search(s, "toy story", 5)
        by_id = {v.id: v.external_id for v in eng.items([fts[0][0], mem[0][0]])}
    assert by_id[fts[0][0]] == by_id[mem[0][0]] == "1"  # Toy Story
    assert len({i for i, _ in fts} & {i for i, _ in mem}) >= 3


def test_a_read_snapshot_searches_without_writing(shop: Engine):
    """Search reads inside one snapshot (Store.snapshot) while writers go on; a snapshot
    cannot write once another connection has committed after it began (SQLite answers
    'database is locked' at once), so the snapshot searches the index as last synced and
    never syncs."""
    from sqlalchemy.exc import OperationalError
    engine = shop
    index = Fts5Index()
    with engine.store.session() as s:
        index.sync(s)
    engine.add_items([{"external_id": "e", "title": "Jersey scarf"}])  # index now behind
    with engine.store.snapshot() as s:
        s.execute(text("SELECT count(*) FROM items")).scalar_one()  # the snapshot is fixed here
        engine.add_items([{"external_id": "f", "title": "Jersey socks"}])  # committed meanwhile
        hits = ids(engine, index.search(s, "jersey", 10, sync=False))
        assert set(hits) == {"a", "d"}  # as last synced: nothing half-seen, nothing written
        with pytest.raises(OperationalError, match="locked"):
            index.search(s, "jersey", 10)  # a sync from a stale snapshot fails
    with engine.store.session() as s:  # a write transaction syncs and finds all four
        assert set(ids(engine, index.search(s, "jersey", 10))) == {"a", "d", "e", "f"}
    assert engine.search("jersey", 10).ids()  # Engine.search syncs first, then reads


#: Clear product queries on the H&M sample (1,000 articles) for the backend comparison.
HM_QUERIES = ["black dress", "denim jeans", "striped shirt", "baby bodysuit", "swimsuit",
              "knitted jumper", "leather boots", "cotton t-shirt", "socks", "hoodie", "red top",
              "wool coat", "floral skirt", "sports bra", "shorts"]


def test_postgres_full_text_ranks_like_bm25_on_hm(pg_url, hm_dir):
    """PostgreSQL's full-text search (its own stemmer and parser) against the in-process
    BM25 on the same catalogue: the same items match, the same item comes first for most
    queries and the top 10 mostly agree (measured: 11/15 same first, mean overlap 0.75)."""
    from polyrec.retrieve.lexical import PostgresFtsIndex
    with Engine(pg_url, device="cpu", entrypoints=False, progress=False) as eng:
        eng.ingest(hm_dir / "articles_sample.parquet", "items")
        same_top, overlaps = 0, []
        with eng.store.session() as s:
            assert isinstance(make_index(s), PostgresFtsIndex)
            fts, memory = PostgresFtsIndex(), MemoryBM25Index()
            for q in HM_QUERIES:
                pg, bm = fts.search(s, q, 10), memory.search(s, q, 10)
                assert pg and bm, q
                assert all(x[1] >= y[1] for x, y in zip(pg, pg[1:]))
                same_top += pg[0][0] == bm[0][0]
                overlaps.append(len({i for i, _ in pg} & {i for i, _ in bm}) / len(bm))
            for q in ("socks", "hoodie", "shorts", "swimsuit"):  # one plain word: same matches
                assert {i for i, _ in fts.search(s, q, 1000)} == \
                    {i for i, _ in memory.search(s, q, 1000)}, q
    assert same_top >= 10, same_top
    assert sum(overlaps) / len(overlaps) >= 0.65, overlaps
