"""examples/polyrec-example-plugin: its encoder and command in-process, then the real
thing: pip-installed into a temporary directory (never the shared venv) and driven
through the ``polyrec`` console script in subprocesses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from polyrec import ConfigError, Engine, EncoderContext, ItemView, NotFoundError

pytestmark = pytest.mark.slow  # every test here is over ~5 s (make test-fast skips them)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "polyrec-example-plugin"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def example():
    """The example plugin's package, imported from its source directory."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import polyrec_example_plugin
        yield polyrec_example_plugin
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m.startswith("polyrec_example_plugin")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def ml_engine(example, ml100k_dir, tmp_path_factory):
    """An Engine with the ml-100k catalogue (1,682 items) and the example plugin."""
    db = tmp_path_factory.mktemp("example") / "ml.db"
    with Engine(db, device="cpu", builtins=("polyrec.plugins.readers",), entrypoints=False,
                plugins=[example], progress=False) as eng:
        eng.ingest(ml100k_dir / "ml-100k.item", "items")
        yield eng


def _ctx(eng: Engine) -> EncoderContext:
    return EncoderContext(engine=eng, device=torch.device("cpu"), progress=False)


# -- in-process: the encoder and the command on real data ----------------------------------


def test_plugin_registers_encoder_and_command(ml_engine, example):
    record = ml_engine.plugins.records["polyrec_example_plugin"]
    assert record.registered == {"encoders": ["numeric"], "commands": ["attr-stats"]}
    assert record.version == example.__version__
    assert ml_engine.registry("encoders").get("numeric").modality == "numeric"


def test_numeric_encoder_on_movielens_years(ml_engine):
    enc = ml_engine.registry("encoders").get("numeric")()
    enc.prepare(_ctx(ml_engine))
    assert enc.attributes == ["release_year"]  # detected; 'class' holds genre lists
    mean, std = enc.stats["release_year"]
    assert 1985 < mean < 1993 and 10 < std < 20
    assert enc.dim == 2 + 2 * 8
    items = ml_engine.items()
    with_year = [it for it in items if enc.content(it) is not None]
    # two movies have no year: "unkonwn" and "V" are not numbers
    assert len(items) == 1682 and len(with_year) == 1680
    toy_story = next(it for it in items if it.external_id == "1")
    assert enc.content(toy_story) == "release_year=1995.0"
    result = enc.encode(with_year, _ctx(ml_engine))
    assert result.vectors.shape == (1680, 18) and result.failed == {}
    assert result.item_ids == [it.id for it in with_year]
    assert torch.allclose(result.vectors.norm(dim=1), torch.ones(1680), atol=1e-5)
    # nearby years are more alike than distant ones
    year = {it.id: float(it.attributes["release_year"]) for it in with_year}
    rows = {iid: n for n, iid in enumerate(result.item_ids)}
    pick = lambda y: rows[next(i for i, v in year.items() if v == y)]  # noqa: E731
    v = result.vectors
    sim = lambda a, b: float(v[pick(a)] @ v[pick(b)])  # noqa: E731
    assert sim(1995, 1996) > sim(1995, 1980) > sim(1995, 1940)


def test_fingerprint_follows_settings_and_statistics(ml_engine):
    registry = ml_engine.registry("encoders")
    fingerprints = []
    for options in ({}, {}, {"features": "rbf"}, {"n_features": 4},
                    {"stats": {"release_year": [1990, 10]}}):
        enc = registry.get("numeric")(**options)
        enc.prepare(_ctx(ml_engine))
        fingerprints.append(enc.fingerprint())
    assert fingerprints[0] == fingerprints[1]
    assert len(set(fingerprints)) == 4


def test_rbf_features_and_partly_missing_attributes(ml_engine, example):
    enc = example.NumericEncoder(attributes="price,size", features="rbf", n_features=5,
                                 normalize=False, stats={"price": [20, 10], "size": [2, 1]})
    enc.prepare(_ctx(ml_engine))  # nothing to learn: attributes and stats are given
    items = [ItemView(1, "a", attributes={"price": 20, "size": "3"}),
             ItemView(2, "b", attributes={"price": "30.0"}),
             ItemView(3, "c", attributes={"price": "n/a"})]
    assert enc.dim == 2 * (2 + 5)
    assert enc.content(items[1]) == "price=30.0" and enc.content(items[2]) is None
    result = enc.encode(items, _ctx(ml_engine))
    assert result.item_ids == [1, 2] and set(result.failed) == {3}
    a, b = result.vectors
    assert a[0] == 0.0 and a[1] == 0.0 and a[2 + 2] == pytest.approx(1.0)  # z=0: centre 0
    assert a[7] == pytest.approx(1.0) and a[8] == 0.0  # size z=1, present
    assert b[0] == pytest.approx(1.0) and b[8] == 1.0 and b[9:].abs().sum() == 0  # size missing


@pytest.mark.parametrize("options, message", [
    ({"colour": 1}, "unknown option"),
    ({"features": "wavelet"}, "features must be one of"),
    ({"attributes": " , "}, "'attributes' is empty"),
    ({"n_features": 0}, "between 1 and 256"),
    ({"stats": {"x": [1, 0]}}, "positive std"),
])
def test_numeric_encoder_refuses_bad_options(example, options, message):
    with pytest.raises(ConfigError, match=message):
        example.NumericEncoder(**options)


def test_numeric_encoder_needs_a_numeric_attribute(ml_engine, example):
    with pytest.raises(ConfigError, match="no item has a numeric attribute 'class'"):
        example.NumericEncoder(attributes=["class"]).prepare(_ctx(ml_engine))


def test_attr_stats_command_in_process(ml_engine, example):
    from polyrec.cli import CliState
    state = CliState(ml_engine.url, "cpu", False, True)
    state._engine = ml_engine  # reuse the open engine; CliState.close is not called
    runner = CliRunner()
    result = runner.invoke(example.attr_stats_command, ["release_year", "--json"], obj=state)
    stats = json.loads(result.output)
    assert stats == {"attribute": "release_year", "items": 1682, "count": 1680, "missing": 0,
                     "non_numeric": 2, "min": 1922.0, "max": 1998.0,
                     "mean": pytest.approx(1989.07, abs=0.01),
                     "std": pytest.approx(14.30, abs=0.01)}
    text = runner.invoke(example.attr_stats_command, ["release_year"], obj=state).output
    assert text.splitlines()[:3] == ["release_year over 1,682 items",
                                     "  count                 1,680",
                                     "  missing                   0"]
    missing = runner.invoke(example.attr_stats_command, ["price"], obj=state)
    assert isinstance(missing.exception, NotFoundError)
    assert "attributes: class, release_year" in str(missing.exception)


# -- installed with pip, driven through the console script ---------------------------------


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """pip-install the example (offline, no deps) into a target directory of its own."""
    tmp = tmp_path_factory.mktemp("pip")
    src = tmp / "src"  # build from a copy, so build/ and *.egg-info stay out of the repo
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                "__pycache__"))
    target = tmp / "site"
    proc = subprocess.run(
        [str(VENV_BIN / "pip"), "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "--disable-pip-version-check", "-q", "--target", str(target),
         str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (target / "polyrec_example_plugin" / "numeric.py").exists()
    return target


def _polyrec(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("POLYREC_LOAD_PLUGINS", "POLYREC_NO_ENTRYPOINTS", "POLYREC_DB")}
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(site)] + ([environ["PYTHONPATH"]] if environ.get("PYTHONPATH") else []))
    environ.update(HF_HUB_OFFLINE="1", **env)
    return subprocess.run([str(VENV_BIN / "polyrec"), *args], capture_output=True, text=True,
                          env=environ, timeout=300)


@pytest.fixture(scope="module")
def shop_db(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("shop") / "shop.db"
    with Engine(db, builtins=(), entrypoints=False, progress=False) as eng:
        eng.add_items([
            {"external_id": "dress", "title": "Black dress", "attributes": {"price": 30}},
            {"external_id": "shirt", "title": "White shirt", "attributes": {"price": "10.5"}},
            {"external_id": "socks", "title": "Socks", "attributes": {"price": 4.5}},
            {"external_id": "hat", "title": "Hat", "attributes": {"price": "ask us"}},
            {"external_id": "gift", "title": "Gift card", "attributes": {}},
        ])
    return db


def test_pip_installed_plugin_is_listed(installed_plugin, shop_db):
    proc = _polyrec(installed_plugin, "--db", str(shop_db), "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    records = [r for r in json.loads(proc.stdout)
               if r["distribution"] == "polyrec-example-plugin"]
    assert len(records) == 1
    record = records[0]
    assert record["name"] == "example" and record["source"] == "entrypoint"
    assert record["version"] == "0.1.0" and record["loaded"] and record["error"] is None
    assert record["hooks"] == ["register_commands", "register_encoders"]
    assert record["registered"] == {"encoders": ["numeric"], "commands": ["attr-stats"]}


def test_pip_installed_command_runs(installed_plugin, shop_db):
    proc = _polyrec(installed_plugin, "--db", str(shop_db), "attr-stats", "price", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "attribute": "price", "items": 5, "count": 3, "missing": 1, "non_numeric": 1,
        "min": 4.5, "max": 30.0, "mean": pytest.approx(15.0),
        "std": pytest.approx(((15 ** 2 + 4.5 ** 2 + 10.5 ** 2) / 3) ** 0.5)}


def test_load_plugins_empty_hides_installed_plugin(installed_plugin, shop_db):
    proc = _polyrec(installed_plugin, "--db", str(shop_db), "plugins", "--json",
                    POLYREC_LOAD_PLUGINS="")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert not [r for r in records if r["source"] == "entrypoint"]
    assert any(r["name"] == "polyrec.plugins.readers" for r in records)  # built-ins still load
