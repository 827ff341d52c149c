"""Curves from records: iterative methods (LatentSeek) after k steps (accuracy, reward,
compute), sampling methods (BoN, SC) with n <= N samples, accuracy against compute, and how many
iterations a method used and how many prefix tokens a step changed.

After k steps a problem that ran more than k is scored by its answer at step k (with
`return_best`, the best-rewarded of steps 0..k), one that ran at most k by the answer it
returned. A sampling method with n < N samples returns the sample its `Derivation.pick` chooses
from the records of the first n (`pipeline.method.methods`), graded by the recorded `sample_correct`.
Which method is which comes from the method registry; nothing here grades or decodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis.records import CONFIGURATION_KEY, SETTING_COLUMNS, Records, method_of, settings_of
from analysis.tables import final_reward

# ------------------------------------------------------------------------------------------
# LatentSeek after k steps: accuracy, reward, compute


def _best_so_far(correct: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[P, K + 1] -> the correctness and reward of the best-rewarded step among 0..k (ties: the
    earliest; a step without a reward never wins), per k."""
    out_c, out_r = correct.copy(), reward.copy()
    scores = np.where(np.isnan(reward), -np.inf, reward)
    for k in range(reward.shape[1]):
        pick = np.argmax(scores[:, : k + 1], axis=1)  # the first maximum
        rows = np.arange(reward.shape[0])
        out_c[:, k], out_r[:, k] = correct[rows, pick], reward[rows, pick]
    return out_c, out_r


def _max_k(g: pd.DataFrame) -> int:
    observed = int(g["iterations"].max())
    configured = pd.to_numeric(g["max_iters"], errors="coerce").max()
    return max(observed, 0 if pd.isna(configured) else int(configured))


LATENT_CURVE_COLUMNS = [
    "k", "problems", "accuracy_pct", "mean_reward", "reward_problems", "running_pct",
    "tokens_per_problem", "flops_per_problem",
]  # fmt: skip


def latent_steps(
    g: pd.DataFrame, iterations: pd.DataFrame, max_k: int, best: bool = False
) -> dict[str, np.ndarray]:
    """Per problem and k = 0..max_k for one configuration of an iterative method (problem rows
    `g`, their iteration rows), each [P, K + 1]: `correct` (bool), `reward` (NaN: none),
    `tokens`, `flops` and `running` (still iterating after k steps). `best` (the run's
    `return_best`): the answer after k steps is the best-rewarded of steps 0..k (ties: the
    earliest), as an executed run with K = k returns it; else the k-th.

    Tokens after k steps (k' = min(k, iterations)) are estimated from the recorded totals:
    solver prompt tokens + solver generated tokens x (answer tokens of iterations 0..k') /
    (answer tokens of all iterations) + verifier tokens x (k' + 1) / (iterations + 1), the
    verifiers scoring one answer per iteration; FLOPs scale with the tokens.
    """
    ks = np.arange(max_k + 1)
    pids = g["problem_id"].to_numpy()
    steps = iterations.drop_duplicates(["problem_id", "iteration"], keep="last")

    def by_step(column: str) -> np.ndarray:  # [P, K + 1], NaN where no iteration row
        wide = steps.pivot(index="problem_id", columns="iteration", values=column)
        return wide.reindex(index=pids, columns=ks).to_numpy(dtype=float)

    n = g["iterations"].to_numpy(int)[:, None]  # [P, 1]
    ran_more = ks[None, :] < n  # [P, K + 1]: scored by the answer at step k
    step_correct = np.nan_to_num(by_step("correct"), nan=0.0) > 0
    step_reward = by_step("reward")
    if best:
        step_correct, step_reward = _best_so_far(step_correct, step_reward)
    final_correct = g["final_correct"].to_numpy(bool)[:, None]
    correct = np.where(ran_more, step_correct, final_correct)
    returned = np.array([final_reward(row) for row in g.to_dict("records")])[:, None]
    reward = np.where(ran_more, step_reward, returned)
    answer_tokens = np.where(ks[None, :] <= n, np.nan_to_num(by_step("tokens")), 0.0)
    cum = np.cumsum(answer_tokens, axis=1)  # [P, K + 1]
    total = cum[:, -1:]
    solver_share = np.divide(cum, total, out=np.ones_like(cum), where=total > 0)
    verifier_share = (np.minimum(ks[None, :], n) + 1) / (n + 1)
    prompt = g["solver_prompt_tokens"].to_numpy(float)[:, None]
    generated = g["solver_generated_tokens"].to_numpy(float)[:, None]
    verifier = g["verifier_tokens"].to_numpy(float)[:, None]
    tokens = prompt + generated * solver_share + verifier * verifier_share
    recorded = prompt + generated + verifier
    flops = g["flops"].to_numpy(float)[:, None]
    flops_k = np.divide(flops * tokens, recorded, out=np.broadcast_to(flops, tokens.shape).copy(),
                        where=recorded > 0)  # fmt: skip
    return {"correct": correct, "reward": reward, "tokens": tokens, "flops": flops_k,
            "running": ran_more}  # fmt: skip


def latent_curve(
    g: pd.DataFrame, iterations: pd.DataFrame, max_k: int, best: bool = False
) -> pd.DataFrame:
    """Per k = 0..max_k for one configuration of an iterative method: accuracy, mean reward,
    share still iterating, tokens and FLOPs per problem: the means of `latent_steps`."""
    s = latent_steps(g, iterations, max_k, best)
    reward = s["reward"]
    has_reward = ~np.isnan(reward)
    counts = has_reward.sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean_reward = np.where(counts > 0, np.nansum(reward, axis=0) / counts, np.nan)
    return pd.DataFrame(
        {
            "k": np.arange(max_k + 1),
            "problems": len(g),
            "accuracy_pct": 100.0 * s["correct"].mean(axis=0),
            "mean_reward": mean_reward,
            "reward_problems": counts,
            "running_pct": 100.0 * s["running"].mean(axis=0),
            "tokens_per_problem": s["tokens"].mean(axis=0),
            "flops_per_problem": s["flops"].mean(axis=0),
        }
    )


def _is(kind: str) -> Any:
    """A predicate on a method name: registered and `iterations` / `samples`."""

    def test(name: str) -> bool:
        m = method_of(name)
        return bool(m is not None and getattr(m, kind))

    return test


def _returns_best(g: pd.DataFrame) -> bool:
    return "return_best" in g and bool(g["return_best"].fillna(False).astype(bool).iloc[0])


def scaling_table(records: Records) -> pd.DataFrame:
    """scaling.csv: `latent_curve` of every configuration of an iterative method."""
    frames = []
    ls = records.problems[records.problems["method"].map(_is("iterations"))]
    for (label, dataset, model), g in ls.groupby(CONFIGURATION_KEY, sort=False):
        it = records.iterations
        it = it[(it["label"] == label) & (it["dataset"] == dataset) & (it["model"] == model)]
        curve = latent_curve(g, it, _max_k(g), best=_returns_best(g))
        head = {"label": label, "method": g["method"].iloc[0], "dataset": dataset, "model": model}
        frames.append(curve.assign(**head, **settings_of(g)))
    columns = ["label", "method", "dataset", "model", *SETTING_COLUMNS, "runs"]
    if not frames:
        return pd.DataFrame(columns=[*columns, *LATENT_CURVE_COLUMNS])
    out = pd.concat(frames, ignore_index=True)
    return out[[*columns, *LATENT_CURVE_COLUMNS]]


# ------------------------------------------------------------------------------------------
# BoN and SC with n <= N samples


def sample_correct(row: dict[str, Any], n: int) -> bool | None:
    """Whether the row's method would have been right with its first n recorded samples; None
    where the records cannot say (written before `sample_correct` / `sample_groups` existed)."""
    samples = list(row["samples"])
    if row["error"] or not samples:
        return False
    if n >= len(samples):
        return bool(row["final_correct"])
    method = method_of(row["method"])
    if method is None or method.derive is None or method.derive.pick is None:
        return None
    graded = row.get("sample_correct")
    try:
        pick = method.derive.pick(row, n)
    except (TypeError, KeyError):  # a column the pick needs is null in older records
        return None
    if pick == 0:
        return bool(row["cot_correct"])
    if graded is None or len(graded) != len(samples):
        return None
    return bool(graded[pick])


def sample_steps(g: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per problem and n = 1..N for one configuration of a sampling method, each [P, N]:
    `correct` (the method's answer from the first n samples, `sample_correct`; NaN where the
    records cannot say), `tokens` and `flops` (the recorded totals x n / N: each sample, and
    its reward, costs alike)."""
    rows_ = g.to_dict("records")
    sizes = g["samples"].map(len).to_numpy(int)[:, None]  # [P, 1]
    ns = np.arange(1, max(1, int(sizes.max())) + 1)[None, :]  # [1, N]
    total = (g["solver_tokens"] + g["verifier_tokens"]).to_numpy(float)[:, None]
    flops = g["flops"].to_numpy(float)[:, None]
    share = np.where(sizes > 0, np.minimum(ns, sizes) / np.maximum(sizes, 1), 1.0)
    correct = np.array(
        [[np.nan if (c := sample_correct(row, n)) is None else float(c) for n in ns[0]]
         for row in rows_],
        dtype=float,
    ).reshape(len(rows_), ns.shape[1])  # fmt: skip
    return {"correct": correct, "tokens": total * share, "flops": flops * share}


def sample_curve(g: pd.DataFrame) -> pd.DataFrame:
    """Per n = 1..N for one configuration of a sampling method: accuracy with the first n
    samples, and tokens / FLOPs per problem (the means of `sample_steps`). An n that the
    records cannot score (older records) is left out."""
    s = sample_steps(g)
    rows = [
        {
            "budget": j + 1,
            "problems": len(g),
            "accuracy_pct": 100.0 * float(s["correct"][:, j].mean()),
            "tokens_per_problem": float(s["tokens"][:, j].mean()),
            "flops_per_problem": float(s["flops"][:, j].mean()),
        }
        for j in range(s["correct"].shape[1])
        if not np.isnan(s["correct"][:, j]).any()
    ]
    return pd.DataFrame(rows)


COMPUTE_COLUMNS = [
    "label", "method", "dataset", "model", "budget_kind", "budget", "problems", "accuracy_pct",
    "tokens_per_problem", "flops_per_problem", *SETTING_COLUMNS, "runs",
]  # fmt: skip


def compute_table(records: Records, scaling: pd.DataFrame) -> pd.DataFrame:
    """compute.csv: iterative methods per k (from `scaling`), sampling methods per n, the rest
    (CoT) as one point."""
    frames = []
    p = records.problems
    for (label, dataset, model), g in p.groupby(CONFIGURATION_KEY, sort=False):
        method = g["method"].iloc[0]
        head = {"label": label, "method": method, "dataset": dataset, "model": model}
        if _is("samples")(method):
            frames.append(sample_curve(g).assign(budget_kind="n", **head, **settings_of(g)))
        elif not _is("iterations")(method):
            point = {
                "budget": 0,
                "problems": len(g),
                "accuracy_pct": 100.0 * float(g["final_correct"].mean()),
                "tokens_per_problem": float((g["solver_tokens"] + g["verifier_tokens"]).mean()),
                "flops_per_problem": float(g["flops"].mean()),
            }
            frames.append(pd.DataFrame([point]).assign(budget_kind="cot", **head, **settings_of(g)))
    if len(scaling):
        frames.append(scaling.rename(columns={"k": "budget"}).assign(budget_kind="k"))
    if not frames:
        return pd.DataFrame(columns=COMPUTE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[COMPUTE_COLUMNS]


# ------------------------------------------------------------------------------------------
# Distributions: iterations used, tokens changed per step


def iterations_table(records: Records) -> pd.DataFrame:
    """iterations.csv: share of an iterative method's problems (failures left out) per
    iterations used."""
    rows = []
    ls = records.problems[records.problems["method"].map(_is("iterations"))]
    for (label, dataset, model), g in ls.groupby(CONFIGURATION_KEY, sort=False):
        done = g[g["error"] == ""]
        counts = done["iterations"].value_counts()
        for i in range(_max_k(g) + 1):
            c = int(counts.get(i, 0))
            rows.append(
                {
                    "label": label, "method": g["method"].iloc[0], "lr": g["lr"].iloc[0],
                    "dataset": dataset, "model": model, "iterations": i,
                    "count": c, "problems": len(done),
                    "share_pct": 100.0 * c / len(done) if len(done) else float("nan"),
                    "mean_iterations": float(done["iterations"].mean()),
                }
            )  # fmt: skip
    columns = ["label", "method", "lr", "dataset", "model", "iterations", "count", "problems",
               "share_pct", "mean_iterations"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def tokens_changed_steps(records: Records) -> pd.DataFrame:
    """One row per latent step (k >= 1) with its tokens_changed and its share of U (%)."""
    it = records.iterations
    it = it[(it["iteration"] >= 1) & it["tokens_changed"].notna()]
    u = records.problems[["run_dir", "method", "problem_id", "update_length", "lr"]]
    it = it.merge(u, on=["run_dir", "method", "problem_id"], how="left")
    order = {label: i for i, label in enumerate(dict.fromkeys(records.problems["label"]))}
    it = it.sort_values("label", key=lambda col: col.map(order), kind="stable")
    changed = it["tokens_changed"].astype(float)
    share = np.where(it["update_length"] > 0, 100.0 * changed / it["update_length"], np.nan)
    return it.assign(tokens_changed=changed, changed_pct=share)[
        ["label", "method", "lr", "dataset", "model", "problem_id", "iteration",
         "tokens_changed", "update_length", "changed_pct"]
    ]  # fmt: skip


def tokens_changed_table(steps: pd.DataFrame) -> pd.DataFrame:
    """tokens_changed.csv: the distribution of tokens_changed per configuration."""
    rows = []
    for (label, dataset, model), g in steps.groupby(CONFIGURATION_KEY, sort=False):
        v = g["tokens_changed"]
        rows.append(
            {
                "label": label, "dataset": dataset, "model": model, "steps": len(g),
                "mean": v.mean(), "q25": v.quantile(0.25), "median": v.median(),
                "q75": v.quantile(0.75), "max": v.max(), "mean_pct_of_u": g["changed_pct"].mean(),
            }
        )  # fmt: skip
    columns = ["label", "dataset", "model", "steps", "mean", "q25", "median", "q75", "max",
               "mean_pct_of_u"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
