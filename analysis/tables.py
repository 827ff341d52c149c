"""Tables from a run's records: the per-method summary and the test-time scaling curve.

Everything here reads the Parquet records (`pipeline.run.records` schema) and nothing else from
the engine, so it works on a run directory copied from a cluster or downloaded from MLflow.

Conventions:
- One name per metric: the columns of `summary_table` are the names used everywhere else:
  summary.csv, the table `latentseek run` prints, and MLflow, which logs each numeric column
  under the same name in the method's own run (`mean_final_reward`).
- A failed problem (`error != ""`) stays in the denominator and counts as incorrect.
- `accuracy_by_iteration` at budget k: a problem that ran more than k latent iterations is
  scored by its answer at iteration k; one that ran at most k is scored by the answer it
  returned (`final_correct`), i.e. its last answer is carried forward. At the largest k the
  curve therefore equals `final_accuracy`, also for methods that select their final answer
  (bon, sc, return_best).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.run.records import read_records

SUMMARY_COLUMNS = [
    "method",
    "problems",
    "failures",
    "cot_accuracy",
    "final_accuracy",
    "mean_iterations",
    "mean_initial_reward",
    "mean_final_reward",
    "tokens_per_problem",
    "mean_wall_seconds",
    "flops_per_problem",
    "problems_per_hour",
    "grade_timeouts",
    "capture_mismatch",
]
CURVE_COLUMNS = ["method", "iteration", "accuracy"]
REWARD_CURVE_COLUMNS = ["method", "iteration", "mean_reward"]


def load_run(run_dir: Path | str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(problems, iterations) of a run directory: committed rows only, one read each."""
    return read_records(run_dir)


def final_reward(row: Any) -> float:
    """The reward of the returned answer (`final_reward`; in older records the last of
    `rewards`, else `initial_reward`)."""
    value = row.get("final_reward")
    if value is not None and not pd.isna(value):
        return float(value)
    rewards = row["rewards"]
    if rewards is not None and len(rewards):
        return float(rewards[-1])
    r0 = row["initial_reward"]
    return float("nan") if r0 is None or pd.isna(r0) else float(r0)


def summary_table(problems: pd.DataFrame) -> pd.DataFrame:
    """One row per method (in order of first appearance) with accuracy, reward and cost.

    `mean_final_reward` is the mean reward of the returned answers (`final_reward`: the last
    element of `rewards`, the best with `return_best`, BoN's pick; `initial_reward` when a
    problem ran no iteration); reward means skip problems without a reward (NaN if none has one).
    `problems_per_hour` is 3600 / mean_wall_seconds: one worker's throughput on that method.
    `grade_timeouts`: problems one of whose answers math-verify did not grade in time (counted
    wrong; `grade_status`). `capture_mismatch`: captured positions whose z_t does not predict
    the CoT's token, summed over the problems that captured (0 expected; NaN if none did).
    """
    rows = []
    for method, g in problems.groupby("method", sort=False):
        wall = float(g["wall_seconds"].mean())
        rows.append(
            {
                "method": method,
                "problems": len(g),
                "failures": int((g["error"] != "").sum()),
                "cot_accuracy": float(g["cot_correct"].mean()),
                "final_accuracy": float(g["final_correct"].mean()),
                "mean_iterations": float(g["iterations"].mean()),
                "mean_initial_reward": _nanmean(g["initial_reward"]),
                "mean_final_reward": _nanmean(g.apply(final_reward, axis=1)),
                "tokens_per_problem": float((g["solver_tokens"] + g["verifier_tokens"]).mean()),
                "mean_wall_seconds": wall,
                "flops_per_problem": float(g["flops"].mean()),
                "problems_per_hour": 3600.0 / wall if wall > 0 else float("nan"),
                "grade_timeouts": int(
                    (g.get("grade_status", pd.Series(dtype=object)) == "timeout").sum()
                ),
                "capture_mismatch": _nansum(g.get("capture_mismatch", pd.Series(dtype=float))),
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _nansum(values: pd.Series) -> float:
    arr = pd.to_numeric(values, errors="coerce").astype(float).to_numpy()
    arr = arr[~np.isnan(arr)]
    return float(arr.sum()) if arr.size else float("nan")


def _nanmean(values: pd.Series) -> float:
    arr = pd.to_numeric(values, errors="coerce").astype(float).to_numpy()
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _per_iteration(
    problems: pd.DataFrame,
    iterations: pd.DataFrame,
    max_k: int | None,
    column: str,  # the iteration rows' value: "correct" or "reward"
    final: Callable[[pd.DataFrame], pd.Series],  # each problem's value of its returned answer
    name: str,  # the output column
) -> pd.DataFrame:
    """The mean of `column` per method and k = 0..max_k (or 0..the most iterations any
    problem ran), if every problem stopped by k: one that ran more than k iterations has its
    iteration-k value, one that ran at most k its `final` value (carried forward)."""
    columns = ["method", "iteration", name]
    if problems.empty:
        return pd.DataFrame(columns=columns)
    top = int(problems["iterations"].max()) if max_k is None else int(max_k)
    key = ["problem_id", "method"]
    base = problems[[*key, "iterations"]].reset_index(drop=True)
    base["final"] = final(problems).to_numpy(dtype=float)
    steps = iterations.loc[iterations["iteration"] <= top, [*key, "iteration", column]]
    rows = []
    for k in range(top + 1):
        step = steps[steps["iteration"] == k].drop_duplicates(key, keep="last")
        at_k = base.merge(step[[*key, column]], on=key, how="left")  # keeps base's order
        if column == "correct":
            stepped = at_k[column].eq(True).astype(float)  # a missing row counts as incorrect
        else:
            stepped = pd.to_numeric(at_k[column], errors="coerce").astype(float)
        value = stepped.where(at_k["iterations"] > k, at_k["final"])
        for method, mean in value.groupby(at_k["method"], sort=False).mean().items():
            rows.append({"method": method, "iteration": k, name: float(mean)})
    return pd.DataFrame(rows, columns=columns).sort_values(
        ["method", "iteration"], kind="stable", ignore_index=True
    )


def accuracy_by_iteration(
    problems: pd.DataFrame, iterations: pd.DataFrame, max_k: int | None = None
) -> pd.DataFrame:
    """The test-time scaling curve: accuracy per method if every problem stopped by k.

    k runs 0..max_k, or 0..the most iterations any problem ran. See the module docstring for
    the carry-forward rule. Columns: method, iteration, accuracy.
    """

    def final(df: pd.DataFrame) -> pd.Series:
        return df["final_correct"].astype(bool)

    return _per_iteration(problems, iterations, max_k, "correct", final, "accuracy")


def reward_by_iteration(
    problems: pd.DataFrame, iterations: pd.DataFrame, max_k: int | None = None
) -> pd.DataFrame:
    """The reward trajectory: mean reward per method if every problem stopped by k.

    The same k and carry-forward rule as `accuracy_by_iteration`: a problem that ran more than
    k iterations has the reward of its iteration-k answer (iteration 0: `initial_reward`), one
    that ran at most k the reward of the answer it returned (the last of `rewards`, else
    `initial_reward`). Problems without a reward are left out (NaN where none has one, e.g.
    CoT). Columns: method, iteration, mean_reward.
    """

    def final(df: pd.DataFrame) -> pd.Series:
        return df.apply(final_reward, axis=1)

    return _per_iteration(problems, iterations, max_k, "reward", final, "mean_reward")


def iteration_curves(
    problems: pd.DataFrame, iterations: pd.DataFrame, max_k: int | None = None
) -> pd.DataFrame:
    """`accuracy_by_iteration` and `reward_by_iteration` side by side: method, iteration,
    accuracy, mean_reward (what MLflow logs per method with step = k)."""
    return accuracy_by_iteration(problems, iterations, max_k).merge(
        reward_by_iteration(problems, iterations, max_k), on=["method", "iteration"], how="left"
    )


def markdown(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured Markdown table of `df` (no `tabulate` needed)."""

    def cell(v: object) -> str:
        if v is None or v is pd.NA:
            return ""
        if isinstance(v, float | np.floating):
            return "" if math.isnan(v) else format(float(v), floatfmt)
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_summary(
    out_dir: Path | str, summary: pd.DataFrame, curve: pd.DataFrame | None = None
) -> list[Path]:
    """Write summary.md, summary.csv (and accuracy_by_iteration.csv) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.md", out / "summary.csv"]
    paths[0].write_text(markdown(summary))
    summary.to_csv(paths[1], index=False)
    if curve is not None:
        paths.append(out / "accuracy_by_iteration.csv")
        curve.to_csv(paths[-1], index=False)
    return paths
