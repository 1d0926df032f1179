"""Ray for the heavy batch work (polyrec.cluster): the results equal the local paths.

One local Ray cluster (2 CPUs) is started for the module and shut down at its end."""
from __future__ import annotations

from collections import Counter

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
    from conftest import ml100k_movies
    return ml100k_movies(ml100k_dir, N_ITEMS)


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


TWO_TOWER = {"modalities": "none", "batch_size": 512, "n_random": 512, "patience": 2}


def test_ray_trained_two_tower_matches_the_local_one(ray_cluster, tmp_path, ml100k_db):
    """The same seed on 2 Ray Train workers (DDP, gloo): Recall@20 on the registry's
    holdout within 1% of the local fit's, and the same artifact (it loads and serves)."""
    from conftest import copy_db, torch_threads

    from polyrec.cluster.train import train as ray_train
    (tmp_path / "l").mkdir(), (tmp_path / "r").mkdir()
    local_db, ray_db = copy_db(ml100k_db, tmp_path / "l"), copy_db(ml100k_db, tmp_path / "r")
    with torch_threads(1), _engine(local_db) as eng:
        local = eng.train("two_tower", options=TWO_TOWER, epochs=2, seed=3, force=True)
    with _engine(ray_db) as eng:
        remote = ray_train(eng, "two_tower", n_workers=2, options=TWO_TOWER, epochs=2, seed=3,
                           force=True)
        assert remote.ranker == "two_tower" and remote.activated
        assert remote.info["epochs"] == local.info["epochs"]
        assert len(eng.recommend("1", k=20)) == 20  # the stored artifact serves
    r_local, r_ray = local.metrics["recall@20"], remote.metrics["recall@20"]
    assert r_local > 0.05
    assert abs(r_ray - r_local) <= 0.01 * r_local, (r_local, r_ray)


def test_ray_training_refuses_a_ranker_that_is_not_data_parallel(ray_cluster, tmp_path, ml100k_db):
    from polyrec.cluster.train import train as ray_train
    from polyrec.errors import ConfigError
    from conftest import copy_db
    with _engine(copy_db(ml100k_db, tmp_path)) as eng, \
            pytest.raises(ConfigError, match="ease.*does not train data-parallel"):
        ray_train(eng, "ease")


def test_ray_batch_recommendations_equal_the_local_batch(ray_cluster, tmp_path, ml100k_db,
                                                        monkeypatch):
    """recommend --all --ray --out on 2 actors (shards of 300 users) writes the local
    batch's rows: the same users in the same order with the same item ids; items
    retired before the run are in neither (each actor's Engine reads the store)."""
    import csv

    from click.testing import CliRunner
    from conftest import copy_db

    from polyrec.cli.main import cli
    db = copy_db(ml100k_db, tmp_path)
    with _engine(db) as eng:
        eng.train("ease", force=True)
    runner = CliRunner()
    base = ["--db", str(db), "--device", "cpu", "--quiet", "recommend", "--all", "-k", "10"]
    with _engine(db) as eng:
        counts = Counter(r.item for _, recs in eng.recommend_many(k=10) for r in recs)
        retired = {item for item, _ in counts.most_common(3)}
        eng.retire_items(sorted(retired))
    local = runner.invoke(cli, [*base, "--out", str(tmp_path / "local.csv")])
    assert local.exit_code == 0, local.output
    monkeypatch.setattr("polyrec.cluster.batch.SHARD_USERS", 300)  # 943 users: 4 shards
    remote = runner.invoke(cli, [*base, "--ray", "--ray-workers", "2",
                                 "--out", str(tmp_path / "ray.csv")])
    assert remote.exit_code == 0, remote.output
    rows = {name: [(r["user"], r["rank"], r["item"]) for r in
                   csv.DictReader(open(tmp_path / f"{name}.csv", newline=""))]
            for name in ("local", "ray")}
    assert len(rows["local"]) == 9430 and rows["ray"] == rows["local"]
    assert not retired & {item for _, _, item in rows["ray"]}


def test_cli_ray_errors_are_one_line(ray_cluster, tmp_path, ml100k_db):
    from click.testing import CliRunner
    from conftest import copy_db

    from polyrec.cli.main import cli
    db = copy_db(ml100k_db, tmp_path)
    res = CliRunner().invoke(cli, ["--db", str(db), "--quiet", "train", "--ray",
                                   "--ranker", "ease"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "Error: ranker 'ease' does not train data-parallel, so it has no --ray training "
        "(two_tower does; train it without --ray)"]
    res = CliRunner().invoke(cli, ["--db", str(db), "--quiet", "recommend", "1", "--ray"])
    assert res.exit_code == 1 and "--ray scores a batch" in res.output
