"""The Python API as documented: docs/python-api.md's example runs on MovieLens-100k."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from polyrec import Engine

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow
def test_documented_example_runs(tmp_path, monkeypatch, ml100k_dir, capsys):
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 1, "docs/python-api.md must hold exactly one runnable example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYREC_DATASETS", str(ml100k_dir.parent))
    exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out
    assert "Ingested 100,000 interactions" in out
    assert "rejected: row 1, field kind: unknown event kind 'like'" in out
    assert "1683 944 100001 91631" in out
    assert "doctor: 85 items are not linked to a knowledge-graph entity (5.1%)" in out
    with Engine(tmp_path / "movies.db", entrypoints=False, progress=False) as eng:
        assert eng.stats()["interactions_by_kind"] == {"rating": 100_000, "click": 1}


def test_documented_signatures_match_the_engine():
    text = DOC.read_text(encoding="utf-8")
    for name in ("add_items", "add_users", "add_interactions", "items", "ingest", "stats",
                 "doctor", "retire_items", "restore_items", "list_items"):
        assert callable(getattr(Engine, name))
        assert f"{name}(" in text, f"Engine.{name} is not documented"


def test_two_engines_are_independent(tmp_path):
    with Engine(tmp_path / "a.db", entrypoints=False, progress=False) as a, \
            Engine(tmp_path / "b.db", entrypoints=False, progress=False, builtins=()) as b:
        a.add_items([{"external_id": "x", "title": "X"}])
        assert a.stats()["items"] == 1 and b.stats()["items"] == 0
        assert "csv" in a.registry("readers") and "csv" not in b.registry("readers")
