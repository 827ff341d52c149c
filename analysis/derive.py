"""A sweep point's metrics read off a larger run's records (derive instead of recompute), as
each method declares (`Method.derive`, `pipeline.method.methods`):

- `steps` (LatentSeek's `max_iters`): with K = k from a run with K' >= k, each problem's answer
  after min(k, its iterations) steps (an early stop carried forward; the best so far with
  `return_best`), by `analysis.curves.latent_curve`.
- `samples` (BoN's and SC's `n_samples`): with n samples from a run with N >= n, the first n
  recorded samples, picked by the method's own rule, by `analysis.curves.sample_curve`.
- A method that does not depend on the key (CoT) keeps the run's own metrics.

Token and FLOP figures of derived points are estimates (see `latent_curve` and `sample_curve`);
accuracy, iterations and rewards are exact readings of the records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.curves import latent_curve, sample_curve
from analysis.records import method_of
from analysis.tables import iteration_curves, summary_table
from pipeline.method.methods import all_methods
from pipeline.run.records import read_records


def derived_metrics(
    run_dir: Path | str, cfg: Any, derived: dict[str, int]
) -> dict[str, dict[str, float]]:
    """method -> {metric: value} for the run at `run_dir` as if it had run with `derived`
    (`{"max_iters": k}` and/or `{"n_samples": n}`), under the names an executed run logs for
    each method. Those that depend on them are derived: final_accuracy, mean_final_reward,
    mean_iterations, tokens_per_problem, flops_per_problem; the rest (cot_accuracy, problems,
    failures ...) are the run's own."""
    problems, iterations = read_records(run_dir)
    out: dict[str, dict[str, float]] = {}
    summary = summary_table(problems)
    for row in summary.to_dict("records"):
        method = row["method"]
        values = {
            key: float(row[key])
            for key in (
                "problems",
                "failures",
                "cot_accuracy",
                "mean_initial_reward",
                "grade_timeouts",
                "capture_mismatch",
            )
            if key in row and row[key] is not None and np.isfinite(row[key])
        }
        g = problems[problems["method"] == method].reset_index(drop=True)
        derived_values = _derive_method(method, g, iterations, cfg, derived, row)
        values.update({k: float(v) for k, v in derived_values.items() if np.isfinite(v)})
        out[method] = values
    return out


def derived_curves(run_dir: Path | str, derived: dict[str, int]) -> pd.DataFrame:
    """The scaling curve and reward trajectory (`analysis.tables.iteration_curves`) of the run at
    `run_dir` as if it had run with `derived`: k = 0..`max_iters` (the executed run's curve up to
    there, read the same way). BoN / SC rows are left out when `n_samples` is derived: their
    recorded curve is the N-sample run's."""
    problems, iterations = read_records(run_dir)
    steps = {k: v for k, v in derived.items() if _kind(k) == "steps"}
    curves = iteration_curves(problems, iterations, next(iter(steps.values()), None))
    samples = [k for k in derived if _kind(k) == "samples"]
    if samples:  # the recorded curve of a sampling method is the N-sample run's
        drop = curves["method"].map(lambda m: _derives(m, samples[0]))
        curves = curves[~drop].reset_index(drop=True)
    return curves


def _kind(key: str) -> str:
    """How the methods that derive `key` do it ("steps" / "samples"; "" if none does)."""
    return next(
        (m.derive.kind for m in all_methods().values() if m.derive and m.derive.key == key), ""
    )


def _derives(method: str, key: str) -> bool:
    m = method_of(method)
    return bool(m is not None and m.derive is not None and m.derive.key == key)


def _derive_method(method, g, iterations, cfg, derived, row) -> dict[str, float]:
    same = {k: row[k] for k in _DEPENDENT if k in row and row[k] is not None}
    m = method_of(method)
    rule = m.derive if m is not None else None
    if rule is None or rule.key not in derived:
        return same
    if rule.kind == "steps":
        k = int(derived[rule.key])
        it = iterations[(iterations["method"] == method)]
        it = it[it["problem_id"].isin(g["problem_id"])]
        curve = latent_curve(g, it, k, best=bool(getattr(cfg, "return_best", False)))
        at = curve[curve["k"] == k].iloc[0]
        return {
            "final_accuracy": at["accuracy_pct"] / 100.0,
            "mean_final_reward": at["mean_reward"],
            "mean_iterations": float(np.minimum(g["iterations"].to_numpy(), k).mean()),
            "tokens_per_problem": at["tokens_per_problem"],
            "flops_per_problem": at["flops_per_problem"],
        }
    if rule.kind == "samples":
        n = int(derived[rule.key])
        curve = sample_curve(g)
        if not (curve["budget"] == min(n, int(curve["budget"].max()))).any():
            raise ValueError(
                f"{method}: its records cannot score {n} of their samples (written before "
                "per-sample correctness was recorded); run the point instead of deriving it"
            )
        at = curve[curve["budget"] == min(n, int(curve["budget"].max()))].iloc[0]
        return {
            "final_accuracy": at["accuracy_pct"] / 100.0,
            "tokens_per_problem": at["tokens_per_problem"],
            "flops_per_problem": at["flops_per_problem"],
        }
    return same


_DEPENDENT = (
    "final_accuracy", "mean_final_reward", "mean_iterations", "tokens_per_problem",
    "flops_per_problem",
)  # fmt: skip
