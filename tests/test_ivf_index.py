"""The Recommender's inverted-file index (polyrec.rank.vector_index, kind "ivf") over
maximum-inner-product keys shaped like a two-tower's (unit vectors / temperature plus a
bias column): exact at full probe, high recall by default, persisted and reloaded
without a rebuild, and exact search when FAISS is missing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from polyrec.rank.vector_index import (ExactIndex, IndexSettings, IndexSlot, faiss_available,
                                       index_path, matrix_fingerprint, open_index)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="FAISS is not installed")
IVF = IndexSettings(backend="faiss", kind="ivf")


def mips_keys(n: int, dim: int, clusters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys [n, dim + 1], user-like queries [100, dim + 1]): clustered unit item vectors
    / 0.1 with a bias column (norms 10 to 11, as a two-tower's); queries are unit vectors
    near a cluster centre with a 1 for the bias."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen)

    def around(count: int) -> torch.Tensor:
        picked = centres[torch.randint(clusters, (count,), generator=gen)]
        return torch.nn.functional.normalize(picked + 0.8 * torch.randn(count, dim, generator=gen),
                                             dim=1)

    keys = torch.cat([around(n) / 0.1, torch.randn(n, 1, generator=gen)], dim=1)
    queries = torch.cat([around(100), torch.ones(100, 1)], dim=1)
    return keys, queries


def recall_at_10(index, exact: ExactIndex, queries: torch.Tensor) -> float:
    hits = sum(len(set(index.search(q, 10)[1].tolist()) & set(exact.search(q, 10)[1].tolist()))
               for q in queries)
    return hits / (10 * len(queries))


@needs_faiss
def test_ivf_is_exact_at_full_probe_and_close_to_exact_by_default() -> None:
    keys, queries = mips_keys(20_000, 32, 50, seed=0)
    exact = ExactIndex(keys)
    default = open_index(keys, name="m", settings=IVF)
    assert default.kind == "ivf"
    assert default.index.nlist == round(2 * 20_000 ** 0.5)  # 283 lists
    assert default.nprobe == 36  # an eighth of them
    assert recall_at_10(default, exact, queries) >= 0.98
    full = open_index(keys, name="m", settings=IndexSettings(backend="faiss", kind="ivf",
                                                             nprobe=10**6))
    assert full.nprobe == full.index.nlist
    for q in queries[:30]:
        want_scores, want_rows = exact.search(q, 10)
        got_scores, got_rows = full.search(q, 10)
        assert got_rows.tolist() == want_rows.tolist()
        assert torch.allclose(got_scores, want_scores, atol=1e-4)
    # with one list probed, a pool larger than that list still comes back whole
    narrow = open_index(keys, name="m", settings=IndexSettings(backend="faiss", kind="ivf",
                                                               nprobe=1))
    scores, rows = narrow.search(queries[0], 500)
    assert len(rows) == 500 and len(set(rows.tolist())) == 500
    assert bool((scores[:-1] >= scores[1:]).all())


@needs_faiss
def test_ivf_persists_and_a_fresh_slot_loads_it_without_building(tmp_path: Path) -> None:
    keys, queries = mips_keys(3000, 16, 10, seed=1)
    fingerprint = matrix_fingerprint(keys)
    built = IndexSlot(keys, name="recommend:v1", settings=IVF, directory=tmp_path,
                      fingerprint=fingerprint, background=False)
    assert built.kind == "ivf" and built.error is None
    path = index_path(tmp_path, "recommend:v1", fingerprint, IVF, len(keys))
    assert path.exists() and path.name.startswith("ivf-")
    stamp = path.stat().st_mtime_ns
    loaded = IndexSlot(keys, name="recommend:v1", settings=IVF, directory=tmp_path,
                       fingerprint=fingerprint)
    assert loaded.ready() and loaded.kind == "ivf" and path.stat().st_mtime_ns == stamp
    assert loaded.current.nprobe == built.current.nprobe
    for q in queries[:10]:
        assert loaded.current.search(q, 20)[1].tolist() == built.current.search(q, 20)[1].tolist()
    # other build settings, another kind, other vectors: other files
    other_lists = index_path(tmp_path, "recommend:v1", fingerprint,
                             IndexSettings(backend="faiss", kind="ivf", nlist=50), len(keys))
    hnsw = index_path(tmp_path, "recommend:v1", fingerprint,
                      IndexSettings(backend="faiss"), len(keys))
    changed = keys.clone()
    changed[0, -1] += 1.0
    other_keys = index_path(tmp_path, "recommend:v1", matrix_fingerprint(changed), IVF, len(keys))
    assert len({path, other_lists, hnsw, other_keys}) == 4
    # the probe count is a search setting: the same file, read with more probes
    wider = IndexSettings(backend="faiss", kind="ivf", nprobe=40)
    assert index_path(tmp_path, "recommend:v1", fingerprint, wider, len(keys)) == path
    slot = IndexSlot(keys, name="recommend:v1", settings=wider, directory=tmp_path,
                     fingerprint=fingerprint)
    assert slot.ready() and slot.current.nprobe == 40
    # a broken file is rebuilt, not served
    path.write_bytes(b"not an index")
    rebuilt = IndexSlot(keys, name="recommend:v1", settings=IVF, directory=tmp_path,
                        fingerprint=fingerprint, background=False)
    assert rebuilt.kind == "ivf" and rebuilt.error is None and path.stat().st_size > 1000


def test_without_faiss_search_stays_exact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    assert not faiss_available()
    keys, queries = mips_keys(2000, 8, 5, seed=2)
    index = open_index(keys, name="m", settings=IVF, directory=tmp_path)
    assert isinstance(index, ExactIndex)
    slot = IndexSlot(keys, name="m", settings=IVF, directory=tmp_path,
                     fingerprint=matrix_fingerprint(keys))
    assert slot.ready() and slot.kind == "exact" and not list(tmp_path.iterdir())
    q = queries[0]
    assert slot.current.search(q, 10)[1].tolist() == torch.topk(keys @ q, 10).indices.tolist()


def test_index_settings_reject_unknown_kinds_and_empty_lists() -> None:
    with pytest.raises(ValueError, match="kind"):
        IndexSettings(kind="annoy")
    with pytest.raises(ValueError, match="nlist"):
        IndexSettings(kind="ivf", nlist=0)
    with pytest.raises(ValueError, match="nprobe"):
        IndexSettings(kind="ivf", nprobe=0)
    assert IndexSettings(kind="ivf").lists(1_000_000) == 2000
    assert IndexSettings(kind="ivf").probes(2000) == 250
    assert IndexSettings(kind="ivf").lists(3) == 3  # never more lists than rows
    with pytest.raises(ValueError, match="rows"):
        index_path(Path("."), "m", "f", IndexSettings(kind="ivf"))
