"""Readers, column mapping, validation and transactional behaviour of ingestion."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from polyrec import Engine, ValidationError
from polyrec.errors import ConfigError, NotFoundError
from polyrec.ingest.files import pick_reader, resolve_mapping, to_timestamp
from polyrec.plugins.readers import CsvReader, JsonLinesReader, ParquetReader, RecBoleReader
from polyrec.store.models import Interaction
from conftest import dump


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def engine(store_engine):
    """Every test here runs on SQLite and on PostgreSQL (tests/conftest.py)."""
    return store_engine


ITEMS_CSV = "item_id,title,description,genre\ni1,Alpha,first item,drama\ni2,Beta,,comedy\n"


# -- readers ------------------------------------------------------------------------------
def test_csv_reader_rows_and_blanks(tmp_path):
    f = write(tmp_path / "a.csv", 'id,name,note\n1,"Smith, J",\n2,Doe,"x"\n')
    rows = list(CsvReader().read(f))
    assert [r.number for r in rows] == [1, 2]
    assert rows[0].fields == {"id": "1", "name": "Smith, J", "note": None}
    assert CsvReader().columns(f) == ["id", "name", "note"]


def test_csv_reader_flags_extra_values(tmp_path):
    f = write(tmp_path / "a.csv", "id,name\n1,a\n2,b,c\n")
    rows = list(CsvReader().read(f))
    assert None not in rows[0].fields
    assert "more value" in rows[1].fields[None]


def test_jsonl_reader(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"id": 1, "tags": ["x", "y"]}\n\n{bad json\n[1, 2]\n')
    rows = list(JsonLinesReader().read(f))
    assert rows[0].fields == {"id": 1, "tags": ["x", "y"]}
    assert [r.number for r in rows] == [1, 2, 3]
    assert "invalid JSON" in rows[1].fields[None]
    assert "JSON object" in rows[2].fields[None]
    assert JsonLinesReader().columns(f) is None


def test_parquet_reader(tmp_path):
    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [10, 11], "name": ["a", None]}), f)
    rows = list(ParquetReader().read(f))
    assert [r.fields for r in rows] == [{"id": 10, "name": "a"}, {"id": 11, "name": None}]
    assert ParquetReader().columns(f) == ["id", "name"]


def test_parquet_reader_rejects_garbage(tmp_path):
    f = write(tmp_path / "a.parquet", "not parquet")
    with pytest.raises(ValidationError, match="Parquet"):
        ParquetReader().columns(f)


def test_recbole_reader_types(tmp_path):
    f = write(tmp_path / "x.item",
              "item_id:token\tmovie_title:token_seq\tscore:float\tclass:token_seq\n"
              "7\tThe Matrix\t4.5\tAction Sci-Fi\n8\tNo Class\tnan?\t\n")
    assert RecBoleReader().columns(f) == ["item_id", "movie_title", "score", "class"]
    rows = list(RecBoleReader().read(f))
    assert rows[0].fields == {"item_id": "7", "movie_title": ["The", "Matrix"], "score": 4.5,
                              "class": ["Action", "Sci-Fi"]}
    assert rows[1].fields["score"] == "nan?" and rows[1].fields["class"] is None


def test_reader_chosen_by_suffix_or_format(engine, tmp_path):
    readers = engine.registry("readers")
    assert {"csv", "tsv", "jsonl", "parquet", "recbole"} <= set(readers.names())
    assert pick_reader(readers, Path("x.inter")).name == "recbole"
    assert pick_reader(readers, Path("x.CSV")).name == "csv"
    assert pick_reader(readers, Path("x.txt"), "tsv").name == "tsv"
    with pytest.raises(ConfigError, match="--format"):
        pick_reader(readers, Path("x.txt"))


# -- mapping ------------------------------------------------------------------------------
def test_mapping_autodetects_common_names():
    cols = ["article_id", "prod_name", "detail_desc", "colour"]
    assert resolve_mapping("items", cols, None, file="f") == {
        "external_id": "article_id", "title": "prod_name", "text": "detail_desc"}
    inter = resolve_mapping("interactions", ["t_dat", "customer_id", "article_id", "price"],
                            None, file="f")
    assert inter == {"user": "customer_id", "item": "article_id", "ts": "t_dat"}
    assert resolve_mapping("kg", ["head_id", "relation_id", "tail_id"], None, file="f") == {
        "head": "head_id", "relation": "relation_id", "tail": "tail_id"}


def test_mapping_explicit_and_errors():
    cols = ["sku", "name", "blurb"]
    m = resolve_mapping("items", cols, {"external_id": "sku", "text": "blurb"}, file="f")
    assert m == {"external_id": "sku", "text": "blurb", "title": "name"}
    assert "title" not in resolve_mapping("items", cols, {"external_id": "sku", "title": None},
                                          file="f")
    with pytest.raises(ValidationError) as err:
        resolve_mapping("items", cols, None, file="f.csv")
    assert err.value.field == "external_id" and "--map" in str(err.value)
    with pytest.raises(ConfigError, match="no column 'nope'"):
        resolve_mapping("items", cols, {"external_id": "nope"}, file="f")
    with pytest.raises(ConfigError, match="unknown field"):
        resolve_mapping("items", cols, {"colour": "name"}, file="f")


def test_timestamps():
    assert to_timestamp("2020-06-12") == 1591920000.0
    assert to_timestamp("881250949") == 881250949.0
    assert to_timestamp("2020-06-12T01:00:00Z") == 1591923600.0


# -- ingestion ----------------------------------------------------------------------------
def test_items_csv_mapping_and_attributes(engine, tmp_path):
    report = engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    assert (report.rows, report.written, report.new, report.skipped) == (2, 2, 2, 0)
    a, b = engine.items()
    assert (a.external_id, a.title, a.text, a.attributes) == ("i1", "Alpha", "first item",
                                                              {"genre": "drama"})
    assert b.text is None


def test_items_jsonl_with_python_mapping_and_image_root(engine, tmp_path):
    (tmp_path / "pics").mkdir()
    f = write(tmp_path / "items.jsonl",
              json.dumps({"sku": "s1", "label": "Lamp", "img": "lamp.jpg", "price": 9.5}) + "\n"
              + json.dumps({"sku": "s2", "label": "Desk", "img": "https://x.test/d.jpg"}) + "\n")
    engine.ingest(f, "items", mapping={"external_id": "sku", "title": "label"},
                  image_root=tmp_path / "pics")
    lamp, desk = engine.items()
    assert lamp.title == "Lamp" and lamp.attributes == {"price": 9.5}
    assert lamp.image == str(tmp_path / "pics" / "lamp.jpg")  # kept even if missing: doctor flags
    assert desk.image == "https://x.test/d.jpg"


def test_image_template_keeps_existing_files_only(engine, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0000000007.jpg").write_bytes(b"jpg")
    f = tmp_path / "items.parquet"
    pq.write_table(pa.table({"article_id": [7, 8], "prod_name": ["a", "b"]}), f)
    engine.ingest(f, "items", image_template="images/{article_id:010d}.jpg")
    a, b = engine.items()
    assert a.image == str(tmp_path / "images" / "0000000007.jpg") and b.image is None
    with pytest.raises(ConfigError, match="sku"):
        engine.ingest(f, "items", image_template="{sku}.jpg")
    g = write(tmp_path / "more.csv", "article_id,prod_name\n7,again\n")  # a text column
    engine.ingest(g, "items", image_template="pics/{article_id:010d}.jpg",
                  image_root=tmp_path / "pics-root")
    assert engine.items()[0].image is None  # tmp/pics-root/pics/... does not exist
    engine.ingest(g, "items", image_template="images/{article_id:010d}.jpg")
    assert engine.items()[0].image == str(tmp_path / "images" / "0000000007.jpg")


def test_interactions_kinds_values_and_context(engine, tmp_path):
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    f = write(tmp_path / "ev.csv", "user_id,item_id,rating,timestamp,shop\n"
                                   "u1,i1,4,100,web\nu2,i2,5,2020-06-12,app\n")
    report = engine.ingest(f, "interactions")
    assert report.new == 2 and engine.stats()["interactions_by_kind"] == {"rating": 2}
    g = write(tmp_path / "clicks.csv", "user,item\nu1,i2\nu1,i2\n")
    assert engine.ingest(g, "interactions").new == 2  # identical rows are both kept
    assert engine.ingest(g, "interactions").new == 0  # ... and once only on re-ingestion
    h = write(tmp_path / "buys.csv", "customer_id,article_id,t_dat\nu3,i1,2020-01-01\n")
    engine.ingest(h, "interactions", interaction_kind="purchase")
    assert engine.stats()["interactions_by_kind"] == {"rating": 2, "click": 2, "purchase": 1}
    with engine.store.session() as s:
        ctx, ts = s.execute(select(Interaction.context, Interaction.ts)
                            .where(Interaction.value == 5)).one()
    assert ctx == {"shop": "app"} and ts == 1591920000.0


@pytest.mark.parametrize("rows, row, field, message", [
    ("u1,i1,4,100\n,i2,5,100\n", 2, "user_id", "missing user"),
    ("u1,i1,4,100\nu2,i2,great,100\n", 2, "rating", "not a number"),
    ("u1,i1,4,yesterday\n", 1, "timestamp", "not a timestamp"),
    ("u1,i1,4,100\nu1,i1,3,200\nu2,zz,5,100\n", 3, "item_id", "unknown item 'zz'"),
    ("u1,i1,,100\n", 1, "rating", "a rating needs a value"),
    ("u1,i1,4,100,extra\n", 1, None, "more value"),
])
def test_validation_names_file_row_field(engine, tmp_path, rows, row, field, message):
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    f = write(tmp_path / "bad.csv", "user_id,item_id,rating,timestamp\n" + rows)
    with pytest.raises(ValidationError) as err:
        engine.ingest(f, "interactions")
    e = err.value
    assert (e.file, e.row, e.field) == (str(f), row, field)
    assert message in str(e) and str(f) in str(e) and f"row {row}" in str(e)


def test_on_error_fail_leaves_database_unchanged(engine, tmp_path):
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    engine.ingest(write(tmp_path / "ok.csv", "user_id,item_id,rating\nu1,i1,4\n"), "interactions")
    before = dump(engine)
    bad_items = write(tmp_path / "bad_items.csv", "item_id,title\ni1,Changed\ni3,New\n,Nameless\n")
    bad_events = write(tmp_path / "bad.csv", "user_id,item_id,rating\nu9,i2,5\nu9,i2,x\nu9,zz,1\n")
    with pytest.raises(ValidationError, match="3 bad rows|2 bad rows"):
        engine.ingest(bad_events, "interactions")
    with pytest.raises(ValidationError, match="row 3"):
        engine.ingest(bad_items, "items")
    assert dump(engine) == before  # not even the new user u9 or item i3


def test_on_error_skip_keeps_good_rows(engine, tmp_path):
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    f = write(tmp_path / "mixed.csv", "user_id,item_id,rating\nu1,i1,4\nu1,i2,x\nu2,zz,1\nu2,i2,5\n")
    report = engine.ingest(f, "interactions", on_error="skip")
    assert (report.rows, report.written, report.skipped) == (4, 2, 2)
    assert [(e["row"], e["field"]) for e in report.errors] == [(2, "rating"), (3, "item_id")]
    assert engine.stats()["interactions"] == 2
    assert engine.ingest(f, "interactions", on_error="skip").new == 0


def test_kg_and_links(engine, tmp_path):
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    kg = write(tmp_path / "g.kg", "head_id:token\trelation_id:token\ttail_id:token\n"
                                  "e1\tdirected_by\te9\ne2\tdirected_by\te9\ne1\tdirected_by\te9\n")
    link = write(tmp_path / "g.link", "item_id:token\tentity_id:token\ni1\te1\ni2\te2\n")
    report = engine.ingest(kg, "kg", links=link)
    assert (report.written, report.new, report.links.new) == (3, 2, 2)
    assert engine.ingest(link, "kg").kind == "links"  # a .link file alone
    stats = engine.stats()
    assert (stats["triples"], stats["entities"], stats["linked_items"]) == (2, 3, 2)
    assert engine.items()[0].entity == "e1"
    bad = write(tmp_path / "bad.link", "item_id:token\tentity_id:token\nnope\te1\n")
    with pytest.raises(ValidationError, match="unknown item 'nope'"):
        engine.ingest(bad, "links")


def test_users_and_file_errors(engine, tmp_path):
    f = write(tmp_path / "u.user", "user_id:token\tage:token\tgender:token\n1\t24\tM\n")
    engine.ingest(f, "users")
    with engine.store.session() as s:
        from polyrec.store.models import User
        assert s.query(User).one().attributes == {"age": "24", "gender": "M"}
    with pytest.raises(NotFoundError):
        engine.ingest(tmp_path / "missing.csv", "users")
    with pytest.raises(ConfigError, match="kind"):
        engine.ingest(f, "movies")
    with pytest.raises(ConfigError, match="on_error"):
        engine.ingest(f, "users", on_error="ignore")


# -- one writer of interactions: the API, feedback, HTTP and files agree ------------------
BAD_EVENTS = [  # (event, field, reason) - each expressible by all four paths
    ({"user": "u1", "item": "i1", "kind": "like"}, "kind", "unknown event kind 'like' (known: "),
    ({"user": "u1", "item": "i1", "kind": "rating"}, "value", "a rating needs a value"),
    ({"user": "u1", "item": "i1", "kind": "rating", "value": "nan"}, "value",
     "not a finite number: 'nan'"),
    ({"user": "u1", "item": "i1", "ts": "yesterday"}, "ts",
     "not a timestamp (epoch seconds or ISO date): 'yesterday'"),
    ({"user": " ", "item": "i1"}, "user", "missing user id"),
]


def _refusals(engine, tmp_path, event):
    """(path, reason, field) of the refusal of ``event`` by each write path."""
    from fastapi.testclient import TestClient

    from polyrec.serve.app import create_app
    out = []
    for name, call in (("add_interactions", lambda: engine.add_interactions([event])),
                       ("feedback_many", lambda: engine.feedback_many([event]))):
        with pytest.raises(ValidationError) as err:
            call()
        out.append((name, err.value.reason, err.value.field, err.value.row))
    body = {k: (float(v) if k in ("value", "ts") and v == "nan" else v) for k, v in event.items()}
    if isinstance(body.get("ts"), str) or not str(body.get("user")).strip():
        response = None  # HTTP's own schema (ts: a number; ids: not blank) refuses it first
    else:
        response = TestClient(create_app(engine)).post(  # json.dumps: NaN as clients send it
            "/feedback", content=json.dumps(body), headers={"content-type": "application/json"})
    if response is not None:
        assert response.status_code == 422, response.text
        message = response.json()["message"]
        out.append(("http", message.split(": ", 1)[1], event_field(message), 1))
    cols = ["user", "item", *[k for k in ("kind", "value", "ts") if k in event]]
    f = write(tmp_path / "one.csv", ",".join(cols) + "\n" + ",".join(str(event[c]) for c in cols)
              + "\n")
    report = engine.ingest(f, "interactions", on_error="skip")
    assert report.skipped == 1
    err = report.errors[0]
    out.append(("file", err["message"], err["field"], err["row"]))
    return out


def event_field(message: str) -> str:
    return message.split("field '", 1)[1].split("'", 1)[0]


@pytest.mark.parametrize("event, field, reason", BAD_EVENTS, ids=[b[1] for b in BAD_EVENTS])
def test_the_same_bad_event_is_refused_alike_by_every_path(engine, tmp_path, event, field, reason):
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    refusals = _refusals(engine, tmp_path, event)
    http = set() if isinstance(event.get("ts"), str) or not event["user"].strip() else {"http"}
    assert {p for p, *_ in refusals} == {"add_interactions", "feedback_many", "file"} | http
    for path, got, got_field, row in refusals:
        assert got.startswith(reason), (path, got)
        assert (got_field, row) == (field, 1), path
    assert len({got for _, got, *_ in refusals}) == 1  # word for word the same
    stats = engine.stats()
    assert stats["interactions"] == 0 and stats["users"] == 0


def test_unknown_item_is_refused_by_every_path(engine, tmp_path):
    from fastapi.testclient import TestClient

    from polyrec.serve.app import create_app
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    event = {"user": "u1", "item": "ghost"}
    for call in (lambda: engine.add_interactions([event]), lambda: engine.feedback("u1", "ghost")):
        with pytest.raises(NotFoundError, match="unknown item 'ghost'"):
            call()
    response = TestClient(create_app(engine)).post("/feedback", json=event)
    assert response.status_code == 404 and "unknown item 'ghost'" in response.json()["message"]
    f = write(tmp_path / "ghost.csv", "user,item\nu1,ghost\n")
    with pytest.raises(ValidationError, match="unknown item 'ghost'"):
        engine.ingest(f, "interactions")
    assert engine.stats()["interactions"] == 0 and engine.stats()["users"] == 0


def test_configured_kinds_are_accepted_by_every_path(engine, tmp_path):
    from polyrec.feedback.events import set_config
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    set_config(engine, {"kind_weights.like": 1.5})
    assert engine.add_interactions([{"user": "u1", "item": "i1", "kind": "Like", "ts": 1}]) == 1
    assert engine.feedback("u1", "i2", "like").kind == "like"
    f = write(tmp_path / "likes.csv", "user,item,kind\nu2,i1,like\n")
    assert engine.ingest(f, "interactions").new == 1
    assert engine.stats()["interactions_by_kind"] == {"like": 3}


def test_one_dedup_rule(engine, tmp_path):
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    batch = [{"user": "u1", "item": "i1", "kind": "view", "ts": 5},
             {"user": "u1", "item": "i1", "kind": "view", "ts": 5},  # a genuine repeat
             {"user": "u2", "item": "i2", "context": {"event_id": "e1"}}]
    assert engine.add_interactions(batch) == 3
    assert engine.add_interactions(batch) == 0  # the same batch again adds nothing
    assert [e.new for e in engine.feedback_many(batch)] == [False, False, False]
    f = write(tmp_path / "v.csv", "user,item,kind,ts\nu1,i1,view,5\nu1,i1,view,5\nu1,i1,view,6\n")
    assert engine.ingest(f, "interactions").new == 1  # the two at ts 5 are stored already
    assert engine.ingest(f, "interactions").new == 0
    assert engine.add_interactions([{"user": "u3", "item": "i1"}]) == 1  # no ts: now, new
    assert engine.add_interactions([{"user": "u3", "item": "i1"}]) == 1
    assert engine.stats()["interactions"] == 6


def test_add_interactions_informs_the_learners(tmp_path, store_url):
    from polyrec import Engine, FeedbackLearner, hookimpl

    seen, contexts = [], []

    class Witness(FeedbackLearner):
        name = "witness_ingest"

        def observe(self, events):
            seen.extend((e.user, e.item, e.kind, e.new) for e in events)
            contexts.extend(e.context for e in events)

    class Plugin:
        @hookimpl
        def register_feedback_learners(self, register):
            register(Witness)

    with Engine(store_url, device="cpu", entrypoints=False, progress=False,
                plugins=[Plugin()]) as eng:
        eng.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
        assert eng.add_interactions([{"user": "a", "item": "i1", "ts": 1},
                                     {"user": "b", "item": "i2", "kind": "cart", "ts": 2}]) == 2
        assert seen == [("a", "i1", "click", True), ("b", "i2", "cart", True)]
        eng.add_interactions([{"user": "a", "item": "i1", "ts": 1}])  # stored before: not new
        assert len(seen) == 2
        f = write(tmp_path / "ev.csv", "user,item,kind,page\nc,i1,view,home\n")
        eng.ingest(f, "interactions")  # files: after commit, through services.interactions_stored
        assert seen[-1][:3] == ("c", "i1", "view") and contexts[-1] == {"page": "home"}
