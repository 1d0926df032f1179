"""`polyrec retrain --if-stale`: which model staleness is measured from."""
from __future__ import annotations

from polyrec import Engine


def test_staleness_is_measured_from_the_live_version_after_a_rollback(tmp_path):
    """After a rollback to an older version, `retrain --if-stale` counts what arrived
    since the version that serves, not since the newest one trained."""
    from polyrec.feedback.retrain import staleness
    with Engine(tmp_path / "stale.db", device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items([{"external_id": f"i{k}"} for k in range(6)])
        eng.add_interactions([{"user": f"u{n}", "item": f"i{(n + k) % 6}", "kind": "click",
                               "ts": n * 10 + k} for n in range(1, 9) for k in range(3)])
        first = eng.train("popular").as_dict()["version"]
        eng.add_interactions([{"user": "u1", "item": "i5", "kind": "purchase", "ts": 500},
                              {"user": "u2", "item": "i4", "kind": "purchase", "ts": 501}])
        eng.train("popular", force=True)
        assert staleness(eng)["new_events"] == 0
        eng.activate(first)
        stale = staleness(eng)
        assert stale["model"]["version"] == first and stale["new_events"] == 2
