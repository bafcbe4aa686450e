"""Charts as inline SVG, drawn on the server: line charts (training curves) and interval plots (CIs).

Every piece of text that goes into the SVG is escaped here; numbers are formatted, never interpolated raw.
The output is `markupsafe.Markup`, so templates insert it as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from markupsafe import Markup, escape

from core.formatting import pct

COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]  # (x, y), x ascending
    colour: str = COLOURS[0]
    markers: bool = False


@dataclass
class Interval:
    label: str
    value: float
    ci: Sequence[float] | None = None
    colour: str = COLOURS[0]


@dataclass
class _Frame:
    """Plot area inside an SVG canvas, mapping data to pixels."""
    width: int
    height: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    left: int = 48
    right: int = 12
    top: int = 12
    bottom: int = 34
    parts: list[str] = field(default_factory=list)

    def x(self, v: float) -> float:
        lo, hi = self.x_range
        return self.left + (v - lo) / ((hi - lo) or 1.0) * (self.width - self.left - self.right)

    def y(self, v: float) -> float:
        lo, hi = self.y_range
        return self.height - self.bottom - (v - lo) / ((hi - lo) or 1.0) * (self.height - self.top - self.bottom)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values between lo and hi."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


def _svg(frame: _Frame, label: str) -> Markup:
    return Markup(f'<svg class="chart" role="img" aria-label="{escape(label)}" viewBox="0 0 {frame.width} '
                  f'{frame.height}" width="{frame.width}" height="{frame.height}">' + "".join(frame.parts) + "</svg>")


def _axes(f: _Frame, x_label: str, y_label: str, y_fmt=_fmt) -> None:
    for t in _ticks(*f.y_range):
        y = f.y(t)
        f.parts.append(f'<line class="grid" x1="{f.left}" x2="{f.width - f.right}" y1="{y:.1f}" y2="{y:.1f}"/>'
                       f'<text class="tick" x="{f.left - 4}" y="{y + 3:.1f}" text-anchor="end">'
                       f'{escape(y_fmt(t))}</text>')
    for t in _ticks(*f.x_range, n=6):
        x = f.x(t)
        f.parts.append(f'<text class="tick" x="{x:.1f}" y="{f.height - f.bottom + 13}" text-anchor="middle">'
                       f'{escape(_fmt(t))}</text>')
    f.parts.append(f'<line class="axis" x1="{f.left}" x2="{f.width - f.right}" y1="{f.height - f.bottom}" '
                   f'y2="{f.height - f.bottom}"/><line class="axis" x1="{f.left}" x2="{f.left}" y1="{f.top}" '
                   f'y2="{f.height - f.bottom}"/>')
    f.parts.append(f'<text class="label" x="{(f.left + f.width - f.right) / 2:.0f}" y="{f.height - 4}" '
                   f'text-anchor="middle">{escape(x_label)}</text>')
    f.parts.append(f'<text class="label" transform="translate(11 {(f.top + f.height - f.bottom) / 2:.0f}) '
                   f'rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')


def line_chart(series: Sequence[Series], *, x_label: str, y_label: str, title: str,
               y_range: tuple[float, float] | None = None, width: int = 520, height: int = 220) -> Markup | None:
    """A line chart of one or more series, with a legend; None when no series has a point."""
    series = [s for s in series if s.points]
    if not series:
        return None
    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points]
    if y_range is None:
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
        y_range = (max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)  # losses and rates stay >= 0
    f = _Frame(width, height, (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1), y_range)
    _axes(f, x_label, y_label)
    for s in series:
        pts = " ".join(f"{f.x(x):.1f},{f.y(y):.1f}" for x, y in s.points)
        f.parts.append(f'<polyline class="series" data-series="{escape(s.name)}" fill="none" stroke="{s.colour}" '
                       f'stroke-width="1.6" points="{pts}"/>')
        if s.markers or len(s.points) == 1:
            f.parts.extend(f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="2.8" fill="{s.colour}"/>'
                           for x, y in s.points)
    for i, s in enumerate(series):  # legend, top right
        y = f.top + 4 + i * 14
        x = f.width - f.right - 150
        f.parts.append(f'<rect x="{x}" y="{y}" width="10" height="3" fill="{s.colour}"/>'
                       f'<text class="legend" x="{x + 14}" y="{y + 5}">{escape(s.name)}</text>')
    return _svg(f, title)


def interval_chart(rows: Sequence[Interval], *, title: str, lo: float = 0.0, hi: float = 1.0,
                   width: int = 520) -> Markup | None:
    """Points with their 95% intervals, one row each, on a shared 0-100% axis; None when empty."""
    if not rows:
        return None
    row_h, left = 24, 190
    height = 30 + row_h * len(rows)
    f = _Frame(width, height, (lo, hi), (0, 1), left=left, top=6, bottom=24)
    for t in _ticks(lo, hi):
        x = f.x(t)
        f.parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}" y2="{height - f.bottom}"/>'
                       f'<text class="tick" x="{x:.1f}" y="{height - 8}" text-anchor="middle">'
                       f'{pct(t, digits=0)}</text>')
    for i, r in enumerate(rows):
        y = f.top + row_h * i + row_h / 2
        f.parts.append(f'<text class="label" x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(r.label)}</text>')
        if r.ci:
            f.parts.append(f'<line stroke="{r.colour}" stroke-width="2" x1="{f.x(r.ci[0]):.1f}" '
                           f'x2="{f.x(r.ci[1]):.1f}" y1="{y:.1f}" y2="{y:.1f}"/>')
        f.parts.append(f'<circle cx="{f.x(r.value):.1f}" cy="{y:.1f}" r="4" fill="{r.colour}"/>')
    return _svg(f, title)
