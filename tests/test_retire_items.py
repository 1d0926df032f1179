"""Retiring items (sold out, discontinued) on MovieLens-100k with the default pipeline:
a retired item keeps its row, vectors and history but is never served (recommend on
every path, batches, search, similar items, the popular fallback), in this Engine at
once and in a second Engine on the same store without a restart; restoring brings it
back; re-ingesting the catalogue does not; the Python API, `polyrec items` and HTTP."""
from __future__ import annotations

import csv
import json
import time
from collections import Counter

import httpx
import pytest
from click.testing import CliRunner
from conftest import copy_db

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.errors import NotFoundError, ValidationError
from polyrec.rank.dataset import build_training_data
from polyrec.serve.app import create_app, start_background

pytestmark = [pytest.mark.slow,  # the default pipeline on ml-100k serves every test
              pytest.mark.usefixtures("one_thread")]

TOKEN = "retire-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: ml-100k users the single-user paths are checked for
USERS = [str(u) for u in range(1, 944, 23)]  # 42 users


def _open(db) -> Engine:
    return Engine(db, device="cpu", entrypoints=False, progress=False)


@pytest.fixture(scope="module")
def shop_db(tmp_path_factory, ml100k_default_db):
    return copy_db(ml100k_default_db[0], tmp_path_factory.mktemp("retire"))


@pytest.fixture(scope="module")
def shop(shop_db):
    with _open(shop_db) as eng:
        yield eng


@pytest.fixture
def eng(shop):
    """The module's Engine; whatever a test retired is restored after it."""
    yield shop
    left = [r["item"] for r in shop.list_items(retired=True, limit=None)]
    if left:
        shop.restore_items(left)


@pytest.fixture(scope="module")
def most_recommended(shop) -> list[str]:
    """The 5 items the model recommends most often (top 10 of every user)."""
    counts = Counter(r.item for _, recs in shop.recommend_many(k=10) for r in recs)
    return [item for item, _ in counts.most_common(5)]


def _internal(eng: Engine, items: list[str]) -> list[int]:
    from polyrec.store.catalog import item_ids
    with eng.store.session() as s:
        found = item_ids(s, items)
    return [found[i] for i in items]


def _title(eng: Engine, item: str) -> str:
    return next(r["title"] for r in eng.list_items(limit=None) if r["item"] == item)


# -- recommend ------------------------------------------------------------------------------
def test_retired_items_are_never_recommended_on_any_path_and_restore_brings_them_back(
        eng, most_recommended):
    gone = set(most_recommended)
    n_items = eng.stats()["items"]
    before = {u: [r.item for r in eng.recommend(u, 10)] for u in USERS}
    assert sum(bool(gone & set(v)) for v in before.values()) > len(USERS) // 2

    report = eng.retire_items(most_recommended)
    assert report.changed == most_recommended and report.unchanged == []
    for user in USERS:
        whole = [r.item for r in eng.recommend(user, n_items)]  # the whole catalogue
        assert whole and not gone & set(whole), user
        top = [r.item for r in eng.recommend(user, 10)]
        assert len(top) == 10 and not gone & set(top)
        # the next best live items fill the places of the retired ones
        assert [i for i in before[user] if i not in gone] == top[:len(before[user]) -
                                                                 len(gone & set(before[user]))]
    for options in ({"diversity": 0.5}, {"filters": {"class": "Comedy"}}, {"explain": True},
                    {"online": True}, {"explore": True}, {"exclude_seen": False}):
        for user in USERS[:8]:
            recs = eng.recommend(user, 20, **options)
            assert len(recs) == 20 and not gone & {r.item for r in recs}, options
    # a user with no history (popularity) and a user the snapshot learns about now
    eng.add_interactions([{"user": "newcomer", "item": "1", "kind": "impression"}])
    assert not gone & {r.item for r in eng.recommend("newcomer", 50)}

    eng.restore_items(most_recommended)
    assert {u: [r.item for r in eng.recommend(u, 10)] for u in USERS} == before


def test_batch_output_leaves_retired_items_out(eng, most_recommended, shop_db, tmp_path):
    gone = set(most_recommended)
    eng.retire_items(most_recommended)
    lists = dict(eng.recommend_many(k=10))
    users = eng.stats()["users"]  # 943, and a user an earlier test may have added
    assert len(lists) == users >= 943
    assert all(len(recs) == 10 and not gone & {r.item for r in recs} for recs in lists.values())
    for user in USERS[:5]:  # the batch path's lists are the single path's
        assert [r.item for r in lists[user]] == [r.item for r in eng.recommend(user, 10)]
    out = tmp_path / "all.csv"
    done = CliRunner().invoke(cli, ["--db", str(shop_db), "--device", "cpu", "--quiet",
                                    "recommend", "--all", "-k", "10", "--out", str(out)])
    assert done.exit_code == 0, done.output
    rows = list(csv.DictReader(open(out, newline="")))
    assert len(rows) == 10 * users and not gone & {r["item"] for r in rows}


def test_history_still_counts_and_evaluation_keeps_retired_items(eng, most_recommended):
    """Retiring changes what is served, not the data: the training data (and with it
    training and offline evaluation) keeps the retired items and their interactions."""
    with eng.store.session() as s:
        before = build_training_data(eng, session=s, features=False)
    interactions = eng.stats()["interactions"]
    eng.retire_items(most_recommended)
    with eng.store.session() as s:
        after = build_training_data(eng, session=s, features=False)
    assert after.item_ids == before.item_ids  # every item, retired ones too
    assert bool((after.items == before.items).all()) and len(after.items) > 0
    dense = {after.item_ids.index(i) for i in _internal(eng, most_recommended)}
    assert sum(int(j) in dense for j in after.items.tolist()) > 100  # their positives stay
    assert eng.stats()["interactions"] == interactions >= 100_000
    assert eng.stats()["retired_items"] == 5


# -- search and similar items ----------------------------------------------------------------
@pytest.mark.parametrize("weights", [None, {"dense": 0.0}, {"lexical": 0.0}])
def test_search_for_a_retired_items_title_does_not_find_it(eng, weights):
    options = {} if weights is None else {"weights": weights}
    title = _title(eng, "1")  # Toy Story
    assert eng.search(title, 10, **options).ids()[0] == "1"
    matches = len(eng.search(title, 20, **options).ids())  # 8 titles share a word (BM25)
    eng.retire_items(["1"])
    found = eng.search(title, 10, **options)
    assert "1" not in found.ids() and len(found.ids()) == min(10, matches - 1)
    assert "1" not in eng.search(title, 10, user="5", **options).ids()  # personalised
    assert "1" not in eng.search(title, 10, filters={"class": "Animation"}, **options).ids()
    eng.restore_items(["1"])
    assert eng.search(title, 10, **options).ids()[0] == "1"


@pytest.mark.parametrize("basis", ["model", "encoders"])
def test_similar_items_of_a_neighbour_leave_the_retired_item_out(eng, basis):
    before = eng.similar("1", 10, basis=basis).ids()
    neighbour = before[0]
    eng.retire_items([neighbour])
    after = eng.similar("1", 10, basis=basis).ids()
    assert neighbour not in after and len(after) == 10
    assert after[:9] == before[1:10]  # the others move up
    # a retired item still has neighbours: alternatives to a discontinued product
    assert len(eng.similar(neighbour, 5, basis=basis).ids()) == 5
    eng.restore_items([neighbour])
    assert eng.similar("1", 10, basis=basis).ids() == before


def test_the_popular_fallback_leaves_retired_items_out(eng):
    from polyrec.serve.app import recommend_or_popular
    top = [r["item"] for r in recommend_or_popular(eng, "nobody", 5)["results"]]
    eng.retire_items(top[:2])
    again = recommend_or_popular(eng, "nobody", 5)
    assert again["basis"] == "popular" and not set(top[:2]) & {r["item"] for r in
                                                                  again["results"]}
    assert [r["item"] for r in again["results"]][:3] == top[2:]


# -- another Engine on the store ------------------------------------------------------------
def test_a_second_engine_sees_the_retirement_without_a_restart(eng, shop_db):
    with _open(shop_db) as other:
        user = USERS[3]
        first = [r.item for r in other.recommend(user, 10)][0]
        title = _title(other, first)
        assert first in other.search(title, 10).ids()
        neighbour = other.similar("1", 5).ids()[0]
        eng.retire_items([first, neighbour])
        started = time.monotonic()
        while first in [r.item for r in other.recommend(user, 10)]:
            assert time.monotonic() - started < 15, "the other Engine still recommends it"
            time.sleep(0.05)
        seconds = time.monotonic() - started
        print(f"the other Engine stopped recommending it after {seconds:.2f} s")
        assert first not in other.search(title, 10).ids()  # search checks every request
        assert neighbour not in other.similar("1", 5).ids()
        assert first not in {r.item for _, recs in other.recommend_many(USERS, 10)
                             for r in recs}
        eng.restore_items([first, neighbour])
        started = time.monotonic()
        while first not in [r.item for r in other.recommend(user, 10)]:
            assert time.monotonic() - started < 15, "the other Engine never serves it again"
            time.sleep(0.05)
        assert first in other.search(title, 10).ids()


# -- ingestion ------------------------------------------------------------------------------
def test_reingesting_the_catalogue_does_not_resurrect_retired_items(eng, ml100k_dir,
                                                                      most_recommended):
    eng.retire_items(most_recommended)
    report = eng.ingest(ml100k_dir / "ml-100k.item", "items")
    assert report.written == 1682 and report.new == 0
    assert {r["item"] for r in eng.list_items(retired=True)} == set(most_recommended)
    assert not set(most_recommended) & {r.item for u in USERS[:10] for r in eng.recommend(u, 20)}
    eng.add_items([{"external_id": most_recommended[0], "title": "Renamed"}])  # an upsert
    assert most_recommended[0] not in eng.search("Renamed", 5, weights={"dense": 0.0}).ids()


def test_an_active_column_or_field_sets_the_state(tmp_path, ml100k_dir):
    from conftest import ml100k_movies
    movies = ml100k_movies(ml100k_dir, 30)
    path = tmp_path / "items.csv"

    def write(active: dict[str, str]) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["item_id", "title", "active"])
            for m in movies:
                w.writerow([m["external_id"], m["title"], active.get(m["external_id"], "")])

    with Engine(tmp_path / "a.db", device="cpu", entrypoints=False, progress=False,
                encode_on_arrival=False) as e:
        write({"1": "false", "2": "No", "3": "0", "4": "true"})
        e.ingest(path, "items")
        assert {r["item"] for r in e.list_items(retired=True)} == {"1", "2", "3"}
        assert "1" not in e.search("Toy Story", 5, weights={"dense": 0.0}).ids()
        first = {r["item"]: r["retired_at"] for r in e.list_items(retired=True)}
        write({"1": "false", "2": "yes"})  # 3: blank, stays retired; 2: restored
        e.ingest(path, "items")
        states = {r["item"]: r["retired_at"] for r in e.list_items(retired=True)}
        assert set(states) == {"1", "3"} and states["1"] == first["1"]  # its first time kept
        assert "active" not in e.items()[0].attributes  # a lifecycle field, not an attribute
        write({"5": "maybe"})
        with pytest.raises(ValidationError, match="row 5, field 'active'.*maybe"):
            e.ingest(path, "items")
        # Python API records: active false / true; anything but a bool is refused
        e.add_items([{"external_id": "7", "active": False}, {"external_id": "new", "active": False,
                                                            "title": "Brand new"}])
        assert {r["item"] for r in e.list_items(retired=True)} == {"1", "3", "7", "new"}
        e.add_items([{"external_id": "7", "active": True}])
        assert "7" not in {r["item"] for r in e.list_items(retired=True)}
        with pytest.raises(ValidationError, match="field 'active'"):
            e.add_items([{"external_id": "8", "active": "no"}])


# -- the Python API's errors ----------------------------------------------------------------
def test_unknown_ids_are_one_error_naming_them_and_nothing_changes(eng):
    with pytest.raises(NotFoundError, match=r"2 unknown item\(s\): 'nope', 'x9'; nothing "
                                            "was retired"):
        eng.retire_items(["1", "nope", "x9"])
    assert eng.list_items(retired=True) == []
    with pytest.raises(ValidationError, match="no item ids given"):
        eng.retire_items([])
    eng.retire_items(["1", 2])  # ids are the one id rule's: 2 is '2'
    again = eng.retire_items(["2", "3"])
    assert again.changed == ["3"] and again.unchanged == ["2"]
    assert "already retired: '2'" in again.summary()
    restored = eng.restore_items(["1", "4"])
    assert restored.changed == ["1"] and restored.unchanged == ["4"]
    with pytest.raises(NotFoundError, match="nothing was restored"):
        eng.restore_items(["2", "nope"])
    assert {r["item"] for r in eng.list_items(retired=True)} == {"2", "3"}


# -- CLI -----------------------------------------------------------------------------------
def test_cli_items_retire_restore_list(eng, shop_db, tmp_path):
    base = ["--db", str(shop_db), "--quiet"]
    runner = CliRunner()
    ids = tmp_path / "ids.txt"
    ids.write_text("# discontinued\n3\n\n4\n")
    done = runner.invoke(cli, [*base, "items", "retire", "1", "2", "--file", str(ids)])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == "4 item(s) retired"
    listed = runner.invoke(cli, [*base, "items", "list", "--retired", "--json"])
    assert sorted(r["item"] for r in json.loads(listed.output)) == ["1", "2", "3", "4"]
    text = runner.invoke(cli, [*base, "items", "list", "--retired"]).output
    assert "Toy Story" in text and "retired 2" in text
    assert "1" not in eng.search(_title(eng, "1"), 10).ids()  # the serving Engine sees it
    bad = runner.invoke(cli, [*base, "items", "restore", "1", "nope"])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1
    assert "1 unknown item(s): 'nope'; nothing was restored" in bad.output
    done = runner.invoke(cli, [*base, "items", "restore", "1", "2", "3", "4", "5", "--json"])
    assert json.loads(done.output)["changed"] == ["1", "2", "3", "4"]
    assert json.loads(done.output)["unchanged"] == ["5"]
    assert runner.invoke(cli, [*base, "items", "list", "--retired"]).output.strip() == \
        "no retired items"
    empty = runner.invoke(cli, [*base, "items", "retire"])
    assert empty.exit_code == 1 and "at least one item id" in empty.output
    assert "Retire items" in runner.invoke(cli, ["items", "--help"]).output


# -- HTTP ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(shop):
    with start_background(create_app(shop, token=TOKEN)) as server:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            yield c


def test_http_retire_restore_and_what_is_served(eng, client):
    # the app's searcher checks the store at most once a second (check_interval) for
    # what other processes wrote, e.g. the CLI test's restore: look now
    eng.services.searcher().invalidate()
    title = _title(eng, "1")
    search = {"query": title, "k": 10}
    assert client.post("/search", json=search).json()["results"][0]["item"] == "1"
    assert client.post("/items/retire", json={"items": ["1", "nope"]}, headers=AUTH
                       ).status_code == 404
    assert client.post("/items/1/retire").status_code == 401  # a write: the token
    r = client.post("/items/1/retire", headers=AUTH)
    assert r.status_code == 200 and r.json()["changed"] == ["1"]
    item = client.get("/items/1").json()
    assert item["retired"] is True and item["retired_at"] > 0
    assert "1" not in [h["item"] for h in client.post("/search", json=search).json()["results"]]
    assert "1" not in [h["item"] for h in client.post("/similar", json={"item": "2", "k": 20}
                                                      ).json()["results"]]
    # /similar may have queued a background refresh of the recommender's data that read
    # before the retire: /recommend waits for it (Recommender.write_wait), then looks again
    for user in USERS[:5] + ["unknown-user"]:
        body = client.post("/recommend", json={"user": user, "k": 50}).json()
        assert "1" not in [h["item"] for h in body["results"]]
    # re-sending the item without 'active' keeps it retired; active true restores it
    put = client.put("/items", json={"items": [{"external_id": "1", "title": title}]},
                     headers=AUTH)
    assert put.status_code == 200 and client.get("/items/1").json()["retired"] is True
    bad = client.put("/items", json={"items": [{"external_id": "1", "active": "yes"}]},
                     headers=AUTH)
    assert bad.status_code == 422
    client.put("/items", json={"items": [{"external_id": "1", "active": True}]}, headers=AUTH)
    assert client.get("/items/1").json()["retired"] is False
    assert client.post("/search", json=search).json()["results"][0]["item"] == "1"
    r = client.post("/items/retire", json={"items": ["1", "2"]}, headers=AUTH)
    assert r.json()["changed"] == ["1", "2"]
    assert client.get("/health").json()["retired_items"] == 2
    r = client.post("/items/restore", json={"items": ["1", "2", "3"]}, headers=AUTH)
    assert r.json()["changed"] == ["1", "2"] and r.json()["unchanged"] == ["3"]
    assert client.post("/items/2/restore", headers=AUTH).json()["unchanged"] == ["2"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/items/retire", "/items/restore", "/items/{item}/retire",
            "/items/{item}/restore"} <= set(paths)

