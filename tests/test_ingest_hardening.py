"""Issue 12, ingestion: each hostile input found by hand gets one error naming file, row
and field, and changes nothing (or, with ``on_error="skip"``, only the bad rows are left
out and the counts add up)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from polyrec import Engine, FeedbackLearner, ValidationError, hookimpl
from polyrec.errors import NotFoundError
from polyrec.store.ids import ID_CHARS
from conftest import dump

ITEMS_CSV = "item_id,title\ni1,Alpha\ni2,Beta\n"


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def eng(engine, tmp_path):
    engine.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
    return engine


def refused(eng: Engine, path: Path, kind: str = "interactions", **options) -> ValidationError:
    """The ValidationError of ingesting ``path`` with on_error=fail; the database is unchanged."""
    before = dump(eng)
    with pytest.raises(ValidationError) as err:
        eng.ingest(path, kind, **options)
    assert dump(eng) == before
    assert err.value.file == str(path)
    return err.value


# -- numbers ------------------------------------------------------------------------------
@pytest.mark.parametrize("line, field", [
    ('{"user": "u1", "item": "i1", "rating": Infinity}', "rating"),
    ('{"user": "u1", "item": "i1", "rating": -Infinity}', "rating"),
    ('{"user": "u1", "item": "i1", "rating": NaN}', "rating"),
    ('{"user": "u1", "item": "i1", "timestamp": Infinity}', "timestamp"),
    ('{"user": "u1", "item": "i1", "timestamp": NaN}', "timestamp"),
    ('{"user": "u1", "item": "i1", "price": Infinity}', "price"),
])
def test_jsonl_non_finite_numbers_are_refused(eng, tmp_path, line, field):
    err = refused(eng, write(tmp_path / "e.jsonl", line + "\n"))
    assert (err.row, err.field) == (1, field)
    assert "not a finite number" in err.reason


def test_non_finite_item_attributes_are_refused(eng, tmp_path):
    err = refused(eng, write(tmp_path / "i.jsonl", '{"item_id": "i9", "w": -Infinity}\n'), "items")
    assert (err.row, err.field) == (1, "w")
    with pytest.raises(ValidationError, match="attributes"):
        eng.add_items([{"external_id": "i9", "attributes": {"w": float("inf")}}])


# -- CSV quoting, BOM, huge fields ----------------------------------------------------------
UNTERMINATED = 'user,item,rating\nu1,i1,1\nu2,"i1,2\nu3,i2,3\n'


def test_csv_unterminated_quote_names_row_and_field(eng, tmp_path):
    err = refused(eng, write(tmp_path / "q.csv", UNTERMINATED))
    assert (err.row, err.field) == (2, "item") and "unterminated quoted value" in err.reason


def test_csv_unterminated_quote_skip_counts_add_up(eng, tmp_path):
    report = eng.ingest(write(tmp_path / "q.csv", UNTERMINATED), "interactions", on_error="skip")
    assert (report.rows, report.written, report.skipped) == (3, 2, 1)  # the row after is kept
    assert [(e["row"], e["field"]) for e in report.errors] == [(2, "item")]
    assert eng.stats()["users"] == 2  # u1 and u3


def test_csv_stray_quote_is_one_bad_row(eng, tmp_path):
    f = write(tmp_path / "s.csv", 'user,item\nu1,"i1"x\nu2,i2\n')
    report = eng.ingest(f, "interactions", on_error="skip")
    assert (report.rows, report.written, report.skipped) == (2, 1, 1)
    assert report.errors[0]["row"] == 1 and "quoting" in report.errors[0]["message"]


def test_csv_quoted_newlines_are_still_one_row(eng, tmp_path):
    f = write(tmp_path / "n.csv", 'user,item,note\nu1,i1,"two\nlines"\nu2,i2,x\n')
    report = eng.ingest(f, "interactions")
    assert (report.rows, report.written, report.skipped) == (2, 2, 0)


@pytest.mark.parametrize("name", ["bom.csv", "bom.jsonl", "bom.tsv"])
def test_utf8_byte_order_mark_is_not_part_of_the_header(eng, tmp_path, name):
    body = {"bom.csv": "user,item\nu1,i1\n", "bom.tsv": "user\titem\nu1\ti1\n",
            "bom.jsonl": '{"user": "u1", "item": "i1"}\n'}[name]
    report = eng.ingest(write(tmp_path / name, "\ufeff".encode() + body.encode()), "interactions")
    assert report.new == 1 and report.mapping["user"] == "user"


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_huge_field_is_a_bad_row_in_every_format(eng, tmp_path, suffix):
    from polyrec.ingest.files import MAX_FIELD_CHARS
    big = "x" * (MAX_FIELD_CHARS + 1)
    body = (f"user,item,note\nu1,i1,{big}\nu2,i2,ok\n" if suffix == "csv" else
            json.dumps({"user": "u1", "item": "i1", "note": big}) + "\n"
            + json.dumps({"user": "u2", "item": "i2", "note": "ok"}) + "\n")
    f = write(tmp_path / f"h.{suffix}", body)
    err = refused(eng, f)
    assert (err.row, err.field) == (1, "note") and "over the limit" in err.reason
    report = eng.ingest(f, "interactions", on_error="skip")
    assert (report.rows, report.written, report.skipped) == (2, 1, 1)


def test_cell_over_the_csv_parser_limit_is_skippable(eng, tmp_path, monkeypatch):
    from polyrec.plugins import readers
    old = csv.field_size_limit()
    monkeypatch.setattr(readers, "CSV_FIELD_LIMIT", 1000)
    csv.field_size_limit(1000)
    try:
        f = write(tmp_path / "p.csv", f'user,item,note\nu1,i1,"{"y" * 5000}"\nu2,i2,ok\n')
        report = eng.ingest(f, "interactions", on_error="skip")
    finally:
        csv.field_size_limit(old)
    assert (report.rows, report.written, report.skipped) == (2, 1, 1)
    assert report.errors[0]["row"] == 1 and "1,000 characters" in report.errors[0]["message"]


# -- kinds ----------------------------------------------------------------------------------
def test_unknown_kind_is_refused_by_file_and_http_alike(eng, tmp_path):
    from fastapi.testclient import TestClient

    from polyrec.serve.app import create_app
    err = refused(eng, write(tmp_path / "k.csv", "user,item,kind\nu1,i1,bogus_kind\n"))
    assert (err.row, err.field) == (1, "kind")
    r = TestClient(create_app(eng)).post("/feedback", json={"user": "u1", "item": "i1",
                                                            "kind": "bogus_kind"})
    assert r.status_code == 422
    assert err.reason.removesuffix(" (nothing was written)") in r.json()["message"]


class Likes(FeedbackLearner):
    """A plugin's learner that adds the event kind 'like'."""

    name = "likes"
    kinds = {"like": 2.0}

    def observe(self, events):
        pass


class LikesPlugin:
    @hookimpl
    def register_feedback_learners(self, register):
        register(Likes)


def test_a_plugin_adds_a_kind_for_every_path(tmp_path):
    from fastapi.testclient import TestClient

    from polyrec.serve.app import create_app
    with Engine(tmp_path / "k.db", device="cpu", entrypoints=False, progress=False,
                plugins=[LikesPlugin()]) as eng:
        eng.ingest(write(tmp_path / "items.csv", ITEMS_CSV), "items")
        assert eng.ingest(write(tmp_path / "k.csv", "user,item,kind\nu1,i1,like\n"),
                          "interactions").new == 1
        assert eng.add_interactions([{"user": "u1", "item": "i2", "kind": "like"}]) == 1
        r = TestClient(create_app(eng)).post("/feedback", json={"user": "u2", "item": "i1",
                                                                "kind": "like"})
        assert r.status_code == 200, r.text
        assert eng.stats()["interactions_by_kind"] == {"like": 3}
        from polyrec.feedback.events import load_config
        assert load_config(eng)["kind_weights"]["like"] == 2.0


# -- ids ------------------------------------------------------------------------------------
BAD_IDS = [({"a": 1}, "JSON object"), ([1, 2], "list"), (True, "not True"),
           (2.5, "not the number 2.5"), ("x" * (ID_CHARS + 1), f"at most {ID_CHARS}"),
           ("a\x01b", "control characters")]


@pytest.mark.parametrize("bad, message", BAD_IDS, ids=[m for _, m in BAD_IDS])
def test_one_id_rule_for_files_and_the_python_api(eng, tmp_path, bad, message):
    f = write(tmp_path / "e.jsonl", json.dumps({"user_id": bad, "item": "i1"}) + "\n")
    err = refused(eng, f)
    assert (err.row, err.field) == (1, "user_id") and message in err.reason
    f = write(tmp_path / "i.jsonl", json.dumps({"item_id": bad, "title": "t"}) + "\n")
    assert message in refused(eng, f, "items").reason
    for call in (lambda: eng.add_items([{"external_id": bad}]),
                 lambda: eng.add_users([{"external_id": bad}]),
                 lambda: eng.add_interactions([{"user": bad, "item": "i1"}])):
        with pytest.raises(ValidationError, match="control|JSON|list|not|at most"):
            call()
    assert eng.stats()["users"] == 0 and eng.stats()["items"] == 2


def test_good_ids_integers_and_the_longest(eng, tmp_path):
    longest = "y" * ID_CHARS
    f = write(tmp_path / "i.jsonl", json.dumps({"item_id": 7, "title": "int"}) + "\n"
              + json.dumps({"item_id": 8.0, "title": "float"}) + "\n"
              + json.dumps({"item_id": f"  {longest}  ", "title": "long"}) + "\n")
    assert eng.ingest(f, "items").new == 3
    assert {i.external_id for i in eng.items()} >= {"7", "8", longest}


def test_unknown_id_messages_do_not_echo_a_huge_id(eng):
    huge = "z" * 100_000
    with pytest.raises(NotFoundError) as err:
        eng.similar(huge)
    assert len(str(err.value)) < 200 and "100,000 characters" in str(err.value)


# -- images ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["../../../../etc/shadow", "/etc/shadow", "sub/../../x.jpg"])
def test_image_paths_escaping_the_root_are_refused(eng, tmp_path, ref):
    root = tmp_path / "pics"
    (root / "sub").mkdir(parents=True)
    f = write(tmp_path / "i.csv", f"item_id,image\ni9,{ref}\n")
    err = refused(eng, f, "items", image_root=root)
    assert (err.row, err.field) == (1, "image") and "outside the image root" in err.reason


def test_image_paths_under_the_root_and_urls_are_kept(eng, tmp_path):
    root = tmp_path / "pics"
    root.mkdir()
    f = write(tmp_path / "i.csv", f"item_id,image\na,x.jpg\nb,{root / 'y.jpg'}\n"
                                  "c,https://example.test/z.jpg\n")
    eng.ingest(f, "items", image_root=root)
    images = {i.external_id: i.image for i in eng.items()}
    assert images["a"] == str(root / "x.jpg") and images["b"] == str(root / "y.jpg")
    assert images["c"] == "https://example.test/z.jpg"


def test_image_template_escaping_the_root_is_refused(eng, tmp_path):
    f = write(tmp_path / "i.csv", "item_id,name\na,../../etc/passwd\n")
    err = refused(eng, f, "items", image_template="{name}", image_root=tmp_path / "r")
    assert err.field == "image"


def test_doctor_flags_files_that_are_not_images(eng, tmp_path):
    from PIL import Image
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    write(tmp_path / "fake.jpg", b"not an image at all")
    eng.image_root = str(tmp_path)  # local images lie under the image root
    eng.add_items([{"external_id": "real", "image": str(tmp_path / "ok.png")},
                   {"external_id": "fake", "image": str(tmp_path / "fake.jpg")}])
    report = eng.doctor()
    assert report["checks"]["image_files_not_images"] == {"count": 1, "examples": ["fake"]}
    assert any("not an image" in w for w in report["warnings"])
