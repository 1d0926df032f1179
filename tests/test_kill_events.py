"""No acknowledged event is lost when the writer is killed mid-stream (SIGKILL)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from polyrec import Engine
from polyrec.store.models import Interaction

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_stream_loses_no_acknowledged_event(tmp_path):
    db = tmp_path / "kill.db"
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items([{"external_id": f"i{i}", "title": f"item {i}"} for i in range(50)])
    env = {**os.environ, "POLYREC_NO_ENTRYPOINTS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from polyrec.cli.main import main; main()", "--db", str(db),
         "feedback", "stream", "--batch", "200"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    sent = [0]
    stop = threading.Event()

    def feed() -> None:  # keeps writing events until the process dies
        n = 0
        try:
            while not stop.is_set():
                block = "".join(json.dumps({"user": f"u{k % 97}", "item": f"i{k % 50}",
                                            "kind": "click", "context": {"event_id": f"e{k}"}}) + "\n"
                                for k in range(n, n + 100))
                proc.stdin.write(block.encode())
                proc.stdin.flush()
                n += 100
                sent[0] = n
        except (BrokenPipeError, OSError, ValueError):
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    acked: list[str] = []
    deadline = time.monotonic() + 90
    while len(acked) < 3000 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(json.loads(line)["event_id"])
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: the feeder is still writing
    proc.wait(timeout=30)
    stop.set()
    for line in proc.stdout:  # acknowledgements already written before the kill count too
        acked.append(json.loads(line)["event_id"])
    feeder.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 3000, f"only {len(acked)} acknowledgements"
    assert sent[0] > len(acked)  # events were still in flight when it died

    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            stored = [c.get("event_id") for c in s.scalars(select(Interaction.context))]
    assert len(stored) == len(set(stored))
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
