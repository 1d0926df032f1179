"""The gate's holdout evaluation on a bounded, fixed sample of held-out users
(engine/rank/registry.py, gate setting ``holdout_users``): at most that many users are
measured, the same ones whatever the order of the data, every held-out pair still left
out of the training, and a store with fewer held-out users (MovieLens-100k) unchanged."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from conftest import copy_db

from polyrec import Engine
from polyrec.errors import ConfigError
from polyrec.rank import registry
from polyrec.rank.dataset import build_training_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

N_USERS, N_ITEMS, PER_USER = 1500, 150, 12


def _rows(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"u{u}", f"i{i}") for u in range(N_USERS)
            for i in rng.sample(range(N_ITEMS), PER_USER)]


def _store(path: Path, rows: list[tuple[str, str]]) -> Path:
    """A store of click events ``rows`` (user, item), the users created in row order."""
    events = path.with_suffix(".csv")
    with events.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "kind", "timestamp"])
        w.writerows((u, i, "click", 1_700_000_000 + n) for n, (u, i) in enumerate(rows))
    with Engine(path, device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items([{"external_id": f"i{n}"} for n in range(N_ITEMS)])
        eng.ingest(events, "interactions")
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    """The same events twice: in user order and reversed (other user indices)."""
    folder = tmp_path_factory.mktemp("holdout_sample")
    rows = _rows()
    return _store(folder / "a.db", rows), _store(folder / "b.db", rows[::-1])


def _split(db: Path, max_users: int):
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        data = build_training_data(eng)
        users = registry._user_external_ids(eng, data)
        train, test, record = registry.split_holdout(eng, data, registry.HOLDOUT_SHARE,
                                                     max_users)
    measured = {users[u]: sorted(data.item_ids[i] for i in t.tolist())
                for u, t in enumerate(test) if len(t)}
    return train, measured, record


def test_evaluated_users_is_capped_and_depends_on_the_ids_only():
    ids = [f"user{n}" for n in range(5000)]
    held = torch.arange(0, 5000, 2)  # 2,500 users with held-out pairs
    first = registry.evaluated_users(held, ids, 300)
    assert len(first) == 300 and torch.equal(first, registry.evaluated_users(held, ids, 300))
    assert bool((first[1:] > first[:-1]).all()) and set(first.tolist()) <= set(held.tolist())
    # the same users under other indices: the same external ids are chosen
    shuffled = list(range(5000))
    random.Random(1).shuffle(shuffled)
    ids2 = [ids[shuffled[n]] for n in range(5000)]  # index n now holds ids[shuffled[n]]
    where = {ids2[n]: n for n in range(5000)}
    held2 = torch.tensor(sorted(where[ids[u]] for u in held.tolist()))
    second = registry.evaluated_users(held2, ids2, 300)
    assert {ids2[u] for u in second.tolist()} == {ids[u] for u in first.tolist()}
    # no cap, or a cap at or above the count: every user, unchanged
    assert torch.equal(registry.evaluated_users(held, ids, 0), held)
    assert torch.equal(registry.evaluated_users(held, ids, 2500), held)


def test_split_measures_a_fixed_sample_and_still_holds_every_pair_out(stores):
    a, b = stores
    train_all, all_users, rec_all = _split(a, 0)
    assert rec_all["users"] == rec_all["evaluated_users"] == len(all_users) > 150
    train_cap, capped, rec = _split(a, 100)
    assert len(capped) == 100 and rec["evaluated_users"] == 100
    assert rec["users"] == rec_all["users"] and rec["pairs"] == rec_all["pairs"]
    assert rec["max_users"] == 100 and rec["rule"] == rec_all["rule"]
    assert all(all_users[u] == items for u, items in capped.items())  # whole lists
    # the training data does not depend on the cap: the unmeasured users' pairs stay out
    assert torch.equal(train_cap.users, train_all.users) and torch.equal(train_cap.items,
                                                                         train_all.items)
    # the same events ingested in another order: the same users and pairs measured
    _, again, _ = _split(a, 100)
    _, reordered, rec_b = _split(b, 100)
    assert again == capped and reordered == capped and rec_b == rec


def test_train_reports_the_sample_and_the_gate_compares_on_it(stores, tmp_path):
    db = tmp_path / "t.db"
    db.write_bytes(stores[0].read_bytes())
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        first = eng.train("popular", gate={"holdout_users": 100})
        second = eng.train("popular", gate={"holdout_users": 100})
        meta = eng.model(second.version)
    held = meta["holdout"]
    assert first.metrics["users"] == second.metrics["users"] == 100
    assert second.metrics["held_out_users"] == held["users"] > 100
    assert held["evaluated_users"] == 100 and held["max_users"] == 100
    check = second.gate["checks"]["metric"]
    assert check["passed"] is True and check["users"] == 100
    assert check["new"] == check["live"]  # the same ranker, the same 100 users
    assert second.gate["config"]["holdout_users"] == 100


def test_a_negative_cap_is_one_clear_error(engine):
    with pytest.raises(ConfigError, match="holdout_users"):
        registry.gate_config(engine, {"holdout_users": -1})
    with pytest.raises(ConfigError, match="holdout_users"):
        registry.gate_config(engine, {"holdout_users": "many"})


def test_movielens_100k_is_measured_on_every_held_out_user(ml100k_db, tmp_path):
    """943 users: the default cap leaves the holdout evaluation and its figures as they were."""
    assert registry.GATE_DEFAULTS["holdout_users"] >= 943
    _, default, rec = _split(ml100k_db, registry.GATE_DEFAULTS["holdout_users"])
    _, every, rec_all = _split(ml100k_db, 0)
    assert default == every and rec["users"] == rec["evaluated_users"] == len(every) > 500
    assert rec["pairs"] == rec_all["pairs"] > 500
    db = copy_db(ml100k_db, tmp_path)
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        capped = eng.train("popular")
        uncapped = eng.train("popular", gate={"holdout_users": 0})
    assert capped.metrics == uncapped.metrics and "held_out_users" not in capped.metrics
    assert capped.metrics["users"] == len(every)


def test_the_setting_caps_polyrec_train_and_it_says_so(stores, tmp_path):
    from click.testing import CliRunner

    from polyrec.cli.main import cli
    from polyrec.store.settings import put_setting
    db = tmp_path / "t.db"
    db.write_bytes(stores[0].read_bytes())
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            put_setting(s, registry.GATE_KEY, {"holdout_users": 120})
    res = CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", "--quiet", "train",
                                   "--ranker", "popular"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("holdout:"))
    assert " on 120 of the " in line and "held-out users (a fixed sample" in line
