"""The HTTP API, served for real by uvicorn on 127.0.0.1 and called with httpx."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from conftest import copy_db

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.serve.app import create_app, start_background

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, hm_bert_db):
    db = copy_db(hm_bert_db, tmp_path_factory.mktemp("served"))
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with start_background(create_app(eng, token=TOKEN)) as server:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                yield eng, client, db


def test_health_and_openapi(served):
    _, client, _ = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == 1000 and health["vectors"]["bert"] == 1000
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/search", "/similar", "/recommend", "/items", "/users", "/feedback",
            "/feedback/batch", "/items/{item}"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_search_over_http_matches_the_cli(served):
    _, client, db = served
    r = client.post("/search", json={"query": "black dress", "k": 10})
    assert r.status_code == 200
    body = r.json()
    assert body["understood"] == {"colour": "Black", "type": "Dress"}
    http_ids = [h["item"] for h in body["results"]]
    res = CliRunner().invoke(cli, ["--db", str(db), "search", "black dress", "--json"])
    assert res.exit_code == 0, res.output
    cli_ids = [h["item"] for h in json.loads(res.output[res.output.index("{"):])["results"]]
    assert http_ids == cli_ids
    assert all(h["attributes"]["product_type_name"] == "Dress" for h in body["results"])


MALFORMED = [
    ({"query": "dress", "k": 0}, 422, "greater than or equal to 1"),
    ({"query": "dress", "k": 1001}, 422, "less than or equal to 1000"),
    ({"query": "dress", "k": 10 ** 12}, 422, "less than or equal to 1000"),
    ({"query": "dress", "k": "ten"}, 422, "valid integer"),
    ({"query": "dress", "k": "10"}, 422, "valid integer"),
    ({"query": "dress", "k": 2.5}, 422, "valid integer"),
    ({"query": 42}, 422, "valid string"),
    ({"query": ""}, 422, "at least 1 character"),
    ({"query": "   "}, 422, "the query is empty"),
    ({"query": "x" * 1_000_000}, 422, "at most 1000 characters"),
    ({"k": 3}, 422, "Field required"),
    ({"query": "dress", "colour": "red"}, 422, "Extra inputs"),
    ({"query": "dress", "filters": {"nope": "x"}}, 422, "unknown filter field 'nope'"),
    ({"query": "dress", "filters": "colour=Black"}, 422, "valid dictionary"),
    ({"query": "dress", "understanding": "always"}, 422, "'boost', 'filter' or 'off'"),
    ({"query": "dress", "weights": {"bm42": 1.0}}, 422, "weights.bm42: Extra inputs are not permitted"),
    ({"query": "dress", "weights": {"lexical": -1.0}}, 422, "greater than or equal to 0"),
    ([1, 2, 3], 422, "valid dictionary"),
]


@pytest.mark.parametrize("body,status,message", MALFORMED)
def test_malformed_search_requests_get_4xx_with_a_message(served, body, status, message):
    _, client, _ = served
    r = client.post("/search", json=body)
    assert r.status_code == status
    assert message in r.json()["message"]


def test_other_bad_requests_and_the_server_keeps_serving(served):
    _, client, _ = served
    r = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.json()["message"]
    assert client.get("/search").status_code == 405
    r = client.post("/similar", json={"item": "no-such-item"})
    assert r.status_code == 404 and r.json()["message"] == "unknown item 'no-such-item'"
    assert client.get("/items/no-such-item").status_code == 404
    r = client.post("/search", content=b'{"query": "' + b"x" * (2 << 20) + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "request body over" in r.json()["message"]

    def chunks():
        for _ in range(12):
            yield b"x" * 100_000
    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/health").status_code == 200
    assert client.post("/search", json={"query": "dress", "k": 2}).status_code == 200


def test_similar_and_items(served):
    eng, client, _ = served
    r = client.post("/similar", json={"item": "731960001", "k": 5,
                                      "filters": {"colour": "Black"}})
    assert r.status_code == 200
    assert [h["item"] for h in r.json()["results"]] == \
        eng.similar("731960001", 5, filters={"colour": "Black"}).ids()
    item = client.get("/items/731960001").json()
    assert item["title"] == "Flora maxi dress" and item["attributes"]["colour_group_name"] == "Black"


def test_recommend_for_unknown_users_is_popular_not_an_error(served):
    _, client, _ = served
    r = client.post("/recommend", json={"user": "never-seen", "k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["basis"] == "popular" and len(body["results"]) == 5
    assert any("unknown user" in n for n in body["notes"])
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    r = client.post("/recommend", json={"user": "never-seen", "k": 3,
                                        "filters": {"type": "Trousers"}})
    assert r.status_code == 200
    ids = [h["item"] for h in r.json()["results"]]
    for i in ids:
        assert client.get(f"/items/{i}").json()["attributes"]["product_type_name"] == "Trousers"
    assert client.post("/recommend", json={"user": "", "k": 3}).status_code == 422
    assert client.post("/recommend", json={"k": 3}).status_code == 422


def test_writes_need_the_token(served):
    _, client, _ = served
    item = {"items": [{"external_id": "http-1", "title": "Zebra velvet gown",
                       "attributes": {"product_type_name": "Dress", "colour_group_name": "White"}}]}
    assert client.put("/items", json=item).status_code == 401
    assert client.put("/items", json=item, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.put("/items", json=item, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"written": 1}
    found = client.post("/search", json={"query": "zebra velvet", "k": 10}).json()["results"]
    new = [h for h in found if h["item"] == "http-1"]  # BM25 finds it before it is encoded
    assert new and new[0]["ranks"] == {"lexical": 1}
    assert client.put("/items", json={"items": []}, headers=AUTH).status_code == 422
    r = client.put("/users", json={"users": [{"external_id": "http-user", "attributes": {"age": 30}}]},
                   headers=AUTH)
    assert r.status_code == 200
    ev = {"user": "http-user", "item": "http-1", "kind": "click"}
    assert client.post("/feedback", json=ev).status_code == 401
    r = client.post("/feedback", json=ev, headers=AUTH)
    assert r.status_code == 200 and r.json()["stored"] == 1
    r = client.post("/feedback", json={**ev, "item": "nope"}, headers=AUTH)
    assert r.status_code == 404 and "unknown item 'nope'" in r.json()["message"]
    r = client.post("/feedback", json={**ev, "value": "high"}, headers=AUTH)
    assert r.status_code == 422
    r = client.post("/feedback/batch", json={"events": [ev, {**ev, "kind": "cart"}]}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"stored": 2, "duplicates": 0}


def test_a_retried_event_is_answered_as_stored_not_counted_again(served):
    _, client, _ = served
    ev = {"user": "retry-user", "item": "http-1", "kind": "click", "ts": 1_700_000_000,
          "context": {"event_id": "retry-1"}}
    first = client.post("/feedback", json=ev, headers=AUTH).json()
    assert first["stored"] == 1 and first["duplicate"] is False and first["event"]["new"]
    # a retry that arrives later and says something else changes nothing
    retry = client.post("/feedback", json={**ev, "kind": "purchase", "ts": 1_700_000_500},
                        headers=AUTH).json()
    assert retry["stored"] == 0 and retry["duplicate"] is True
    assert retry["event"]["id"] == first["event"]["id"]
    assert (retry["event"]["kind"], retry["event"]["ts"]) == ("click", 1_700_000_000)
    r = client.post("/feedback/batch", headers=AUTH, json={"events": [
        {**ev, "ts": 1_700_000_900}, {**ev, "context": {"event_id": "retry-2"}}]}).json()
    assert r == {"stored": 1, "duplicates": 1}


def test_concurrent_clients_get_consistent_answers(served):
    _, client, _ = served
    expected = client.post("/search", json={"query": "black dress", "k": 5}).json()["results"]
    expected = [h["item"] for h in expected]

    def call(n: int) -> tuple[int, object]:
        if n % 3 == 0:
            r = client.post("/search", json={"query": "dress", "k": 0})
            return r.status_code, None
        if n % 3 == 1:
            r = client.post("/recommend", json={"user": f"anon-{n}", "k": 3})
            return r.status_code, r.json()["basis"]
        r = client.post("/search", json={"query": "black dress", "k": 5})
        return r.status_code, [h["item"] for h in r.json()["results"]]

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(call, range(48)))
    for n, (status, payload) in enumerate(out):
        if n % 3 == 0:
            assert status == 422
        elif n % 3 == 1:
            assert status == 200 and payload == "popular"
        else:
            assert status == 200 and payload == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_polyrec_serve_command(tmp_path, hm_db):
    """`polyrec serve` in a subprocess on loopback, stopped after a few calls."""
    db = copy_db(hm_db, tmp_path)
    port = _free_port()
    env = {**os.environ, "POLYREC_NO_ENTRYPOINTS": "1"}
    polyrec = Path(sys.executable).with_name("polyrec")
    proc = subprocess.Popen([str(polyrec), "--db", str(db), "serve",
                             "--port", str(port), "--token", TOKEN, "--log-level", "warning"],
                            cwd=Path(__file__).resolve().parents[1], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        r = httpx.post(url + "/search", json={"query": "black dress", "k": 3,
                                              "weights": {"dense": 0}}, timeout=60)
        assert r.status_code == 200 and r.json()["understood"] == {"colour": "Black", "type": "Dress"}
        assert httpx.put(url + "/users", json={"users": [{"external_id": "x"}]}).status_code == 401
        assert httpx.put(url + "/users", json={"users": [{"external_id": "x"}]},
                         headers=AUTH).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
