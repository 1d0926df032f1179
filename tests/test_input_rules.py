"""One rule per input concern, the same for files (``polyrec ingest``), the Python API
(``Engine.add_items``, ``add_interactions``, ``feedback``, ``feedback_many``) and HTTP
(``PUT /items``, ``POST /feedback``, ``/feedback/batch``): image paths stay under the
image root (and the admin serves nothing outside it)."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from polyrec import Engine, ValidationError
from polyrec.cli.main import cli
from polyrec.serve.app import create_app

TOKEN = "t0k"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: a 1x1 PNG
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d4944415478da63f8cfc0f01f0005000201ba2a6b0e0000000049454e44ae426082")


@pytest.fixture
def eng(tmp_path):
    with Engine(tmp_path / "r.db", device="cpu", entrypoints=False, progress=False,
                encode_on_arrival=False) as eng:
        eng.add_items([{"external_id": "i1", "title": "Alpha"}])
        yield eng


def client(eng: Engine, **options):
    from fastapi.testclient import TestClient
    return TestClient(create_app(eng, token=TOKEN, **options))


@pytest.fixture
def outside(tmp_path) -> Path:
    """An image file outside every root of these tests."""
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "elsewhere" / "secret.png"
    path.write_bytes(PNG)
    return path


# -- 1. image paths stay under the image root ------------------------------------------------
ESCAPES = ["../../../../etc/shadow", "/etc/shadow", "sub/../../x.png"]


@pytest.mark.parametrize("ref", ESCAPES)
def test_api_refuses_image_paths_outside_its_root(eng, tmp_path, ref):
    eng.image_root = str(tmp_path / "pics")
    with pytest.raises(ValidationError) as err:
        eng.add_items([{"external_id": "NEW-1", "image": ref}])
    e = err.value
    assert (e.file, e.row, e.field) == ("add_items", 1, "image")
    assert "'NEW-1'" in e.reason and "outside the image root" in e.reason
    assert {i.external_id for i in eng.items()} == {"i1"}  # nothing was written


def test_api_without_a_root_refuses_local_paths_and_keeps_urls(eng, outside):
    with pytest.raises(ValidationError) as err:
        eng.add_items([{"external_id": "NEW-2", "image": str(outside)}])
    assert err.value.field == "image" and "no image root is set" in err.value.reason
    eng.add_items([{"external_id": "u", "image": "https://example.test/u.jpg"},
                   {"external_id": "d", "image": "data:image/png;base64,AAAA"}])
    images = {i.external_id: i.image for i in eng.items()}
    assert images["u"] == "https://example.test/u.jpg" and images["d"].startswith("data:")


def test_api_stores_paths_under_its_root_absolute_and_records_the_root(eng, tmp_path, outside):
    root = tmp_path / "pics"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    eng.image_root = str(root)
    eng.add_items([{"external_id": "a", "image": "a.png"}])
    assert {i.external_id: i.image for i in eng.items()}["a"] == str(root / "a.png")
    # another process without a root: absolute paths under the recorded root are taken
    eng.image_root = None
    eng.add_items([{"external_id": "b", "image": str(root / "a.png")}])
    with pytest.raises(ValidationError, match="outside the image roots of this store"):
        eng.add_items([{"external_id": "c", "image": str(outside)}])


def test_ingest_records_its_root_for_the_api_and_the_admin(eng, tmp_path, outside):
    root = tmp_path / "shop"
    root.mkdir()
    (root / "p.png").write_bytes(PNG)
    (root / "items.csv").write_text("item_id,image\np,p.png\n", encoding="utf-8")
    eng.ingest(root / "items.csv", "items")  # root: the file's folder
    eng.add_items([{"external_id": "q", "image": str(root / "p.png")}])
    http = client(eng)
    r = http.get("/admin/image", params={"item": "q"})
    assert r.status_code == 200 and r.content == PNG


@pytest.mark.parametrize("ref", ESCAPES)
def test_http_put_items_refuses_image_paths_outside_the_root(eng, tmp_path, ref):
    root = tmp_path / "pics"
    root.mkdir()
    http = client(eng, image_root=str(root))
    r = http.put("/items", json={"items": [{"external_id": "NEW-1", "image": ref}]}, headers=AUTH)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["details"]["field"] == "image" and "'NEW-1'" in body["message"]
    assert "outside the image root" in body["message"]
    assert http.get("/items/NEW-1").status_code == 404


def test_http_without_a_root_refuses_a_local_file_and_never_serves_it(eng, outside):
    http = client(eng)
    r = http.put("/items", json={"items": [{"external_id": "NEW-2", "image": str(outside)}]},
                 headers=AUTH)
    assert r.status_code == 422 and "no image root is set" in r.json()["message"]
    assert http.get("/admin/image", params={"item": "NEW-2"}).status_code == 404


def test_admin_never_serves_a_stored_path_outside_the_roots(eng, tmp_path, outside):
    """Defence in depth: a row stored before the rule (written here behind the API's back)
    is not served, with or without --image-root; a file under the root is."""
    from sqlalchemy import update

    from polyrec.store.models import Item
    root = tmp_path / "pics"
    root.mkdir()
    (root / "in.png").write_bytes(PNG)
    eng.image_root = str(root)
    eng.add_items([{"external_id": "in", "image": "in.png"}, {"external_id": "old"}])
    with eng.store.session() as s:
        s.execute(update(Item).where(Item.external_id == "old").values(image=str(outside)))
    for http in (client(eng), client(eng, image_root=str(root))):
        assert http.get("/admin/image", params={"item": "old"}).status_code == 404
        r = http.get("/admin/image", params={"item": "in"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    eng.image_root = None
    relative = client(eng)  # a relative stored path is taken under the recorded roots
    with eng.store.session() as s:
        s.execute(update(Item).where(Item.external_id == "old").values(image="in.png"))
    assert relative.get("/admin/image", params={"item": "old"}).status_code == 200
    with eng.store.session() as s:
        s.execute(update(Item).where(Item.external_id == "old").values(image="../elsewhere/secret.png"))
    assert relative.get("/admin/image", params={"item": "old"}).status_code == 404


# -- 4. unknown fields are refused, not dropped ----------------------------------------------
def test_api_refuses_unknown_item_and_user_fields(eng):
    with pytest.raises(ValidationError) as err:
        eng.add_items([{"external_id": "NEW-3", "titel": "typo field"}])
    e = err.value
    assert (e.file, e.row, e.field) == ("add_items", 1, "titel")
    assert "unknown field 'titel'" in e.reason and "title" in e.reason and "attributes" in e.reason
    with pytest.raises(ValidationError, match="unknown field 'atributes'.*known: external_id, attributes"):
        eng.add_users([{"external_id": "u1", "atributes": {"age": 3}}])
    assert {i.external_id for i in eng.items()} == {"i1"} and eng.stats()["users"] == 0


@pytest.mark.parametrize("write", ["add_interactions", "feedback_many"])
def test_api_refuses_unknown_event_fields(eng, write):
    with pytest.raises(ValidationError) as err:
        getattr(eng, write)([{"user": "u1", "item": "i1"},
                             {"user": "u1", "item": "i1", "knid": "purchase"}])
    e = err.value
    assert (e.row, e.field) == (2, "knid") and "unknown field 'knid'" in e.reason
    assert "user, item, kind, value, ts, context" in e.reason
    assert eng.stats()["interactions"] == 0  # nothing of the batch


def test_http_refuses_the_same_unknown_fields(eng):
    http = client(eng)
    r = http.put("/items", json={"items": [{"external_id": "NEW-3", "titel": "typo"}]}, headers=AUTH)
    assert r.status_code == 422 and "titel" in r.json()["message"]
    r = http.post("/feedback/batch", json={"events": [{"user": "u1", "item": "i1", "knid": "x"}]},
                  headers=AUTH)
    assert r.status_code == 422 and "knid" in r.json()["message"]


def test_cli_stream_refuses_an_unknown_event_field(eng, tmp_path):
    eng.close()
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "r.db"), "-q", "feedback", "stream"],
                                input='{"user": "u1", "item": "i1"}\n{"user": "u1", "itme": "i1"}\n')
    assert result.exit_code == 1
    assert "stdin, row 2, field 'itme': unknown field 'itme'" in result.output


# -- 2. event times lie in 1970-01-01 .. 2200-01-01 UTC; the admin survives older rows -------
ABSURD = [99999999999999, 1.7e12, -1, "1969-12-31T23:59:59Z", "2200-01-01"]


@pytest.mark.parametrize("ts", ABSURD)
def test_api_refuses_times_outside_the_range(eng, ts):
    for write in (lambda: eng.feedback("u1", "i1", ts=ts),
                  lambda: eng.feedback_many([{"user": "u1", "item": "i1", "ts": ts}]),
                  lambda: eng.add_interactions([{"user": "u1", "item": "i1", "ts": ts}])):
        with pytest.raises(ValidationError) as err:
            write()
        assert err.value.field == "ts" and "outside 1970-01-01 .. 2200-01-01 UTC" in err.value.reason
    assert eng.stats()["interactions"] == 0
    eng.feedback("u1", "i1", ts=0)  # the range's ends: 1970-01-01 is in
    eng.feedback("u1", "i1", ts="2199-12-31T23:59:59Z")
    assert eng.stats()["interactions"] == 2


def test_http_file_and_cli_refuse_the_same_far_future_time(eng, tmp_path):
    http = client(eng)
    r = http.post("/feedback", json={"user": "u1", "item": "i1", "ts": 99999999999999}, headers=AUTH)
    assert r.status_code == 422 and r.json()["details"]["field"] == "ts"
    assert "outside 1970-01-01 .. 2200-01-01 UTC" in r.json()["message"]
    r = http.post("/feedback/batch", json={"events": [{"user": "u1", "item": "i1", "ts": 1.7e12}]},
                  headers=AUTH)
    assert r.status_code == 422 and "looks like milliseconds" in r.json()["message"]
    f = tmp_path / "events.csv"
    f.write_text("user_id,item_id,timestamp\nu1,i1,99999999999999\n", encoding="utf-8")
    with pytest.raises(ValidationError) as err:
        eng.ingest(f, "interactions")
    assert (err.value.row, err.value.field) == (1, "timestamp")
    assert "outside 1970-01-01 .. 2200-01-01 UTC" in err.value.reason
    assert eng.stats()["interactions"] == 0
    eng.close()
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "r.db"), "-q", "feedback", "send",
                                      "u1", "i1", "--ts", "99999999999999"])
    assert result.exit_code == 1 and "outside 1970-01-01 .. 2200-01-01 UTC" in result.output


def test_admin_pages_survive_a_stored_absurd_time(eng):
    """A store written before the range was checked may hold such rows: the overview and
    the user's history still answer (the row is left out of the chart, its day is '?')."""
    from sqlalchemy import update

    from polyrec.store.models import Interaction
    eng.feedback("u1", "i1", ts=1_796_112_000)  # 2026-12-01
    eng.feedback("u1", "i1", kind="purchase", ts=1_796_112_000)
    with eng.store.session() as s:
        s.execute(update(Interaction).where(Interaction.kind == "purchase")
                  .values(ts=99999999999999.0))
    http = client(eng)
    r = http.get("/")
    assert r.status_code == 200 and "2026-12-01" in r.text
    r = http.get("/admin/preview", params={"user": "u1"})
    assert r.status_code == 200 and "(2 interactions)" in r.text


# -- 3. a time may be epoch seconds or ISO 8601 on every path --------------------------------
ISO = "2026-12-01T10:00:00+02:00"
EPOCH = 1_796_112_000.0  # the same instant


def stored_times(eng: Engine) -> list[float]:
    from sqlalchemy import select

    from polyrec.store.models import Interaction
    with eng.store.session() as s:
        return list(s.execute(select(Interaction.ts).order_by(Interaction.id)).scalars())


def test_http_takes_iso_times_like_the_python_api(eng):
    http = client(eng)
    r = http.post("/feedback", json={"user": "u1", "item": "i1", "ts": ISO}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["event"]["ts"] == EPOCH
    r = http.post("/feedback/batch", json={"events": [
        {"user": "u2", "item": "i1", "ts": ISO}, {"user": "u3", "item": "i1", "ts": EPOCH},
        {"user": "u4", "item": "i1", "ts": str(int(EPOCH))}]}, headers=AUTH)
    assert r.status_code == 200, r.text
    eng.feedback("u5", "i1", ts=ISO)
    assert stored_times(eng) == [EPOCH] * 5
    r = http.post("/feedback", json={"user": "u1", "item": "i1", "ts": "next tuesday"}, headers=AUTH)
    assert r.status_code == 422 and "not a timestamp" in r.json()["message"]
    r = http.post("/feedback", json={"user": "u1", "item": "i1", "ts": True}, headers=AUTH)
    assert r.status_code == 422


def test_cli_feedback_send_takes_an_iso_time(eng, tmp_path):
    eng.close()
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "r.db"), "-q", "feedback", "send",
                                      "u1", "i1", "--ts", ISO, "--json"])
    assert result.exit_code == 0, result.output
    with Engine(tmp_path / "r.db", device="cpu", entrypoints=False, progress=False) as again:
        assert stored_times(again) == [EPOCH]
