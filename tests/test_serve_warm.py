"""The serving warm-up (engine/serve/warm.py): a process loads at start what its first
requests would load lazily, and /health says how far it got."""
from __future__ import annotations

import time

import pytest
from click.testing import CliRunner
from conftest import copy_db
from fastapi.testclient import TestClient

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _open(path) -> Engine:
    return Engine(path, device="cpu", entrypoints=False, progress=False)


def _warmed(client: TestClient, timeout: float) -> dict:
    """/health once the warm-up is no longer running."""
    deadline = time.monotonic() + timeout
    while True:
        health = client.get("/health").json()
        if health["warm"]["state"] != "running" or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def test_warm_loads_the_model_and_the_search_models_before_any_request(tmp_path,
                                                                       ml100k_default_db):
    with _open(copy_db(ml100k_default_db[0], tmp_path)) as eng:
        client = TestClient(create_app(eng, warm=True))
        health = _warmed(client, 300)
        # loaded by the warm-up, not by a request: only /health was asked
        assert eng.services.started("recommender") is not None
        assert eng.services.searcher()._encoders, "no query encoder was loaded"
        assert health["warm"]["state"] == "done" and health["warm"]["skipped"] == {}
        assert set(health["warm"]["seconds"]) == {"recommender", "search"}
        assert health["model"] == {"live": 1, "serving": 1}


def test_without_warm_nothing_loads_until_asked(tmp_path, ml100k_default_db):
    with _open(copy_db(ml100k_default_db[0], tmp_path)) as eng:
        app = create_app(eng)
        assert TestClient(app).get("/health").json()["warm"]["state"] == "off"
        assert eng.services.started("recommender") is None


def test_a_store_without_a_model_warms_what_it_can_and_serves(tmp_path):
    with _open(tmp_path / "empty.db") as eng:
        client = TestClient(create_app(eng, warm=True))
        warm = _warmed(client, 120)["warm"]
        assert warm["state"] == "done" and "polyrec train" in warm["skipped"]["recommender"]
        r = client.post("/recommend", json={"user": "anyone", "k": 3})
        assert r.status_code == 200 and r.json()["basis"] == "popular"


def test_serve_says_it_warms_by_default():
    out = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    assert "--warm / --no-warm" in out and "[default: warm]" in out
