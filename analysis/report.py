"""A report of one run or a sweep of runs, read from the Parquet records and config.yaml alone.

`write_report(run_dirs, out_dir)` writes into `out_dir`, readable without MLflow:

    report.md                 everything below, with how each number and figure was computed
    table.md, table.csv       Table 1 of the paper: accuracy per method and dataset (x model),
                              95% Wilson intervals, gain over CoT with a paired 95% interval
    scaling.png, scaling.csv  LatentSeek accuracy (and mean reward, compute) after k steps
    compute.png, compute.csv  accuracy against tokens and FLOPs per problem: LatentSeek per k,
                              BoN and SC per n <= N (subsampled from the recorded samples), CoT
    rewards.png               LatentSeek mean reward after k steps (numbers in scaling.csv)
    iterations.png, .csv      how many latent iterations LatentSeek used
    tokens_changed.png, .csv  how many prefix tokens one latent step changed

A configuration is a method with its settings (`label`, e.g. "LatentSeek (PSRM, lr=0.05)") on
one dataset and model. The label carries the reward (LatentSeek, BoN), N (BoN, SC) and every
setting that takes two values among the runs of that method on one dataset and model; the
CSVs carry the main settings as columns. Runs of one configuration are pooled (first record of
a problem wins).

Conventions shared with `analysis.tables`: a failed problem (`error != ""`) stays in the
denominator and counts as incorrect; after k latent steps a problem that ran more than k is
scored by its answer at step k, one that ran at most k by the answer it returned.

This module reads the record schema (`pipeline.records`) and the saved config; to score BoN and
SC with fewer samples than were drawn it calls the engine's own selection and grading rules
(`pipeline.methods.select_best`, `majority_vote`, `pipeline.grading.extract_answer`,
`pipeline.compat.make_grader`), imported only when BoN or SC records are present.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis.tables import markdown
from pipeline.records import CONFIG_FILE, PROBLEMS, read_records

Z95 = 1.959963984540054  # two-sided 95% normal quantile

DATASET_NAMES = {"gsm8k": "GSM8K", "math500": "MATH-500", "aime2024": "AIME 2024"}
METHOD_NAMES = {"cot": "CoT", "bon": "BoN", "sc": "SC", "latentseek": "LatentSeek"}
REWARD_NAMES = {"self": "self", "psrm": "PSRM"}
METHOD_ORDER = ["cot", "bon", "sc", "latentseek"]
REWARD_ORDER = ["self", "psrm"]

# Settings that can tell two configurations of a method apart (shown in a label when they vary
# within one dataset and model), method-specific ones first.
_COMMON_KEYS = ("prompt", "compat", "max_new_tokens", "dtype")
_SAMPLING_KEYS = ("temperature", "top_p", "seed")
_LATENT_KEYS = (
    "lr", "rho", "max_iters", "lr_relative", "reward_threshold", "grad_clip", "sample_update",
    "return_best", "max_update_length",
)  # fmt: skip
_SELF_REWARD_KEYS = ("verifier_prompts", "verifier_max_new_tokens", "format_rule")
_ALL_KEYS = (
    "reward", "n_samples", *_LATENT_KEYS, *_SAMPLING_KEYS, *_COMMON_KEYS, *_SELF_REWARD_KEYS,
)  # fmt: skip
# Settings written as columns of every CSV (blank where they do not apply).
SETTING_COLUMNS = [
    "reward", "lr", "rho", "max_iters", "n_samples", "prompt", "compat", "max_new_tokens",
]  # fmt: skip
_KEY = ["label", "dataset", "model"]  # one configuration

CI_TEXT = (
    "Accuracy intervals are 95% Wilson score intervals over the problems. The gain over CoT is "
    "the mean paired difference (method correct - CoT correct, each 0 or 1) over the problems "
    "both have, in percentage points, with the paired-difference normal approximation: mean "
    "+- 1.96 x sd / sqrt(pairs) (sd with n - 1; clipped to [-100, 100]; no interval for fewer "
    "than 2 pairs). LatentSeek is compared with its own CoT pass (`cot_correct` of the same "
    "records: same problems, settings and run); the other methods with the CoT records of the "
    "same dataset and model, or, where there are none, with LatentSeek's CoT passes (marked †)."
)


@dataclass(frozen=True)
class ReportFiles:
    """The files `write_report` wrote; a figure is None when it could not be drawn (`notes`)."""

    out_dir: Path
    report: Path
    table_md: Path
    table_csv: Path
    scaling_csv: Path
    compute_csv: Path
    iterations_csv: Path
    tokens_changed_csv: Path
    scaling_png: Path | None = None
    compute_png: Path | None = None
    rewards_png: Path | None = None
    iterations_png: Path | None = None
    tokens_changed_png: Path | None = None
    notes: tuple[str, ...] = ()

    def paths(self) -> list[Path]:
        """Every file written, report.md first."""
        return [
            v
            for f in fields(self)
            if f.name != "out_dir" and isinstance(v := getattr(self, f.name), Path)
        ]


# ------------------------------------------------------------------------------------------
# Finding and reading runs


# Accuracy axes: 0-100 % with a margin, so that a line at 0 % is not drawn on the axis itself.
PERCENT_YLIM = (-3, 103)


def _is_run_dir(path: Path) -> bool:
    return (path / PROBLEMS).is_dir() or (path / CONFIG_FILE).is_file()


def find_run_dirs(paths: Sequence[Path | str] | Path | str, depth: int = 3) -> list[Path]:
    """Run directories among `paths`: each is a run dir, or a sweep dir holding run dirs
    (searched `depth` levels down). Order: as given, then sorted by name."""
    if isinstance(paths, str | Path):
        paths = [paths]
    found: list[Path] = []

    def walk(path: Path, level: int) -> None:
        if _is_run_dir(path):
            found.append(path)
        elif level < depth and path.is_dir():
            for child in sorted(path.iterdir()):
                if child.is_dir() and not child.name.startswith("."):
                    walk(child, level + 1)

    for p in paths:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"not a directory: {p}")
        walk(Path(p), 0)
    return list(dict.fromkeys(found))


def read_run_config(run_dir: Path | str) -> dict[str, Any]:
    """`<run_dir>/config.yaml` as a dict, or {} when it is absent or unreadable."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _relevant_keys(method: str, reward: Any) -> tuple[str, ...]:
    """The settings that can change a method's results (besides reward and N)."""
    if method == "latentseek":
        keys = (*_LATENT_KEYS, *_COMMON_KEYS)
    elif method in ("bon", "sc"):
        keys = (*_SAMPLING_KEYS, *_COMMON_KEYS)
    else:
        keys = _COMMON_KEYS
    if method in ("latentseek", "bon") and reward == "self":
        keys = (*keys, *_SELF_REWARD_KEYS)
    return keys


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def _applies(key: str, method: str, reward: Any) -> bool:
    if key == "reward":
        return method in ("latentseek", "bon")
    if key == "n_samples":
        return method in ("bon", "sc")
    return key in _relevant_keys(method, reward)


def _settings(problems: pd.DataFrame, cfg: dict[str, Any]) -> pd.DataFrame:
    """One run's problem rows with a column per setting (None where it does not apply)."""
    out = problems.copy()
    for key in _ALL_KEYS:
        out[key] = [
            cfg.get(key) if _applies(key, m, cfg.get("reward")) else None for m in out["method"]
        ]
        out[key] = out[key].astype(object)
    sampled = out["method"].isin(["bon", "sc"]) & out["n_samples"].isna()
    if sampled.any():  # no config: N is what was drawn
        out.loc[sampled, "n_samples"] = out.loc[sampled, "samples"].map(len).max()
    return out


def _base_label(method: str, reward: Any, n_samples: Any) -> tuple[str, list[str]]:
    parts = []
    if method in ("latentseek", "bon"):
        parts.append(REWARD_NAMES.get(reward, _fmt(reward)))
    if method in ("bon", "sc"):
        parts.append(f"N={_fmt(n_samples)}")
    return METHOD_NAMES.get(method, method), parts


def _assign_labels(problems: pd.DataFrame) -> pd.DataFrame:
    bases = [
        _base_label(m, r, n)
        for m, r, n in zip(problems["method"], problems["reward"], problems["n_samples"])
    ]
    problems = problems.assign(_base=[f"{name} {parts}" for name, parts in bases])
    labels = pd.Series("", index=problems.index, dtype=object)
    for _, same in problems.groupby("_base", sort=False):
        first = same.iloc[0]
        keys = _relevant_keys(first["method"], first["reward"])
        varying = [
            k
            for k in keys
            if any(
                cell[k].map(_fmt).nunique() > 1 for _, cell in same.groupby(["dataset", "model"])
            )
        ]
        for i, row in same.iterrows():
            name, parts = _base_label(row["method"], row["reward"], row["n_samples"])
            parts = parts + [f"{k}={_fmt(row[k])}" for k in varying]
            labels[i] = name + (f" ({', '.join(parts)})" if parts else "")
    return problems.drop(columns="_base").assign(label=labels)


@dataclass
class Records:
    """The records of many runs, one row per (configuration, problem)."""

    problems: pd.DataFrame  # problem rows + run_dir, label and the setting columns
    iterations: pd.DataFrame  # iteration rows of those problems + run_dir, label, model
    runs: pd.DataFrame  # one row per run directory


def load_records(paths: Sequence[Path | str] | Path | str) -> Records:
    """Read every run under `paths` (run dirs or sweep dirs) into one `Records`."""
    frames, iteration_frames, runs = [], [], []
    for d in find_run_dirs(paths):
        problems, iterations = read_records(d)
        cfg = read_run_config(d)
        runs.append(
            {
                "run_dir": str(d),
                "config": "config.yaml" if cfg else "absent",
                "methods": ", ".join(dict.fromkeys(problems["method"])),
                "datasets": ", ".join(dict.fromkeys(problems["dataset"])),
                "models": ", ".join(dict.fromkeys(problems["model"])),
                "problems": len(problems),
                "failures": int((problems["error"] != "").sum()),
            }
        )
        if problems.empty:
            continue
        frames.append(_settings(problems.assign(run_dir=str(d)), cfg))
        iteration_frames.append(iterations.assign(run_dir=str(d)))
    if not frames:
        raise ValueError(f"no problem records under {', '.join(map(str, _as_list(paths)))}")
    problems = _assign_labels(pd.concat(frames, ignore_index=True))
    problems = problems.drop_duplicates([*_KEY, "problem_id"], keep="first")
    order = problems.apply(_row_order, axis=1)
    problems = (
        problems.assign(_order=order)
        .sort_values(["_order", "label"], kind="stable")
        .drop(columns="_order")
        .reset_index(drop=True)
    )
    link = ["run_dir", "method", "problem_id"]
    iterations = pd.concat(iteration_frames, ignore_index=True).merge(
        problems[[*link, "label", "model"]], on=link, how="inner"
    )
    return Records(problems, iterations, pd.DataFrame(runs))


def _as_list(paths: Sequence[Path | str] | Path | str) -> list[Path | str]:
    return [paths] if isinstance(paths, str | Path) else list(paths)


def _row_order(row: pd.Series) -> tuple[int, int]:
    method = METHOD_ORDER.index(row["method"]) if row["method"] in METHOD_ORDER else 99
    reward = REWARD_ORDER.index(row["reward"]) if row["reward"] in REWARD_ORDER else 9
    return method, reward


def _dataset_order(names: Sequence[str]) -> list[str]:
    known = [d for d in DATASET_NAMES if d in names]
    return known + sorted(set(names) - set(known))


def _model_key(model: str) -> tuple[str, str]:
    return _short_model(model).lower(), model


def _short_model(model: str) -> str:
    return Path(model.rstrip("/")).name or model


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


def _settings_of(g: pd.DataFrame) -> dict[str, Any]:
    first = g.iloc[0]
    return {k: first[k] for k in SETTING_COLUMNS} | {
        "runs": ";".join(sorted({Path(d).name for d in g["run_dir"]}))
    }


def accuracy_table(problems: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: accuracy, Wilson CI, paired gain over CoT, cost (long form)."""
    rows = []
    for _, cell in problems.groupby(["dataset", "model"], sort=False):
        cot = cell[cell["method"] == "cot"].drop_duplicates("problem_id")
        source = "records"
        if cot.empty and (cell["method"] == "latentseek").any():
            # No CoT run: LatentSeek's own CoT passes are greedy CoT answers of the same model.
            cot = cell[cell["method"] == "latentseek"].drop_duplicates("problem_id")
            cot = cot.assign(final_correct=cot["cot_correct"], method="cot", label="CoT")
            cot = cot.assign(iterations=0, **{k: None for k in _ALL_KEYS if k not in _COMMON_KEYS})
            source = "LatentSeek CoT pass"
            row = _table_row(cot, None, "", source)
            # Its cost is not recorded apart from LatentSeek's.
            rows.append(row | {"tokens_per_problem": math.nan, "flops_per_problem": math.nan})
        reference = cot.set_index("problem_id")["final_correct"] if not cot.empty else None
        for _, g in cell.groupby("label", sort=False):
            method = g["method"].iloc[0]
            if method == "latentseek":
                rows.append(_table_row(g, g["cot_correct"].to_numpy(bool), "own CoT pass"))
            elif method == "cot" or reference is None:
                rows.append(_table_row(g, None, ""))
            else:
                shared = g[g["problem_id"].isin(reference.index)]
                ref = reference.loc[shared["problem_id"]].to_numpy(bool)
                name = "CoT records" if source == "records" else "LatentSeek CoT pass"
                rows.append(_table_row(shared, ref, name, full=g))
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    # Rows: methods in the records' order (a CoT from LatentSeek's passes first), then cells.
    labels = list(dict.fromkeys(["CoT", *problems["label"]]))
    datasets = _dataset_order(list(dict.fromkeys(table["dataset"])))
    order = [
        (labels.index(lab), datasets.index(d), _model_key(m))
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
        **_settings_of(full),
    }


def _cell_column(dataset: str, model: str, several_models: bool) -> str:
    name = DATASET_NAMES.get(dataset, dataset)
    return f"{name} · {_short_model(model)}" if several_models else name


def grid(table: pd.DataFrame, render) -> pd.DataFrame:
    """`render(row)` of every `table` row, methods as rows, dataset (x model) as columns;
    rows where nothing rendered are left out."""
    several = table["model"].nunique() > 1
    cells = [
        (d, m)
        for d in _dataset_order(list(dict.fromkeys(table["dataset"])))
        for m in sorted(table.loc[table["dataset"] == d, "model"].unique(), key=_model_key)
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


# ------------------------------------------------------------------------------------------
# LatentSeek after k steps: accuracy, reward, compute


def _final_reward(rewards: Any, initial: Any) -> float:
    if rewards is not None and len(rewards):
        return float(rewards[-1])
    return float("nan") if initial is None or pd.isna(initial) else float(initial)


def _max_k(g: pd.DataFrame) -> int:
    observed = int(g["iterations"].max())
    configured = pd.to_numeric(g["max_iters"], errors="coerce").max()
    return max(observed, 0 if pd.isna(configured) else int(configured))


LATENT_CURVE_COLUMNS = [
    "k", "problems", "accuracy_pct", "mean_reward", "reward_problems", "running_pct",
    "tokens_per_problem", "flops_per_problem",
]  # fmt: skip


def latent_curve(g: pd.DataFrame, iterations: pd.DataFrame, max_k: int) -> pd.DataFrame:
    """Per k = 0..max_k for one LatentSeek configuration (problem rows `g`, their iteration
    rows): accuracy, mean reward, share still iterating, tokens and FLOPs per problem.

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
    final_correct = g["final_correct"].to_numpy(bool)[:, None]
    correct = np.where(ran_more, step_correct, final_correct)
    final_reward = np.array(
        [_final_reward(r, r0) for r, r0 in zip(g["rewards"], g["initial_reward"])]
    )[:, None]
    reward = np.where(ran_more, by_step("reward"), final_reward)
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
    has_reward = ~np.isnan(reward)
    counts = has_reward.sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean_reward = np.where(counts > 0, np.nansum(reward, axis=0) / counts, np.nan)
    return pd.DataFrame(
        {
            "k": ks,
            "problems": len(g),
            "accuracy_pct": 100.0 * correct.mean(axis=0),
            "mean_reward": mean_reward,
            "reward_problems": counts,
            "running_pct": 100.0 * ran_more.mean(axis=0),
            "tokens_per_problem": tokens.mean(axis=0),
            "flops_per_problem": flops_k.mean(axis=0),
        }
    )


def scaling_table(records: Records) -> pd.DataFrame:
    """scaling.csv: `latent_curve` of every LatentSeek configuration."""
    frames = []
    ls = records.problems[records.problems["method"] == "latentseek"]
    for (label, dataset, model), g in ls.groupby(_KEY, sort=False):
        it = records.iterations
        it = it[(it["label"] == label) & (it["dataset"] == dataset) & (it["model"] == model)]
        curve = latent_curve(g, it, _max_k(g))
        head = {"label": label, "method": "latentseek", "dataset": dataset, "model": model}
        frames.append(curve.assign(**head, **_settings_of(g)))
    columns = ["label", "method", "dataset", "model", *SETTING_COLUMNS, "runs"]
    if not frames:
        return pd.DataFrame(columns=[*columns, *LATENT_CURVE_COLUMNS])
    out = pd.concat(frames, ignore_index=True)
    return out[[*columns, *LATENT_CURVE_COLUMNS]]


# ------------------------------------------------------------------------------------------
# BoN and SC with n <= N samples


@functools.lru_cache(maxsize=32)
def _style(prompt: str | None) -> str:
    """The answer style ("boxed" / "json") of a solver prompt template; "boxed" if unknown."""
    from pipeline.config import ConfigError
    from pipeline.prompts import load_solver_template

    try:
        return load_solver_template(prompt or "boxed").style
    except (ConfigError, OSError, yaml.YAMLError):
        return "boxed"


class _SampleScorer:
    """Whether BoN / SC would have been right with the first n of a problem's samples, by the
    engine's own selection and grading rules."""

    def __init__(self) -> None:
        from pipeline.compat import make_grader
        from pipeline.grading import extract_answer
        from pipeline.methods import majority_vote, select_best

        self._make_grader, self._extract = make_grader, extract_answer
        self._vote, self._best = majority_vote, select_best
        self._graders: dict[tuple[str, str], Any] = {}

    def correct(self, row: pd.Series, n: int) -> bool:
        samples = list(row["samples"])
        if row["error"] or not samples:
            return False
        if n >= len(samples):
            return bool(row["final_correct"])
        style = _style(row["prompt"])
        if row["method"] == "bon":
            pick = self._best(list(row["sample_rewards"])[:n])
        else:
            winner = self._vote([self._extract(s, style) for s in samples[:n]])
            pick = 0 if winner is None else winner
        text = samples[pick]
        # Correctness is a function of the text: reuse what the run recorded where it can.
        if text == row["final_answer"]:
            return bool(row["final_correct"])
        if text == samples[0]:
            return bool(row["cot_correct"])
        key = (row["compat"] or "none", style)
        if key not in self._graders:
            self._graders[key] = self._make_grader(*key)
        problem = SimpleNamespace(gold=row["gold"], dataset=row["dataset"], label="")
        return bool(self._graders[key](problem, text).correct)


def sample_curve(g: pd.DataFrame, scorer: _SampleScorer | None = None) -> pd.DataFrame:
    """Per n = 1..N for one BoN or SC configuration: accuracy with the first n samples, and
    tokens / FLOPs per problem scaled by n / N (each sample, and its reward, costs alike)."""
    scorer = scorer or _SampleScorer()
    sizes = g["samples"].map(len).to_numpy(int)
    total = (g["solver_tokens"] + g["verifier_tokens"]).to_numpy(float)
    flops = g["flops"].to_numpy(float)
    rows = []
    for n in range(1, max(1, int(sizes.max())) + 1):
        share = np.where(sizes > 0, np.minimum(n, sizes) / np.maximum(sizes, 1), 1.0)
        correct = [scorer.correct(row, n) for _, row in g.iterrows()]
        rows.append(
            {
                "budget": n,
                "problems": len(g),
                "accuracy_pct": 100.0 * float(np.mean(correct)),
                "tokens_per_problem": float((total * share).mean()),
                "flops_per_problem": float((flops * share).mean()),
            }
        )
    return pd.DataFrame(rows)


COMPUTE_COLUMNS = [
    "label", "method", "dataset", "model", "budget_kind", "budget", "problems", "accuracy_pct",
    "tokens_per_problem", "flops_per_problem", *SETTING_COLUMNS, "runs",
]  # fmt: skip


def compute_table(records: Records, scaling: pd.DataFrame) -> pd.DataFrame:
    """compute.csv: LatentSeek per k (from `scaling`), BoN / SC per n, CoT as one point."""
    frames = []
    p = records.problems
    scorer = _SampleScorer() if p["method"].isin(["bon", "sc"]).any() else None
    for (label, dataset, model), g in p.groupby(_KEY, sort=False):
        method = g["method"].iloc[0]
        head = {"label": label, "method": method, "dataset": dataset, "model": model}
        if method in ("bon", "sc"):
            frames.append(
                sample_curve(g, scorer).assign(budget_kind="n", **head, **_settings_of(g))
            )
        elif method == "cot":
            point = {
                "budget": 0,
                "problems": len(g),
                "accuracy_pct": 100.0 * float(g["final_correct"].mean()),
                "tokens_per_problem": float((g["solver_tokens"] + g["verifier_tokens"]).mean()),
                "flops_per_problem": float(g["flops"].mean()),
            }
            frames.append(
                pd.DataFrame([point]).assign(budget_kind="cot", **head, **_settings_of(g))
            )
    if len(scaling):
        frames.append(scaling.rename(columns={"k": "budget"}).assign(budget_kind="k"))
    if not frames:
        return pd.DataFrame(columns=COMPUTE_COLUMNS)
    return pd.concat(frames, ignore_index=True)[COMPUTE_COLUMNS]


# ------------------------------------------------------------------------------------------
# Distributions: iterations used, tokens changed per step


def iterations_table(records: Records) -> pd.DataFrame:
    """iterations.csv: share of LatentSeek problems (failures left out) per iterations used."""
    rows = []
    ls = records.problems[records.problems["method"] == "latentseek"]
    for (label, dataset, model), g in ls.groupby(_KEY, sort=False):
        done = g[g["error"] == ""]
        counts = done["iterations"].value_counts()
        for i in range(_max_k(g) + 1):
            c = int(counts.get(i, 0))
            rows.append(
                {
                    "label": label, "method": "latentseek", "lr": g["lr"].iloc[0],
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
    for (label, dataset, model), g in steps.groupby(_KEY, sort=False):
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


# ------------------------------------------------------------------------------------------
# Figures


def _with_series(df: pd.DataFrame, several_models: bool) -> pd.DataFrame:
    """Adds `configuration` (the legend entry: the label, with lr for LatentSeek) and `panel`
    (the dataset, and the model when there are several)."""

    def name(row: pd.Series) -> str:
        label = row["label"]
        if row.get("method") == "latentseek" and "lr=" not in label and row.get("lr") is not None:
            label = label[:-1] + f", lr={_fmt(row['lr'])})" if label.endswith(")") else label
        return label

    def panel(row: pd.Series) -> str:
        dataset = DATASET_NAMES.get(row["dataset"], row["dataset"])
        return f"{dataset} · {_short_model(row['model'])}" if several_models else dataset

    if df.empty:
        return df.assign(configuration=[], panel=[])
    datasets = _dataset_order(list(dict.fromkeys(df["dataset"])))
    order = [(datasets.index(d), _model_key(m)) for d, m in zip(df["dataset"], df["model"])]
    df = df.iloc[sorted(range(len(df)), key=order.__getitem__)]  # panels in table order
    return df.assign(configuration=df.apply(name, axis=1), panel=df.apply(panel, axis=1))


def _draw(notes: list[str], name: str, draw) -> Path | None:
    try:
        return draw()
    except ImportError as exc:
        notes.append(f"{name}: not drawn ({exc})")
        return None


def _figures(out: Path, scaling, compute, iterations, steps, several, notes) -> dict:
    from analysis.plots import plot_boxes, plot_lines

    figures: dict[str, Path | None] = {}
    if len(scaling):
        s = _with_series(scaling, several)
        figures["scaling_png"] = _draw(notes, "scaling.png", lambda: plot_lines(
            s, out / "scaling.png", y="accuracy_pct", ylabel="accuracy (%)",
            xs=[("k", "latent iterations k (steps)")], series="configuration",
            facet="panel", title="LatentSeek: accuracy if stopped after k steps",
            ylim=PERCENT_YLIM, integer_x=True,
        ))  # fmt: skip
        r = s.dropna(subset=["mean_reward"])
        if len(r):
            figures["rewards_png"] = _draw(notes, "rewards.png", lambda: plot_lines(
                r, out / "rewards.png", y="mean_reward",
                ylabel="mean reward (0 best, -1 worst)",
                xs=[("k", "latent iterations k (steps)")], series="configuration",
                facet="panel", title="LatentSeek: mean reward after k steps",
                integer_x=True,
            ))  # fmt: skip
        else:
            notes.append("rewards.png: no LatentSeek record holds a reward")
    else:
        notes.append("scaling.png, rewards.png: no LatentSeek records")
    if len(compute):
        c = _with_series(compute, several)
        figures["compute_png"] = _draw(notes, "compute.png", lambda: plot_lines(
            c, out / "compute.png", y="accuracy_pct", ylabel="accuracy (%)",
            xs=[("tokens_per_problem", "tokens per problem (solver + verifier; log scale)"),
                ("flops_per_problem", "FLOPs per problem (estimate; log scale)")],
            series="configuration", facet="panel", logx=True, ylim=PERCENT_YLIM,
            title="Accuracy against compute: LatentSeek per k, BoN / SC per n, CoT",
        ))  # fmt: skip
    if len(iterations):
        i = _with_series(iterations, several)
        figures["iterations_png"] = _draw(notes, "iterations.png", lambda: plot_lines(
            i, out / "iterations.png", y="share_pct", ylabel="problems (%)",
            xs=[("iterations", "latent iterations used (steps)")], series="configuration",
            facet="panel", ylim=PERCENT_YLIM, integer_x=True,
            title="LatentSeek: distribution of iterations used (failures left out)",
        ))  # fmt: skip
    if len(steps):
        t = _with_series(steps, several)
        figures["tokens_changed_png"] = _draw(notes, "tokens_changed.png", lambda: plot_boxes(
            t, out / "tokens_changed.png", group="configuration", facet="panel",
            xs=[("tokens_changed", "prefix tokens changed per step (tokens)"),
                ("changed_pct", "prefix tokens changed per step (% of U)")],
            title="LatentSeek: prefix tokens changed by one latent step",
            integer_x=("tokens_changed",),
        ))  # fmt: skip
    else:
        notes.append("tokens_changed.png: no latent step recorded tokens_changed")
    return figures


# ------------------------------------------------------------------------------------------
# The report


def write_report(run_dirs: Sequence[Path | str] | Path | str, out_dir: Path | str) -> ReportFiles:
    """Read the records of `run_dirs` (run dirs or sweep dirs) and write the report files
    into `out_dir` (see the module docstring). Raises ValueError when there are no records."""
    records = load_records(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    several = records.problems["model"].nunique() > 1

    table = accuracy_table(records.problems)
    table_md = out / "table.md"
    table_md.write_text("# Table 1: accuracy by method and dataset\n\n" + table_markdown(table))
    table.to_csv(out / "table.csv", index=False)

    scaling = scaling_table(records)
    scaling.to_csv(out / "scaling.csv", index=False)
    compute = compute_table(records, scaling)
    compute.to_csv(out / "compute.csv", index=False)
    iterations = iterations_table(records)
    iterations.to_csv(out / "iterations.csv", index=False)
    steps = tokens_changed_steps(records)
    tokens_changed_table(steps).to_csv(out / "tokens_changed.csv", index=False)

    notes: list[str] = []
    figures = _figures(out, scaling, compute, iterations, steps, several, notes)
    files = ReportFiles(
        out_dir=out,
        report=out / "report.md",
        table_md=table_md,
        table_csv=out / "table.csv",
        scaling_csv=out / "scaling.csv",
        compute_csv=out / "compute.csv",
        iterations_csv=out / "iterations.csv",
        tokens_changed_csv=out / "tokens_changed.csv",
        notes=tuple(notes),
        **figures,
    )
    files.report.write_text(_report_markdown(records, table, files))
    return files


def _image(files: ReportFiles, name: str, alt: str) -> str:
    path = getattr(files, name)
    return f"![{alt}]({path.name})\n\n" if path is not None else f"*({alt}: not drawn)*\n\n"


def _report_markdown(records: Records, table: pd.DataFrame, files: ReportFiles) -> str:
    runs = records.runs.assign(
        run_dir=[os.path.relpath(d, files.out_dir) for d in records.runs["run_dir"]]
    )
    settings = table[["label", "dataset", "model", *SETTING_COLUMNS, "runs"]].copy()
    settings = settings.astype(object).where(settings.notna(), "")
    mean_iterations = grid(
        table[table["method"] == "latentseek"], lambda r: f"{r['mean_iterations']:.2f}"
    )
    parts = [
        "# LatentSeek evaluation report\n\n",
        f"Built from the Parquet records of {len(runs)} run(s) (paths relative to this file); "
        "every number below can be recomputed from those records and each run's config.yaml. "
        "A failed problem counts as incorrect and stays in every denominator.\n\n",
        markdown(runs),
        "\n# Table 1\n\n",
        table_markdown(table),
        "\nNumbers, with tokens and FLOPs per problem and the settings: `table.csv`.\n\n",
        "### Configurations\n\n",
        markdown(settings),
        "\n# Test-time scaling: accuracy after k latent steps\n\n",
        _image(files, "scaling_png", "accuracy against k"),
        "For each LatentSeek configuration and k = 0..K (K = the configured `max_iters`, or the "
        "most iterations any problem ran if larger), a problem that ran more than k iterations "
        "is scored by the correctness of its iteration-k answer (iteration 0 = the CoT answer); "
        "one that stopped earlier (reward above the threshold, or no update) is scored by the "
        "answer it returned, i.e. its last answer is carried forward to every later k. At k = K "
        "the curve equals the Table 1 accuracy. Numbers: `scaling.csv` (`running_pct` = "
        "problems still iterating after k steps).\n\n",
        "# Accuracy against compute\n\n",
        _image(files, "compute_png", "accuracy against tokens and FLOPs"),
        "Tokens per problem count every token run through the model, solver and verifier, "
        "prompt and generated (`solver_tokens + verifier_tokens`); FLOPs are the records' "
        "`flops` estimate (2 x parameters x token-passes). CoT is one point. **LatentSeek**, "
        "one point per k: the records hold only each problem's totals, so the cost after "
        "k' = min(k, iterations) steps is approximated as solver prompt tokens + solver "
        "generated tokens x (answer tokens of iterations 0..k') / (answer tokens of all its "
        "iterations) + verifier tokens x (k' + 1) / (iterations + 1) (the verifiers score one "
        "answer per iteration, the CoT answer included); FLOPs are scaled by the same ratio "
        "of tokens. This leaves out the latent step itself (a softmax and backward through "
        "the LM head over U positions), counts the prompt once, and equals the recorded "
        "totals at k = K. **BoN and SC** with N recorded samples, one point per n = 1..N: "
        "the answer the method would have returned from the first n samples (BoN: the highest "
        "`sample_rewards` among them, ties to the earliest; SC: the majority of their extracted "
        "answers, grouped by equivalence, ties to the group seen first, the engine's own "
        "`select_best` / `majority_vote`), graded against the gold answer (the recorded "
        "correctness where that text was recorded, else the engine's grader for the run's "
        "`compat` and prompt style); tokens and FLOPs are the recorded totals x n / N, "
        "as every sample and its reward cost alike on average. At n = N the point equals the "
        "Table 1 row. Numbers: `compute.csv`.\n\n",
        "# Reward trajectories\n\n",
        _image(files, "rewards_png", "mean reward against k"),
        "Mean reward of the answer each problem would return if stopped after k steps, with "
        "the same carry-forward rule as the scaling curve (a stopped problem keeps the reward "
        "of its returned answer: the last element of `rewards`, or `initial_reward` when it "
        "ran no iteration). Problems without a reward (failures) are left out. Self-reward "
        "lies in [-1, 0], PSRM is 0 (correct) or -1. Numbers: `scaling.csv` (`mean_reward`, "
        "`reward_problems`).\n\n",
        "# Iterations used\n\n",
        _image(files, "iterations_png", "distribution of iterations used"),
        "Share of the problems of each LatentSeek configuration that ran exactly i latent "
        "iterations (`iterations` of the problem rows; 0 = the CoT answer was accepted or "
        "there was nothing to update), failed problems left out. Numbers: `iterations.csv`. "
        "Mean iterations per problem (failures included, as in `table.csv`):\n\n",
        markdown(mean_iterations) if len(mean_iterations) else "(no LatentSeek records)\n",
        "\n",
        "# Prefix tokens changed per step\n\n",
        _image(files, "tokens_changed_png", "tokens changed per latent step"),
        "One value per latent step k >= 1 of every problem: `tokens_changed` of the iteration "
        "rows (optimised prefix positions whose argmax token differs from the previous "
        "iteration's), left in tokens and as a share of the problem's U (`update_length`). "
        "Boxes span the quartiles, whiskers 1.5 x the interquartile range, triangles are means. "
        "A step that changes most of U rewrites the answer's opening. Numbers: "
        "`tokens_changed.csv`.\n",
    ]
    if files.notes:
        parts.append("\n# Notes\n\n" + "".join(f"- {n}\n" for n in files.notes))
    return "".join(parts)


# ------------------------------------------------------------------------------------------
# Command line: latentseek report RUN_OR_SWEEP_DIR [--out DIR]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
        help="a run directory, or a sweep directory whose subdirectories are run directories",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None,
        help="where to write the report (default: <first dir>/report)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else Path(args.paths[0]) / "report"
    try:
        files = write_report(args.paths, out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in files.paths():
        print(path)
    for note in files.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="latentseek report", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
