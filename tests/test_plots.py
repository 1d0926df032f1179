"""Pictures (polyrec.plots, matplotlib on the Agg canvas): `polyrec evaluate --plot`,
`polyrec experiments report --plot` and benchmarks/replay.py's charts, as PNG and as a
self-contained HTML page; bad targets and a missing matplotlib are one-line errors."""
from __future__ import annotations

import base64
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from polyrec.cli.main import cli
from polyrec.errors import ConfigError
from polyrec.plots import (chart_bytes, evaluation_chart, experiment_chart, replay_chart,
                           save_chart)

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(db, *args):
    return CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", "--quiet", *args])


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data.startswith(PNG)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _embedded_png(page: str) -> bytes:
    """The one image of a self-contained page, which must reference nothing outside."""
    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(found) == 1
    rest = page.replace(found[0], "")
    assert not re.search(r"(https?:)?//[a-z0-9]", rest, flags=re.I), "an external URL"
    assert "<script" not in rest and "<link" not in rest and "url(" not in rest
    return base64.b64decode(found[0])


def _cells(page: str) -> list[list[str]]:
    return [re.findall(r"<t[dh]>(.*?)</t[dh]>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)]


# -- evaluate --plot ------------------------------------------------------------------------
@pytest.mark.slow  # fits two rankers on ml-100k
def test_evaluate_plot_html(ml100k_db, tmp_path):
    page = tmp_path / "eval.html"  # (PNG files: the experiment and replay tests)
    result = _run(ml100k_db, "evaluate", "--models", "popular,ease", "-o", "ease.l2=500",
                  "--k", "5,10,20", "--plot", str(page), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # --json stays pure JSON; the note goes to stderr
    assert f"Plot written to {page}" in result.stderr
    text = page.read_text()
    assert _png_size(_embedded_png(text)) == (1100, 360)
    cells = _cells(text)
    assert cells[0][:4] == ["model", "recall@5", "ndcg@5", "coverage@5"]
    by_model = {row[0]: row for row in cells[1:]}
    assert set(by_model) == {"popular", "ease"}
    for row in report["models"]:
        shown = dict(zip(cells[0], by_model[row["model"]]))
        for key in ("recall@10", "ndcg@20", "coverage@5"):
            assert shown[key] == f"{row['metrics'][key]:.4f}"
    assert report["models"][1]["metrics"]["recall@10"] > report["models"][0]["metrics"]["recall@10"]


def test_a_bad_plot_target_fails_before_any_work(tmp_path):
    db = tmp_path / "none.db"  # not even a database: the target is checked first
    for target, message in ((tmp_path / "x.jpg", "must end in .png, .svg, .html"),
                            (tmp_path / "no" / "x.png", "does not exist"),
                            (tmp_path, "is a directory")):
        result = CliRunner().invoke(cli, ["--db", str(db), "evaluate", "--plot", str(target)])
        assert result.exit_code != 0
        assert message in result.output and "Traceback" not in result.output, result.output


# -- experiments report --plot ---------------------------------------------------------------
def test_experiment_report_plot(engine, tmp_path):
    from polyrec.feedback.experiments import create, report
    engine.add_items([{"external_id": f"i{i}"} for i in range(6)])
    create(engine, "ranker", {"control": 1, "online": 1})
    events = []
    for n in range(120):
        user = f"u{n}"
        events += [{"user": user, "item": f"i{i}", "kind": "impression"} for i in range(4)]
        events += [{"user": user, "item": "i0", "kind": "click"}] * (1 + n % 2)
        if n % 3 == 0:
            events.append({"user": user, "item": "i5", "kind": "purchase"})
    engine.feedback_many(events)
    db = engine.url.removeprefix("sqlite:///")
    page = tmp_path / "exp.html"
    result = _run(db, "experiments", "report", "ranker", "--confidence", "0.9", "--plot", str(page))
    assert result.exit_code == 0, result.output
    assert "CTR" in result.output and f"Plot written to {page}" in result.output
    text = page.read_text()
    _embedded_png(text)
    cells = _cells(text)
    assert cells[0][:6] == ["variant", "users", "impressions", "clicks", "CTR", "CTR 90% CI"]
    rep = report(engine, "ranker", confidence=0.9)
    for row, variant in zip(cells[1:], rep["variants"]):
        assert row[0] == variant["variant"]
        assert row[4] == f"{100 * variant['ctr']:.2f}%"
        lo, hi = variant["ctr_ci"]
        assert row[5] == f"[{100 * lo:.2f}%, {100 * hi:.2f}%]"
        assert lo < variant["ctr"] < hi
    png = tmp_path / "exp.png"
    assert _run(db, "experiments", "report", "ranker", "--plot", str(png)).exit_code == 0
    assert _png_size(png.read_bytes()) == (900, 360)


def test_same_numbers_same_file_and_a_missing_matplotlib(monkeypatch, tmp_path):
    rep = {"experiment": "e", "active": True, "confidence": 0.95, "variants": [
        {"variant": "a", "users": 10, "impressions": 100, "clicks": 9, "ctr": 0.09,
         "ctr_ci": [0.05, 0.16], "exposed_users": 10, "converted_users": 2, "conversion": 0.2,
         "conversion_ci": [0.06, 0.51]}]}
    first, second = tmp_path / "a.svg", tmp_path / "b.svg"
    save_chart(experiment_chart(rep), first)
    save_chart(experiment_chart(rep), second)
    assert first.read_bytes() == second.read_bytes()  # no dates: docs images stay put
    assert chart_bytes(experiment_chart(rep)) == chart_bytes(experiment_chart(rep))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'polyrec\[plot\]'"):
        experiment_chart(rep)


# -- benchmarks/replay.py --plot --------------------------------------------------------------
def _replay_module():
    path = ROOT / "benchmarks" / "replay.py"
    spec = importlib.util.spec_from_file_location("replay_benchmark_plots", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_replay_curve_and_chart(tmp_path):
    replay = _replay_module()
    result = replay.ReplayResult(k=10, hits={"frozen": 0, "online": 0},
                                 cold_hits={"frozen": 0, "online": 0}, window=4,
                                 holdout_hits={"frozen": 0, "online": 0}, holdout_from=5)
    for n in range(10):  # online hits every other event, frozen only in the first window
        for arm, hit in (("frozen", n < 4 and n % 4 == 0), ("online", n % 2 == 0)):
            result.hits[arm] += hit
            result.holdout_hits[arm] += hit and n >= 5
            result.count(arm, hit, n)
        result.events += 1
    summary = result.as_dict()
    assert summary["curve"] == {"window": 4, "ends": [4, 8, 10],
                                "hit_rate": {"frozen": [0.25, 0.0, 0.0], "online": [0.5, 0.5, 0.5]}}
    path = save_chart(replay_chart(summary), tmp_path / "replay.html")
    text = path.read_text()
    _embedded_png(text)
    assert _cells(text)[1:] == [["frozen", "0.1000", "0.0000", "0.0000"],
                                ["online", "0.5000", "0.0000", "0.4000"]]
    out = subprocess_plot(tmp_path, summary)
    assert _png_size(out.read_bytes()) == (1000, 360)


def subprocess_plot(tmp_path: Path, summary: dict) -> Path:
    """benchmarks/replay.py --from-json stored.json --plot FILE redraws without replaying."""
    import subprocess
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps({"replay": summary}))
    out = tmp_path / "again.png"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "replay.py"), "--from-json",
                           str(stored), "--plot", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return out


def test_evaluation_chart_refuses_an_empty_report():
    with pytest.raises(ConfigError, match="no models"):
        evaluation_chart({"ks": [10], "models": [], "split": {}})
