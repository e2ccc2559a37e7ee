"""The run report's SVG charts: ticks cover the data, and every mark lies inside the plot."""

from __future__ import annotations

import itertools
import math
import re

from hypothesis import given
from hypothesis import strategies as st

from loraforge.training import report_svg
from loraforge.training.report_svg import Series, bar_chart, line_chart, nice_ticks, thin

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(finite, finite)
def test_ticks_cover_the_range_in_round_steps(a: float, b: float) -> None:
    low, high = min(a, b), max(a, b)
    ticks = nice_ticks(low, high)
    assert 2 <= len(ticks) <= 12
    steps = [b - a for a, b in itertools.pairwise(ticks)]
    # covered, up to a float error far below a pixel
    assert ticks[0] <= low + 1e-6 * steps[0] and ticks[-1] >= high - 1e-6 * steps[0]
    scale = max(abs(ticks[0]), abs(ticks[-1]))
    assert all(math.isclose(s, steps[0], rel_tol=1e-6, abs_tol=1e-9 * scale) for s in steps)
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 5, 10))


def _numbers(svg: str, tag: str, attributes: tuple[str, ...]) -> list[tuple[float, ...]]:
    found = []
    for element in re.findall(rf"<{tag} [^>]*>", svg):
        values = dict(re.findall(r'(\w+)="([^"]*)"', element))
        found.append(tuple(float(values[a]) for a in attributes))
    return found


def _inside(x: float, y: float) -> bool:
    right = report_svg.WIDTH - report_svg._RIGHT
    bottom = report_svg.HEIGHT - report_svg._BOTTOM
    return (
        report_svg._LEFT - 0.05 <= x <= right + 0.05
        and report_svg._TOP - 0.05 <= y <= bottom + 0.05
    )


values = st.one_of(st.none(), st.floats(min_value=-50, max_value=50, allow_nan=False))


@given(st.lists(values, min_size=1, max_size=40), st.lists(values, min_size=1, max_size=40))
def test_every_point_of_a_line_chart_lies_in_the_plot(first, second) -> None:
    svg = line_chart(
        "t",
        [
            Series("a", list(enumerate(first)), "#111111"),
            Series("b", [(i * 0.5, y) for i, y in enumerate(second)], "#222222", markers=True),
        ],
    )
    for points in re.findall(r'<polyline points="([^"]+)"', svg):
        for pair in points.split():
            x, y = (float(v) for v in pair.split(","))
            assert _inside(x, y), (x, y)
    for x, y in _numbers(svg, "circle", ("cx", "cy")):
        assert _inside(x, y), (x, y)
    drawn = sum(y is not None for y in first + second)
    assert (svg.count("no data") == 1) == (drawn == 0)


def test_a_line_breaks_at_gaps_and_bars_scale_to_their_values() -> None:
    svg = line_chart("t", [Series("a", [(1, 1.0), (2, 2.0), (3, None), (4, 1.0), (5, 3.0)], "#1")])
    assert svg.count("<polyline") == 2
    bars = bar_chart("b", ["x", "y"], [("n", "#123456", [3.0, 6.0])])
    heights = [float(h) for h in re.findall(r'height="([\d.]+)" fill="#123456"><title>', bars)]
    plot = report_svg.HEIGHT - report_svg._TOP - report_svg._BOTTOM
    assert heights == [plot / 2, plot]  # the axis ends at the tick 6


def test_a_long_series_is_thinned_keeping_its_extremes() -> None:
    import random

    rng = random.Random(0)
    points = [(float(i), rng.uniform(0, 1)) for i in range(20_000)]
    points[12_345] = (12_345.0, 9.0)  # a spike
    points[7_000] = (7_000.0, None)  # a gap
    kept = thin(points)
    assert len(kept) <= report_svg.MAX_POINTS + 2
    assert (12_345.0, 9.0) in kept and min(p[1] for p in kept if p[1] is not None) == min(
        p[1] for p in points if p[1] is not None
    )
    assert [x for x, _ in kept] == sorted(x for x, _ in kept)
    assert any(y is None for _, y in kept)
    svg = line_chart("t", [Series("a", points, "#111111")])
    assert sum(len(p.split()) for p in re.findall(r'points="([^"]+)"', svg)) <= len(kept)
