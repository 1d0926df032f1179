"""A file ingestion killed mid-write (SIGKILL) leaves all of the file or none of it."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polyrec import Engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_ingest_leaves_all_or_nothing(tmp_path, ml100k_dir):
    db = tmp_path / "kill.db"
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        eng.ingest(ml100k_dir / "ml-100k.item", "items")
    wal = db.with_name(db.name + "-wal")
    start = wal.stat().st_size if wal.exists() else 0
    env = {**os.environ, "POLYREC_NO_ENTRYPOINTS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from polyrec.cli.main import main; main()", "--db", str(db),
         "-q", "ingest", "interactions", str(ml100k_dir / "ml-100k.inter"), "--batch-size", "500"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # the write has begun
        if wal.exists() and wal.stat().st_size > start + (1 << 20):
            break
        time.sleep(0.005)
    killed_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        n = con.execute("SELECT COUNT(*) FROM interactions").fetchone()[0]
        users = con.execute("SELECT COUNT(*) FROM users").fetchone()[0]
    finally:
        con.close()
    assert (n, users) in ((0, 0), (100_000, 943)), (n, users)
    if killed_running:
        assert n == 0  # killed inside the one transaction: nothing of the file
