"""The host-app example of docs/python-api.md runs as written, served by uvicorn on
loopback: its own routes call the Engine in-process, polyrec's API is mounted beside."""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from conftest import copy_db

from polyrec import Engine
from polyrec.serve.app import start_background

pytestmark = pytest.mark.slow  # every test here is over ~5 s (make test-fast skips them)

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def host_app_source() -> str:
    blocks = re.findall(r"```python host_app\.py\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/python-api.md must hold one host_app.py example"
    return blocks[0]


def test_host_app_example_serves_search_and_similar(tmp_path, monkeypatch, hm_bert_db):
    db = copy_db(hm_bert_db, tmp_path)
    monkeypatch.setenv("SHOP_DB", str(db))
    monkeypatch.setenv("POLYREC_TOKEN", "host-secret")
    namespace: dict = {"__name__": "host_app"}
    exec(compile(host_app_source(), str(DOC), "exec"), namespace)
    engine = namespace["engine"]
    try:
        with start_background(namespace["app"]) as server, \
                httpx.Client(base_url=server.url, timeout=120) as client:
            r = client.get("/shop/search", params={"q": "black dress", "k": 5})
            assert r.status_code == 200
            body = r.json()
            assert body["understood"] == {"colour": "Black", "type": "Dress"}
            with Engine(db, device="cpu", entrypoints=False, progress=False) as other:
                assert [p["id"] for p in body["products"]] == other.search("black dress", 5).ids()
            r = client.get("/shop/products/731960001/similar")
            assert r.status_code == 200 and len(r.json()["products"]) == 6
            assert client.get("/shop/products/nope/similar").status_code == 404
            assert client.get("/shop/search", params={"q": "dress", "k": "x"}).status_code == 422
            assert client.get("/polyrec/health").json()["items"] == 1000
            r = client.post("/polyrec/search", json={"query": "black dress", "k": 5})
            assert [h["item"] for h in r.json()["results"]] == [p["id"] for p in body["products"]]
            assert client.put("/polyrec/users", json={"users": [{"external_id": "u"}]}).status_code == 401
    finally:
        engine.close()


def test_polyrec_imports_beside_a_host_apps_own_engine_and_plugins(tmp_path):
    """The import name is safe: a host application whose folder holds its own
    ``plugins`` package and ``engine.py`` still gets polyrec and all its built-ins.
    Run from that folder (not the repository root, which ``python -m pytest`` puts on
    sys.path), so the host's modules come first on sys.path."""
    import os
    import subprocess
    import sys

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "__init__.py").write_text("HOST_PLUGINS = True\n")
    (tmp_path / "engine.py").write_text("HOST_ENGINE = True\n")
    script = (
        "import engine, plugins, polyrec\n"
        "from polyrec.plugin_host import DEFAULT_PLUGINS\n"
        "assert engine.HOST_ENGINE and plugins.HOST_PLUGINS\n"
        "print(polyrec.Engine)\n"
        "with polyrec.Engine('host.db', device='cpu', entrypoints=False, progress=False) as eng:\n"
        "    loaded = [r.name for r in eng.plugins.describe() if r.loaded]\n"
        "    assert loaded == list(DEFAULT_PLUGINS), loaded\n"
        "    print(sorted(eng.registry('rankers').names()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "<class 'polyrec.engine.Engine'>"
    assert "hybrid" in lines[1] and "popular" in lines[1]
