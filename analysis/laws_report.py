"""The scaling laws of `analysis.laws` as the report shows them: the "Scaling laws" section in
markdown, the MLflow metrics and params of a sweep's run, the figures (laws.png, frontier.png;
matplotlib imported when drawn), and `write_laws`, which fits and writes them all (laws.csv,
law_points.csv, forecasts.csv, frontier.csv).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.laws import (
    BETA,
    LAWS,
    MIN_PROBLEMS,
    POWER,
    RESAMPLES,
    SATURATING,
    Forecast,
    Law,
    Laws,
    fit_laws,
)
from analysis.records import Records, short_model

# Markdown and MLflow


def _f(v: float, digits: int = 1) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _g(v: float) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3g}"


def laws_markdown(result: Laws, laws_png: str | None, frontier_png: str | None) -> str:
    """The report's "Scaling laws" section (without its heading): the forecasts, the laws, the
    compute-optimal frontier."""
    return (
        _forecasts_markdown(result)
        + (f"![scaling laws]({laws_png})\n\n" if laws_png else "")
        + _laws_table_markdown(result)
        + "### The compute-optimal frontier\n\n"
        + (f"![compute-optimal frontier]({frontier_png})\n\n" if frontier_png else "")
        + _frontier_markdown(result)
    )


def _forecasts_markdown(result: Laws) -> str:
    """The forecast error in one sentence, then a row per forecast."""
    from analysis.tables import markdown

    parts = []
    fc = [f for f in result.forecasts if not f.refused]
    if fc:
        errors = np.array([abs(f.error) for f in fc])
        inside = sum(f.within for f in fc)
        parts.append(
            f"**Forecast error** (each law fitted on the budgets <= half the largest, "
            f"predicting the largest): median |predicted - observed| = "
            f"**{np.median(errors):.1f} points** over {len(fc)} forecasts (max "
            f"{errors.max():.1f}); {inside} of {len(fc)} observed values lie inside the "
            f"forecast's 95% interval.\n\n"
        )
    else:
        parts.append("**Forecast error**: no forecast could be made (see the refusals).\n\n")
    rows = [
        {"configuration": f.label, "dataset": f.dataset, "law": f.law,
         "fitted on <=": _g(f.cut), "target": _g(f.target),
         "predicted (%)": f"{_f(f.predicted)} [{_f(f.lo)}, {_f(f.hi)}]" if not f.refused
         else f"refused: {f.refused}",
         "observed (%)": f"{_f(f.observed)} [{_f(f.observed_lo)}, {_f(f.observed_hi)}]",
         "error (points)": _f(f.error) if not f.refused else ""}
        for f in result.forecasts
    ]  # fmt: skip
    if rows:
        parts.append(markdown(pd.DataFrame(rows)) + "\n")
    return "".join(parts)


def _laws_table_markdown(result: Laws) -> str:
    """A row per law (its parameters with their intervals, or why it was refused), then the
    forms and how they were fitted."""
    from analysis.tables import markdown

    lrows = []
    for w in result.laws:
        if w.refused:
            params = f"refused: {w.refused}"
        else:
            params = "; ".join(
                f"{n} = {_g(v)} [{_g(w.intervals[n][0])}, {_g(w.intervals[n][1])}]"
                for n, v in w.params.items()
                if n != "x0"
            ) + (f" ({w.note})" if w.note else "")
        lrows.append({"configuration": w.label, "dataset": w.dataset, "law": w.law,
                      "fitted on": w.fitted_on, "parameters (95% interval)": params,
                      "R^2": _f(w.r2, 3), "RMSE (points)": _f(w.rmse, 2)})  # fmt: skip
    table = markdown(pd.DataFrame(lrows)) + "\n" if lrows else ""
    return table + (
        "Forms: `coverage_power` " + f"`{POWER}`" + " (fitted on log(-log pass@k) against log k); "
        "`coverage_beta` " + f"`{BETA}`" + " (maximum likelihood, beta-binomial); "
        "`accuracy_n`, `accuracy_k`, `accuracy_compute` " + f"`{SATURATING}`" + " with x0 the "
        "smallest budget fitted (A the asymptote, a0 the accuracy at x0, s the budget scale). "
        "pass@k is the unbiased per-problem estimator from N samples; intervals are 95% "
        f"percentile intervals over {RESAMPLES} bootstrap resamples of the problems (seeded); "
        "R^2 and RMSE are on the fitted points (coverage_power: those with 0 < pass@k < 100%). "
        f"A law needs {MIN_PROBLEMS} problems and more budgets than parameters. Numbers: "
        "`laws.csv`, `law_points.csv`, `forecasts.csv`.\n\n"
    )


def _frontier_markdown(result: Laws) -> str:
    """Which configuration is best over which token span, its crossovers, and how it is read."""
    from analysis.tables import markdown

    parts = []
    if len(result.frontier):
        spans = []
        for (dataset, model), f in result.frontier.groupby(["dataset", "model"], sort=False):
            change = (f["label"] != f["label"].shift()).cumsum()
            for _, run in f.groupby(change, sort=False):
                spans.append({"dataset": dataset, "model": short_model(model),
                              "tokens from": _g(run["tokens"].iloc[0]),
                              "to": _g(run["tokens"].iloc[-1]), "best": run["label"].iloc[0],
                              "accuracy at the end (%)": f"{_f(run['accuracy_pct'].iloc[-1])} "
                              f"[{_f(run['lo'].iloc[-1])}, {_f(run['hi'].iloc[-1])}]"})  # fmt: skip
        parts.append(markdown(pd.DataFrame(spans)) + "\n")
        if len(result.crossovers):
            cross = "; ".join(
                f"{r['from']} -> {r['to']} at ~{_g(r['tokens'])} tokens"
                for r in result.crossovers.to_dict("records")
            )
            parts.append(f"Crossovers: {cross}.\n\n")
        else:
            parts.append("Crossovers: none (one configuration is best at every budget).\n\n")
    else:
        parts.append("(no configuration has points at two token budgets)\n\n")
    parts.append(
        "At each token budget B (60 log-spaced budgets over the observed range), the "
        "configuration whose `accuracy_compute` law (or best point, where it has no law) is "
        "highest at min(B, its largest budget), among those whose smallest budget is <= B; "
        "the interval is that law's bootstrap band. Numbers: `frontier.csv`.\n"
    )
    return "".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def mlflow_values(result: Laws) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, params) for a sweep's parent run: `law.<configuration>.<law>.<param>` with
    `_lo` / `_hi`, `.r2`, `.rmse_pts`; `forecast.<configuration>.<law>.error_pts`, `.predicted`,
    `.observed`; params: each law's form and data, or why it refused."""
    several = len({(w.dataset, w.model) for w in result.laws}) > 1
    metrics: dict[str, float] = {}
    params: dict[str, str] = {}

    def name(x: Law | Forecast) -> str:
        where = f"{x.dataset}.{short_model(x.model)}." if several else ""
        return _slug(f"{where}{x.label}")

    for w in result.laws:
        key = f"law.{name(w)}.{w.law}"
        if w.refused:
            params[f"{key}.refused"] = w.refused
            continue
        params[f"{key}.form"] = w.form
        params[f"{key}.fitted_on"] = w.fitted_on
        for p, v in w.params.items():
            metrics[f"{key}.{p}"] = v
            metrics[f"{key}.{p}_lo"], metrics[f"{key}.{p}_hi"] = w.intervals[p]
        metrics[f"{key}.r2"], metrics[f"{key}.rmse_pts"] = w.r2, w.rmse
    for f in result.forecasts:
        if f.refused:
            continue
        key = f"forecast.{name(f)}.{f.law}"
        metrics.update({f"{key}.error_pts": f.error, f"{key}.predicted": f.predicted,
                        f"{key}.observed": f.observed})  # fmt: skip
    fc = [abs(f.error) for f in result.forecasts if not f.refused]
    if fc:
        metrics["forecast.median_abs_error_pts"] = float(np.median(fc))
    return {k: float(v) for k, v in metrics.items() if np.isfinite(v)}, params


# ------------------------------------------------------------------------------------------
# Figures (matplotlib imported when drawn)


def plot_laws(result: Laws, path: Path | str) -> Path | None:
    """One panel per (configuration, law) with a fit: the data with bootstrap error bars, the
    fit and its 95% band, the forecast fitted on the small budgets (dashed), log budgets."""
    from analysis.plots import _figure_class, _log_x, _save

    shown = [w for w in result.laws if w.law != "coverage_beta"]
    beta = {(w.label, w.dataset, w.model): w for w in result.laws if w.law == "coverage_beta"}
    panels = [w for w in shown if (w.predict is not None)
              or len(_law_points(result, w))]  # fmt: skip
    panels = [w for w in panels if len(_law_points(result, w)) > 1]
    if not panels:
        return None
    Figure = _figure_class()
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, w in zip(axes, panels):
        pts = _law_points(result, w)
        x = pts["tokens" if w.law == "accuracy_compute" else "budget"].to_numpy(float)
        shift = 1.0 if w.law == "accuracy_k" else 0.0  # k = 0 on a log axis: plot k + 1
        y = pts["value"].to_numpy(float)
        err = np.vstack([y - pts["lo"].to_numpy(float), pts["hi"].to_numpy(float) - y])
        ax.errorbar(x + shift, y, yerr=np.clip(err, 0, None), fmt="o", color="black",
                    markersize=4, capsize=2, label="data (95% bootstrap)")  # fmt: skip
        grid = np.geomspace(max(x.min(), 1e-9) + shift, x.max() + shift, 100) - shift
        _draw_fit(ax, w, grid, shift, "C0", "fit")
        b = beta.get((w.label, w.dataset, w.model))
        if w.law == "coverage_power" and b is not None and b.predict is not None:
            _draw_fit(ax, b, grid, shift, "C2", "Beta (distributional)")
        f = next((f for f in result.forecasts
                  if (f.label, f.dataset, f.model, f.law) == (w.label, w.dataset, w.model, w.law)
                  and not f.refused), None)  # fmt: skip
        if f is not None:
            ax.errorbar([f.target + shift], [f.predicted], yerr=[[f.predicted - f.lo],
                        [f.hi - f.predicted]], fmt="s", color="C3", mfc="none", capsize=3,
                        label=f"forecast from <= {f.cut:.3g}")  # fmt: skip
            ax.axvline(f.cut + shift, color="C3", lw=0.8, ls=":")
        ax.set_xscale("log")
        if w.law != "accuracy_k":
            _log_x(ax)
        quantity, axis = LAWS[w.law]
        ax.set_xlabel(axis + (" + 1 (log scale)" if shift else " (log scale)"))
        ax.set_ylabel(quantity)
        ax.set_title(f"{w.label}\n{w.law}" + (f" (refused: {w.refused})" if w.refused else ""),
                     fontsize=8)  # fmt: skip
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Test-time scaling laws: data, fit with 95% band, forecast")
    return _save(fig, path)


def _law_points(result: Laws, w: Law) -> pd.DataFrame:
    p = result.points
    return p[(p["label"] == w.label) & (p["dataset"] == w.dataset) & (p["model"] == w.model)
             & (p["law"] == w.law)]  # fmt: skip


def _draw_fit(ax, w: Law, grid: np.ndarray, shift: float, color: str, name: str) -> None:
    if w.predict is None:
        return
    ax.plot(grid + shift, w.predict(grid), color=color, label=f"{name}")
    lo, hi = w.band(grid)
    if np.isfinite(lo).any():
        ax.fill_between(grid + shift, lo, hi, color=color, alpha=0.2, lw=0)


def plot_frontier(result: Laws, path: Path | str) -> Path | None:
    """Accuracy against tokens per problem, one panel per dataset and model: every
    configuration's data and `accuracy_compute` fit, the frontier in black, crossovers dotted."""
    from analysis.plots import _colors, _figure_class, _log_x, _save

    compute = result.points[result.points["law"] == "accuracy_compute"]
    if compute.empty or result.frontier.empty:
        return None
    Figure = _figure_class()
    panels = list(result.frontier.groupby(["dataset", "model"], sort=False).groups)
    fig = Figure(figsize=(7.5, 4.6 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    by_label = {(w.label, w.dataset, w.model): w for w in result.laws
                if w.law == "accuracy_compute"}  # fmt: skip
    for ax, (dataset, model) in zip(axes, panels):
        part = compute[(compute["dataset"] == dataset) & (compute["model"] == model)]
        labels = list(dict.fromkeys(part["label"]))
        for label, color in zip(labels, _colors(len(labels)), strict=True):
            pts = part[part["label"] == label]
            y = pts["value"].to_numpy(float)
            err = np.vstack([y - pts["lo"].to_numpy(float), pts["hi"].to_numpy(float) - y])
            ax.errorbar(pts["tokens"], y, yerr=np.clip(err, 0, None), fmt="o", color=color,
                        markersize=4, capsize=2, label=label)  # fmt: skip
            w = by_label.get((label, dataset, model))
            if w is not None and w.predict is not None and pts["tokens"].nunique() > 1:
                grid = np.geomspace(pts["tokens"].min(), pts["tokens"].max(), 100)
                ax.plot(grid, w.predict(grid), color=color, lw=1)
                lo, hi = w.band(grid)
                ax.fill_between(grid, lo, hi, color=color, alpha=0.15, lw=0)
        f = result.frontier[(result.frontier["dataset"] == dataset)
                            & (result.frontier["model"] == model)]  # fmt: skip
        ax.plot(f["tokens"], f["accuracy_pct"], color="black", lw=2.5, alpha=0.5,
                label="frontier")  # fmt: skip
        c = result.crossovers
        for t in c[(c["dataset"] == dataset) & (c["model"] == model)]["tokens"]:
            ax.axvline(t, color="black", ls=":", lw=1)
        ax.set_xscale("log")
        _log_x(ax)
        ax.set_xlabel("tokens per problem (solver + verifier; log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{dataset} · {short_model(model)}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Compute-optimal frontier: the best configuration at each token budget")
    return _save(fig, path)


@dataclass
class LawsWritten:
    """What `write_laws` wrote and computed."""

    result: Laws
    png: dict[str, Path | None]  # "laws", "frontier" -> the figure (None: not drawn)
    markdown: str  # the report's "Scaling laws" section
    metrics: dict[str, float]  # `mlflow_values`
    params: dict[str, str]


def write_laws(records: Records, out: Path, notes: list[str]) -> LawsWritten:
    """laws.csv, law_points.csv, forecasts.csv, frontier.csv, laws.png and frontier.png into
    `out` (a figure that cannot be drawn is noted in `notes`)."""
    result = fit_laws(records)
    result.laws_table().to_csv(out / "laws.csv", index=False)
    result.points.to_csv(out / "law_points.csv", index=False)
    result.forecasts_table().to_csv(out / "forecasts.csv", index=False)
    result.frontier.to_csv(out / "frontier.csv", index=False)
    png: dict[str, Path | None] = {}
    for name, draw in (("laws", plot_laws), ("frontier", plot_frontier)):
        try:
            png[name] = draw(result, out / f"{name}.png")
        except ImportError as exc:
            notes.append(f"{name}.png: not drawn ({exc})")
            png[name] = None
    text = laws_markdown(
        result, *(png[n].name if png[n] is not None else None for n in ("laws", "frontier"))
    )
    return LawsWritten(result, png, text, *mlflow_values(result))
