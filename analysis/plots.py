"""Plots of a run's tables. matplotlib is optional: it is imported only when a plot is drawn.

Figures are built with `matplotlib.figure.Figure` directly, so drawing a plot changes no
global matplotlib state (backend, current figure) and opens no window.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def plot_scaling_curve(curve: pd.DataFrame, path: Path | str, title: str = "") -> Path:
    """Accuracy against the iteration budget k (`accuracy_by_iteration`), one line per method."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib, which is not a dependency: pip install matplotlib"
        ) from exc
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for method, g in curve.groupby("method", sort=False):
        ax.plot(g["iteration"], g["accuracy"], marker="o", label=str(method))
    ax.set_xlabel("latent iterations k")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# ------------------------------------------------------------------------------------------
# Figures of a report (analysis.report): several panels, one line or box per series.

_MARKERS = "osD^vP*Xph<>"


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plots need matplotlib, which is not a dependency: pip install matplotlib"
        ) from exc
    return Figure


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: Path | str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _log_x(ax) -> None:
    """Log x axis labelled in engineering notation (2k, 50M); 2x and 5x ticks labelled too
    when the axis spans less than two decades."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    low, high = ax.get_xlim()
    if low > 0 and high / low < 100:
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(EngFormatter(sep=""))
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())


def plot_lines(
    data: pd.DataFrame,
    path: Path | str,
    *,
    y: str,
    ylabel: str,
    xs: list[tuple[str, str]],
    series: str,
    title: str,
    facet: str | None = None,
    logx: bool = False,
    ylim: tuple[float, float] | None = None,
    integer_x: bool = False,
) -> Path:
    """One panel per (facet value, x column in `xs`), one line per `series` value.

    `xs` holds (column, axis label) pairs; a series keeps its colour and marker in every
    panel and appears once in the legend (below the panels). A series with one point is
    drawn as a large marker on top of the lines.
    """
    Figure = _figure_class()
    from matplotlib.ticker import MaxNLocator

    facets = list(dict.fromkeys(data[facet])) if facet else [None]
    names = list(dict.fromkeys(data[series]))
    style = {
        name: (color, _MARKERS[i % len(_MARKERS)])
        for i, (name, color) in enumerate(zip(names, _colors(len(names)), strict=True))
    }
    panels = [(value, x, xlabel) for value in facets for x, xlabel in xs]
    # Several x columns: one row per facet. One x column: facets two to a row.
    ncols = len(xs) if len(xs) > 1 else min(2, len(facets))
    nrows = -(-len(panels) // ncols)
    legend_cols, legend_width = _legend_layout([str(n) for n in names], 5.4 * ncols)
    fig = Figure(
        figsize=(
            max(7.0, 5.4 * ncols, legend_width + 0.4),
            3.6 * nrows + 1.0 + 0.22 * -(-len(names) // legend_cols),
        ),
        layout="constrained",
    )
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = {}
    for ax, (value, x, xlabel) in zip(axes, panels):
        part = data if facet is None else data[data[facet] == value]
        for name, g in part.groupby(series, sort=False):
            g = g.dropna(subset=[x, y]).sort_values(x)
            color, marker = style[name]
            single = len(g) == 1
            (line,) = ax.plot(
                g[x], g[y], marker=marker, color=color, label=str(name),
                markersize=11 if single else 6, zorder=4 if single else 2,
                markeredgecolor="black" if single else color,
            )  # fmt: skip
            handles.setdefault(name, line)
        if logx:
            _log_x(ax)
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both" if logx else "major")
        if value is not None:
            ax.set_title(str(value), fontsize=10)
    fig.suptitle(title)
    if handles:
        fig.legend(
            list(handles.values()), [str(n) for n in handles], loc="outside lower center",
            ncols=legend_cols, fontsize=9, title=series_title(series),
        )  # fmt: skip
    return _save(fig, path)


def _legend_layout(labels: list[str], width: float) -> tuple[int, float]:
    """(columns, inches) of a legend in 9 pt text: two columns if they fit in `width`."""
    column = 0.07 * max((len(t) for t in labels), default=0) + 0.8  # text + handle, inches
    cols = 2 if len(labels) > 1 and 2 * column <= width else 1
    return cols, cols * column


def series_title(column: str) -> str:
    """Legend title of a series column: its name with spaces."""
    return column.replace("_", " ")


def plot_boxes(
    data: pd.DataFrame,
    path: Path | str,
    *,
    group: str,
    xs: list[tuple[str, str]],
    title: str,
    facet: str | None = None,
    integer_x: Sequence[str] = (),
) -> Path:
    """Horizontal box plots, one box per `group` value, one panel per (facet, x column).

    Boxes span the quartiles, whiskers 1.5 x IQR, dots are outliers, triangles the means.
    Columns in `integer_x` get integer ticks.
    """
    Figure = _figure_class()
    from matplotlib.ticker import MaxNLocator

    facets = list(dict.fromkeys(data[facet])) if facet else [None]
    heights = [max(1, data[data[facet] == f][group].nunique() if facet else data[group].nunique())
               for f in facets]  # fmt: skip
    fig = Figure(
        figsize=(4.6 * len(xs) + 3.0, 0.45 * sum(heights) + 1.2 * len(facets) + 0.6),
        layout="constrained",
    )
    axes = fig.subplots(len(facets), len(xs), squeeze=False, gridspec_kw={"height_ratios": heights})
    for row, value in enumerate(facets):
        part = data if facet is None else data[data[facet] == value]
        names = list(dict.fromkeys(part[group]))
        for col, (x, xlabel) in enumerate(xs):
            ax = axes[row][col]
            values = [part.loc[part[group] == n, x].dropna().to_numpy(float) for n in names]
            kept = [(n, v) for n, v in zip(names, values, strict=True) if v.size]
            if kept:
                positions = list(range(1, len(kept) + 1))
                try:
                    ax.boxplot([v for _, v in kept], positions=positions, widths=0.6,
                               orientation="horizontal", showmeans=True)  # fmt: skip
                except TypeError:  # matplotlib < 3.10
                    ax.boxplot([v for _, v in kept], positions=positions, widths=0.6,
                               vert=False, showmeans=True)  # fmt: skip
                ax.set_yticks(positions, [str(n) for n, _ in kept] if col == 0 else [])
                ax.invert_yaxis()  # first group on top
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
                ax.set_yticks([])
            if x in integer_x:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3, axis="x")
            if value is not None:
                ax.set_title(str(value), fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)
