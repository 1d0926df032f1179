"""`polyrec encode` through click: counts, a no-op second run, one-line errors."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.cli.encode import parse_settings
from polyrec.errors import ConfigError
from polyrec.store import Store
from polyrec.store.vectors import load_vectors

from conftest import copy_db


def run(db, *args):
    return CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", "-q", "encode", *args])


@pytest.mark.slow
def test_ml100k_encode_stores_a_text_vector_for_every_item(ml100k_encoded_db):
    report = json.loads(ml100k_encoded_db.with_name(ml100k_encoded_db.name + ".encode.json").read_text())
    bert = next(r for r in report["encoders"] if r["encoder"] == "bert")
    assert (bert["encoded"], bert["cached"], bert["failed"]) == (1682, 0, {})
    assert bert["items_per_second"] > 0
    store = Store(ml100k_encoded_db)
    with store.session() as s:
        ids, vectors = load_vectors(s, "bert")
        kg = [r for r in report["encoders"] if r["encoder"] == "kg"]
        if kg:  # plugins/kg_entity.py present: one vector per linked item
            kg_ids, _ = load_vectors(s, "kg")
            assert len(kg_ids) == kg[0]["encoded"] == 1598
    store.close()
    assert len(ids) == 1682 and vectors.shape == (1682, 384)


@pytest.mark.slow
def test_second_run_reencodes_nothing_and_says_so(ml100k_encoded_db, tmp_path):
    db = copy_db(ml100k_encoded_db, tmp_path)
    result = run(db, "--encoder", "bert")
    assert result.exit_code == 0, result.output
    assert "Nothing re-encoded" in result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("bert"))
    assert "encoded       0" in line and "unchanged   1,682" in line
    data = json.loads(run(db, "-e", "bert", "--json").stdout)
    assert data["encoded"] == 0 and data["encoders"][0]["cached"] == 1682


def test_force_batch_size_and_settings(tmp_path):
    db = tmp_path / "s.db"
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items([{"external_id": str(k), "title": t} for k, t in
                       enumerate(["Heat", "Up", "Alien", "Fargo"])])
    first = run(db, "-e", "bert", "--set", "bert.template={title}!", "--batch-size", "3")
    assert first.exit_code == 0, first.output
    assert "Encoded 4 item vectors." in first.stdout
    again = run(db, "-e", "bert", "--force", "--json", "--dtype", "float32")
    data = json.loads(again.stdout)["encoders"][0]
    assert data["encoded"] == 4 and data["options"] == {"template": "{title}!"}


@pytest.mark.parametrize("args, message", [
    (["--set", "bert.max_length"], "--set expects ENCODER.OPTION=VALUE"),
    (["--encoder", "nope"], "no encoder named 'nope'"),
    (["-e", "bert", "--set", "bert.colour=red"], "unknown bert option"),
    (["-e", "bert", "--device", "cuda:7"], "CUDA"),
])
def test_errors_are_one_line(tmp_path, args, message):
    Engine(tmp_path / "e.db", device="cpu", entrypoints=False, progress=False).close()
    result = run(tmp_path / "e.db", *args)
    if "cuda" in args[-1] and "Error" not in result.stderr:
        pytest.skip("this machine has CUDA")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_parse_settings():
    assert parse_settings(("bert.max_length=128", "clip.pretrained=a=b")) == {
        "bert": {"max_length": "128"}, "clip": {"pretrained": "a=b"}}
    with pytest.raises(ConfigError):
        parse_settings(("max_length=1",))
