"""A/B experiments: deterministic assignment, variants recorded with events, the report."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.errors import ConfigError, NotFoundError
from polyrec.feedback.experiments import (assign, bucket, choose, create, list_experiments, report, stop,
                                two_proportion_p, wilson)


@pytest.fixture
def engine(store_engine):
    """The tests taking ``engine`` run on SQLite and on PostgreSQL (tests/conftest.py)."""
    return store_engine


def _items(eng: Engine) -> None:
    eng.add_items([{"external_id": f"i{i}"} for i in range(10)])


def test_assignment_is_deterministic_and_follows_the_weights():
    variants = {"a": {"weight": 3.0}, "b": {"weight": 1.0}}
    first = [choose("exp", variants, f"user{n}") for n in range(4000)]
    assert first == [choose("exp", dict(reversed(variants.items())), f"user{n}") for n in range(4000)]
    share_a = first.count("a") / len(first)
    assert 0.72 < share_a < 0.78
    other = [choose("other", variants, f"user{n}") for n in range(4000)]
    assert other != first  # experiments are independent of each other
    assert 0.0 <= bucket("exp", "x") < 1.0 and bucket("exp", "x") == bucket("exp", "x")


def test_definitions_are_checked(engine):
    with pytest.raises(ConfigError, match="at least two"):
        create(engine, "solo", {"a": 1})
    with pytest.raises(ConfigError, match="positive weight"):
        create(engine, "neg", {"a": 1, "b": -1})
    with pytest.raises(NotFoundError, match="no experiment named 'nope'"):
        report(engine, "nope")


def test_events_carry_the_variant_and_the_report_counts_them(engine):
    _items(engine)
    create(engine, "ranker", {"control": 1, "online": {"weight": 1, "options": {"online": True}}})
    users = [f"u{n}" for n in range(200)]
    events, expected = [], {"control": [0, 0, set(), set()], "online": [0, 0, set(), set()]}
    for n, user in enumerate(users):
        variant = choose("ranker", {"control": {"weight": 1}, "online": {"weight": 1}}, user)
        clicks = 2 if variant == "online" else 1  # the 'online' variant gets more clicks
        for i in range(5):
            events.append({"user": user, "item": f"i{i}", "kind": "impression"})
        for i in range(clicks):
            events.append({"user": user, "item": f"i{i}", "kind": "click"})
        expected[variant][0] += 5
        expected[variant][1] += clicks
        expected[variant][2].add(user)
        if n % 4 == 0:
            events.append({"user": user, "item": "i9", "kind": "purchase"})
            expected[variant][3].add(user)
    stored = engine.feedback_many(events)
    assert all(e.context["experiments"]["ranker"] in ("control", "online") for e in stored)
    assert stored[0].context["experiments"]["ranker"] == assign(engine, "ranker", "u0")
    rep = report(engine, "ranker")
    rows = {r["variant"]: r for r in rep["variants"]}
    for variant, (imps, clicks, exposed, converted) in expected.items():
        r = rows[variant]
        assert (r["impressions"], r["clicks"]) == (imps, clicks)
        assert r["users"] == len(exposed) and r["exposed_users"] == len(exposed)
        assert r["converted_users"] == len(converted)
        assert r["ctr"] == pytest.approx(clicks / imps)
        lo, hi = r["ctr_ci"]
        assert lo < r["ctr"] < hi
    assert rows["online"]["ctr_p_value"] < 0.001  # 40% vs 20% CTR on ~500 impressions each
    assert rows["online"]["ctr_ci"][0] > rows["control"]["ctr_ci"][1]


def test_stopped_experiments_no_longer_tag_events(engine):
    _items(engine)
    create(engine, "old", {"a": 1, "b": 1})
    assert "experiments" in engine.feedback("u", "i1", "click").context
    stop(engine, "old")
    assert engine.feedback("u", "i1", "click").context is None
    assert list_experiments(engine)[0]["active"] is False


def test_wilson_and_p_value():
    lo, hi = wilson(20, 100)
    assert lo == pytest.approx(0.1333, abs=1e-3) and hi == pytest.approx(0.2888, abs=1e-3)
    assert wilson(0, 0) == (0.0, 0.0)
    assert two_proportion_p(50, 100, 50, 100) == pytest.approx(1.0)
    assert two_proportion_p(60, 100, 40, 100) == pytest.approx(0.00468, abs=1e-4)


def test_cli_create_assign_report(tmp_path):
    db = str(tmp_path / "e.db")
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        _items(eng)
    run = CliRunner().invoke
    out = run(cli, ["--db", db, "experiments", "create", "ab", "--variant", "a=1",
                    "--variant", "b=1", "--options", 'b={"online": false}'])
    assert out.exit_code == 0 and "experiment 'ab' active" in out.output, out.output
    variant = run(cli, ["--db", db, "experiments", "assign", "ab", "zoe"]).output.strip()
    assert variant == choose("ab", {"a": {"weight": 1}, "b": {"weight": 1}}, "zoe")
    for kind in ("impression", "impression", "click"):
        assert run(cli, ["--db", db, "feedback", "send", "zoe", "i1", "--kind", kind]).exit_code == 0
    text = run(cli, ["--db", db, "experiments", "report", "ab"])
    assert text.exit_code == 0 and "CTR" in text.output and "50.00%" in text.output, text.output
    listed = run(cli, ["--db", db, "experiments", "list"])
    assert "ab" in listed.output and "1 users" in listed.output
    bad = run(cli, ["--db", db, "experiments", "create", "x", "--variant", "a"])
    assert bad.exit_code == 1 and "at least two" in bad.output
