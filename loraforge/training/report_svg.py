"""Inline SVG charts for the run report: line charts (loss, learning rates, gradient norm) and
grouped bar charts (buckets, VRAM), drawn here so the page needs no script and no network.

Each function returns one ``<svg>`` element as text. Gaps (``None`` values) break a line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 560, 270
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 34, 44
_AXIS = "#555555"
_GRID = "#e6e6e6"
_FONT = 'font-family="system-ui, sans-serif" font-size="11"'


@dataclass(frozen=True)
class Series:
    """One line of a line chart.

    Attributes:
        label: the legend text.
        points: ``(x, y)`` pairs in x order; ``y = None`` breaks the line.
        color: the stroke colour (``#rrggbb``).
        width: stroke width in pixels.
        markers: draw a dot at every point (sparse series such as validation loss).
    """

    label: str
    points: Sequence[tuple[float, float | None]]
    color: str
    width: float = 1.5
    markers: bool = False


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering
    ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    if not raw > 1e-300:  # a span below float resolution (denormals): one unit around it
        return [float(math.floor(low)), float(math.floor(low)) + 1.0]
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step + 1e-9)  # the tolerance absorbs float division error
    last = math.ceil(high / step - 1e-9)
    return [i * step for i in range(first, max(last, first + 1) + 1)]


def tick_label(value: float) -> str:
    """Short text for a tick: ``0.02``, ``1.5e-04``, ``1200``."""
    if value == 0:
        return "0"
    if abs(value) < 1e-2 or abs(value) >= 1e5:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _svg_open(title: str, width: int, height: int) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" {_FONT} font-size="13" '
        f'font-weight="600">{escape(title)}</text>',
    ]


def _legend(items: Sequence[tuple[str, str]], width: int) -> list[str]:
    parts, x = [], _LEFT
    for label, color in items:
        parts.append(f'<rect x="{x}" y="{HEIGHT - 14}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 14}" y="{HEIGHT - 5}" {_FONT}>{escape(label)}</text>')
        x += 24 + 7 * len(label)
        if x > width - 60:
            break
    return parts


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_label: str = "step",
    y_label: str = "",
    from_zero: bool = False,
) -> str:
    """A line chart of ``series`` on shared axes: the y range covers every finite value (and 0
    with ``from_zero``)."""
    xs = [x for s in series for x, y in s.points if y is not None]
    ys = [y for s in series for _, y in s.points if y is not None and math.isfinite(y)]
    parts = _svg_open(title, WIDTH, HEIGHT)
    if not ys:
        parts.append(
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" {_FONT}>no data</text>'
        )
        return "\n".join([*parts, "</svg>"])
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min([*ys, 0.0]) if from_zero else min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w

    def py(y: float) -> float:
        return _TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    for t in y_ticks:
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
            f'stroke="{_GRID}"/>'
        )
        parts.append(
            f'<text x="{_LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end" {_FONT}>'
            f"{tick_label(t)}</text>"
        )
    for t in x_ticks:
        parts.append(
            f'<text x="{px(t):.1f}" y="{_TOP + plot_h + 15}" text-anchor="middle" {_FONT}>'
            f"{tick_label(t)}</text>"
        )
    parts.append(
        f'<path d="M{_LEFT},{_TOP} V{_TOP + plot_h} H{_LEFT + plot_w}" fill="none" '
        f'stroke="{_AXIS}"/>'
    )
    parts.append(
        f'<text x="{_LEFT + plot_w}" y="{_TOP + plot_h + 28}" text-anchor="end" {_FONT}>'
        f"{escape(x_label)}</text>"
    )
    if y_label:
        parts.append(f'<text x="6" y="{_TOP - 8}" {_FONT}>{escape(y_label)}</text>')
    for s in series:
        parts += _series_marks(s, px, py)
    parts += _legend([(s.label, s.color) for s in series], WIDTH)
    return "\n".join([*parts, "</svg>"])


MAX_POINTS = 2000  # per series: a long run's line keeps its envelope, not every step


def thin(
    points: Sequence[tuple[float, float | None]], limit: int = MAX_POINTS
) -> list[tuple[float, float | None]]:
    """``points`` cut to about ``limit``: the lowest and highest point of each of ``limit / 2``
    consecutive slices, in x order (spikes survive); gaps are kept."""
    if len(points) <= limit:
        return list(points)
    size = -(-len(points) // (limit // 2))
    kept: list[tuple[float, float | None]] = []
    for start in range(0, len(points), size):
        chunk = points[start : start + size]
        known = [(x, y) for x, y in chunk if y is not None and math.isfinite(y)]
        if len(known) < len(chunk):
            kept.append((chunk[0][0], None))  # a gap in the slice breaks the line
        if known:
            low = min(known, key=lambda p: p[1])
            high = max(known, key=lambda p: p[1])
            kept += sorted({low, high})
    return kept


def _series_marks(
    s: Series, px: Callable[[float], float], py: Callable[[float], float]
) -> list[str]:
    """The polylines (split at gaps) and markers of one series, in pixels."""
    marks, run = [], []
    for x, y in [*thin(s.points), (math.nan, None)]:  # the sentinel ends the last run
        if y is not None and math.isfinite(y):
            run.append(f"{px(x):.1f},{py(y):.1f}")
            continue
        if len(run) > 1:
            marks.append(
                f'<polyline points="{" ".join(run)}" fill="none" stroke="{s.color}" '
                f'stroke-width="{s.width}" stroke-linejoin="round"/>'
            )
        if s.markers or len(run) == 1:
            marks += [
                f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="3" fill="{s.color}"/>'
                for p in run
            ]
        run = []
    return marks


def bar_chart(
    title: str,
    labels: Sequence[str],
    groups: Sequence[tuple[str, str, Sequence[float]]],
) -> str:
    """Bars per label: ``groups`` are ``(legend, colour, values)``, drawn over each other in
    order (the first, largest behind)."""
    values = [v for _, _, vs in groups for v in vs]
    parts = _svg_open(title, WIDTH, HEIGHT)
    if not labels or not values:
        parts.append(
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" {_FONT}>no data</text>'
        )
        return "\n".join([*parts, "</svg>"])
    y_ticks = nice_ticks(0.0, max(values))
    top = y_ticks[-1] or 1
    bottom = _BOTTOM + (28 if len(labels) > 6 else 0)  # room for slanted labels
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - bottom
    slot = plot_w / len(labels)
    for t in y_ticks:
        y = _TOP + plot_h - t / top * plot_h
        parts.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{_GRID}"/>'
        )
        parts.append(
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" {_FONT}>'
            f"{tick_label(t)}</text>"
        )
    bar_w = slot * 0.7
    for index, label in enumerate(labels):
        x = _LEFT + index * slot + slot * 0.15
        for _, color, vs in groups:
            h = vs[index] / top * plot_h
            parts.append(
                f'<rect x="{x:.1f}" y="{_TOP + plot_h - h:.1f}" width="{bar_w:.1f}" '
                f'height="{h:.1f}" fill="{color}"><title>{escape(label)}: {vs[index]:g}</title>'
                "</rect>"
            )
        cx, cy = _LEFT + (index + 0.5) * slot, _TOP + plot_h + 14
        turn = f' transform="rotate(-40 {cx:.1f} {cy})"' if len(labels) > 6 else ""
        anchor = "end" if len(labels) > 6 else "middle"
        parts.append(
            f'<text x="{cx:.1f}" y="{cy}" text-anchor="{anchor}"{turn} {_FONT}>'
            f"{escape(label)}</text>"
        )
    parts.append(
        f'<path d="M{_LEFT},{_TOP} V{_TOP + plot_h} H{_LEFT + plot_w}" fill="none" '
        f'stroke="{_AXIS}"/>'
    )
    parts += _legend([(name, color) for name, color, _ in groups], WIDTH)
    return "\n".join([*parts, "</svg>"])
