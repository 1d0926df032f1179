"""The data commands through click's CliRunner: init, ingest, stats, doctor."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import copy_db
from polyrec.cli.main import cli
from polyrec.errors import ValidationError


def run(db: Path, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["--db", str(db), "--quiet", *args])


def ok(db: Path, *args: str):  # type: ignore[no-untyped-def]
    result = run(db, *args)
    assert result.exit_code == 0, result.output
    return result


def stats(db: Path) -> dict:
    return json.loads(ok(db, "stats", "--json").stdout)


ML_STEPS = [("items", "ml-100k.item"), ("users", "ml-100k.user"),
            ("interactions", "ml-100k.inter"), ("kg", "ml-100k.kg")]


def ingest_ml100k(db: Path, data: Path) -> list[str]:
    lines = []
    for kind, name in ML_STEPS:
        extra = ["--links", str(data / "ml-100k.link")] if kind == "kg" else []
        lines.append(ok(db, "ingest", kind, str(data / name), *extra).stdout.strip())
    return lines


@pytest.mark.slow
def test_ml100k_stats_and_reingestion_through_the_cli(tmp_path, ml100k_db, ml100k_dir):
    """The ml100k_db fixture is ml-100k ingested once (Engine.ingest, the code behind the
    CLI); ingesting every file again through the CLI leaves the same counts."""
    db = copy_db(ml100k_db, tmp_path)
    assert "schema version" in ok(db, "init").stdout
    s1 = stats(db)
    assert (s1["items"], s1["users"], s1["interactions"], s1["triples"]) == (1682, 943, 100_000,
                                                                            91_631)
    assert s1["interactions_by_kind"] == {"rating": 100_000} and s1["linked_items"] == 1598
    again = ingest_ml100k(db, ml100k_dir)
    assert all(len(line.splitlines()) == 1 for line in again)
    assert again[2].startswith("Ingested 100,000 interactions from ml-100k.inter (recbole): 0 new")
    assert "91,631 triples from ml-100k.kg (recbole): 0 new" in again[3]
    assert "1,598 item links from ml-100k.link (recbole): 0 new" in again[3]
    assert stats(db) == s1


def test_malformed_csv_fails_with_one_line_and_changes_nothing(tmp_path):
    db = tmp_path / "t.db"
    ok(db, "init")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\na,Alpha\nb,Beta\n")
    ok(db, "ingest", "items", str(items))
    before = stats(db)
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,rating\nu1,a,5\nu2,b,five\n")
    result = run(db, "ingest", "interactions", str(bad))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: {bad}, row 2, field 'rating': not a number: 'five' (nothing was written)"]
    assert "Traceback" not in result.output
    assert stats(db) == before
    debug = CliRunner().invoke(cli, ["--db", str(db), "--debug", "ingest", "interactions", str(bad)])
    assert debug.exit_code == 1 and isinstance(debug.exception, ValidationError)
    assert debug.exception.row == 2 and debug.exception.field == "rating"


def test_skip_map_kind_and_json(tmp_path):
    db = tmp_path / "t.db"
    ok(db, "init")
    items = tmp_path / "items.tsv"
    items.write_text("sku\tname\nA\tAlpha\nB\tBeta\n")
    ok(db, "ingest", "items", str(items), "--map", "external_id=sku")
    events = tmp_path / "events.jsonl"
    events.write_text('{"user": "u1", "item": "A"}\n{"user": "u1", "item": "Z"}\n{oops\n')
    result = ok(db, "ingest", "interactions", str(events), "--on-error", "skip",
                "--kind", "view")
    assert "1 new, 2 bad rows skipped" in result.stdout
    assert f"skipped {events}, row 2, field 'item': unknown item 'Z'" in result.stderr
    assert f"skipped {events}, row 3: invalid JSON" in result.stderr
    assert stats(db)["interactions_by_kind"] == {"view": 1}
    report = json.loads(ok(db, "ingest", "items", str(items), "--map", "external_id=sku",
                           "--json").stdout)
    assert report["mapping"] == {"external_id": "sku", "title": "name"}
    assert (report["written"], report["new"], report["format"]) == (2, 0, "tsv")


@pytest.mark.parametrize("args, message", [
    (["ingest", "items", "{tmp}/nope.csv"], "no such file"),
    (["ingest", "items", "{tmp}/items.txt"], "no reader for suffix '.txt'"),
    (["ingest", "items", "{tmp}/items.txt", "--format", "xml"], "no reader named 'xml'"),
    (["ingest", "items", "{tmp}/items.txt", "--format", "csv", "--map", "title"], "FIELD=COLUMN"),
    (["ingest", "users", "{tmp}/items.txt", "--links", "{tmp}/x.link"], "--links goes with"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "items.txt").write_text("item_id,title\na,Alpha\n")
    ok(tmp_path / "t.db", "init")
    result = run(tmp_path / "t.db", *[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_doctor_on_ml100k(ml100k_db):
    report = json.loads(ok(ml100k_db, "doctor", "--json", "--min-interactions", "20").stdout)
    checks = report["checks"]
    assert report["counts"]["interactions"] == 100_000
    assert checks["items_missing_text"]["count"] == 1682
    assert checks["items_unlinked_to_kg"]["count"] == 1682 - 1598
    assert checks["orphan_interactions"]["count"] == 0
    assert checks["duplicate_titles"]["count"] > 0
    assert 0.93 < report["sparsity"] < 0.94  # 100,000 of 943 x 1,682 cells
    con = sqlite3.connect(ml100k_db)
    few = con.execute("SELECT COUNT(*) FROM (SELECT item_id FROM interactions GROUP BY item_id "
                      "HAVING COUNT(*) < 20)").fetchone()[0]
    con.close()
    assert checks["items_below_min_interactions"]["count"] == few > 0
    text = ok(ml100k_db, "doctor").stdout
    assert "84 items are not linked to a knowledge-graph entity" in text


def test_doctor_on_hm(hm_db):
    checks = json.loads(ok(hm_db, "doctor", "--json").stdout)["checks"]
    assert checks["items_missing_image"]["count"] == 900
    assert checks["image_files_missing"]["count"] == 0
    assert checks["users_below_min_interactions"]["count"] > 0


def test_doctor_finds_broken_images_and_orphans(tmp_path):
    db = tmp_path / "t.db"
    ok(db, "init")
    img = tmp_path / "a.jpg"
    img.write_bytes(b"x")
    items = tmp_path / "items.csv"
    items.write_text(f"item_id,title,image\na,Same,{img}\nb,same ,missing.jpg\nc,Other,\n")
    events = tmp_path / "ev.csv"
    events.write_text("user_id,item_id\nu1,a\nu1,c\n")
    ok(db, "ingest", "items", str(items))
    ok(db, "ingest", "interactions", str(events))
    con = sqlite3.connect(db)  # foreign keys are off on this raw connection
    con.execute("DELETE FROM items WHERE external_id = 'c'")
    con.commit()
    con.close()
    report = json.loads(ok(db, "doctor", "--json", "--min-interactions", "2").stdout)
    checks = report["checks"]
    assert checks["image_files_missing"] == {"count": 1, "examples": ["b"]}
    assert checks["duplicate_titles"]["count"] == 1 and checks["duplicate_titles"]["items"] == 2
    assert checks["orphan_interactions"]["count"] == 1
    assert checks["items_without_interactions"]["examples"] == ["b"]
    assert checks["users_below_min_interactions"]["count"] == 0
    assert any("image file that does not exist" in w for w in report["warnings"])
