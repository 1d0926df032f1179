"""benchmarks/scale.py end to end on a tiny shop (200 items): the shop generated once and
reused by path, phases run separately over the databases kept in --work, rows merged
into the JSON. Numbers are not checked (performance lives in the benchmark), only that
every phase ran and reported."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, *args: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--items", "200",
           "--interactions", "3000", "--encode-items", "10", "--batch-users", "20",
           "--requests", "10", "--configs", "sqlite", "--shop", str(tmp_path / "shop"),
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "scale.json"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_scale_benchmark_phases_on_a_tiny_shop(tmp_path):
    first = _run(tmp_path, "--phases", "ingest", "--keep")
    assert "generated 200 items" in first
    assert (tmp_path / "work" / "sqlite.db").exists()
    row = json.loads((tmp_path / "scale.json").read_text())["results"][0]
    assert row["ingest_rows"] == 3200 and row["ingest_rows_per_s"] > 0
    assert "train_s_per_epoch" not in row
    second = _run(tmp_path, "--phases", "train,batch,recommend", "--merge")
    assert "reusing the shop" in second and "sqlite: ingest" not in second
    result = json.loads((tmp_path / "scale.json").read_text())
    row = result["results"][0]
    assert row["train_positives"] > 0 and row["train_s_per_epoch"] > 0
    assert row["batch_users"] == 20 and row["recommend_requests"] == 10
    assert set(row["phase_s"]) == {"ingest", "train", "batch", "recommend"}  # merged
    assert row["ingest_rows"] == 3200
    assert "--phases train,batch,recommend" in result["command"]
    assert not list((tmp_path / "work").glob("*.db"))  # without --keep: removed
