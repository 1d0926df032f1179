"""Dense search in PostgreSQL with pgvector (polyrec.store.pgvector), on the tests' real
PostgreSQL server (pgvector 0.8): the same answers as the in-process exact search on
MovieLens-100k titles encoded with BERT, filters, writes reflected in the same
transaction, the switch that keeps search in the process, SQLite untouched."""
from __future__ import annotations

import json

import numpy as np
import psycopg
import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import text

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.retrieve.search import VectorSpace
from polyrec.store import pgvector
from polyrec.store.pgvector import PgVectors
from polyrec.store.vectors import delete_vectors, load_vectors, save_vectors

pytestmark = pytest.mark.usefixtures("one_thread")

#: queries of the comparison (the first 20 are the ones the bars were set on, the last
#: 10 were looked at only once the bars were written)
QUERIES = [
    "space adventure", "romantic comedy in paris", "horror", "war movie",
    "animated children's film", "detective crime thriller", "musical", "western cowboys",
    "science fiction aliens", "christmas", "vampire", "shakespeare", "high school",
    "boxing", "wedding", "dinosaurs", "pirates", "batman", "star trek", "james bond",
    "documentary about music", "kung fu", "ghost story", "robots", "a king and his court",
    "a dog", "new york city", "love story", "mafia family", "toys come alive",
]
GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western"]


def _open(url: str, **kw) -> Engine:
    return Engine(url, device="cpu", entrypoints=False, progress=False, **kw)


def _genre_vectors(eng: Engine) -> None:
    """A second vector space from the catalogue itself: genres one-hot plus the decade,
    stored as encoder 'genres' (similar items average it with bert)."""
    rows, vecs = [], []
    for item in eng.items():
        classes = item.attributes.get("class") or []
        year = str(item.attributes.get("release_year") or "0")
        v = [1.0 if g in classes else 0.0 for g in GENRES]
        v += [1.0 if year[:3] == d else 0.0 for d in ("193", "194", "195", "196", "197", "198", "199")]
        rows.append((item.id, "g"))
        vecs.append(v)
    with eng.store.session() as s:
        save_vectors(s, "genres", "genres-v1", rows, torch.tensor(vecs))


@pytest.fixture(scope="module")
def ml_pg(pg_server, ml100k_dir) -> str:
    """A PostgreSQL database with MovieLens-100k's 1,682 items, their BERT title vectors
    and 'genres' vectors; no pgvector table yet (encoded with pgvector switched off, as a
    database from before the tables were built at encode time). Read-only (copy it:
    ``ml_copy``)."""
    url = pg_server.create_database("pgv_ml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(pgvector.ENV, "off")
        with _open(url) as eng:
            eng.ingest(ml100k_dir / "ml-100k.item", "items")
            eng.encode(["bert"], options={"bert": {"max_length": 32}})
            _genre_vectors(eng)
    yield url
    pg_server.drop_database("pgv_ml")


_copies = iter(range(1, 10**6))


@pytest.fixture
def ml_copy(pg_server, ml_pg) -> str:
    """A writable copy of ml_pg (CREATE DATABASE ... TEMPLATE), dropped after."""
    name = f"pgv_copy{next(_copies)}"
    with psycopg.connect(f"host=127.0.0.1 port={pg_server.port} user=postgres dbname=postgres",
                         autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}" TEMPLATE "pgv_ml"')
    yield pg_server.url(name)
    pg_server.drop_database(name)


def _exact(eng: Engine, encoder: str) -> VectorSpace:
    with eng.store.session() as s:
        ids, vecs = load_vectors(s, encoder)
    return VectorSpace.of(encoder, (), ids, vecs)


def _query(eng: Engine, q: str) -> torch.Tensor:
    srch = eng.services.searcher()
    with eng.store.snapshot() as s:
        fingerprint = srch.state(s).vectors["bert"][2]
    vec, why = srch.query_vector("bert", q, fingerprint)
    assert vec is not None, why
    return vec


def _ready(eng: Engine, encoder: str, dim: int) -> PgVectors:
    pgv = eng.services.searcher().pgvector
    assert pgv is not None and pgv.available()
    assert pgv.ensure(encoder, dim) is not None
    return pgv


def _recall(got: list[int], want: list[int]) -> float:
    return len(set(got) & set(want)) / max(1, len(want))


@pytest.mark.parametrize("plan", ["planner", "hnsw"])
def test_dense_top_k_matches_the_exact_search(ml_copy, capsys, plan):
    """pgvector's top-10 (and top-200, the search's candidate pool) against exact
    in-process cosine top-k over the same stored vectors. At 1,682 rows the planner
    compares every row (a sort: exact); "hnsw" makes it use the HNSW index (sequential
    scans off), as it does on large tables. Measured (ef_search 100, m 16): see the
    printed line (docs/storage.md); the bars leave room for HNSW's randomness. Scores
    agree to float16 precision."""
    with _open(ml_copy) as eng:
        pgv = _ready(eng, "bert", 384)
        exact = _exact(eng, "bert")
        r10, r200, gaps = [], [], []
        for q in QUERIES:
            vec = _query(eng, q)
            want10 = exact.top(exact.scores(vec), 10)
            want200 = exact.top(exact.scores(vec), 200)
            with eng.store.snapshot() as s:
                if plan == "hnsw":
                    s.execute(text("SELECT set_config('enable_seqscan', 'off', true)"))
                got10 = pgv.search(s, "bert", 384, vec, 10)
                got200 = pgv.search(s, "bert", 384, vec, 200)
            assert got10 is not None and len(got10) == 10 and len(got200) == 200
            r10.append(_recall([i for i, _ in got10], [i for i, _ in want10]))
            r200.append(_recall([i for i, _ in got200], [i for i, _ in want200]))
            exact_score = dict(exact.top(exact.scores(vec), len(exact.item_ids)))
            gaps += [abs(sc - exact_score[i]) for i, sc in got10]
    with capsys.disabled():
        print(f"\npgvector ({plan}) vs exact on {len(QUERIES)} ML-100k queries: recall@10 "
              f"{np.mean(r10):.3f} (min {min(r10):.2f}), recall@200 {np.mean(r200):.3f} "
              f"(min {min(r200):.3f}), max score gap {max(gaps):.5f}")
    assert np.mean(r10[:20]) >= 0.95 and min(r10) >= 0.7
    assert np.mean(r200) >= 0.95
    assert max(gaps) < 2e-3


def test_search_uses_the_index_and_answers_like_the_process(ml_copy, monkeypatch):
    """Engine.search on PostgreSQL runs the dense leg in SQL once the table exists, in a
    form the HNSW index serves; its hits equal those of the same Engine with pgvector switched off
    (top-10 overlap >= 0.9 per query; lexical and dense fused the same way)."""
    with _open(ml_copy) as eng:
        srch = eng.services.searcher()
        eng.search("space adventure", k=10)  # creates the table (this request: in process)
        before = srch.pgvector.queries
        with_pg = {q: eng.search(q, k=10).ids() for q in QUERIES[:12]}
        assert srch.pgvector.queries - before == 12
        with eng.store.snapshot() as s:
            name = srch.pgvector.table(s, "bert", 384)
            # at 1,682 rows the planner sorts them all (exact, cheaper); the query's shape
            # can use the index, which it does at scale (benchmarks/pgvector_search.py)
            s.execute(text("SELECT set_config('enable_seqscan', 'off', true)"))
            plan = "\n".join(r[0] for r in s.execute(text(
                f"EXPLAIN SELECT item_id FROM {name} ORDER BY embedding <=> "
                f"CAST(:q AS halfvec) LIMIT 10"), {"q": pgvector.vector_literal(torch.ones(384))}))
        assert f"Index Scan using {name}_hnsw" in plan
    monkeypatch.setenv(pgvector.ENV, "off")
    with _open(ml_copy) as eng:
        assert eng.services.searcher().pgvector is None
        for q, ids in with_pg.items():
            assert _recall(ids, eng.search(q, k=10).ids()) >= 0.9, q


@pytest.mark.parametrize("exact_below", [5_000, 0], ids=["exact-scan", "iterative-index-scan"])
def test_filters_are_respected(ml_copy, exact_below):
    """A filter's allowed items only, whether answered by an exact scan of the allowed
    rows or by pgvector 0.8's iterative index scan; the same items as the exact search
    restricted to them (recall@10 >= 0.9 on average). A filter nothing passes: nothing."""
    with _open(ml_copy) as eng:
        pgv = _ready(eng, "bert", 384)
        pgv.exact_below = exact_below
        srch = eng.services.searcher()
        exact = _exact(eng, "bert")
        with eng.store.snapshot() as s:
            snap = srch.catalog(s)
        recalls = []
        for genre, q in [("Horror", "space adventure"), ("Comedy", "war movie"),
                         ("Drama", "a dog"), ("Western", "love story"), ("Sci-Fi", "christmas")]:
            allowed = snap.allowed({"class": genre})
            vec = _query(eng, q)
            with eng.store.snapshot() as s:
                got = pgv.search(s, "bert", 384, vec, 10, allowed)
            assert got and all(i in allowed for i, _ in got)
            want = exact.top(exact.scores(vec), 10, allowed)
            recalls.append(_recall([i for i, _ in got], [i for i, _ in want]))
            hits = eng.search(q, k=10, filters={"class": genre})
            assert hits.results and all(genre in h.attributes["class"] for h in hits.results)
        assert np.mean(recalls) >= 0.9, recalls
        with eng.store.snapshot() as s:
            assert pgv.search(s, "bert", 384, _query(eng, "horror"), 10, set()) == []


@pytest.mark.parametrize("basis", ["bert", "auto"])
def test_similar_items_match_the_process(ml_copy, monkeypatch, basis):
    """Similar items answered in SQL (one encoder; and bert + genres averaged over
    candidates from both) against the in-process answer of the same store with pgvector
    off: top-10 overlap >= 0.9 on average over 20 items, >= 0.7 for each; scores of
    shared neighbours equal to float16 precision; filters respected."""
    items = [str(i) for i in range(1, 400, 20)]
    with _open(ml_copy) as eng:
        pgv = _ready(eng, "bert", 384)
        assert pgv.ensure("genres", 25)
        before = pgv.queries
        got = {i: eng.similar(i, 10, basis=basis) for i in items}
        assert pgv.queries > before
        filtered = eng.similar("1", 10, basis=basis, filters={"class": "Drama"})
    monkeypatch.setenv(pgvector.ENV, "off")
    with _open(ml_copy) as eng:
        want = {i: eng.similar(i, 10, basis=basis) for i in items}
    overlaps = []
    for i in items:
        assert got[i].spaces == want[i].spaces and got[i].basis == want[i].basis
        assert i not in got[i].ids() and len(got[i].results) == 10
        overlaps.append(_recall(got[i].ids(), want[i].ids()))
        exact = {h.item: h.score for h in want[i].results}
        assert all(abs(h.score - exact[h.item]) < 2e-3 for h in got[i].results if h.item in exact)
    assert np.mean(overlaps) >= 0.9 and min(overlaps) >= 0.7, overlaps
    assert filtered.results and all("Drama" in h.attributes["class"] for h in filtered.results)


def test_retired_items_are_left_out_in_sql_and_k_are_still_found(ml_copy):
    """Search and similar items answered by pgvector never return a retired item and
    still give k answers: a few retired items are dropped from an index scan asked for
    as many more rows; when most of the catalogue is retired the answer is an exact scan
    of the rest."""
    with _open(ml_copy) as eng:
        pgv = _ready(eng, "bert", 384)
        vec = _query(eng, "space adventure")
        with eng.store.snapshot() as s:
            top = [i for i, _ in pgv.search(s, "bert", 384, vec, 20)]
        ext = {v.id: v.external_id for v in eng.items()}
        before = pgv.queries
        hits = eng.search("space adventure", 10, weights={"lexical": 0.0}).ids()
        assert pgv.queries > before and hits[:3] == [ext[i] for i in top[:3]]
        eng.retire_items([ext[i] for i in top[:5]])
        got = eng.search("space adventure", 10, weights={"lexical": 0.0}).ids()
        assert len(got) == 10 and not {ext[i] for i in top[:5]} & set(got)
        neighbours = eng.similar(ext[top[5]], 10, basis="bert").ids()
        assert len(neighbours) == 10 and not {ext[i] for i in top[:5]} & set(neighbours)
        # all but 12 items retired: an exact scan finds the live ones
        live = set(top[5:17])
        eng.retire_items([e for i, e in ext.items() if i not in live])
        with eng.store.snapshot() as s:
            retired = eng.services.searcher().retired(s)
            found = pgv.search(s, "bert", 384, vec, 10, exclude=retired)
        assert len(retired) == len(ext) - 12 and {i for i, _ in found} <= live
        assert [i for i, _ in found] == top[5:15]
        assert set(eng.search("space adventure", 10, weights={"lexical": 0.0}).ids()) <= \
            {ext[i] for i in live}


def test_writes_and_deletes_are_reflected_in_the_same_transaction(ml_copy):
    """The trigger keeps the pgvector table in step: a re-encoded vector is found at
    once, a deleted vector or item is gone, a rolled-back write leaves the table as it
    was, a vector of another width leaves the table; float16 and float32 blobs are
    decoded exactly (to float16)."""
    with _open(ml_copy) as eng:
        pgv = _ready(eng, "bert", 384)
        exact = _exact(eng, "bert")
        ids = {it.external_id: it.id for it in eng.items()}
        a, b, c = ids["1"], ids["2"], ids["3"]
        va = exact.matrix[exact.row[a]]

        def top(vec: torch.Tensor, k: int = 3) -> list[tuple[int, float]]:
            with eng.store.snapshot() as s:
                return pgv.search(s, "bert", 384, vec, k)

        assert top(va)[0][0] == a
        # re-encode b with a's vector: b is a's twin at once
        with eng.store.session() as s:
            save_vectors(s, "bert", "fp", [(b, "x")], va[None])
        found = dict(top(va))
        assert b in found and found[b] > 0.999
        # a write rolled back leaves nothing behind
        with pytest.raises(RuntimeError):
            with eng.store.session() as s:
                save_vectors(s, "bert", "fp", [(c, "x")], va[None])
                raise RuntimeError("abort")
        assert c not in dict(top(va, 5))
        # deleting a's vector, and deleting item b itself, removes them
        with eng.store.session() as s:
            delete_vectors(s, "bert", [a])
            s.execute(text("DELETE FROM items WHERE id = :i"), {"i": b})
        assert {a, b}.isdisjoint(i for i, _ in top(va, 20))
        # a vector of another width leaves the 384-wide table; zero vectors never match
        with eng.store.session() as s:
            save_vectors(s, "bert", "fp", [(c, "x")], torch.ones(1, 8))
            save_vectors(s, "bert", "fp", [(ids["4"], "x")], torch.zeros(1, 384))
        with eng.store.snapshot() as s:
            name = pgv.table(s, "bert", 384)
            left = {r[0] for r in s.execute(text(f"SELECT item_id FROM {name}"))}
        assert {a, b, c, ids["4"]}.isdisjoint(left) and len(left) == 1682 - 4
        # exact decoding of both stored precisions
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.standard_normal((2, 384)).astype(np.float32))
        with eng.store.session() as s:
            save_vectors(s, "bert", "fp", [(ids["5"], "x")], x[:1], dtype="float16")
            save_vectors(s, "bert", "fp", [(ids["6"], "x")], x[1:], dtype="float32")
        with eng.store.snapshot() as s:
            stored = {i: np.array(v.strip("[]").split(","), dtype=np.float32) for i, v in s.execute(
                text(f"SELECT item_id, embedding::text FROM {name} WHERE item_id IN (:a, :b)"),
                {"a": ids["5"], "b": ids["6"]})}
        expect = x.numpy().astype(np.float16).astype(np.float32)
        assert np.array_equal(stored[ids["5"]], expect[0])
        assert np.array_equal(stored[ids["6"]], expect[1])


def test_switched_off_or_sqlite_stays_in_the_process(ml_copy, tmp_path, monkeypatch):
    """POLYREC_PGVECTOR=off (a server treated as one without pgvector): search and
    similar items work in the process and nothing is created in the database. On SQLite
    there is no pgvector path at all."""
    monkeypatch.setenv(pgvector.ENV, "off")
    with _open(ml_copy) as eng:
        assert eng.services.searcher().pgvector is None
        assert PgVectors.for_store(eng.store) is None
        assert eng.search("space adventure", k=5).results
        assert eng.similar("1", 5, basis="bert").results
        with eng.store.session() as s:
            assert s.execute(text("SELECT to_regclass(:t)"), {"t": pgvector.REGISTRY}).scalar() is None
            assert not s.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first()
        assert pgvector.build_tables(eng.store) == [] and pgvector.missing_tables(eng.store) == []
    monkeypatch.delenv(pgvector.ENV)
    with _open(tmp_path / "t.db") as eng:
        assert eng.services.searcher().pgvector is None
        assert PgVectors.for_store(eng.store) is None
        assert pgvector.build_tables(eng.store) == []


def test_migrate_passes_with_pgvector_tables(ml_copy):
    """`polyrec migrate` on a PostgreSQL database that has pgvector tables and the
    trigger: nothing to do, and --check agrees."""
    with _open(ml_copy) as eng:
        _ready(eng, "bert", 384)
    runner = CliRunner()
    out = runner.invoke(cli, ["--db", ml_copy, "--quiet", "migrate"])
    assert out.exit_code == 0, out.output
    check = runner.invoke(cli, ["--db", ml_copy, "--quiet", "migrate", "--check"])
    assert check.exit_code == 0, check.output


def _registry(url: str) -> list[tuple]:
    """The pgvector tables registered in ``url`` (encoder, dim, table, created_at); [] when
    there is no registry."""
    with _open(url) as eng, eng.store.session() as s:
        if s.execute(text("SELECT to_regclass(:t)"), {"t": pgvector.REGISTRY}).scalar() is None:
            return []
        return [tuple(r) for r in s.execute(text(
            f"SELECT encoder, dim, table_name, created_at FROM {pgvector.REGISTRY} ORDER BY id"))]


def _rows(url: str, table: str) -> dict[int, str]:
    with _open(url) as eng, eng.store.session() as s:
        return dict(s.execute(text(f"SELECT item_id, embedding::text FROM {table}")).all())


def _first_search_builds_nothing(url: str) -> None:
    """A fresh Engine's first search answers its dense leg in SQL (the table was there
    in its snapshot) and leaves the registry as it was."""
    before = _registry(url)
    with _open(url) as eng:
        srch = eng.services.searcher()
        assert eng.search("space adventure", k=10).results
        assert srch.pgvector.queries == 1  # answered by pgvector, not in process
    assert _registry(url) == before


def test_encode_builds_the_table_before_the_first_search(ml_copy):
    """`polyrec encode` on PostgreSQL with pgvector builds the encoder's table and index
    once its vectors are written (progress lines while it does): every stored vector
    is in it, and the first search creates nothing. Later writes (a new item encoded
    on a second run) reach the table through its trigger, without a rebuild."""
    with _open(ml_copy) as eng, eng.store.session() as s:  # 25 titles to (re-)encode
        s.execute(text("DELETE FROM item_vectors WHERE encoder = 'bert' AND item_id IN "
                       "(SELECT id FROM items ORDER BY id LIMIT 25)"))
    assert _registry(ml_copy) == []
    runner = CliRunner()
    out = runner.invoke(cli, ["--db", ml_copy, "--device", "cpu", "encode", "-e", "bert", "--json"])
    assert out.exit_code == 0, out.output
    assert "pgvector: copy bert (384)" in out.output and "pgvector: building the HNSW" in out.output
    reg = _registry(ml_copy)
    assert [(e, d) for e, d, _, _ in reg] == [("bert", 384)]  # not 'genres': not encoded here
    table = reg[0][2]
    with _open(ml_copy) as eng:
        with eng.store.session() as s:
            stored = s.execute(text("SELECT count(*) FROM item_vectors WHERE encoder = 'bert'")).scalar()
        exact = _exact(eng, "bert")
    rows = _rows(ml_copy, table)
    assert stored == 1682 and len(rows) == 1682
    some = exact.item_ids[0]  # the table holds the stored vector (to float16)
    got = np.array(rows[some].strip("[]").split(","), dtype=np.float32)
    assert np.allclose(got, exact.matrix[exact.row[some]].numpy(), atol=1e-3)
    _first_search_builds_nothing(ml_copy)
    # a new item, encoded on arrival (encode_items): in the table through the trigger
    # in the writing transaction, no rebuild; the catalogue's search finds it
    with _open(ml_copy) as eng:
        eng.add_items([{"external_id": "new-1", "title": "Spaceship lost among the stars"}])
        assert eng.wait_for_encoding(120)
        new = {it.external_id: it.id for it in eng.items()}["new-1"]
        with eng.store.session() as s:
            count = s.execute(text("SELECT count(*) FROM item_vectors WHERE encoder = 'bert'")).scalar()
    assert _registry(ml_copy) == reg
    rows = _rows(ml_copy, table)
    assert count == 1683 and len(rows) == 1683 and new in rows


def test_migrate_builds_the_tables_before_the_first_search(ml_copy, monkeypatch):
    """`polyrec migrate` on a PostgreSQL database whose encoders have stored vectors but
    no pgvector table (from before): --check lists them (exit 0: the schema is current),
    POLYREC_PGVECTOR=off builds nothing, migrate builds one per (encoder, width) with
    progress lines, a second migrate builds nothing, and the first search creates
    nothing."""
    runner = CliRunner()
    check = runner.invoke(cli, ["--db", ml_copy, "migrate", "--check"])
    assert check.exit_code == 0, check.output
    assert "pgvector: no table yet for bert (384)" in check.output
    assert "pgvector: no table yet for genres (25)" in check.output
    monkeypatch.setenv(pgvector.ENV, "off")
    off = runner.invoke(cli, ["--db", ml_copy, "migrate", "--json"])
    assert off.exit_code == 0 and "pgvector" not in json.loads(off.stdout)
    assert _registry(ml_copy) == []
    monkeypatch.delenv(pgvector.ENV)
    out = runner.invoke(cli, ["--db", ml_copy, "migrate"])
    assert out.exit_code == 0, out.output
    assert "pgvector: copy bert (384)" in out.output  # progress (stderr)
    assert "pgvector: built polyrec_vec_" in out.output and "for genres (25)" in out.output
    reg = _registry(ml_copy)
    assert sorted((e, d) for e, d, _, _ in reg) == [("bert", 384), ("genres", 25)]
    assert len(_rows(ml_copy, reg[0][2])) == 1682
    again = runner.invoke(cli, ["--db", ml_copy, "migrate", "--json"])
    assert again.exit_code == 0, again.output
    assert [t["built"] for t in json.loads(again.stdout)["pgvector"]] == [False, False]
    assert _registry(ml_copy) == reg
    _first_search_builds_nothing(ml_copy)


@pytest.mark.parametrize("path", ["binary", "sql"])
def test_the_table_build_copies_exactly_the_vectors_the_trigger_would(pg_url, monkeypatch, path):
    """A table build writes the stored vectors with a binary COPY (decoded in the client,
    in ranges of ids): the table equals the source vectors as float16 (float16 blobs
    exactly, float32 rounded to nearest) and what the trigger's SQL decoding writes from
    the same blobs; vectors halfvec cannot hold (zero, NaN, infinite, beyond 65504) and
    other widths are left out. ``sql``: the same through the path of a driver without
    psycopg 3's COPY (psycopg2), which decodes the blobs in SQL."""
    monkeypatch.setattr(pgvector, "COPY_CHUNK", 7)  # several ranges of ids
    if path == "sql":
        monkeypatch.setattr(pgvector, "_copy_range", pgvector._copy_range_in_sql)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((60, 16)) * 3).astype(np.float32)
    x[3] = 0.0
    x[4, 2] = np.nan
    x[5, 1] = np.inf
    x[6, 0] = 70000.0    # beyond float16 (float16 blob: inf; float32 blob: over 65504)
    x[7, 0] = 65504.0    # the largest float16: kept
    x[40, 0] = 65519.0   # float32 over 65504: left out
    x[41] = 1e-9         # not zero in float32 (kept), zero once rounded to float16
    x[42, 5] = 1.0 + 2 ** -11  # a tie: rounds to even (1.0)
    with _open(pg_url) as eng:
        eng.add_items([{"external_id": f"i{n}"} for n in range(61)])
        ids = [it.id for it in eng.items()]
        rows = [(i, "h") for i in ids[:60]]
        with eng.store.session() as s:
            save_vectors(s, "enc", "fp", rows[:30], torch.from_numpy(x[:30]), dtype="float16")
            save_vectors(s, "enc", "fp", rows[30:], torch.from_numpy(x[30:]), dtype="float32")
            save_vectors(s, "enc", "fp", [(ids[60], "h")], torch.ones(1, 8))
        name = eng.services.searcher().pgvector.ensure("enc", 16)
        assert name is not None

        def table() -> dict[int, np.ndarray]:
            with eng.store.snapshot() as s:
                return {i: np.array(v.strip("[]").split(","), dtype=np.float32)
                        for i, v in s.execute(text(f"SELECT item_id, embedding::text FROM {name}"))}

        copied = table()
        left_out = {ids[k] for k in (3, 4, 5, 6, 40)} | {ids[60]}
        assert set(copied) == set(ids[:61]) - left_out
        with np.errstate(over="ignore"):
            half = x.astype(np.float16).astype(np.float32)  # float16 blobs hold these exactly
        for k in range(60):
            if ids[k] in copied:
                assert np.array_equal(copied[ids[k]], half[k]), k
        assert copied[ids[7]][0] == 65504.0 and not copied[ids[41]].any()
        assert copied[ids[42]][5] == 1.0
        # the trigger rewrites every row from the same blobs (SQL decoding): no change
        with eng.store.session() as s:
            save_vectors(s, "enc", "fp", rows[:30], torch.from_numpy(x[:30]), dtype="float16")
            save_vectors(s, "enc", "fp", rows[30:], torch.from_numpy(x[30:]), dtype="float32")
        rewritten = table()
        assert rewritten.keys() == copied.keys()
        assert all(np.array_equal(rewritten[i], copied[i]) for i in copied)
