"""Ingestion of the real datasets through the session fixtures (re-ingestion of ml-100k
is checked through the CLI in test_cli_data.py)."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from polyrec import Engine


def _open(db: Path) -> Engine:
    return Engine(db, device="cpu", entrypoints=False, progress=False)


def test_ml100k_counts(ml100k_db):
    with _open(ml100k_db) as eng:
        stats = eng.stats()
        assert stats["items"] == 1682
        assert stats["users"] == 943
        assert stats["interactions"] == 100_000
        assert stats["interactions_by_kind"] == {"rating": 100_000}
        assert stats["triples"] == 91_631
        assert stats["linked_items"] == 1598
        toy = eng.items([1])[0]
    assert toy.external_id == "1" and toy.title == "Toy Story"
    assert toy.attributes["class"] == ["Animation", "Children's", "Comedy"]
    assert toy.entity is not None
    con = sqlite3.connect(ml100k_db)
    # first row of ml-100k.inter: 196 242 3 881250949
    value, ts = con.execute(
        "SELECT i.value, i.ts FROM interactions i JOIN users u ON u.id = i.user_id "
        "JOIN items it ON it.id = i.item_id WHERE u.external_id='196' AND it.external_id='242'"
    ).fetchone()
    con.close()
    assert (value, ts) == (3.0, 881250949.0)


def test_hm_loads_with_images(hm_db, hm_dir):
    with _open(hm_db) as eng:
        stats = eng.stats()
        items = eng.items()
    assert stats["items"] == 1000 and stats["users"] == 4946
    assert stats["interactions_by_kind"] == {"purchase": 5000}
    jpgs = {p.name for p in (hm_dir / "images").glob("*.jpg")}
    with_image = [it for it in items if it.image]
    assert len(with_image) == len(jpgs) == 100
    for it in with_image:
        assert os.path.isabs(it.image) and os.path.isfile(it.image)
        assert Path(it.image).name == f"{int(it.external_id):010d}.jpg"
    leggings = next(it for it in items if it.external_id == "822115001")
    assert leggings.title == "Pola seamless leggings"
    assert leggings.text.startswith("High-waisted leggings")
    assert leggings.attributes["colour_group_name"] == "Black"
    assert "prod_name" not in leggings.attributes and "detail_desc" not in leggings.attributes
