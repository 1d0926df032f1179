"""Charts as inline SVG, drawn in Python: no JavaScript library, nothing to fetch.

Each function returns markup to put into a page as is (``markupsafe.Markup``); every text
in it is escaped. Colours come from CSS classes (``s0``..``s5``, static/admin.css) so the
charts follow the page's style; each mark has a ``<title>`` (the browser's tooltip).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from markupsafe import Markup, escape

#: how many series colours admin.css defines (s0..s5)
COLOURS = 6


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _nice_max(value: float) -> float:
    """A round number >= value for the top of an axis (1, 2, 2.5, 5 x 10^n)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    return next(step * magnitude for step in (1, 2, 2.5, 5, 10) if step * magnitude >= value)


def _svg(width: int, height: int, label: str, body: list[str]) -> Markup:
    return Markup(f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
                  f'height="{height}" role="img" aria-label="{escape(label)}">'
                  + "".join(body) + "</svg>")


def empty(label: str, message: str = "no data yet", width: int = 640, height: int = 60) -> Markup:
    """A chart-sized box saying there is nothing to draw."""
    return _svg(width, height, label, [
        f'<text class="muted" x="{width / 2}" y="{height / 2 + 4}" text-anchor="middle">'
        f"{escape(message)}</text>"])


def bars(points: Sequence[tuple[str, float]], *, label: str, width: int = 720,
         height: int = 200, unit: str = "") -> Markup:
    """A bar per point (e.g. interactions per day), labels of the first, middle and last."""
    if not points:
        return empty(label, width=width)
    left, right, top, bottom = 56, 10, 10, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = _nice_max(max(v for _, v in points))
    step = plot_w / len(points)
    body = _y_axis(left, top, plot_w, plot_h, top_value, lambda v: f"{v:,.0f}")
    for i, (name, value) in enumerate(points):
        h = plot_h * value / top_value
        x = left + i * step
        body.append(f'<rect class="bar s0" x="{_num(x)}" y="{_num(top + plot_h - h)}" '
                    f'width="{_num(max(step - (1 if step > 3 else 0), 0.5))}" height="{_num(h)}">'
                    f"<title>{escape(name)}: {value:,.0f}{escape(unit)}</title></rect>")
    for i in sorted({0, len(points) // 2, len(points) - 1}):
        anchor = "start" if i == 0 else "end" if i == len(points) - 1 else "middle"
        x = left + i * step + (0 if anchor == "start" else step if anchor == "end" else step / 2)
        body.append(f'<text class="axis" x="{_num(x)}" y="{height - 8}" text-anchor="{anchor}">'
                    f"{escape(points[i][0])}</text>")
    return _svg(width, height, label, body)


def _y_axis(left: float, top: float, plot_w: float, plot_h: float, top_value: float,
            fmt: Callable[[float], str], ticks: int = 4) -> list[str]:
    out = []
    for t in range(ticks + 1):
        value = top_value * t / ticks
        y = top + plot_h - plot_h * t / ticks
        out.append(f'<line class="grid" x1="{left}" x2="{_num(left + plot_w)}" y1="{_num(y)}" '
                   f'y2="{_num(y)}"/>')
        out.append(f'<text class="axis" x="{left - 6}" y="{_num(y + 4)}" text-anchor="end">'
                   f"{escape(fmt(value))}</text>")
    return out


def lines(x_labels: Sequence[str], series: dict[str, Sequence[float | None]], *, label: str,
          width: int = 720, height: int = 220, fmt: Callable[[float], str] = "{:.3f}".format
          ) -> Markup:
    """One line per series over the same x positions (e.g. a metric per model version);
    a None value leaves a gap. The legend is under the plot."""
    values = [v for vs in series.values() for v in vs if v is not None]
    if not x_labels or not values:
        return empty(label, width=width)
    legend_rows = (len(series) + 3) // 4
    left, right, top, bottom = 56, 16, 10, 30 + 18 * legend_rows
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = _nice_max(max(values))
    body = _y_axis(left, top, plot_w, plot_h, top_value, fmt)
    n = len(x_labels)
    xs = [left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2) for i in range(n)]
    for i, name in enumerate(x_labels):
        body.append(f'<text class="axis" x="{_num(xs[i])}" y="{top + plot_h + 18}" '
                    f'text-anchor="middle">{escape(name)}</text>')
    for k, (name, vs) in enumerate(series.items()):
        cls = f"s{k % COLOURS}"
        points = [(xs[i], top + plot_h - plot_h * v / top_value, v) for i, v in enumerate(vs)
                  if v is not None]
        if len(points) > 1:
            path = " ".join(f"{_num(x)},{_num(y)}" for x, y, _ in points)
            body.append(f'<polyline class="line {cls}" points="{path}"/>')
        for (x, y, v), xl in zip(points, [x_labels[i] for i, v in enumerate(vs) if v is not None]):
            body.append(f'<circle class="dot {cls}" cx="{_num(x)}" cy="{_num(y)}" r="3.5">'
                        f"<title>{escape(name)} at {escape(xl)}: {escape(fmt(v))}</title></circle>")
        lx = left + (k % 4) * (plot_w / 4)
        ly = top + plot_h + 36 + 18 * (k // 4)
        body.append(f'<rect class="bar {cls}" x="{_num(lx)}" y="{ly - 9}" width="12" height="10"/>'
                    f'<text class="legend" x="{_num(lx + 16)}" y="{ly}">{escape(name)}</text>')
    return _svg(width, height, label, body)


def intervals(rows: Sequence[tuple[str, float, float, float]], *, label: str, width: int = 640,
              fmt: Callable[[float], str] = "{:.1%}".format) -> Markup:
    """Horizontal confidence intervals, one row per (name, value, low, high): a line from
    low to high with a dot at the value (e.g. the CTR of each variant, Wilson interval)."""
    if not rows:
        return empty(label, width=width)
    left, right, top, row_h = 130, 70, 8, 26
    height = top + row_h * len(rows) + 26
    plot_w = width - left - right
    top_value = _nice_max(max(max(hi, v) for _, v, _, hi in rows))
    x = lambda v: left + plot_w * v / top_value  # noqa: E731
    body = []
    for t in range(5):
        v = top_value * t / 4
        body.append(f'<line class="grid" x1="{_num(x(v))}" x2="{_num(x(v))}" y1="{top}" '
                    f'y2="{top + row_h * len(rows)}"/>'
                    f'<text class="axis" x="{_num(x(v))}" y="{height - 8}" text-anchor="middle">'
                    f"{escape(fmt(v))}</text>")
    for i, (name, value, lo, hi) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        cls = f"s{i % COLOURS}"
        tip = f"{name}: {fmt(value)} [{fmt(lo)}, {fmt(hi)}]"
        body.append(f'<text class="legend" x="{left - 8}" y="{_num(y + 4)}" text-anchor="end">'
                    f"{escape(name)}</text>"
                    f'<g><title>{escape(tip)}</title>'
                    f'<line class="whisker {cls}" x1="{_num(x(lo))}" x2="{_num(x(hi))}" '
                    f'y1="{_num(y)}" y2="{_num(y)}"/>'
                    f'<line class="whisker {cls}" x1="{_num(x(lo))}" x2="{_num(x(lo))}" '
                    f'y1="{_num(y - 6)}" y2="{_num(y + 6)}"/>'
                    f'<line class="whisker {cls}" x1="{_num(x(hi))}" x2="{_num(x(hi))}" '
                    f'y1="{_num(y - 6)}" y2="{_num(y + 6)}"/>'
                    f'<circle class="dot {cls}" cx="{_num(x(value))}" cy="{_num(y)}" r="4.5"/>'
                    f"</g>"
                    f'<text class="legend" x="{width - right + 6}" y="{_num(y + 4)}">'
                    f"{escape(fmt(value))}</text>")
    return _svg(width, height, label, body)


def meter(parts: Sequence[tuple[str, float]], *, label: str, width: int = 180,
          height: int = 14) -> Markup:
    """One stacked bar of shares (e.g. an item's modality weights), each part titled."""
    total = sum(max(v, 0.0) for _, v in parts) or 1.0
    body, x = [], 0.0
    for i, (name, value) in enumerate(parts):
        w = width * max(value, 0.0) / total
        body.append(f'<rect class="bar s{i % COLOURS}" x="{_num(x)}" y="0" width="{_num(w)}" '
                    f'height="{height}"><title>{escape(name)}: {value:.0%}</title></rect>')
        x += w
    return _svg(width, height, label, body)
