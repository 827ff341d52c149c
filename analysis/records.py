"""The records of many runs read into labelled configurations: the input of every report.

`load_records(paths)` finds the run directories under `paths` (runs or sweeps), reads their
Parquet records and config.yaml, and labels each row with its configuration: a method with its
settings (`label`, e.g. "LatentSeek (PSRM, lr=0.05)") on one dataset and model. The label
carries the reward (LatentSeek, BoN), N (BoN, SC) and every setting that takes two values among
the runs of that method on one dataset and model; `SETTING_COLUMNS` are carried as columns. Runs
of one configuration are pooled (first record of a problem wins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.benchmarks import all_benchmarks
from pipeline.method.methods import Method, all_methods
from pipeline.run.records import PROBLEMS, read_records
from pipeline.run.rundir import CONFIG_FILE

REWARD_NAMES = {"self": "self", "psrm": "PSRM"}
REWARD_ORDER = ["self", "psrm"]

# Settings that can tell two configurations of a method apart (shown in a label when they vary
# within one dataset and model): each method's own (`Method.settings`), then these.
COMMON_SETTING_KEYS = ("prompt", "compat", "max_new_tokens", "dtype", "backend")
_SELF_REWARD_KEYS = ("verifier_prompts", "verifier_max_new_tokens", "format_rule")
_IN_BASE_LABEL = ("reward", "n_samples")  # always in the label where they apply
ALL_SETTING_KEYS = tuple(
    dict.fromkeys(
        [
            *_IN_BASE_LABEL,
            *(k for m in all_methods().values() for k in m.settings),
            *COMMON_SETTING_KEYS,
            *_SELF_REWARD_KEYS,
        ]
    )
)
# Settings written as columns of every CSV (blank where they do not apply).
SETTING_COLUMNS = [
    "reward", "lr", "rho", "max_iters", "n_samples", "prompt", "compat", "max_new_tokens",
]  # fmt: skip
CONFIGURATION_KEY = ["label", "dataset", "model"]  # one configuration


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


def method_of(name: str) -> Method | None:
    """The registered method that recorded rows call `name` (None: not known here)."""
    return all_methods().get(name)


def method_title(name: str) -> str:
    m = method_of(name)
    return m.title if m else name


def dataset_title(name: str) -> str:
    b = all_benchmarks().get(name)
    return b.title if b else name


def _relevant_keys(method: str, reward: Any) -> tuple[str, ...]:
    """The settings that can change a method's results (besides reward and N)."""
    m = method_of(method)
    own = tuple(k for k in (m.settings if m else ()) if k not in _IN_BASE_LABEL)
    keys = (*own, *COMMON_SETTING_KEYS)
    if m is not None and m.uses_reward and reward == "self":
        keys = (*keys, *_SELF_REWARD_KEYS)
    return keys


def _samples(method: str) -> bool:
    m = method_of(method)
    return bool(m and m.samples)


def _uses_reward(method: str) -> bool:
    m = method_of(method)
    return bool(m and m.uses_reward)


def fmt_setting(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def _applies(key: str, method: str, reward: Any) -> bool:
    if key == "reward":
        return _uses_reward(method)
    if key == "n_samples":
        return _samples(method)
    return key in _relevant_keys(method, reward)


def _settings(problems: pd.DataFrame, cfg: dict[str, Any]) -> pd.DataFrame:
    """One run's problem rows with a column per setting (None where it does not apply)."""
    out = problems.copy()
    for key in ALL_SETTING_KEYS:
        out[key] = [
            cfg.get(key) if _applies(key, m, cfg.get("reward")) else None for m in out["method"]
        ]
        out[key] = out[key].astype(object)
    sampled = out["method"].map(_samples) & out["n_samples"].isna()
    if sampled.any():  # no config: N is what was drawn
        out.loc[sampled, "n_samples"] = out.loc[sampled, "samples"].map(len).max()
    # The paper's backbone a run stands for (configs/paper recipes), else the model's own name.
    out["paper_model"] = cfg.get("paper_model") or None
    return out


def _base_label(method: str, reward: Any, n_samples: Any) -> tuple[str, list[str]]:
    parts = []
    if _uses_reward(method):
        parts.append(REWARD_NAMES.get(reward, fmt_setting(reward)))
    if _samples(method):
        parts.append(f"N={fmt_setting(n_samples)}")
    return method_title(method), parts


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
                cell[k].map(fmt_setting).nunique() > 1
                for _, cell in same.groupby(["dataset", "model"])
            )
        ]
        for i, row in same.iterrows():
            name, parts = _base_label(row["method"], row["reward"], row["n_samples"])
            parts = parts + [f"{k}={fmt_setting(row[k])}" for k in varying]
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
    problems = problems.drop_duplicates([*CONFIGURATION_KEY, "problem_id"], keep="first")
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
    m = method_of(row["method"])
    method = m.order if m else 10**6
    reward = REWARD_ORDER.index(row["reward"]) if row["reward"] in REWARD_ORDER else 9
    return method, reward


def dataset_order(names: Sequence[str]) -> list[str]:
    known = [d for d in all_benchmarks() if d in names]
    return known + sorted(set(names) - set(known))


def model_key(model: str) -> tuple[str, str]:
    return short_model(model).lower(), model


def short_model(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def settings_of(g: pd.DataFrame) -> dict[str, Any]:
    first = g.iloc[0]
    return {k: first[k] for k in SETTING_COLUMNS} | {
        "runs": ";".join(sorted({Path(d).name for d in g["run_dir"]}))
    }
