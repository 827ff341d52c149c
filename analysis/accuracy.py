"""Table 1 of the paper from records: accuracy per configuration and dataset (x model), 95%
Wilson intervals, and the gain over CoT with a paired 95% interval (`CI_TEXT` says how).

Conventions shared with `analysis.tables`: a failed problem (`error != ""`) stays in the
denominator and counts as incorrect.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analysis.records import (
    ALL_SETTING_KEYS,
    COMMON_SETTING_KEYS,
    SETTING_COLUMNS,
    dataset_order,
    dataset_title,
    method_of,
    model_key,
    settings_of,
    short_model,
)
from analysis.tables import markdown
from pipeline.method.methods import all_methods, reference_method

Z95 = 1.959963984540054  # two-sided 95% normal quantile

CI_TEXT = (
    "Accuracy intervals are 95% Wilson score intervals over the problems. The gain over CoT is "
    "the mean paired difference (method correct - CoT correct, each 0 or 1) over the problems "
    "both have, in percentage points, with the paired-difference normal approximation: mean "
    "+- 1.96 x sd / sqrt(pairs) (sd with n - 1; clipped to [-100, 100]; no interval for fewer "
    "than 2 pairs). LatentSeek is compared with its own CoT pass (`cot_correct` of the same "
    "records: same problems, settings and run); the other methods with the CoT records of the "
    "same dataset and model, or, where there are none, with LatentSeek's CoT passes (marked †)."
)


# ------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct/n (NaN, NaN when n is 0)."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_gain(method: np.ndarray, reference: np.ndarray, z: float = Z95) -> dict[str, float]:
    """Mean of method - reference (booleans, paired) with a normal-approximation interval."""
    d = method.astype(float) - reference.astype(float)
    n = d.size
    if n == 0:
        return {"gain": float("nan"), "low": float("nan"), "high": float("nan"), "pairs": 0}
    mean = float(d.mean())
    if n < 2:
        return {"gain": mean, "low": float("nan"), "high": float("nan"), "pairs": n}
    half = z * float(d.std(ddof=1)) / math.sqrt(n)
    return {"gain": mean, "low": max(-1.0, mean - half), "high": min(1.0, mean + half), "pairs": n}


# ------------------------------------------------------------------------------------------
# Table 1


def accuracy_table(problems: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: accuracy, Wilson CI, paired gain over CoT, cost (long form)."""
    rows = []
    base = reference_method()
    base_name = base.name if base else ""
    base_title = base.title if base else "CoT"
    with_pass = [m.name for m in all_methods().values() if m.cot_pass]
    for _, cell in problems.groupby(["dataset", "model"], sort=False):
        cot = cell[cell["method"] == base_name].drop_duplicates("problem_id")
        source = "records"
        passes = cell[cell["method"].isin(with_pass)]
        if cot.empty and not passes.empty:
            # No CoT run: a method's own CoT passes are greedy CoT answers of the same model.
            first = passes["method"].iloc[0]
            cot = passes[passes["method"] == first].drop_duplicates("problem_id")
            cot = cot.assign(final_correct=cot["cot_correct"], method=base_name, label=base_title)
            cot = cot.assign(
                iterations=0, **{k: None for k in ALL_SETTING_KEYS if k not in COMMON_SETTING_KEYS}
            )
            source = f"{method_of(first).title} CoT pass"
            row = _table_row(cot, None, "", source)
            # Its cost is not recorded apart from that method's.
            rows.append(row | {"tokens_per_problem": math.nan, "flops_per_problem": math.nan})
        reference = cot.set_index("problem_id")["final_correct"] if not cot.empty else None
        for _, g in cell.groupby("label", sort=False):
            method = method_of(g["method"].iloc[0])
            if method is not None and method.cot_pass:
                rows.append(_table_row(g, g["cot_correct"].to_numpy(bool), "own CoT pass"))
            elif (method is not None and method.reference) or reference is None:
                rows.append(_table_row(g, None, ""))
            else:
                shared = g[g["problem_id"].isin(reference.index)]
                ref = reference.loc[shared["problem_id"]].to_numpy(bool)
                name = "CoT records" if source == "records" else source
                rows.append(_table_row(shared, ref, name, full=g))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    # Rows: methods in the records' order (a CoT from a CoT pass first), then cells.
    labels = list(dict.fromkeys([base_title, *problems["label"]]))
    datasets = dataset_order(list(dict.fromkeys(table["dataset"])))
    order = [
        (labels.index(lab), datasets.index(d), model_key(m))
        for lab, d, m in zip(table["label"], table["dataset"], table["model"])
    ]
    return table.iloc[sorted(range(len(table)), key=order.__getitem__)].reset_index(drop=True)


TABLE_COLUMNS = [
    "label", "method", "dataset", "model", "problems", "correct", "failures", "accuracy_pct",
    "accuracy_ci_low_pct", "accuracy_ci_high_pct", "gain_pct", "gain_ci_low_pct",
    "gain_ci_high_pct", "pairs", "gain_reference", "mean_iterations", "tokens_per_problem",
    "flops_per_problem", "source", *SETTING_COLUMNS, "runs",
]  # fmt: skip


def _table_row(
    g: pd.DataFrame,
    reference: np.ndarray | None,
    reference_name: str,
    source: str = "records",
    full: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Accuracy over `full` (default `g`); the gain over `reference`, paired row by row with `g`."""
    full = g if full is None else full
    n, correct = len(full), int(full["final_correct"].sum())
    low, high = wilson_interval(correct, n)
    if reference is None:
        gain = {"gain": float("nan"), "low": float("nan"), "high": float("nan"), "pairs": 0}
    else:
        gain = paired_gain(g["final_correct"].to_numpy(bool), reference)
    first = full.iloc[0]
    return {
        "label": first["label"],
        "method": first["method"],
        "dataset": first["dataset"],
        "model": first["model"],
        "problems": n,
        "correct": correct,
        "failures": int((full["error"] != "").sum()),
        "accuracy_pct": 100.0 * correct / n,
        "accuracy_ci_low_pct": 100.0 * low,
        "accuracy_ci_high_pct": 100.0 * high,
        "gain_pct": 100.0 * gain["gain"],
        "gain_ci_low_pct": 100.0 * gain["low"],
        "gain_ci_high_pct": 100.0 * gain["high"],
        "pairs": gain["pairs"],
        "gain_reference": reference_name,
        "mean_iterations": float(full["iterations"].mean()),
        "tokens_per_problem": float((full["solver_tokens"] + full["verifier_tokens"]).mean()),
        "flops_per_problem": float(full["flops"].mean()),
        "source": source,
        **settings_of(full),
    }


def _cell_column(dataset: str, model: str, several_models: bool) -> str:
    name = dataset_title(dataset)
    return f"{name} · {short_model(model)}" if several_models else name


def grid(table: pd.DataFrame, render) -> pd.DataFrame:
    """`render(row)` of every `table` row, methods as rows, dataset (x model) as columns;
    rows where nothing rendered are left out."""
    several = table["model"].nunique() > 1
    cells = [
        (d, m)
        for d in dataset_order(list(dict.fromkeys(table["dataset"])))
        for m in sorted(table.loc[table["dataset"] == d, "model"].unique(), key=model_key)
    ]
    labels = list(dict.fromkeys(table["label"]))
    out = {"method": labels}
    for d, m in cells:
        col = []
        for label in labels:
            hit = table[(table["label"] == label) & (table["dataset"] == d)]
            hit = hit[hit["model"] == m]
            col.append(render(hit.iloc[0]) if len(hit) else "")
        out[_cell_column(d, m, several)] = col
    df = pd.DataFrame(out)
    return df[(df.drop(columns="method") != "").any(axis=1)].reset_index(drop=True)


def table_markdown(table: pd.DataFrame) -> str:
    """table.md: accuracy and gain, methods as rows, dataset (x model) as columns."""

    def accuracy(r: pd.Series) -> str:
        mark = " †" if r["source"] != "records" else ""
        return (
            f"{r['accuracy_pct']:.1f} [{r['accuracy_ci_low_pct']:.1f}, "
            f"{r['accuracy_ci_high_pct']:.1f}] (n={r['problems']}){mark}"
        )

    def gain(r: pd.Series) -> str:
        if not r["pairs"]:
            return ""
        ci = (
            ""
            if math.isnan(r["gain_ci_low_pct"])
            else f" [{r['gain_ci_low_pct']:+.1f}, {r['gain_ci_high_pct']:+.1f}]"
        )
        return f"{r['gain_pct']:+.1f}{ci} ({r['pairs']} pairs)"

    gains = grid(table, gain)
    parts = [
        "## Accuracy (%) [95% Wilson CI] (n problems)\n\n",
        markdown(grid(table, accuracy)),
        "\n## Gain over CoT (percentage points) [paired 95% CI, normal approximation] "
        "(n paired problems)\n\n",
        markdown(gains) if len(gains) else "No method has a CoT reference on its problems.\n",
        "\n" + CI_TEXT + "\n",
    ]
    if (table["source"] != "records").any():
        parts.append(
            "\n† No CoT run on this dataset and model: the CoT row is the CoT pass recorded "
            "with LatentSeek (`cot_correct`), greedy and of the same model.\n"
        )
    return "".join(parts)
