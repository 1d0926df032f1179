"""Issue 12: property tests of the readers. Random CSV, JSON Lines and Parquet content
(quotes, separators, newlines, byte-order marks, other encodings, huge cells, non-finite
numbers, odd ids) either ingests cleanly or raises ONE ValidationError naming the file,
the row and the field, with the database unchanged under ``on_error="fail"``; under
``skip`` only bad rows are left out and ``rows == written + skipped``."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyrec import Engine, ValidationError
from conftest import dump

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
ITEMS = ["i1", "i2", "i3"]

cells = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", '"', '""', "a,b", "x\ny", "\r\n", "nan", "NaN", "inf", "-Infinity",
                     "1e400", "3", "4.5", "i1", "i2", "\ufeff", "\x00", "\x85", "é"]),
    st.just("z" * 1_000_001),  # over the cell limit
)
ids = st.one_of(st.sampled_from(ITEMS + ["ghost", "", " ", "u1", "7", "7.0"]),
                st.text(min_size=0, max_size=6))
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10),
                    st.sampled_from(["5", "x", "", None]))
rows = st.lists(st.fixed_dictionaries({"user": ids, "item": ids, "rating": numbers,
                                       "note": cells}), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("props")
    with Engine(tmp / "p.db", device="cpu", entrypoints=False, progress=False,
                encode_on_arrival=False) as engine:
        engine.add_items([{"external_id": i, "title": i.upper()} for i in ITEMS])
        yield engine


def csv_bytes(records: list[dict], *, bom: bool, encoding: str, corrupt: int | None) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["user", "item", "rating", "note"])
    for r in records:
        writer.writerow(["" if r[k] is None else str(r[k]) for k in ("user", "item", "rating",
                                                                   "note")])
    text = buf.getvalue()
    if corrupt is not None and text:  # a stray quote somewhere after the header
        at = len(text.split("\n", 1)[0]) + 1 + corrupt % max(1, len(text) // 2)
        text = text[:at] + '"' + text[at:]
    data = text.encode(encoding, errors="replace")
    return (b"\xef\xbb\xbf" if bom else b"") + data


def jsonl_bytes(records: list[dict], *, bom: bool) -> bytes:
    lines = [json.dumps(r, allow_nan=True) for r in records]  # NaN/Infinity literals
    return (b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode()


def check(eng: Engine, path: Path) -> None:
    """The property: a clean ingest, or one ValidationError naming file/row/field and no
    change; then, with skip, the counts add up."""
    before = dump(eng)
    try:
        report = eng.ingest(path, "interactions")
    except ValidationError as err:
        assert err.file == str(path)
        assert dump(eng) == before  # nothing written
        file_level = err.row is None
        if not file_level:
            assert err.row >= 1 and (err.field is not None or "value" in err.reason
                                     or "quot" in err.reason or "JSON" in err.reason)
        skipped = None
        try:
            skipped = eng.ingest(path, "interactions", on_error="skip")
        except ValidationError as again:
            assert again.row is None  # only a file-level error refuses a skip
        if skipped is not None:
            assert skipped.rows == skipped.written + skipped.skipped
            assert skipped.skipped >= 1
        return
    assert report.skipped == 0 and report.rows == report.written


@SETTINGS
@given(records=rows, bom=st.booleans(), encoding=st.sampled_from(["utf-8", "latin-1", "utf-16"]),
       corrupt=st.one_of(st.none(), st.integers(0, 500)))
def test_random_csv(eng, tmp_path_factory, records, bom, encoding, corrupt):
    path = tmp_path_factory.mktemp("csv") / "events.csv"
    path.write_bytes(csv_bytes(records, bom=bom, encoding=encoding, corrupt=corrupt))
    check(eng, path)


@SETTINGS
@given(records=rows, bom=st.booleans())
def test_random_jsonl(eng, tmp_path_factory, records, bom):
    path = tmp_path_factory.mktemp("jsonl") / "events.jsonl"
    path.write_bytes(jsonl_bytes(records, bom=bom))
    check(eng, path)


@SETTINGS
@given(records=rows)
def test_random_parquet(eng, tmp_path_factory, records):
    path = tmp_path_factory.mktemp("pq") / "events.parquet"
    table = {
        "user": [r["user"] for r in records], "item": [r["item"] for r in records],
        "rating": [float(r["rating"]) if isinstance(r["rating"], (int, float)) else
                   (float("nan") if r["rating"] is None else math.nan) for r in records],
        "note": [r["note"][:50] for r in records],
    }
    pq.write_table(pa.table(table), path)
    check(eng, path)
