"""A file that updates some columns of stored items or users keeps the others: a shop's
file of new prices must not wipe every other attribute of the items it names."""
from __future__ import annotations

import json
import sqlite3

from click.testing import CliRunner

from polyrec.cli.main import cli


def _ingest(db, kind, path):
    result = CliRunner().invoke(cli, ["--db", str(db), "-q", "ingest", kind, str(path)])
    assert result.exit_code == 0, result.output


def _attributes(db, table):
    rows = sqlite3.connect(db).execute(f"select external_id, title, attributes from {table}"
                                       if table == "items" else
                                       f"select external_id, null, attributes from {table}")
    return {e: (t, json.loads(a)) for e, t, a in rows}


def test_a_partial_items_file_sets_its_columns_and_keeps_the_rest(tmp_path):
    db = tmp_path / "shop.db"
    assert CliRunner().invoke(cli, ["--db", str(db), "init"]).exit_code == 0
    full = tmp_path / "catalogue.csv"
    full.write_text("item_id,title,genre,colour,price\n"
                    "i1,Alpha,drama,red,10\ni2,Beta,comedy,blue,12\ni3,Gamma,horror,,9\n")
    _ingest(db, "items", full)
    prices = tmp_path / "prices.csv"  # i2's colour column blank: that attribute goes
    prices.write_text("item_id,price,colour\ni1,11,\ni2,13,navy\n")
    _ingest(db, "items", prices)
    got = _attributes(db, "items")
    assert got["i1"] == ("Alpha", {"genre": "drama", "price": "11"})
    assert got["i2"] == ("Beta", {"genre": "comedy", "colour": "navy", "price": "13"})
    assert got["i3"] == ("Gamma", {"genre": "horror", "price": "9"})  # not in the file
    _ingest(db, "items", full)  # the whole catalogue again: exactly its values
    assert _attributes(db, "items")["i1"] == ("Alpha", {"genre": "drama", "colour": "red",
                                                        "price": "10"})


def test_a_partial_users_file_keeps_the_other_attributes(tmp_path):
    db = tmp_path / "shop.db"
    assert CliRunner().invoke(cli, ["--db", str(db), "init"]).exit_code == 0
    users = tmp_path / "users.csv"
    users.write_text("user_id,age,country\nu1,31,SE\nu2,40,DE\n")
    _ingest(db, "users", users)
    ages = tmp_path / "ages.csv"
    ages.write_text("user_id,age\nu1,32\n")
    _ingest(db, "users", ages)
    got = _attributes(db, "users")
    assert got["u1"][1] == {"age": "32", "country": "SE"}
    assert got["u2"][1] == {"age": "40", "country": "DE"}
