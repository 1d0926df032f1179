"""Issue 12, HTTP: one error schema ({"error", "message", "details"}) for every status,
FastAPI/Starlette's own answers included, declared in the OpenAPI schema; ids refused by
the schema itself; a 404 never echoes a huge id."""
from __future__ import annotations

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from polyrec.serve.app import create_app  # noqa: E402
from polyrec.store.ids import ID_CHARS  # noqa: E402

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(engine):
    engine.add_items([{"external_id": "i1", "title": "Alpha", "attributes": {"genre": "drama"}},
                      {"external_id": "i2", "title": "Beta", "attributes": {"genre": "comedy"}}])
    engine.add_interactions([{"user": "u1", "item": "i1", "ts": 1}])
    return TestClient(create_app(engine, token=TOKEN, encode_on_arrival=False),
                      raise_server_exceptions=False)


def error_of(response, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "message", "details"}, body
    assert isinstance(body["error"], str) and isinstance(body["message"], str)
    assert "Traceback" not in response.text
    return body


def test_every_status_has_the_one_schema(client, engine, monkeypatch):
    item = {"items": [{"external_id": "x"}]}
    assert error_of(client.put("/items", json=item), 401)["error"] == "unauthorized"
    assert client.put("/items", json=item).headers["www-authenticate"] == "Bearer"
    assert error_of(client.get("/no/such/route"), 404)["error"] == "not_found"
    assert error_of(client.get("/items/ghost"), 404)["message"] == "unknown item 'ghost'"
    assert error_of(client.get("/search"), 405)["error"] == "method_not_allowed"
    nested = "[" * 100_000 + "]" * 100_000
    body = error_of(client.post("/search", content=nested,
                                headers={"content-type": "application/json"}), 400)
    assert body["error"] == "bad_request"
    body = error_of(client.post("/search", json={"query": "x", "k": 0}), 422)
    assert body["error"] == "invalid_request" and body["details"][0]["loc"] == ["body", "k"]
    body = error_of(client.post("/feedback", json={"user": "u", "item": "i1", "kind": "zzz"},
                                headers=AUTH), 422)
    assert body["error"] == "validation_error" and body["details"]["field"] == "kind"
    assert error_of(client.post("/search", content=b"x" * (2 << 20)), 413)["error"] == \
        "payload_too_large"
    assert error_of(client.post("/feedback", json={"user": "u", "item": "ghost"},
                                headers=AUTH), 404)["error"] == "not_found"

    def broken(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("secret internals")

    monkeypatch.setattr(type(engine), "stats", broken)
    body = error_of(client.get("/health"), 500)
    assert body["error"] == "internal_error" and "secret" not in body["message"]
    monkeypatch.undo()
    assert client.get("/health").status_code == 200  # and it keeps serving


def test_openapi_declares_the_error_schema(client):
    schema = client.get("/openapi.json").json()
    assert "ErrorBody" in schema["components"]["schemas"]
    ops = schema["paths"]
    for path, method, statuses in [("/search", "post", {"400", "413", "422", "500"}),
                                   ("/feedback", "post", {"401", "404", "413", "422"}),
                                   ("/items", "put", {"401", "413", "422"}),
                                   ("/items/{item}", "get", {"404", "422"})]:
        responses = ops[path][method]["responses"]
        assert statuses <= set(responses), (path, set(responses))
        for status in statuses:
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody")
    assert "HTTPValidationError" not in schema["components"]["schemas"]


@pytest.mark.parametrize("bad", ["\x00", "a\x07b", "\x1f", "   ", "\x85", "x" * (ID_CHARS + 1)])
def test_ids_are_refused_by_the_schema(client, bad):
    for path, body in [("/recommend", {"user": bad}), ("/similar", {"item": bad}),
                       ("/feedback", {"user": bad, "item": "i1"}),
                       ("/users", {"users": [{"external_id": bad}]})]:
        method = client.put if path == "/users" else client.post
        err = error_of(method(path, json=body, headers=AUTH), 422)
        assert err["error"] == "invalid_request", (path, err)
        assert len(err["message"]) < 300
    assert client.get("/health").json()["users"] == 1


def test_a_404_never_echoes_a_huge_id(client):
    longest = "q" * ID_CHARS
    body = error_of(client.get(f"/items/{longest}"), 404)
    assert len(body["message"]) < 120 and "255 characters" in body["message"]
    body = error_of(client.get(f"/items/{'q' * 60_000}"), 422)
    assert len(body["message"]) < 300 and "q" * 100 not in str(body)


def test_recommend_refuses_an_unknown_filter_field_like_search(client):
    search = error_of(client.post("/search", json={"query": "alpha", "filters": {"nope": 1}}), 422)
    rec = error_of(client.post("/recommend", json={"user": "u1", "filters": {"nope": 1}}), 422)
    assert "unknown filter field 'nope'" in search["message"]
    assert "unknown filter field 'nope'" in rec["message"]
    ok = client.post("/recommend", json={"user": "u1", "filters": {"genre": "comedy"}})
    assert ok.status_code == 200 and [r["item"] for r in ok.json()["results"]] in ([], ["i2"])


def test_non_finite_numbers_are_refused(client):
    body = '{"query": "alpha", "weights": {"dense": Infinity}}'
    err = error_of(client.post("/search", content=body,
                               headers={"content-type": "application/json"}), 422)
    assert err["details"][0]["loc"] == ["body", "weights", "dense"]
    body = '{"items": [{"external_id": "z", "attributes": {"w": NaN}}]}'
    assert error_of(client.put("/items", content=body, headers={**AUTH, "content-type":
                                                                "application/json"}), 422)
    body = '{"user": "u1", "item": "i1", "value": -Infinity}'
    err = error_of(client.post("/feedback", content=body,
                               headers={**AUTH, "content-type": "application/json"}), 422)
    assert "not a finite number" in err["message"]
