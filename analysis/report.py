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
    paper.md, paper.csv       our cells beside the paper's (arXiv 2505.13308 v3), its Tables 6
                              and 8 (`analysis.paper`)
    laws.png, laws.csv        scaling laws fitted per configuration, with bootstrap intervals
    law_points.csv            the points they were fitted to; forecasts.csv: the largest budget
                              predicted from the small ones (`analysis.laws`)
    frontier.png, .csv        the compute-optimal frontier: the best configuration per budget

The pieces, each in its own module: the records read into labelled configurations
(`analysis.records`), Table 1 with its intervals (`analysis.accuracy`), the curves after k steps,
with n samples and against compute (`analysis.curves`); this module draws the figures, writes
the files and report.md, and is the `latentseek report` command. The scaling laws, their
forecasts and the frontier are `analysis.laws`, their section, figures and MLflow values
`analysis.laws_report`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd

from analysis.accuracy import accuracy_table, grid, table_markdown
from analysis.curves import (
    compute_table,
    iterations_table,
    scaling_table,
    tokens_changed_steps,
    tokens_changed_table,
)
from analysis.laws_report import write_laws
from analysis.paper import comparison_table, paper_markdown
from analysis.records import (
    SETTING_COLUMNS,
    Records,
    dataset_order,
    dataset_title,
    fmt_setting,
    load_records,
    method_of,
    model_key,
    short_model,
)
from analysis.tables import markdown


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
    paper_md: Path
    paper_csv: Path
    laws_csv: Path
    law_points_csv: Path
    forecasts_csv: Path
    frontier_csv: Path
    scaling_png: Path | None = None
    compute_png: Path | None = None
    rewards_png: Path | None = None
    iterations_png: Path | None = None
    tokens_changed_png: Path | None = None
    laws_png: Path | None = None
    frontier_png: Path | None = None
    notes: tuple[str, ...] = ()
    laws_section: str = ""  # the "Scaling laws" section (`analysis.laws_report.laws_markdown`)
    # the laws as MLflow metrics and params (`analysis.laws_report.mlflow_values`), for a sweep's run
    laws_metrics: dict[str, float] = field(default_factory=dict)
    laws_params: dict[str, str] = field(default_factory=dict)

    def paths(self) -> list[Path]:
        """Every file written, report.md first."""
        return [
            v
            for f in fields(self)
            if f.name != "out_dir" and isinstance(v := getattr(self, f.name), Path)
        ]


# Accuracy axes: 0-100 % with a margin, so that a line at 0 % is not drawn on the axis itself.
PERCENT_YLIM = (-3, 103)


# ------------------------------------------------------------------------------------------
# Figures


def _with_series(df: pd.DataFrame, several_models: bool) -> pd.DataFrame:
    """Adds `configuration` (the legend entry: the label, with lr for LatentSeek) and `panel`
    (the dataset, and the model when there are several)."""

    def name(row: pd.Series) -> str:
        label = row["label"]
        method = method_of(row.get("method", ""))
        steps = method is not None and "lr" in method.settings
        if steps and "lr=" not in label and row.get("lr") is not None:
            label = label[:-1] + f", lr={fmt_setting(row['lr'])})" if label.endswith(")") else label
        return label

    def panel(row: pd.Series) -> str:
        dataset = dataset_title(row["dataset"])
        return f"{dataset} · {short_model(row['model'])}" if several_models else dataset

    if df.empty:
        return df.assign(configuration=[], panel=[])
    datasets = dataset_order(list(dict.fromkeys(df["dataset"])))
    order = [(datasets.index(d), model_key(m)) for d, m in zip(df["dataset"], df["model"])]
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
    against = comparison_table(records)
    against.to_csv(out / "paper.csv", index=False)
    paper_md = out / "paper.md"
    paper_md.write_text("# Against the paper\n\n" + paper_markdown(records, against))

    notes: list[str] = []
    figures = _figures(out, scaling, compute, iterations, steps, several, notes)
    laws = write_laws(records, out, notes)
    files = ReportFiles(
        out_dir=out,
        report=out / "report.md",
        table_md=table_md,
        table_csv=out / "table.csv",
        scaling_csv=out / "scaling.csv",
        compute_csv=out / "compute.csv",
        iterations_csv=out / "iterations.csv",
        tokens_changed_csv=out / "tokens_changed.csv",
        paper_md=paper_md,
        paper_csv=out / "paper.csv",
        laws_csv=out / "laws.csv",
        law_points_csv=out / "law_points.csv",
        forecasts_csv=out / "forecasts.csv",
        frontier_csv=out / "frontier.csv",
        laws_png=laws.png["laws"],
        frontier_png=laws.png["frontier"],
        notes=tuple(notes),
        laws_section=laws.markdown,
        laws_metrics=laws.metrics,
        laws_params=laws.params,
        **figures,
    )
    files.report.write_text(_report_markdown(records, table, files))
    return files


def _image(files: ReportFiles, name: str, alt: str) -> str:
    path = getattr(files, name)
    return f"![{alt}]({path.name})\n\n" if path is not None else f"*({alt}: not drawn)*\n\n"


# The report's explanations, one per section.
_SCALING_NOTE = (
    "For each LatentSeek configuration and k = 0..K (K = the configured `max_iters`, or the "
    "most iterations any problem ran if larger), a problem that ran more than k iterations "
    "is scored by the correctness of its iteration-k answer (iteration 0 = the CoT answer); "
    "one that stopped earlier (reward above the threshold, or no update) is scored by the "
    "answer it returned, i.e. its last answer is carried forward to every later k. At k = K "
    "the curve equals the Table 1 accuracy. Numbers: `scaling.csv` (`running_pct` = "
    "problems still iterating after k steps).\n\n"
)

_COMPUTE_NOTE = (
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
    "Table 1 row. Numbers: `compute.csv`.\n\n"
)

_REWARDS_NOTE = (
    "Mean reward of the answer each problem would return if stopped after k steps, with "
    "the same carry-forward rule as the scaling curve (a stopped problem keeps the reward "
    "of its returned answer: the last element of `rewards`, or `initial_reward` when it "
    "ran no iteration). Problems without a reward (failures) are left out. Self-reward "
    "lies in [-1, 0], PSRM is 0 (correct) or -1. Numbers: `scaling.csv` (`mean_reward`, "
    "`reward_problems`).\n\n"
)

_ITERATIONS_NOTE = (
    "Share of the problems of each LatentSeek configuration that ran exactly i latent "
    "iterations (`iterations` of the problem rows; 0 = the CoT answer was accepted or "
    "there was nothing to update), failed problems left out. Numbers: `iterations.csv`. "
    "Mean iterations per problem (failures included, as in `table.csv`):\n\n"
)

_TOKENS_CHANGED_NOTE = (
    "One value per latent step k >= 1 of every problem: `tokens_changed` of the iteration "
    "rows (optimised prefix positions whose argmax token differs from the previous "
    "iteration's), left in tokens and as a share of the problem's U (`update_length`). "
    "Boxes span the quartiles, whiskers 1.5 x the interquartile range, triangles are means. "
    "A step that changes most of U rewrites the answer's opening. Numbers: "
    "`tokens_changed.csv`.\n"
)


def _report_markdown(records: Records, table: pd.DataFrame, files: ReportFiles) -> str:
    runs = records.runs.assign(
        run_dir=[os.path.relpath(d, files.out_dir) for d in records.runs["run_dir"]]
    )
    settings = table[["label", "dataset", "model", *SETTING_COLUMNS, "runs"]].copy()
    settings = settings.astype(object).where(settings.notna(), "")
    iterative = table["method"].map(lambda m: bool((x := method_of(m)) and x.iterations))
    mean_iterations = grid(table[iterative], lambda r: f"{r['mean_iterations']:.2f}")
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
        "\n" + files.paper_md.read_text(),
        "\n# Test-time scaling: accuracy after k latent steps\n\n",
        _image(files, "scaling_png", "accuracy against k"),
        _SCALING_NOTE,
        "# Accuracy against compute\n\n",
        _image(files, "compute_png", "accuracy against tokens and FLOPs"),
        _COMPUTE_NOTE,
        "# Scaling laws\n\n",
        files.laws_section,
        "\n",
        "# Reward trajectories\n\n",
        _image(files, "rewards_png", "mean reward against k"),
        _REWARDS_NOTE,
        "# Iterations used\n\n",
        _image(files, "iterations_png", "distribution of iterations used"),
        _ITERATIONS_NOTE,
        markdown(mean_iterations) if len(mean_iterations) else "(no LatentSeek records)\n",
        "\n",
        "# Prefix tokens changed per step\n\n",
        _image(files, "tokens_changed_png", "tokens changed per latent step"),
        _TOKENS_CHANGED_NOTE,
    ]
    if files.notes:
        parts.append("\n# Notes\n\n" + "".join(f"- {n}\n" for n in files.notes))
    return "".join(parts)


# ------------------------------------------------------------------------------------------
# Command line: latentseek report RUN_OR_SWEEP_DIR [--out DIR]


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
