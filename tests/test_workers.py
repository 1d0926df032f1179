"""`polyrec serve --workers 2` over one store (PostgreSQL, and a SQLite file in WAL mode):
two real uvicorn worker processes, each with its own Engine. After `polyrec models
activate` in another process both serve the new version without a restart, and both see
an item and events written by another process, and items retired and restored by
another process (`polyrec items retire|restore`), within a bounded delay."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from click.testing import CliRunner

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.serve.workers import WORKER_HEADER

pytestmark = pytest.mark.slow  # two server processes start (torch imported in each)

#: Seconds within which every worker must show what another process changed (the
#: recommender and the search check the store at most once a second; the rest is slack
#: for a loaded 2-core machine).
BOUND = 20.0


def _shop(url: str) -> None:
    """30 items with power-law popularity, 20 users; v1 and v2 of the 'popular' pipeline."""
    with Engine(url, device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items([{"external_id": f"i{n}", "title": f"plain item {n}"} for n in range(30)])
        events = [{"user": f"u{u}", "item": f"i{n}", "kind": "click", "ts": 1000 + u * 40 + n}
                  for u in range(20) for n in range(30) if (u * 7 + n * 13) % (n + 2) == 0 or n < 3]
        eng.add_interactions(events)
        assert eng.train("popular").activated
        assert eng.train("popular").live_version == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["postgresql", "sqlite"])
def served(request, tmp_path) -> Iterator[tuple[str, str]]:
    """(store URL, base URL of `polyrec serve --workers 2` over it)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" \
        else f"sqlite:///{tmp_path / 'w.db'}"
    _shop(url)
    port = _free_port()
    exe = Path(sys.executable).with_name("polyrec")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([str(exe), "--db", url, "--device", "cpu", "serve", "--workers", "2",
                             "--port", str(port), "--log-level", "warning",
                             "--no-encode-on-arrival"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: _get(base, "/health") is not None, 120, lambda: "the server to start", log)
        yield url, base
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn's supervisor stops its workers
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _get(base: str, path: str) -> httpx.Response | None:
    try:  # a new connection each time: the kernel hands it to either worker
        return httpx.get(base + path, timeout=10, headers={"Connection": "close"})
    except httpx.HTTPError:
        return None


def _post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=30, headers={"Connection": "close"})


def _until(check: Callable[[], bool], seconds: float, what: Callable[[], str], log=None) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.2)
    tail = ""
    if log is not None:
        log.seek(0)
        tail = log.read()[-3000:]
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what()}\n{tail}")


def _per_worker(ask: Callable[[], httpx.Response], ok: Callable[[dict], bool], what: str,
                seconds: float = BOUND) -> float:
    """Ask until two different worker pids have each answered ``ok`` (their latest answer);
    the seconds it took."""
    latest: dict[str, dict] = {}

    def check() -> bool:
        r = ask()
        assert r.status_code == 200, r.text
        latest[r.headers[WORKER_HEADER]] = r.json()
        return len(latest) >= 2 and all(ok(body) for body in latest.values())
    return _until(check, seconds, lambda: f"both workers to {what} (latest answers: {latest})")


def _items(body: dict) -> list[str]:
    return [h["item"] for h in body["results"]]


def test_both_workers_follow_activate_and_see_new_items_events_and_retirements(served):
    url, base = served
    health = [(_get(base, "/health") or pytest.fail("no /health")).json() for _ in range(3)]
    assert {h["items"] for h in health} == {30}

    # each worker loads the live version (v2) at its first recommendation (not timed: the
    # first request of a process loads the model)
    _per_worker(lambda: _post(base, "/recommend", {"user": "u1", "k": 5}),
                lambda b: b["basis"] == "model", "recommend with the model", 120)
    _per_worker(lambda: _get(base, "/health"),
                lambda b: b["model"] == {"live": 2, "serving": 2}, "serve v2")

    # another process makes v1 live: both workers switch without a restart
    out = CliRunner().invoke(cli, ["--db", url, "models", "activate", "1"])
    assert out.exit_code == 0, out.output
    took = {"activate": _per_worker(lambda: _get(base, "/health"),
                                    lambda b: b["model"] == {"live": 1, "serving": 1}, "serve v1")}

    # an item written by another process is found by both workers' search
    with Engine(url, device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items([{"external_id": "velvet", "title": "Green velvet blazer"}])
    took["item"] = _per_worker(lambda: _post(base, "/search", {"query": "velvet blazer", "k": 3,
                                                               "weights": {"dense": 0.0}}),
                               lambda b: [h["item"] for h in b["results"]][:1] == ["velvet"],
                               "find the new item")

    # events written by another process: a new user's seen item leaves their recommendations
    first = _post(base, "/recommend", {"user": "newcomer", "k": 3}).json()
    assert first["basis"] == "popular"
    top = first["results"][0]["item"]
    with Engine(url, device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_interactions([{"user": "newcomer", "item": top, "kind": "purchase", "ts": 5000}])
    took["events"] = _per_worker(
        lambda: _post(base, "/recommend", {"user": "newcomer", "k": 3}),
        lambda b: b["basis"] == "model" and top not in [h["item"] for h in b["results"]],
        "see the newcomer's purchase")

    # items retired by another process: neither worker recommends, finds or shows them
    gone = _items(_post(base, "/recommend", {"user": "u1", "k": 5}).json())[0]
    velvet = {"query": "velvet blazer", "k": 3, "weights": {"dense": 0.0}}
    out = CliRunner().invoke(cli, ["--db", url, "items", "retire", gone, "velvet"])
    assert out.exit_code == 0 and "2 item(s) retired" in out.output, out.output
    took["retire"] = _per_worker(lambda: _post(base, "/recommend", {"user": "u1", "k": 5}),
                                 lambda b: len(b["results"]) == 5 and gone not in _items(b),
                                 "stop recommending the retired item")
    took["retire (search)"] = _per_worker(lambda: _post(base, "/search", velvet),
                                          lambda b: "velvet" not in _items(b),
                                          "stop finding the retired item")
    out = CliRunner().invoke(cli, ["--db", url, "items", "restore", gone, "velvet"])
    assert out.exit_code == 0, out.output
    took["restore"] = _per_worker(lambda: _post(base, "/search", velvet),
                                  lambda b: _items(b)[:1] == ["velvet"], "find it again")
    print("seconds until both workers showed it:", {k: round(v, 2) for k, v in took.items()})


def test_workers_need_a_shared_store():
    out = CliRunner().invoke(cli, ["--db", "sqlite:///:memory:", "serve", "--workers", "2"])
    assert out.exit_code == 1 and "store the processes can share" in out.output
