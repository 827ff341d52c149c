"""Plots of a run's tables. matplotlib is optional: it is imported only when a plot is drawn.

Figures are built with `matplotlib.figure.Figure` directly, so drawing a plot changes no
global matplotlib state (backend, current figure) and opens no window.
"""

from __future__ import annotations

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
