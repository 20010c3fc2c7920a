"""Metric series drawn in the terminal with plotext (``anylearn tasks metrics``)."""

from __future__ import annotations

from collections.abc import Iterable

from anylearn_sdk.wire import MetricSeries

#: Rows of one chart.
CHART_HEIGHT = 14


def chart(series: MetricSeries, width: int, *, color: bool) -> str:
    """One series as a line chart ``width`` cells wide, steps along x, its key as the title
    (with its last, min and max); plain text unless ``color``."""
    import plotext

    figure = plotext.figure
    figure.clear()
    figure.plot_size(max(30, width), CHART_HEIGHT)
    figure.title(
        f"{series.key}: last {series.last:.6g}, min {series.min:.6g}, max {series.max:.6g}"
        if series.values
        else f"{series.key}: no points yet"
    )
    figure.label("step", axis="x")
    if series.values:
        points = figure.signal(series.steps, series.values)
        figure.draw(points.lines() if len(series.values) > 1 else points)
    return figure.build().string(colorless=not color)


def charts(series: Iterable[MetricSeries], width: int, *, color: bool) -> str:
    """Each series' :func:`chart`, one under the other."""
    return "\n".join(chart(s, width, color=color) for s in series)
