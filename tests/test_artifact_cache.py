"""A stored pipeline version as a file beside the store (polyrec.store.artifact_cache):
the first process to load it writes the file, later ones map it instead of copying the
blob out of the database; a missing, truncated or foreign file is never served."""
from __future__ import annotations

import pytest
import torch

from conftest import copy_db, torch_threads
from polyrec import Engine
from polyrec.rank import recommend as recommend_module
from polyrec.store import artifact_cache
from polyrec.store.artifacts import ArtifactHeader, artifact_header, to_bytes
from polyrec.store.vector_cache import index_directory

USERS = ["1", "7", "42", "300", "943"]


@pytest.fixture(scope="module")
def two_tower_db(tmp_path_factory, ml100k_db):
    db = copy_db(ml100k_db, tmp_path_factory.mktemp("artifact-cache"))
    with torch_threads(1), Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        report = eng.train("two_tower", options={"dim": 16, "epochs": 1, "batch_size": 2048,
                                                 "n_random": 256, "validation": False},
                           force=True, seed=0)
        assert report.activated
    for old in (index_directory(f"sqlite:///{db}") or db).glob("artifact-*.pt"):
        old.unlink()  # the gate's smoke test loaded it already: start with no file
    return db


def _answers(db) -> list[list[str]]:
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        return [[r.item for r in eng.recommend(u, 10)] for u in USERS]


def _files(db) -> list:
    return sorted(index_directory(f"sqlite:///{db}").glob("artifact-pipeline-*.pt"))


def test_first_process_writes_the_file_and_the_next_maps_it_without_the_blob(
        two_tower_db, monkeypatch):
    assert _files(two_tower_db) == []
    first = _answers(two_tower_db)
    files = _files(two_tower_db)
    assert len(files) == 1
    with Engine(two_tower_db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            header = artifact_header(s, "pipeline")
    assert files[0].stat().st_size == header.size

    def no_blob(*args, **kwargs):
        raise AssertionError("the blob was read although its file is there")

    monkeypatch.setattr(recommend_module, "load_artifact", no_blob)
    assert _answers(two_tower_db) == first
    payload = artifact_cache.load_cached(files[0].parent, header)
    weights = payload["state"]["model"]
    assert weights and all(isinstance(w, torch.Tensor) for w in weights.values())


def test_truncated_or_unreadable_file_is_not_served(two_tower_db):
    expected = _answers(two_tower_db)
    (path,) = _files(two_tower_db)
    path.write_bytes(path.read_bytes()[:1000])  # a torn write by something else
    assert _answers(two_tower_db) == expected  # read from the store, file written again
    (again,) = _files(two_tower_db)
    size = again.stat().st_size
    assert size > 1000
    again.write_bytes(b"x" * size)  # right size, not a torch file
    assert _answers(two_tower_db) == expected


def test_file_names_the_version_exactly_and_old_files_are_pruned(tmp_path):
    header = ArtifactHeader("pipeline", "pipeline", 3, 0, {}, 1.0)
    payloads = {v: to_bytes({"v": torch.tensor([v])}) for v in (1, 2, 3)}
    headers = {v: ArtifactHeader("pipeline", "pipeline", v, len(payloads[v]), {}, 100.0 + v)
               for v in payloads}
    for v in (1, 2, 3):
        artifact_cache.save_cached(tmp_path, headers[v], payloads[v], keep=2)
    assert len(list(tmp_path.glob("artifact-pipeline-*.pt"))) == 2
    assert artifact_cache.load_cached(tmp_path, headers[1]) is None  # pruned
    assert int(artifact_cache.load_cached(tmp_path, headers[3])["v"]) == 3
    # the same version number of a rebuilt store (another creation time): not this file
    rebuilt = ArtifactHeader("pipeline", "pipeline", 3, headers[3].size, {}, 999.0)
    assert artifact_cache.load_cached(tmp_path, rebuilt) is None
    assert artifact_cache.load_cached(None, header) is None
    artifact_cache.save_cached(None, header, b"")  # no directory: nothing, no error
    # another artifact's files are not pruned with these
    other = ArtifactHeader("pipeline-b", "pipeline", 1, len(payloads[1]), {}, 5.0)
    artifact_cache.save_cached(tmp_path, other, payloads[1], keep=1)
    assert artifact_cache.load_cached(tmp_path, headers[3]) is not None


def test_a_place_that_cannot_hold_the_file_serves_from_the_store(ml100k_db, tmp_path,
                                                                 monkeypatch):
    db = copy_db(ml100k_db, tmp_path)
    with torch_threads(1), Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        eng.train("popular", force=True)
        before = [r.item for r in eng.recommend("1", 5)]
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the index folder would go")
    monkeypatch.setenv("POLYREC_INDEX_DIR", str(blocked))
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        assert [r.item for r in eng.recommend("1", 5)] == before
    assert blocked.read_text().startswith("a file")
