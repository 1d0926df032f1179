"""Progress of long work off a terminal: plain log lines (polyrec.progress), one per
epoch for training, throttled for row loops, none with --quiet."""
from __future__ import annotations

import logging
import random

import pytest
from click.testing import CliRunner

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.progress import LineProgress, progress_bar, stage


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="polyrec.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "polyrec.progress"]


def test_a_line_per_update_with_count_eta_and_postfix(lines):
    bar = LineProgress(range(4), desc="two_tower epoch", unit="epochs", interval=0)
    for n in bar:
        bar.set_postfix(loss=f"{1.0 / (n + 1):.3f}")
    out = lines()
    assert len(out) == 4
    assert out[0].startswith("two_tower epoch: 1/4 epochs (25%)") and "ETA" in out[0]
    assert out[0].endswith("loss=1.000")
    assert out[-1].startswith("two_tower epoch: 4/4 epochs (100%)") and "ETA" not in out[-1]


def test_throttled_lines_still_end_with_the_total(lines):
    bar = LineProgress(total=1000, desc="items x.csv", unit="rows", interval=3600)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert lines() == [lines()[0]] and lines()[0].startswith("items x.csv: 1,000/1,000 rows (100%)")


def test_disabled_progress_and_stages_say_nothing(lines):
    for _ in progress_bar(range(3), desc="quiet", enabled=False):
        pass
    stage("not shown", enabled=False)
    assert lines() == []
    stage("shown")  # off a terminal (pytest captures stderr): a log line
    assert lines() == ["shown"]


@pytest.fixture
def small_db(tmp_path):
    """60 items, 40 users and their clicks: enough to train a small two-tower."""
    db = tmp_path / "small.db"
    rnd = random.Random(0)
    with Engine(db, device="cpu", entrypoints=False, progress=False,
                encode_on_arrival=False) as eng:
        eng.add_items([{"external_id": f"i{n}", "title": f"item {n}"} for n in range(60)])
        eng.add_interactions([{"user": f"u{u}", "item": f"i{rnd.randrange(60)}", "kind": "click",
                               "ts": 1_000 + n} for n, u in enumerate(list(range(40)) * 8)])
    return db


def _train(db, *extra):
    return CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", *extra, "train",
                                    "--ranker", "two_tower", "--epochs", "3", "--set",
                                    "validation=false", "--set", "modalities=none",
                                    "--set", "dim=8"])


def test_train_off_a_terminal_logs_a_line_per_epoch(small_db):
    result = _train(small_db)
    assert result.exit_code == 0, result.output
    epochs = [ln for ln in result.stderr.splitlines() if ln.startswith("two_tower epoch:")]
    assert [ln.split(" epochs")[0] for ln in epochs] == [
        "two_tower epoch: 1/3", "two_tower epoch: 2/3", "two_tower epoch: 3/3"]
    assert all("loss=" in ln for ln in epochs)
    assert "train: fitting two_tower on" in result.stderr  # the stages too
    assert "two_tower epoch" not in result.stdout  # the report stays clean on stdout


def test_quiet_train_prints_no_progress(small_db):
    result = _train(small_db, "--quiet")
    assert result.exit_code == 0, result.output
    assert "epoch" not in result.stderr and "train:" not in result.stderr


def test_a_long_epoch_shows_its_steps(small_db, monkeypatch):
    """An epoch of many steps (at 10M interactions about an hour) logs its steps with a
    total and an ETA, not just one line when it ends; a short one does not."""
    monkeypatch.setattr("polyrec.progress.LINE_INTERVAL", 0.0)  # every step, for the test
    result = CliRunner().invoke(cli, ["--db", str(small_db), "--device", "cpu", "train",
                                      "--ranker", "two_tower", "--epochs", "3", "--set",
                                      "validation=false", "--set", "modalities=none", "--set",
                                      "dim=8", "--set", "batch_size=2"])
    assert result.exit_code == 0, result.output
    steps = [ln for ln in result.stderr.splitlines() if ln.startswith("two_tower epoch 1/3:")]
    assert len(steps) >= 100, result.stderr[-2000:]
    total = int(steps[-1].split("/")[2].split(" ")[0].replace(",", ""))
    assert total >= 100 and steps[-1].startswith(f"two_tower epoch 1/3: {total:,}/{total:,} steps")
    assert "ETA" in steps[len(steps) // 2] and "loss=" in steps[-1]
    assert any(ln.startswith("two_tower epoch 3/3:") for ln in result.stderr.splitlines())
    short = _train(small_db)  # batch 2,048: one step an epoch, no step lines
    assert not any(" steps" in ln for ln in short.stderr.splitlines())


def test_a_large_ingest_shows_its_writing_and_the_learners_catch_up(tmp_path, monkeypatch):
    """After the rows are read and checked, writing them and the bandit learning them
    took minutes at 10M rows with no output: both show their progress."""
    monkeypatch.setattr("polyrec.progress.LINE_INTERVAL", 0.0)
    monkeypatch.setattr("polyrec.ingest.files.WRITE_PROGRESS_ROWS", 10)
    items, events = tmp_path / "items.csv", tmp_path / "events.csv"
    items.write_text("item_id,title\n" + "".join(f"i{n},item {n}\n" for n in range(50)))
    rnd = random.Random(1)
    events.write_text("user_id,item_id,kind,timestamp\n" + "".join(  # clicks: the learners'
        f"u{rnd.randrange(300)},i{rnd.randrange(50)},click,{1_000 + n}\n" for n in range(12_000)))
    db = str(tmp_path / "big.db")
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db, "init"]).exit_code == 0
    assert runner.invoke(cli, ["--db", db, "ingest", "items", str(items)]).exit_code == 0
    result = runner.invoke(cli, ["--db", db, "ingest", "interactions", str(events)])
    assert result.exit_code == 0, result.output
    err = result.stderr.splitlines()
    writing = [ln for ln in err if ln.startswith("interactions events.csv: writing:")]
    assert writing and writing[-1].startswith(
        "interactions events.csv: writing: 12,000/12,000 rows (100%)"), result.stderr[-1500:]
    # polyrec ingest is a fresh process: the bandit loads its posterior and learns the
    # events stored since its checkpoint (these 3,000) in batches, shown as it goes
    monkeypatch.setattr("polyrec.plugins.feedback_bandit.CATCH_UP_BATCH", 1_000)
    more = tmp_path / "more.csv"
    more.write_text("user_id,item_id,kind,timestamp\n" + "".join(
        f"u{rnd.randrange(300)},i{rnd.randrange(50)},click,{20_000 + n}\n" for n in range(3_000)))
    result = runner.invoke(cli, ["--db", db, "ingest", "interactions", str(more)])
    assert result.exit_code == 0, result.output
    learning = [ln for ln in result.stderr.splitlines()
                if ln.startswith("bandit: learning from stored events:")]
    assert learning and learning[-1].startswith(
        "bandit: learning from stored events: 3,000 events"), result.stderr[-1500:]
    small = runner.invoke(cli, ["--db", db, "feedback", "state", "u1"])  # nothing new: silent
    assert small.exit_code == 0, small.output
    assert "bandit: learning" not in small.stderr
