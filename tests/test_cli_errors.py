"""Issue 12, CLI: every expected failure is one line ``Error: ...`` with a hint and exit
status 1; ``--debug`` raises instead; only ``init`` creates a database."""
from __future__ import annotations

import importlib.util
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from polyrec.cli.main import cli


def run(db: Path | str, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", "--quiet", *args])


def one_line_error(result, *fragments: str) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "t.db"
    assert run(path, "init").exit_code == 0
    (tmp_path / "items.csv").write_text("item_id,title\na,Alpha\nb,Beta\n")
    return path


@pytest.mark.parametrize("command", [["stats"], ["doctor"], ["recommend", "1"],
                                     ["ingest", "items", "items.csv"], ["models", "list"]])
def test_only_init_creates_a_database(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "items.csv").write_text("item_id\na\n")
    line = one_line_error(run("typo.db", *command))
    assert line == "Error: no polyrec database at typo.db; run polyrec init (polyrec --db typo.db init)"
    assert not (tmp_path / "typo.db").exists()
    assert run("typo.db", "init").exit_code == 0 and (tmp_path / "typo.db").exists()


def test_db_pointing_at_a_csv_or_a_directory(tmp_path):
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("user,item\nu1,i1\n")
    one_line_error(run(csv_file, "stats"), "is not a polyrec database")
    assert csv_file.read_text() == "user,item\nu1,i1\n"
    one_line_error(run(tmp_path, "doctor"), "is a directory")
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (x)")
    con.close()
    one_line_error(run(other, "stats"), "is not a polyrec database")
    con = sqlite3.connect(other)
    assert [r[0] for r in con.execute("SELECT name FROM sqlite_master")] == ["notes"]
    con.close()


def _hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    ready = threading.Event()

    def hold() -> None:
        con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        con.execute("BEGIN IMMEDIATE")
        ready.set()
        time.sleep(seconds)
        con.execute("COMMIT")
        con.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    ready.wait(5)
    return thread


def test_a_locked_database_is_retried_then_one_line(db):
    holder = _hold_write_lock(db, 3.0)
    started = time.monotonic()
    result = run(db, "--lock-timeout", "0.5", "ingest", "items", str(db.parent / "items.csv"))
    waited = time.monotonic() - started
    one_line_error(result, "locked", "--lock-timeout")
    assert 0.4 < waited < 3.0
    holder.join()
    assert '"items": 0' in run(db, "stats", "--json").stdout


def test_a_lock_released_within_the_timeout_is_waited_for(db):
    holder = _hold_write_lock(db, 0.5)
    result = CliRunner().invoke(cli, ["--db", str(db), "-q", "ingest", "items",
                                      str(db.parent / "items.csv")],
                                env={"POLYREC_LOCK_TIMEOUT": "20"})
    holder.join()
    assert result.exit_code == 0, result.output
    assert "2 new" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("pg8000") is not None,
                    reason="the pg8000 PostgreSQL driver is installed")
def test_missing_database_driver():
    # psycopg (the extra postgres) is installed; a URL naming another driver still fails in one line
    one_line_error(run("postgresql+pg8000://u@127.0.0.1:1/x", "stats"), "not installed",
                   "pip install pg8000")


def test_unreachable_postgresql_server():
    one_line_error(run("postgresql://u@127.0.0.1:1/x", "stats"), "database error", "connection")


def test_unknown_url_scheme():
    one_line_error(run("nosuchdb://x/y", "stats"), "unknown database URL scheme")


def test_bad_option_value(db):
    one_line_error(run(db, "train", "--ranker", "ease", "--set", "l2=abc"), "l2", "abc")


@pytest.mark.parametrize("args, fragments", [
    (["recommend", "1", "--diversity", "2"], ["--diversity", "recommend --help'"]),
    (["ingest", "widgets", "items.csv"], ["'widgets' is not one of", "ingest --help'"]),
    (["models", "activate", "x1"], ["no version", "models activate --help'"]),
    (["nosuchcommand"], ["No such command", "--help'"]),
])
def test_usage_errors_of_commands_are_one_line_too(db, args, fragments):
    one_line_error(run(db, *args), *fragments)


def test_model_versions_are_read_as_models_list_shows_them(db, tmp_path):
    assert run(db, "ingest", "items", str(tmp_path / "items.csv")).exit_code == 0
    res = run(db, "ingest", "interactions", _events(tmp_path))
    assert res.exit_code == 0, res.output
    assert run(db, "train", "--ranker", "popular", "--force").exit_code == 0
    for version in ("1", "v1", "V1"):
        res = run(db, "models", "show", version)
        assert res.exit_code == 0 and res.output.startswith("version 1"), res.output


def _events(tmp_path) -> str:
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,kind\n" + "".join(
        f"u{n},{'ab'[(n + k) % 2]},click\n" for n in range(6) for k in range(2)))
    return str(path)


def test_os_and_unexpected_errors_are_one_line_with_a_hint(db, monkeypatch):
    from polyrec.engine import Engine

    def denied(self):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", "/data/x.db")

    monkeypatch.setattr(Engine, "stats", denied)
    one_line_error(run(db, "stats"), "Permission denied", "/data/x.db", "permissions")

    def bug(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(Engine, "stats", bug)
    one_line_error(run(db, "stats"), "unexpected RuntimeError: boom", "--debug")


def test_debug_shows_the_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--db", str(tmp_path / "typo.db"), "--debug", "stats"])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "ConfigError"
    assert "no polyrec database" in str(result.exception)


def test_plugins_needs_no_database(tmp_path):
    result = run(tmp_path / "none.db", "plugins", "--json")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "none.db").exists()
