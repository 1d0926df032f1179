"""The top-k index of vector spaces (polyrec.rank.vector_index) and the persisted
vector matrix (polyrec.store.vector_cache): recall of HNSW against exact, exact
below the threshold, persistence across processes, never stale."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from polyrec.retrieve.search import VectorSpace
from polyrec.rank.vector_index import (ExactIndex, IndexSettings, IndexSlot, index_path,
                                           matrix_fingerprint, open_index)

faiss = pytest.importorskip("faiss")


def unit(n: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)


def recall_at_10(space: VectorSpace, queries: torch.Tensor) -> float:
    hits = 0
    for q in queries:
        exact = {i for i, _ in space.top(space.scores(q), 10)}
        hits += len(exact & {i for i, _ in space.search(q, 10)})
    return hits / (10 * len(queries))


def test_hnsw_recall_against_exact_on_random_vectors() -> None:
    items, queries = unit(5000, 32, 0), unit(100, 32, 1)
    space = VectorSpace.of("m", ("s",), range(5000), items, normalised=True)
    space = space.indexed(IndexSettings(backend="faiss", m=16, ef_search=128))
    assert space.index.wait(60) and space.index.kind == "hnsw"
    assert recall_at_10(space, queries) >= 0.95
    # excluded items never come back, and there are still n answers
    q = queries[0]
    first = [i for i, _ in space.search(q, 10)]
    again = [i for i, _ in space.search(q, 10, exclude=set(first[:5]))]
    assert len(again) == 10 and not set(first[:5]) & set(again)
    # a filter (allowed items) is answered exactly
    allowed = set(range(0, 5000, 7))
    assert space.search(q, 10, allowed) == space.top(space.scores(q), 10, allowed)


def test_many_excluded_items_are_answered_exactly_and_still_fill_n() -> None:
    """Search leaves the retired items out by ``exclude``: when asking the index for n
    plus that many rows would be a quarter of the space or more, the answer is exact
    (the index would have to return nearly everything), always n when n others exist."""
    items, queries = unit(4000, 16, 2), unit(5, 16, 3)
    space = VectorSpace.of("m", ("s",), range(4000), items, normalised=True)
    space = space.indexed(IndexSettings(backend="faiss", m=16, ef_search=64))
    assert space.index.wait(60) and space.index.kind == "hnsw"
    asked: list[int] = []
    hnsw = space.index.current
    search = hnsw.search
    hnsw.search = lambda q, k: asked.append(k) or search(q, k)  # type: ignore[method-assign]
    assert len(space.search(queries[0], 10, exclude=set(range(0, 200)))) == 10
    assert asked == [210]  # a few excluded: the index, asked for as many more
    retired = set(range(0, 4000, 2))  # half the catalogue
    for q in queries:
        found = space.search(q, 10, exclude=retired)
        assert found == space.top(space.scores(q), 10, exclude=retired)
        assert len(found) == 10 and not retired & {i for i, _ in found}
    everything_but_three = set(range(3, 4000))
    assert {i for i, _ in space.search(queries[0], 10, exclude=everything_but_three)} == {0, 1, 2}
    assert asked == [210]  # never asked for thousands of rows


def test_exact_below_threshold_or_when_asked() -> None:
    items = unit(300, 16, 2)
    assert isinstance(open_index(items, name="m"), ExactIndex)  # auto: 300 < threshold
    assert isinstance(open_index(items, name="m", settings=IndexSettings(backend="exact")),
                      ExactIndex)
    assert open_index(items, name="m", settings=IndexSettings(threshold=100)).kind == "hnsw"
    space = VectorSpace.of("m", ("s",), range(300), items).indexed()
    assert space.index.ready() and space.index.kind == "exact"
    q = unit(1, 16, 3)[0]
    assert space.search(q, 10) == space.top(space.scores(q), 10)


BUILD = """
import sys, torch
from polyrec.rank.vector_index import IndexSettings, open_index
gen = torch.Generator().manual_seed(5)
m = torch.nn.functional.normalize(torch.randn(3000, 24, generator=gen), dim=1)
open_index(m, name=sys.argv[2], settings=IndexSettings(backend="faiss", m=16),
           directory=sys.argv[1])
"""


@pytest.mark.slow
def test_index_persists_across_processes_and_is_keyed_by_version_and_vectors(
        tmp_path: Path) -> None:
    settings = IndexSettings(backend="faiss", m=16)
    subprocess.run([sys.executable, "-c", BUILD, str(tmp_path), "model:pipeline:v1"], check=True)
    gen = torch.Generator().manual_seed(5)
    matrix = torch.nn.functional.normalize(torch.randn(3000, 24, generator=gen), dim=1)
    path = index_path(tmp_path, "model:pipeline:v1", matrix_fingerprint(matrix), settings)
    assert path.exists()
    stamp = path.stat().st_mtime_ns
    # same name and vectors: loaded at once, not rebuilt
    slot = IndexSlot(matrix, name="model:pipeline:v1", settings=settings, directory=tmp_path,
                     fingerprint=matrix_fingerprint(matrix))
    assert slot.ready() and slot.kind == "hnsw" and path.stat().st_mtime_ns == stamp
    # a new model version, or one changed vector: another key, a new index
    v2 = index_path(tmp_path, "model:pipeline:v2", matrix_fingerprint(matrix), settings)
    changed = matrix.clone()
    changed[0] = -changed[0]
    other = index_path(tmp_path, "model:pipeline:v1", matrix_fingerprint(changed), settings)
    assert len({path, v2, other}) == 3 and not v2.exists() and not other.exists()
    slot = IndexSlot(changed, name="model:pipeline:v1", settings=settings, directory=tmp_path)
    assert slot.wait(60) and slot.kind == "hnsw" and other.exists()
    q = changed[0]
    _, rows = slot.current.search(q, 1)
    assert int(rows[0]) == 0  # the rebuilt index knows the changed vector


def test_persisted_matrix_is_used_by_a_fresh_searcher_and_never_stale(tmp_path: Path) -> None:
    from polyrec import Engine
    from polyrec.retrieve.search import Searcher
    from polyrec.store.models import Item
    from polyrec.store.vectors import save_vectors
    db = tmp_path / "shop.db"
    with Engine(db, entrypoints=False, progress=False, encode_on_arrival=False) as eng:
        eng.add_items([{"external_id": f"i{k}", "title": f"item {k}"} for k in range(50)])
        with eng.store.session() as s:
            ids = [i for (i,) in s.query(Item.id).order_by(Item.id)]
            save_vectors(s, "bert", "fp1", [(i, "h") for i in ids], unit(50, 8, 6))
        with eng.store.snapshot() as s:
            first = Searcher(eng).space(s, "bert")
        files = list((tmp_path / "shop.db.polyrec-index").glob("vectors-bert-*.matrix.npy"))
        assert len(files) == 1
        with eng.store.snapshot() as s:  # a fresh searcher reads the file, same vectors
            again = Searcher(eng).space(s, "bert")
        assert torch.equal(first.matrix, again.matrix) and first.item_ids == again.item_ids
        time.sleep(0.01)
        new = unit(1, 8, 7)
        with eng.store.session() as s:  # one vector rewritten in place: same count and ids
            save_vectors(s, "bert", "fp1", [(ids[3], "h2")], new)
        with eng.store.snapshot() as s:
            third = Searcher(eng).space(s, "bert")
        assert torch.allclose(third.matrix[3], torch.nn.functional.normalize(new[0], dim=0),
                              atol=1e-3)
        assert len(list((tmp_path / "shop.db.polyrec-index").glob("vectors-bert-*.matrix.npy"))) == 2


def test_each_space_keeps_its_two_newest_index_files(tmp_path: Path) -> None:
    """A retrained model's index does not pile up beside the store: per kind and space
    (the name less its version) the two newest files stay, other spaces are untouched,
    and files named as before spaces were are removed."""
    settings = IndexSettings(backend="faiss", m=8, ef_construction=16)
    legacy = tmp_path / f"hnsw-{'0' * 32}.faiss"
    legacy.write_bytes(b"an index saved under the old naming")
    small = unit(300, 8, seed=1)
    search_path = index_path(tmp_path, "bert", matrix_fingerprint(small), settings)
    open_index(small, name="bert", settings=settings, directory=tmp_path)
    assert search_path.exists() and not legacy.exists()
    paths = []
    for version in range(1, 5):
        matrix = unit(300, 8, seed=10 + version)
        open_index(matrix, name=f"recommend:v{version}", settings=settings, directory=tmp_path)
        paths.append(index_path(tmp_path, f"recommend:v{version}", matrix_fingerprint(matrix),
                                settings))
        time.sleep(0.01)  # distinct modification times
    assert [p.exists() for p in paths] == [False, False, True, True]
    assert search_path.exists()  # another space: not pruned with recommend's
    assert all(p.name.startswith("hnsw-recommend-") for p in paths)
