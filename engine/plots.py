"""Pictures of results, drawn with matplotlib (the ``plot`` extra), headless.

One module for the three pictures polyrec draws: evaluation curves (``polyrec evaluate
--plot``), experiment variants with their confidence intervals (``polyrec experiments
report --plot``) and a replay's hit rate over the event stream (``benchmarks/replay.py
--plot``). Each ``*_chart`` function turns the plain dict a report already produces
into a :class:`Chart` (a figure plus the numbers it shows); :func:`save_chart` writes it
as PNG, SVG or a self-contained HTML page (the PNG embedded as a data URI and the
numbers as a table: no external URL, no script). Figures are made with matplotlib's
object API on the Agg canvas: no pyplot, no global backend switch, no display needed.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from polyrec.errors import ConfigError

#: Suffixes save_chart writes.
PLOT_SUFFIXES = (".png", ".svg", ".html")
_METADATA = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None}}
_DPI = 100


@dataclass
class Chart:
    """A figure and the numbers it shows (``columns`` and ``rows``: the HTML table)."""

    title: str
    figure: Any
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)


def check_plot_path(path: str | Path) -> Path:
    """``path`` when its suffix is one save_chart writes and its folder exists; else
    one ConfigError (checked before the work whose result is plotted)."""
    p = Path(path)
    if p.suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(f"cannot plot to '{p}': the file name must end in "
                          f"{', '.join(PLOT_SUFFIXES)}")
    if p.is_dir():
        raise ConfigError(f"{p} is a directory; give --plot a file name")
    if not p.parent.exists():
        raise ConfigError(f"cannot write {p}: the folder {p.parent} does not exist")
    return p


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (ConfigError naming the extra without it)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'polyrec[plot]'") from None
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}%"


# -- evaluation ------------------------------------------------------------------------------
def evaluation_chart(report: Mapping[str, Any]) -> Chart:
    """Recall@K and NDCG@K curves per model and coverage@K bars, from an evaluation
    report's ``as_dict()`` ({"split", "ks", "models": [{"model", "metrics"}]})."""
    ks = [int(k) for k in report["ks"]]
    models = list(report["models"])
    if not models:
        raise ConfigError("the evaluation has no models to plot")
    split = report.get("split", {})
    title = (f"{split.get('split', '?')} split, seed {split.get('seed', '?')}: "
             f"{split.get('eval_users', '?')} users, {split.get('test_interactions', '?')} "
             "held-out interactions")
    fig = _figure(11.0, 3.6)
    axes = fig.subplots(1, 3)
    for ax, metric, label in ((axes[0], "recall", "Recall@K"), (axes[1], "ndcg", "NDCG@K")):
        for row in models:
            ax.plot(ks, [row["metrics"][f"{metric}@{k}"] for k in ks], marker="o",
                    label=row["model"])
        ax.set_title(label)
        ax.set_xlabel("K")
        ax.set_xticks(ks)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    width = 0.8 / len(ks)
    for j, k in enumerate(ks):
        axes[2].bar([i + (j - (len(ks) - 1) / 2) * width for i in range(len(models))],
                    [row["metrics"][f"coverage@{k}"] for row in models], width, label=f"@{k}")
    axes[2].set_xticks(range(len(models)), [row["model"] for row in models],
                       rotation=30 if len(models) > 3 else 0, ha="right" if len(models) > 3
                       else "center")
    axes[2].set_title("Coverage@K (share of the catalogue)")
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize="small")
    axes[2].grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    columns = ["model"] + [f"{m}@{k}" for k in ks for m in ("recall", "ndcg", "coverage")]
    rows = [[row["model"]] + [f"{row['metrics'][c]:.4f}" for c in columns[1:]] for row in models]
    return Chart(f"Evaluation: {title}", fig, columns, rows)


# -- experiments ---------------------------------------------------------------------------
def experiment_chart(report: Mapping[str, Any]) -> Chart:
    """CTR and conversion per variant with their Wilson intervals as error bars, from
    ``polyrec.feedback.experiments.report`` ({"experiment", "confidence", "variants"})."""
    variants = list(report["variants"])
    if not variants:
        raise ConfigError(f"experiment '{report.get('experiment')}' has no events to plot yet")
    conf = float(report.get("confidence", 0.95))
    fig = _figure(9.0, 3.6)
    axes = fig.subplots(1, 2)
    names = [v["variant"] for v in variants]
    for ax, key, label in ((axes[0], "ctr", "CTR (clicks / impressions)"),
                           (axes[1], "conversion", "Conversion (exposed users)")):
        values = [float(v[key]) for v in variants]
        lows = [max(0.0, val - float(v[f"{key}_ci"][0])) for val, v in zip(values, variants)]
        highs = [max(0.0, float(v[f"{key}_ci"][1]) - val) for val, v in zip(values, variants)]
        ax.bar(range(len(names)), values, 0.6, yerr=[lows, highs], capsize=6,
               color=[f"C{i}" for i in range(len(names))], alpha=0.85)
        for i, (val, v) in enumerate(zip(values, variants)):
            ax.annotate(_pct(val), (i, val), textcoords="offset points", xytext=(8, 2),
                        fontsize="small")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"{label}, {conf:.0%} Wilson interval", fontsize="medium")
        ax.yaxis.set_major_formatter(lambda y, _pos: f"{100 * y:.0f}%" if y >= 0.01 or y == 0
                                     else f"{100 * y:.1f}%")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    state = "active" if report.get("active") else "stopped"
    title = f"Experiment {report.get('experiment')} ({state})"
    fig.suptitle(title, fontsize="medium")
    columns = ["variant", "users", "impressions", "clicks", "CTR", f"CTR {conf:.0%} CI",
               "conversion", f"conversion {conf:.0%} CI", "p(CTR) vs first"]
    rows = []
    for v in variants:
        p = v.get("ctr_p_value")
        rows.append([v["variant"], f"{v['users']:,}", f"{v['impressions']:,}", f"{v['clicks']:,}",
                     _pct(v["ctr"]), f"[{_pct(v['ctr_ci'][0])}, {_pct(v['ctr_ci'][1])}]",
                     _pct(v["conversion"]),
                     f"[{_pct(v['conversion_ci'][0])}, {_pct(v['conversion_ci'][1])}]",
                     "-" if p is None else f"{p:.3f}"])
    return Chart(title, fig, columns, rows)


# -- replay ----------------------------------------------------------------------------------
def replay_chart(result: Mapping[str, Any]) -> Chart:
    """A replay's HitRate@k per arm along the event stream (one point per window of
    events) and overall, from the ``replay`` part of benchmarks/replay.py's JSON
    ({"k", "events", "hit_rate", "cold_user_hit_rate", "curve": {"window", "ends",
    "hit_rate": {arm: [...]}}})."""
    k = int(result["k"])
    arms = sorted(result["hit_rate"])
    curve = result.get("curve")
    fig = _figure(10.0, 3.6)
    left, right = fig.subplots(1, 2, width_ratios=[2, 1])
    if curve and curve.get("ends"):
        for arm in arms:
            left.plot(curve["ends"], curve["hit_rate"][arm], marker=".", label=arm)
        left.set_title(f"HitRate@{k} per {int(curve['window']):,} events, in stream order",
                       fontsize="medium")
        left.set_xlabel("events replayed")
        left.set_ylim(bottom=0)
        left.grid(alpha=0.3)
        left.legend(fontsize="small")
    else:
        left.set_axis_off()
        left.text(0.5, 0.5, "no per-window curve in this result", ha="center", va="center")
    groups = [("all events", "hit_rate"), ("new users", "cold_user_hit_rate")]
    if any(v is not None for v in (result.get("holdout_hit_rate") or {}).values()):
        groups.append((f"from #{int(result.get('holdout_from', 0)):,}", "holdout_hit_rate"))
    width = 0.8 / len(arms)
    for j, arm in enumerate(arms):
        values = [float(result[key].get(arm) or 0.0) for _, key in groups]
        right.bar([i + (j - (len(arms) - 1) / 2) * width for i in range(len(groups))], values,
                  width, label=arm, color=f"C{j}")
    right.set_xticks(range(len(groups)), [g for g, _ in groups])
    right.set_title(f"HitRate@{k} overall", fontsize="medium")
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize="small")
    title = f"Replay: {int(result['events']):,} events streamed through Engine.feedback"
    fig.suptitle(title, fontsize="medium")
    columns = ["arm"] + [g for g, _ in groups]
    rows = [[arm] + [_fmt(result[key].get(arm)) for _, key in groups] for arm in arms]
    return Chart(title, fig, columns, rows)


def _fmt(value: Any) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{float(value):.4f}"


# -- writing -------------------------------------------------------------------------------
def chart_bytes(chart: Chart, fmt: str = "png") -> bytes:
    """The chart's figure as PNG or SVG bytes (no timestamp or version metadata, so
    the same numbers give the same file)."""
    import matplotlib
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "polyrec"}):  # SVG ids: not random
        chart.figure.savefig(buf, format=fmt, dpi=_DPI, metadata=_METADATA.get(fmt))
    return buf.getvalue()


def chart_html(chart: Chart) -> str:
    """A self-contained HTML page: the title, the figure as an embedded PNG and the
    numbers as a table."""
    png = base64.b64encode(chart_bytes(chart, "png")).decode("ascii")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in chart.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in chart.rows)
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" if chart.rows else ""
    title = html.escape(chart.title)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>body{{font-family:sans-serif;margin:1.5em}}"
            "table{border-collapse:collapse;margin-top:1em}td,th{border:1px solid #ccc;"
            "padding:.25em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
            "img{max-width:100%}</style></head><body>"
            f"<h1 style=\"font-size:1.2em\">{title}</h1>"
            f"<img alt=\"{title}\" src=\"data:image/png;base64,{png}\">{table}</body></html>\n")


def save_chart(chart: Chart, path: str | Path) -> Path:
    """Write ``chart`` to ``path`` by its suffix (.png, .svg, .html), atomically (a
    temporary file beside it, then renamed). Returns the path."""
    p = check_plot_path(path)
    suffix = p.suffix.lower()
    data = (chart_html(chart).encode("utf-8") if suffix == ".html"
            else chart_bytes(chart, suffix[1:]))
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as fh:  # the usual permissions (mkstemp's are 0600)
            fh.write(data)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p

