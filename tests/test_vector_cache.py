"""An encoder's stored vectors persisted as one matrix file (polyrec.store.vectors
load_vectors with a directory): a fresh reader gets the file instead of one blob per
item, and never a stale file after a vector is added, rewritten or deleted."""
from __future__ import annotations

import time

import pytest
import torch

from polyrec.store import Store, vectors as store_vectors
from polyrec.store.models import Item
from polyrec.store.vector_cache import index_directory
from polyrec.store.vectors import delete_vectors, load_vectors, save_vectors


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "v.db")
    with s.session() as session:
        session.execute(Item.__table__.insert(), [
            {"id": i, "external_id": f"i{i}", "title": f"item {i}", "attributes": {},
             "created_at": 0.0, "updated_at": 0.0} for i in range(1, 6)])
        save_vectors(session, "enc", "fp", [(i, f"h{i}") for i in range(1, 5)],
                     torch.arange(16, dtype=torch.float32).reshape(4, 4))
    yield s
    s.close()


def _load(store):
    with store.snapshot() as session:
        return load_vectors(session, "enc", directory=index_directory(store.url))


def test_the_matrix_file_is_written_then_read_instead_of_the_store(store, monkeypatch):
    ids, matrix = _load(store)
    files = list(index_directory(store.url).glob("vectors-stored-enc-*.matrix.npy"))
    assert ids == [1, 2, 3, 4] and len(files) == 1
    assert torch.equal(matrix, torch.arange(16, dtype=torch.float32).reshape(4, 4))

    def no_store_read(*_args, **_kwargs):
        raise AssertionError("the store was read although the file is current")

    monkeypatch.setattr(store_vectors, "_read_vectors", no_store_read)
    again_ids, again = _load(store)
    assert again_ids == ids and torch.equal(again, matrix)


@pytest.mark.parametrize("change", ["add", "rewrite", "delete"])
def test_a_changed_vector_is_never_read_from_a_stale_file(store, change):
    _load(store)
    time.sleep(0.01)  # a rewrite is stamped with the time of the write
    with store.session() as session:
        if change == "add":
            save_vectors(session, "enc", "fp", [(5, "h5")], torch.full((1, 4), 7.0))
        elif change == "rewrite":
            save_vectors(session, "enc", "fp2", [(2, "new")], torch.full((1, 4), -1.0))
        else:
            delete_vectors(session, "enc", [3])
    ids, matrix = _load(store)
    with store.snapshot() as session:
        truth_ids, truth = load_vectors(session, "enc")  # straight from the blobs
    assert ids == truth_ids and torch.equal(matrix, truth)
    assert {"add": 5, "rewrite": 4, "delete": 3}[change] == len(ids)


def test_files_vanishing_during_a_cleanup_are_skipped(tmp_path):
    """Two writers of one folder: a file the other removed between the listing and the
    check of its age is skipped, not an error (a server's request failed that way)."""
    from polyrec.store.vector_cache import beyond_newest
    old, new = tmp_path / "a.npy", tmp_path / "b.npy"
    old.write_bytes(b"0")
    new.write_bytes(b"1")
    import os
    os.utime(old, (1_000, 1_000))
    gone = tmp_path / "gone.npy"  # listed, then removed by the other writer
    assert beyond_newest([old, gone, new], keep=1) == [old]
    assert beyond_newest([gone], keep=0) == []


def test_concurrent_saves_of_one_stem_never_raise(tmp_path):
    """Threads saving different keys of one stem at once (each save prunes the others'
    files): every save returns, the newest files stay readable."""
    import threading

    import numpy as np

    from polyrec.store.vector_cache import load_arrays, save_arrays
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for n in range(40):
                save_arrays(tmp_path, "keys", f"{t}x{n}", {"ids": np.arange(3) + n,
                                                           "matrix": np.ones((3, 2)) * n})
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    save_arrays(tmp_path, "keys", "last", {"ids": np.arange(3), "matrix": np.zeros((3, 2))})
    found = load_arrays(tmp_path, "keys", "last", ("ids", "matrix"))
    assert found is not None and found["matrix"].shape == (3, 2)
    assert len(list(tmp_path.glob("keys-*.ids.npy"))) <= 2 + 4  # pruned (up to one per racing writer)
