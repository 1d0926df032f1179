"""engine/store/artifacts.py: versioned blobs in the store, torch payloads through bytes."""
from __future__ import annotations

import pytest
import torch

from polyrec.store.artifacts import (from_bytes, list_artifacts, load_artifact, prune_artifacts,
                              save_artifact, to_bytes)
from polyrec.errors import NotFoundError


def test_versions_count_up_and_latest_wins(engine):
    with engine.store.session() as s:
        assert save_artifact(s, "model", "two_tower", b"one", {"epochs": 1}) == 1
        assert save_artifact(s, "model", "two_tower", b"two", {"epochs": 2}) == 2
        assert save_artifact(s, "other", "ease", b"x") == 1
    with engine.store.session() as s:
        latest = load_artifact(s, "model")
        assert (latest.version, latest.data, latest.meta) == (2, b"two", {"epochs": 2})
        assert load_artifact(s, "model", version=1).data == b"one"
        assert [a["version"] for a in list_artifacts(s, "model")] == [1, 2]
        assert list_artifacts(s, "other")[0]["bytes"] == 1


def test_missing_artifact_or_version_is_not_found(engine):
    with engine.store.session() as s:
        with pytest.raises(NotFoundError, match="nothing"):
            load_artifact(s, "nothing")
        save_artifact(s, "model", "k", b"a")
        with pytest.raises(NotFoundError, match="version 5"):
            load_artifact(s, "model", version=5)


def test_prune_keeps_the_newest(engine):
    with engine.store.session() as s:
        for k in range(5):
            save_artifact(s, "m", "k", bytes([k]))
        assert prune_artifacts(s, "m", keep=2) == 3
        assert [a["version"] for a in list_artifacts(s, "m")] == [4, 5]
        assert save_artifact(s, "m", "k", b"z") == 6


def test_torch_payload_round_trip_survives_reopening(tmp_path):
    from polyrec import Engine
    state = {"weights": torch.randn(3, 4), "ids": [1, 2, 3], "blob": b"\x00\x01",
             "options": {"dim": 4, "name": "x", "none": None}}
    with Engine(tmp_path / "a.db", device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            save_artifact(s, "state", "test", to_bytes(state))
    with Engine(tmp_path / "a.db", device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            back = from_bytes(load_artifact(s, "state").data)
    assert torch.equal(back["weights"], state["weights"])
    assert {k: v for k, v in back.items() if k != "weights"} == \
        {k: v for k, v in state.items() if k != "weights"}
