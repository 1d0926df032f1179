"""Batch recommendations (Engine.recommend_many, `polyrec recommend --all | --users FILE
--out`) on MovieLens-100k: the same lists as `recommend` one user at a time, with filters,
seen items, diversity, a cold user and a user known only from online feedback; the
default pipeline (click probabilities) and EASE; the files written; the errors."""
from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import _checkpoint, copy_db

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.errors import ConfigError, NotFoundError, ValidationError
from polyrec.rank.export import RecommendationWriter

pytestmark = [pytest.mark.slow,  # the module's fixtures train on ml-100k (over ~5 s)
              pytest.mark.usefixtures("one_thread")]

#: ml-100k users 1..50, a user who only rated one film low and saw another (no
#: positives: popularity), and one the model never saw, known from online clicks.
USERS = [str(u) for u in range(1, 51)] + ["cold-1", "online-1"]


def _open(db) -> Engine:
    return Engine(db, device="cpu", entrypoints=False, progress=False)


def _add_late_users(eng: Engine) -> None:
    eng.add_interactions([{"user": "cold-1", "item": "50", "kind": "rating", "value": 2.0},
                          {"user": "cold-1", "item": "100", "kind": "impression"}])
    for item in ("1", "2", "3", "4"):
        eng.feedback("online-1", item, "click")


@pytest.fixture(scope="module")
def ease_db(tmp_path_factory, ml100k_db):
    """ml-100k with EASE (l2 500) live, then the two late users added."""
    db = copy_db(ml100k_db, tmp_path_factory.mktemp("batch_ease"))
    with _open(db) as eng:
        eng.train("ease", options={"l2": 500.0})
        _add_late_users(eng)
    _checkpoint(db)
    return db


@pytest.fixture(scope="module")
def default_db(tmp_path_factory, ml100k_default_db):
    """The default pipeline (hybrid: EASE re-ranked by the click model), late users added."""
    db = copy_db(ml100k_default_db[0], tmp_path_factory.mktemp("batch_default"))
    with _open(db) as eng:
        _add_late_users(eng)
    _checkpoint(db)
    return db


def _same(single, many) -> None:
    """The same items in the same order, the same scores (up to float rounding: a block
    is one matrix product, a user alone another)."""
    assert [r.item for r in many] == [r.item for r in single]
    assert [r.title for r in many] == [r.title for r in single]
    for a, b in zip(single, many):
        assert b.score == pytest.approx(a.score, rel=1e-4, abs=1e-6)


REQUESTS = [
    {},
    {"filters": {"class": "Comedy"}},
    {"filters": {"class": ["Horror", "Thriller"]}, "exclude_seen": False},
    {"diversity": 0.3, "k": 7},
]


@pytest.mark.parametrize("request_options", REQUESTS, ids=["plain", "filter", "any-of+seen",
                                                           "diversity"])
def test_recommend_many_equals_recommend_per_user_ease(ease_db, request_options):
    options = dict(request_options)
    k = options.pop("k", 10)
    with _open(ease_db) as eng:
        many = list(eng.recommend_many(USERS, k, batch_size=37, **options))
        assert [u for u, _ in many] == USERS  # every user, in order
        for user, recs in many:
            _same(eng.recommend(user, k, **options), recs)
            assert len(recs) == k
        by_user = dict(many)
    if not options:  # the cold user gets popular films, less the one they rated (Star
        cold = [r.item for r in by_user["cold-1"]]  # Wars, the most popular), not less
        assert "50" not in cold and "100" in cold   # Fargo, which they only saw listed


def test_recommend_many_default_pipeline_click_probabilities(default_db):
    with _open(default_db) as eng:
        for options in ({}, {"filters": {"class": "Comedy"}}):
            many = dict(eng.recommend_many(USERS[:30] + USERS[-2:], 10, batch_size=16, **options))
            for user, recs in many.items():
                single = eng.recommend(user, 10, **options)
                _same(single, recs)
        known = [r.score for r in many["1"]]
        assert all(0.0 < s < 1.0 for s in known)  # click probabilities, not raw scores


def test_batch_size_and_order_do_not_change_the_answer(ease_db):
    with _open(ease_db) as eng:
        one = list(eng.recommend_many(USERS[:20], 5, batch_size=1))
        big = list(eng.recommend_many(list(reversed(USERS[:20])), 5, batch_size=1000))
    assert [(u, [r.item for r in recs]) for u, recs in one] == \
        [(u, [r.item for r in recs]) for u, recs in reversed(big)]


def test_all_users_and_bad_requests(ease_db):
    with _open(ease_db) as eng:
        everyone = [u for u, _ in eng.recommend_many(None, 3, batch_size=500)]
        assert len(everyone) == 943 + 2 and everyone[:3] == ["1", "2", "3"]
        with pytest.raises(NotFoundError, match="'nobody'"):
            eng.recommend_many(["1", "nobody"], 5)  # checked before anything is scored
        with pytest.raises(ConfigError, match="k must be"):
            eng.recommend_many(["1"], 0)
        with pytest.raises(ConfigError, match="batch_size"):
            eng.recommend_many(["1"], 5, batch_size=0)


def test_an_unknown_filter_field_is_one_error_on_every_path(ease_db, tmp_path):
    """recommend, recommend_many and the CLI refuse a filter key the catalogue does not
    have, with search's (and HTTP's 422) message, instead of an empty answer."""
    message = "unknown filter field 'nosuch' (attribute fields: "
    with _open(ease_db) as eng:
        with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
            eng.recommend("1", 5, filters={"nosuch": "1"})
        with pytest.raises(ValidationError, match="'nosuch'.*class"):
            eng.recommend_many(["1", "2"], 5, filters={"class": "Drama", "nosuch": "1"})
        assert eng.recommend("1", 3, filters={"class": "Drama"})  # a known field still works
    out = tmp_path / "x.csv"
    for args in (["1"], ["--all", "--out", str(out)]):
        result = _run(ease_db, "recommend", *args, "--filter", "nosuch=1")
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ") and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_search_slot_filters_like_the_attribute_it_reads(ease_db):
    """A query-understanding slot ('genre', read from the attribute 'class') filters as
    search does, instead of matching no item: one user and a batch alike."""
    with _open(ease_db) as eng:
        by_slot = eng.recommend("1", 8, filters={"genre": "Comedy"})
        assert [r.item for r in by_slot] == \
            [r.item for r in eng.recommend("1", 8, filters={"class": "Comedy"})]
        views = {v.external_id: v for v in eng.items()}
        assert len(by_slot) == 8 and all("Comedy" in views[r.item].attributes["class"]
                                         for r in by_slot)
        (_, many), = eng.recommend_many(["1"], 8, filters={"genre": "Comedy", "class": "Drama"})
        assert many and all({"Comedy", "Drama"} <= set(views[r.item].attributes["class"])
                            for r in many)


# -- the CLI ------------------------------------------------------------------------------
def _run(db, *args):
    return CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", "--quiet", *args])


def test_cli_exports_parquet_csv_jsonl(ease_db, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("\n".join(USERS[:30]) + "\n\n")  # a blank line is skipped
    with _open(ease_db) as eng:
        expected = {u: [(r.item, r.score) for r in recs]
                    for u, recs in eng.recommend_many(USERS[:30], 4, filters={"class": "Drama"})}
    for suffix in ("parquet", "csv", "jsonl"):
        out = tmp_path / f"recs.{suffix}"
        result = _run(ease_db, "recommend", "--users", str(users), "-k", "4",
                      "--filter", "class=Drama", "--out", str(out))
        assert result.exit_code == 0, result.output
        assert f"Wrote 120 recommendations for 30 users to {out}" in result.output
        if suffix == "jsonl":
            lines = [json.loads(line) for line in out.read_text().splitlines()]
            got = {d["user"]: [(r["item"], r["score"]) for r in d["recommendations"]]
                   for d in lines}
        else:
            rows = (pq.read_table(out).to_pylist() if suffix == "parquet"
                    else list(csv.DictReader(out.open())))
            got = {}
            for row in rows:
                got.setdefault(row["user"], []).append((row["item"], float(row["score"])))
                assert int(row["rank"]) == len(got[row["user"]])
        assert got.keys() == expected.keys()
        for user in expected:
            assert [i for i, _ in got[user]] == [i for i, _ in expected[user]]
            assert [s for _, s in got[user]] == pytest.approx([s for _, s in expected[user]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recs.csv", "recs.jsonl",
                                                          "recs.parquet", "users.txt"]


def test_cli_all_to_stdout_and_single_user_still_works(ease_db):
    result = _run(ease_db, "recommend", "--all", "-k", "2")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 945 and all(len(d["recommendations"]) == 2 for d in lines)
    assert "for 945 users" in result.stderr
    single = _run(ease_db, "recommend", "1", "-k", "2", "--json")
    assert single.exit_code == 0, single.output
    assert [r["item"] for r in json.loads(single.stdout)] == \
        [r["item"] for r in lines[0]["recommendations"]]


@pytest.mark.parametrize("args,message", [
    (["1", "--all"], "give one of USER, --all or --users FILE, not USER and --all"),
    ([], "give one of USER, --all or --users FILE"),
    (["--all", "--out", "recs.txt"], "must end in .csv, .jsonl, .parquet"),
    (["--all", "--explain"], "--explain is for one USER"),
    (["--users", "USERS"], "unknown user(s): 'ghost'"),
    (["--users", "EMPTY"], "lists no users"),
])
def test_cli_batch_errors(ease_db, tmp_path, args, message):
    (tmp_path / "users.txt").write_text("1\nghost\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    args = [{"USERS": str(tmp_path / "users.txt"), "EMPTY": str(tmp_path / "empty.txt"),
             "recs.txt": str(tmp_path / "recs.txt")}.get(a, a) for a in args]
    result = _run(ease_db, "recommend", *args, "--out", str(tmp_path / "out.csv")) \
        if "--out" not in args else _run(ease_db, "recommend", *args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.csv").exists()


def test_writer_leaves_no_file_when_the_export_fails(tmp_path):
    out = tmp_path / "recs.parquet"
    with pytest.raises(RuntimeError):
        with RecommendationWriter(out) as writer:
            writer.write("1", [])
            raise RuntimeError("scoring failed half way")
    assert list(tmp_path.iterdir()) == []
