"""Our cells beside the paper's (arXiv 2505.13308 v3): the accuracies it reports, shipped in
data/paper/latentseek-v3.csv (table, prompt, backbone, dataset, method, reward, setting, value),
and its two analyses that need no GPU: the self-reward's agreement with correctness (Table 6)
and the average number of iterations (Table 8).

A cell of ours is matched to the paper by backbone (the run's `paper_model`, else the model's
own name), dataset, prompt, method, the reward where the paper names one, SE's noise variance,
and the budget: N for BoN and SC (Table 1 is N = 3, Table 10 N = 10), K for LatentSeek (the
cell's K from Tables 21-26, else the N column, e.g. Table 4's K = 256). A cell that matches in
everything but the budget is listed with "no paper cell" and the budgets the paper has, never
beside a value at another budget. Table 1 gives one prompt per cell; Table 3 (PSRM) only the mean
of both prompts, so a PSRM cell is compared when both prompts were run. The comparison reports our
accuracy with its 95% Wilson interval, the paper's value, the difference, and whether the paper's
value lies inside our interval. A model that is not one of the paper's backbones (the embedded
135M model) has no cell of its own in the paper: it is compared only where a run says which
backbone it stands for.

Tables 6 and 8 are looked up by method and reward too: both report LatentSeek with the
self-reward (Table 8's reward is not named; the data file reads it as self), so a reflect, SE or
PSRM configuration gets no paper value there; Table 8 (iterations) also needs the cell's K.

The 1:1:1:2 verifier weights (App. F.5: Qwen2-7B and Llama-3.1-8B, MATH-500, Prompt 1) put one
failed weight-1 verifier at exactly -1/5 = -0.2 = tau, which the strict `>` rejects (with the
1:1:2:2 weights it is -1/6, accepted). The recipes of those two cells therefore set tau = -0.21
(`TIE_THRESHOLD`), so that the re-weighted cells accept what the default ones accept;
`TIE_CELLS` lists them and the comparison flags their self-rewarded rows. (Table 6's agreement
keeps the paper's -0.2 for every run: it is the paper's definition, and the paper reports no
Table 6 value for those cells.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.accuracy import wilson_interval
from analysis.records import Records, dataset_order, short_model

PAPER_DIR = Path(__file__).resolve().parent.parent / "data" / "paper"
PAPER_FILE = PAPER_DIR / "latentseek-v3.csv"
SETTINGS_FILE = PAPER_DIR / "latentseek-v3-settings.csv"
THRESHOLD = -0.2  # Table 6 binarises the self-reward here: positive above, negative at or below
DEFAULT_K = 10  # Algorithm 1: "K is typically 10"; every cell of Tables 21-26 says 10
# The cells whose verifiers are weighted 1:1:1:2 (App. F.5), where one failed weight-1 verifier
# gives exactly -0.2: their recipes run with TIE_THRESHOLD instead of -0.2 (module docstring).
TIE_CELLS = frozenset(
    {("Qwen2-7B-Instruct", "math500", "boxed"), ("Llama-3.1-8B-Instruct", "math500", "boxed")}
)
TIE_THRESHOLD = -0.21
BUDGET_KEYS = {"bon": "n_samples", "sc": "n_samples", "latentseek": "max_iters"}
NO_PAPER_CELL = "no paper cell"
# Above this share of unreadable verdicts (each counted as False) a self-reward mostly measures
# whether the verifiers wrote the marker, not the answer: the report warns.
UNPARSED_WARN = 0.10

COLUMNS = [
    "label", "dataset", "prompt", "paper_model", "problems", "accuracy_pct", "ci_low_pct",
    "ci_high_pct", "paper_pct", "difference_pp", "paper_in_ci", "paper_table", "note",
]  # fmt: skip


def load_paper(path: Path = PAPER_FILE, settings: Path = SETTINGS_FILE) -> pd.DataFrame:
    """The paper's numbers, with `budget`: the N (BoN, SC) or K (LatentSeek) each row is at."""
    paper = pd.read_csv(path, dtype=str, keep_default_na=False)
    paper = paper.assign(value=pd.to_numeric(paper["value"], errors="coerce"))
    ks = _cell_ks(settings)
    budget = []
    for row in paper.itertuples():
        if row.n:
            budget.append(int(row.n))
        elif row.method == "latentseek":
            prompts = row.prompt.removeprefix("avg(").removesuffix(")").split(",")
            found = {ks.get((row.model, row.dataset, p, row.reward)) for p in prompts} - {None}
            budget.append(found.pop() if len(found) == 1 else DEFAULT_K)
        else:
            budget.append(None)
    return paper.assign(budget=pd.array(budget, dtype="Int64"))


def _cell_ks(settings: Path) -> dict[tuple[str, str, str, str], int]:
    """(model, dataset, prompt, reward) -> K, from Tables 21-26 of the settings file."""
    table = pd.read_csv(settings, dtype=str, keep_default_na=False)
    rows = table[table["table"].str.fullmatch(r"Table 2[1-6]") & (table["key"] == "max_iters")]
    return {
        (r.model, r.dataset, r.prompt, r.method.removeprefix("latentseek_")): int(r.value)
        for r in rows.itertuples()
    }


def _budget(method: str, settings: dict) -> int | None:
    """Our cell's budget in the paper's terms (N or K), None for a method without one."""
    key = BUDGET_KEYS.get(method)
    value = settings.get(key) if key else None
    try:
        return None if value is None or pd.isna(value) else int(value)
    except (TypeError, ValueError):
        return None


def _at_budget(paper: pd.DataFrame, budget: int | None) -> pd.Series:
    """Rows of `paper` at exactly `budget` (none when our cell has no budget)."""
    if budget is None:
        return pd.Series(False, index=paper.index)
    return (paper["budget"] == budget).fillna(False).astype(bool)


def tie_cell(backbone: str, dataset: str, prompt: str) -> bool:
    """Whether (backbone, dataset, prompt) is one of the 1:1:1:2 cells (`TIE_CELLS`)."""
    return (backbone, dataset, prompt) in TIE_CELLS


def _cells(records: Records) -> pd.DataFrame:
    """One row per configuration and dataset: what matching needs, and the correct count."""
    p = records.problems.assign(
        backbone=[m or short_model(model) for m, model in zip(records.problems["paper_model"],
                                                               records.problems["model"])]
    )  # fmt: skip
    keys = ["label", "dataset", "model"]
    rows = []
    for (label, dataset, model), g in p.groupby(keys, sort=False):
        first = g.iloc[0]
        rows.append(
            {
                "label": label, "dataset": dataset, "model": model, "method": first["method"],
                "reward": first["reward"] or "", "prompt": first["prompt"] or "",
                "settings": first.to_dict(), "paper_model": first["backbone"],
                "problems": len(g), "correct": int(g["final_correct"].sum()),
            }
        )  # fmt: skip
    return pd.DataFrame(rows)


def _match(paper: pd.DataFrame, cell: pd.Series, prompt: str) -> tuple[pd.DataFrame, list[str]]:
    """The paper's rows for our cell at our budget, and (when there are none) the budgets at
    which the paper does report the cell, e.g. ["N=3 (Table 1)", "N=10 (Table 10)"]."""
    hit = paper[
        (paper["metric"] == "accuracy")
        & (paper["model"] == cell["paper_model"])
        & (paper["dataset"] == cell["dataset"])
        & (paper["method"] == cell["method"])
        & (paper["prompt"] == prompt)
    ]
    hit = hit[(hit["reward"] == "") | (hit["reward"] == cell["reward"])]
    same_setting = [_same_setting(setting, cell["settings"]) for setting in hit["setting"]]
    hit = hit[np.array(same_setting, dtype=bool)]
    ours = _budget(cell["method"], cell["settings"])
    if ours is None or cell["method"] not in BUDGET_KEYS:
        return hit, []
    same = hit[hit["budget"].isna().to_numpy() | _at_budget(hit, ours).to_numpy()]
    letter = "N" if BUDGET_KEYS[cell["method"]] == "n_samples" else "K"
    tables: dict[int, list[str]] = {}
    for b, t in zip(hit["budget"], hit["table"]):
        if not pd.isna(b) and t not in tables.setdefault(int(b), []):
            tables[int(b)].append(t)
    other = [f"{letter}={b} ({', '.join(ts)})" for b, ts in sorted(tables.items())]
    return same, [] if len(same) else other


def _same_setting(setting: str, ours: dict) -> bool:
    """Whether our run has the paper row's `key=value` setting (SE's noise variance); a row
    without one matches any run."""
    if not setting:
        return True
    key, _, value = setting.partition("=")
    mine = ours.get(key)
    try:
        return mine is not None and float(mine) == float(value)
    except (TypeError, ValueError):
        return str(mine) == value


def comparison_table(records: Records, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each of our cells that the paper reports, beside the paper's value (long form)."""
    paper = load_paper() if paper is None else paper
    cells = _cells(records)
    rows = []
    for _, cell in cells.iterrows():
        hit, elsewhere = _match(paper, cell, cell["prompt"])
        if len(hit) or elsewhere:
            rows.append(
                _row(cell, cell["prompt"], cell["correct"], cell["problems"], hit, elsewhere)
            )
    # Table 3: the mean of both prompts, for a method and reward run once on each prompt.
    budget = [_budget(c["method"], c["settings"]) for _, c in cells.iterrows()]
    cells = cells.assign(budget=pd.array(budget, dtype="Int64"))
    for _, g in cells.groupby(["method", "reward", "dataset", "paper_model", "budget"],
                              sort=False, dropna=False):  # fmt: skip
        if sorted(g["prompt"]) == ["boxed", "json"]:
            cell = g.iloc[0].copy()
            hit, elsewhere = _match(paper, cell, "avg(boxed,json)")
            if len(hit) or elsewhere:
                cell["label"] = " + ".join(g["label"])
                acc = [c / n for c, n in zip(g["correct"], g["problems"])]
                problems = int(g["problems"].sum())
                rows.append(_row(cell, "avg(boxed,json)", None, problems, hit, elsewhere, acc))
    table = pd.DataFrame(rows, columns=COLUMNS)
    order = dataset_order(list(dict.fromkeys(table["dataset"])))
    return table.sort_values("dataset", key=lambda c: c.map(order.index), kind="stable")


def _row(cell, prompt, correct, problems, hit, elsewhere, mean_of=None) -> dict:
    if mean_of is None:
        acc = correct / problems
        low, high = wilson_interval(correct, problems)
    else:  # the mean of the prompts' accuracies; no interval of our own for it
        acc, low, high = float(np.mean(mean_of)), float("nan"), float("nan")
    notes = []
    if len(hit):
        first = hit.iloc[0]
        paper, table = float(first["value"]), first["table"]
        inside = bool(100 * low <= paper <= 100 * high) if not np.isnan(low) else None
    else:  # the paper reports this cell at other budgets only: nothing to set beside it
        paper, table, inside = float("nan"), "", None
        notes.append(f"{NO_PAPER_CELL} at this budget; the paper has {', '.join(elsewhere)}")
    if tie_cell(cell["paper_model"], cell["dataset"], prompt) and cell["reward"] == "self":
        tau = cell["settings"].get("reward_threshold")
        notes.append(
            "1:1:1:2 verifiers: one failed weight-1 verifier gives exactly -0.2; the recipe's "
            f"tau is {TIE_THRESHOLD}" + ("" if tau is None else f", this run's {tau:g}")
        )
    return {
        "label": cell["label"], "dataset": cell["dataset"], "prompt": prompt,
        "paper_model": cell["paper_model"], "problems": problems,
        "accuracy_pct": 100 * acc, "ci_low_pct": 100 * low, "ci_high_pct": 100 * high,
        "paper_pct": paper, "difference_pp": 100 * acc - paper, "paper_in_ci": inside,
        "paper_table": table, "note": "; ".join(notes),
    }  # fmt: skip


def agreement_table(records: Records, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 6: over every answer a self-rewarded configuration explored (its CoT answer and each
    iteration's), the share whose reward > -0.2 agrees with its correctness; the paper's value
    where it reports this cell (GSM8K, the json prompt)."""
    paper = load_paper() if paper is None else paper
    p, it = records.problems, records.iterations
    rows = []
    selfish = p[(p["reward"] == "self") & p["method"].isin(it["method"].unique())]
    for (label, dataset, model), g in selfish.groupby(["label", "dataset", "model"], sort=False):
        steps = it[(it["label"] == label) & (it["model"] == model)]
        steps = steps[steps["problem_id"].isin(g["problem_id"]) & steps["reward"].notna()]
        if steps.empty:
            continue
        agree = (steps["reward"].astype(float) > THRESHOLD) == steps["correct"].astype(bool)
        backbone = g["paper_model"].iloc[0] or short_model(model)
        hit = paper[(paper["table"] == "Table 6") & (paper["model"] == backbone)
                    & (paper["dataset"] == dataset) & (paper["prompt"] == g["prompt"].iloc[0])
                    & (paper["method"] == g["method"].iloc[0]) & (paper["reward"] == "self")]  # fmt: skip
        rows.append(
            {
                "label": label, "dataset": dataset, "prompt": g["prompt"].iloc[0],
                "paper_model": backbone, "answers": len(steps),
                "agreement_pct": 100 * float(agree.mean()),
                "positive_pct": 100 * float((steps["reward"].astype(float) > THRESHOLD).mean()),
                "correct_pct": 100 * float(steps["correct"].astype(bool).mean()),
                "paper_pct": float(hit["value"].iloc[0]) if len(hit) else float("nan"),
            }
        )  # fmt: skip
    columns = ["label", "dataset", "prompt", "paper_model", "answers", "agreement_pct",
               "positive_pct", "correct_pct", "paper_pct"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def iterations_table(records: Records, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 8: the mean number of iterations over every problem of an iterative configuration
    (a CoT answer accepted at once counts 0), beside the paper's value where it reports it."""
    paper = load_paper() if paper is None else paper
    p = records.problems
    rows = []
    it_methods = set(records.iterations.loc[records.iterations["iteration"] > 0, "method"])
    for (label, dataset, model), g in p[p["method"].isin(it_methods)].groupby(
        ["label", "dataset", "model"], sort=False
    ):
        backbone, first = g["paper_model"].iloc[0] or short_model(model), g.iloc[0]
        hit = paper[(paper["table"] == "Table 8") & (paper["metric"] == "avg_update_iterations")
                    & (paper["model"] == backbone) & (paper["dataset"] == dataset)
                    & (paper["prompt"] == first["prompt"])
                    & (paper["method"] == first["method"])
                    & (paper["reward"] == (first["reward"] or ""))
                    & _at_budget(paper, _budget(first["method"], first.to_dict()))]  # fmt: skip
        rows.append(
            {
                "label": label, "dataset": dataset, "prompt": g["prompt"].iloc[0],
                "paper_model": backbone, "problems": len(g),
                "mean_iterations": float(g["iterations"].mean()),
                "accepted_at_cot_pct": 100 * float((g["iterations"] == 0).mean()),
                "paper_mean_iterations": float(hit["value"].iloc[0]) if len(hit) else float("nan"),
            }
        )  # fmt: skip
    columns = ["label", "dataset", "prompt", "paper_model", "problems", "mean_iterations",
               "accepted_at_cot_pct", "paper_mean_iterations"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def verdicts_table(records: Records) -> pd.DataFrame:
    """Per self-rewarded configuration: how many verifier outputs gave no readable verdict
    (`unparsed_verdicts`, counted as False) out of the verdicts asked for (answers scored x
    verifiers in its `verifier_prompts` file), and whether the share exceeds `UNPARSED_WARN`."""
    p = records.problems
    rows = []
    for (label, dataset, model), g in p[p["reward"] == "self"].groupby(
        ["label", "dataset", "model"], sort=False
    ):
        scored = sum(
            len(samples) + (0 if pd.isna(r0) else 1) + len(rewards)
            for samples, r0, rewards in zip(g["sample_rewards"], g["initial_reward"], g["rewards"])
        )  # answers scored: BoN's samples, else the first answer and one per iteration
        asked = scored * _verifier_count(g["verifier_prompts"].iloc[0])
        unparsed = int(g["unparsed_verdicts"].sum())
        share = unparsed / asked if asked else float("nan")
        rows.append(
            {
                "label": label, "dataset": dataset, "model": short_model(model),
                "verdicts": asked, "unparsed": unparsed, "unparsed_pct": 100 * share,
                "warning": bool(share > UNPARSED_WARN),
            }
        )  # fmt: skip
    columns = ["label", "dataset", "model", "verdicts", "unparsed", "unparsed_pct", "warning"]
    return pd.DataFrame(rows, columns=columns)


def _verifier_count(verifier_prompts: object) -> int:
    """The number of verifiers in a run's `verifier_prompts` file (4, the paper's, if unknown)."""
    from pipeline.config import ConfigError
    from pipeline.method.prompts import load_verifiers

    try:
        return len(load_verifiers(str(verifier_prompts or "verifiers")).verifiers)
    except (ConfigError, OSError):
        return 4


def paper_markdown(records: Records, against: pd.DataFrame) -> str:
    """paper.md: the comparison, then Tables 6 and 8, with how each was computed."""
    from analysis.tables import markdown

    def fmt(df: pd.DataFrame) -> str:
        return markdown(df, floatfmt=".2f") if len(df) else "(no such configuration here)\n"

    agreement, iterations = agreement_table(records), iterations_table(records)
    verdicts = verdicts_table(records)
    warned = verdicts[verdicts["warning"]]
    warning = "".join(
        f"**Warning:** {r.label} ({r.dataset}, {r.model}): {r.unparsed_pct:.1f}% of the "
        f"verifiers' outputs held no readable verdict (counted as False; above "
        f"{100 * UNPARSED_WARN:.0f}%), so its self-reward says little about its answers.\n\n"
        for r in warned.itertuples()
    )
    return "".join(
        [
            warning,
            "Our cells beside the numbers arXiv 2505.13308 v3 reports for the same backbone "
            "(the run's `paper_model`, else the model's name), dataset, prompt, method, reward, "
            "setting and budget: N for BoN and SC (Table 1: N = 3, Table 10: N = 10), K for "
            "LatentSeek (the cell's K) (data/paper/latentseek-v3.csv). A cell the paper reports "
            'at other budgets only has no paper value: its `note` says "no paper cell" and '
            "which budgets the paper has. `note` also flags the two 1:1:1:2 cells, whose "
            "recipes run at tau = -0.21 (one failed weight-1 verifier gives exactly -0.2). "
            "`ci_*_pct`: our 95% Wilson interval; "
            "`paper_in_ci`: whether the paper's value lies inside it. Table 3 (PSRM) gives the "
            "mean of both prompts only: such a row is the mean of our two prompts' accuracies, "
            "without an interval. A model that is not one of the paper's backbones is compared "
            "only as the backbone its run names, which is not a reproduction.\n\n",
            fmt(against),
            "\n## Self-reward agreement with correctness (the paper's Table 6)\n\n",
            "Over every answer a self-rewarded configuration explored (the CoT answer and each "
            "iteration's), the share whose reward > -0.2 agrees with its correctness; "
            "`positive_pct`: rewards above -0.2; `correct_pct`: correct answers. The paper "
            "reports LatentSeek (Self) on GSM8K with the json prompt.\n\n",
            fmt(agreement),
            "\n## Average iterations (the paper's Table 8)\n\n",
            "The mean number of iterations over every problem of an iterative configuration, a "
            "CoT answer accepted at once counting 0; the paper's value is LatentSeek (Self) at "
            "its cell's K.\n\n",
            fmt(iterations),
            "\n## Unreadable verdicts\n\n",
            "Per self-rewarded configuration: `verdicts`, the verifier outputs it asked for "
            "(answers scored x verifiers); `unparsed`, those without a readable verdict (the "
            "records' `unparsed_verdicts`; in the default mode such a verifier counts as False, "
            "under compat=reference the official rule reads it from its own prompt). "
            f"`warning`: above {100 * UNPARSED_WARN:.0f}%.\n\n",
            fmt(verdicts),
        ]
    )
