"""Ray for the heavy batch work (polyrec.cluster): the results equal the local paths.

One local Ray cluster (2 CPUs) is started for the module and shut down at its end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

ray = pytest.importorskip("ray")

from polyrec import Engine  # noqa: E402
from polyrec.store.vectors import load_vectors  # noqa: E402

pytestmark = pytest.mark.slow
N_ITEMS = 120


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs shared by this module's tests."""
    import os
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def movies(ml100k_dir) -> list[dict]:
    lines = (ml100k_dir / "ml-100k.item").read_text(encoding="latin-1").splitlines()[1:N_ITEMS + 1]
    out = []
    for line in lines:
        item_id, title, year, genres = line.split("\t")
        out.append({"external_id": item_id, "title": title,
                    "attributes": {"release_year": year, "class": genres.split()}})
    return out


def _engine(path) -> Engine:
    return Engine(path, device="cpu", entrypoints=False, progress=False)


def _vectors(path, encoder="bert"):
    with _engine(path) as eng, eng.store.session() as s:
        return load_vectors(s, encoder)


def test_ray_encode_matches_local_and_keeps_the_cache_rules(ray_cluster, tmp_path, movies):
    from polyrec.cluster.encode import encode as ray_encode
    local, remote = tmp_path / "local.db", tmp_path / "ray.db"
    for path in (local, remote):
        with _engine(path) as eng:
            eng.add_items(movies)
    with _engine(local) as eng:
        assert eng.encode(["bert"])["bert"].encoded == N_ITEMS
    with _engine(remote) as eng:
        rep = ray_encode(eng, ["bert"], n_workers=2, shard=64)["bert"]  # 2 shards, 2 actors
        assert (rep.encoded, rep.cached, rep.failed, rep.error) == (N_ITEMS, 0, {}, None)
    (ids_l, vec_l), (ids_r, vec_r) = _vectors(local), _vectors(remote)
    assert ids_l == ids_r and vec_r.shape == (N_ITEMS, 384)
    cos = F.cosine_similarity(vec_l, vec_r, dim=1)
    assert float(cos.min()) >= 0.9999
    with _engine(remote) as eng:  # the same cache rules: unchanged items stay, one changed
        again = ray_encode(eng, ["bert"], n_workers=2)["bert"]
        assert (again.encoded, again.cached, again.loaded) == (0, N_ITEMS, False)
        eng.add_items([{"external_id": movies[3]["external_id"], "title": "Another title"}])
        one = ray_encode(eng, ["bert"], n_workers=2)["bert"]
        assert (one.encoded, one.cached) == (1, N_ITEMS - 1)
    ids_after, vec_after = _vectors(remote)
    moved = [i for k, i in enumerate(ids_after) if not torch.equal(vec_after[k], vec_r[k])]
    assert len(moved) == 1
