"""A sweep point's metrics read off a larger run's records (derive instead of recompute).

- LatentSeek with K = k from a run with K' >= k: each problem's answer after min(k, its
  iterations) steps (an early stop carried forward), by `analysis.report.latent_curve`.
- BoN / SC with n samples from a run with N >= n: the first n recorded samples, selected by the
  engine's own rules, by `analysis.report.sample_curve`.
- CoT does not depend on K or n: its metrics are the run's own.

Token and FLOP figures of derived points are estimates (see `latent_curve` and `sample_curve`);
accuracy, iterations and rewards are exact readings of the records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from analysis.report import latent_curve, sample_curve
from analysis.tables import summary_table
from pipeline.records import read_records


def derived_metrics(run_dir: Path | str, cfg: Any, derived: dict[str, int]) -> dict[str, float]:
    """`<method>/<metric>` for the run at `run_dir` as if it had run with `derived`
    (`{"max_iters": k}` and/or `{"n_samples": n}`), for the metrics a run logs that depend on
    them: final_accuracy, mean_final_reward, mean_iterations, tokens_per_problem,
    flops_per_problem; the rest (cot_accuracy, problems, failures ...) are the run's own."""
    problems, iterations = read_records(run_dir)
    out: dict[str, float] = {}
    summary = summary_table(problems)
    for row in summary.to_dict("records"):
        method = row["method"]
        for key in ("problems", "failures", "cot_accuracy", "mean_initial_reward"):
            if key in row and row[key] is not None and np.isfinite(row[key]):
                out[f"{method}/{key}"] = float(row[key])
        g = problems[problems["method"] == method].reset_index(drop=True)
        values = _derive_method(method, g, iterations, cfg, derived, row)
        out.update({f"{method}/{k}": float(v) for k, v in values.items() if np.isfinite(v)})
    return out


def _derive_method(method, g, iterations, cfg, derived, row) -> dict[str, float]:
    same = {k: row[k] for k in _DEPENDENT if k in row and row[k] is not None}
    if method == "latentseek" and "max_iters" in derived:
        k = int(derived["max_iters"])
        it = iterations[(iterations["method"] == "latentseek")]
        it = it[it["problem_id"].isin(g["problem_id"])]
        curve = latent_curve(g, it, k)
        at = curve[curve["k"] == k].iloc[0]
        return {
            "final_accuracy": at["accuracy_pct"] / 100.0,
            "mean_final_reward": at["mean_reward"],
            "mean_iterations": float(np.minimum(g["iterations"].to_numpy(), k).mean()),
            "tokens_per_problem": at["tokens_per_problem"],
            "flops_per_problem": at["flops_per_problem"],
        }
    if method in ("bon", "sc") and "n_samples" in derived:
        n = int(derived["n_samples"])
        curve = sample_curve(g.assign(prompt=cfg.prompt, compat=cfg.compat))
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
