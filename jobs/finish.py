"""Finishing a run: compact the records, write the summary files and the report, log the run
to MLflow, and the summary `latentseek run` prints."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data import Dataset
from pipeline.run.records import RecordStore
from pipeline.run.rundir import CONFIG_FILE, redact


@dataclass
class RunSummary:
    run_dir: Path
    total: int  # (problem, method) pairs in the selection
    skipped: int  # already recorded before this invocation (resume)
    recorded: int  # recorded by this invocation
    failures: int  # recorded with an error
    worker_failures: int  # worker processes lost
    retried: int  # problem attempts that raised and were retried
    wall_seconds: float
    problems_per_hour: float
    mlflow_run_id: str
    tracking_uri: str
    ui_command: str
    table: Any  # pandas DataFrame: analysis.tables.summary_table
    curve: Any  # pandas DataFrame: analysis.tables.accuracy_by_iteration
    files: list[Path]  # the summary files written into run_dir
    infra_failures: int = 0  # of `failures`, recorded with an infrastructure error (error_kind)
    unrecorded: int = 0  # (problem, method) pairs of the selection with no record

    @property
    def incomplete(self) -> bool:
        """Whether the run's records fall short: pairs not recorded, or recorded with an
        infrastructure error (a rerun with retry_errors=true may fill them): `latentseek run`
        then exits non-zero, and the MLflow run is tagged `latentseek.incomplete`."""
        return bool(self.infra_failures or self.unrecorded)


@dataclass
class Counts:
    recorded: int = 0
    failures: int = 0
    correct: int = 0
    worker_failures: int = 0
    retried: int = 0
    iterations: int = 0  # latent iterations of the problems recorded (the progress bar's)


def finish_run(
    cfg: Config,
    directory: Path,
    store: RecordStore,
    dataset: Dataset,
    total: int,
    skipped: int,
    counts: Counts,
    start: float,
    tags: dict[str, str] | None = None,
    mlflow_run: str = "",
) -> RunSummary:
    """Compact the records, write the summary files and the report, log the run to MLflow
    (the report's Table 1 also as an MLflow table). If a step fails, the evaluation's MLflow
    run `mlflow_run` (open while it ran; "" if none) ends FAILED (KILLED on an interrupt) and
    the error goes on."""
    from pipeline.run import tracking

    try:
        return _finish(cfg, directory, store, dataset, total, skipped, counts, start, tags)
    except BaseException as exc:
        if mlflow_run:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tracking.end_run(cfg, mlflow_run, status)
        raise


def _finish(
    cfg: Config,
    directory: Path,
    store: RecordStore,
    dataset: Dataset,
    total: int,
    skipped: int,
    counts: Counts,
    start: float,
    tags: dict[str, str] | None,
) -> RunSummary:
    import pandas as pd

    from analysis.tables import CURVE_COLUMNS, iteration_curves, summary_table, write_summary
    from pipeline.run import tracking

    store.compact()
    ids = [p.problem_id for p in dataset.problems]
    problems, iterations = store.read_problems(), store.read_iterations()
    selected = problems[problems["problem_id"].isin(ids)]
    table = summary_table(selected)
    curves = iteration_curves(selected, iterations[iterations["problem_id"].isin(ids)])
    curve = curves[CURVE_COLUMNS]  # accuracy_by_iteration; curves adds the mean reward
    files = write_summary(directory, table, curve)
    files += report_files(directory)
    table_csv = directory / "report" / "table.csv"
    tables = {"report/table.json": pd.read_csv(table_csv)} if table_csv.is_file() else {}
    wall = time.perf_counter() - start
    per_hour = 3600.0 * counts.recorded / wall if counts.recorded else 0.0
    failures = int((selected["error"] != "").sum())
    kinds = selected["error_kind"].fillna("") if "error_kind" in selected else None
    infra = int((kinds == "infra").sum()) if kinds is not None else 0
    unrecorded = max(total - int(selected["method"].isin(cfg.method).sum()), 0)
    incomplete = {"latentseek.incomplete": "true" if infra or unrecorded else "false"}
    mlflow_run = tracking.log_run(
        cfg,
        directory,
        table,
        curves,
        {"name": dataset.name, "digest": dataset.digest, "source": dataset.source},
        files=files,
        extra_metrics={
            "run_problems_per_hour": per_hour,
            "run_failures": float(failures),
            "run_infra_failures": float(infra),
            "run_unrecorded": float(unrecorded),
            "worker_failures": float(counts.worker_failures),
        },
        tags={"run_dir": str(directory.resolve()), **incomplete, **(tags or {})},
        tables=tables,
    )
    return RunSummary(
        run_dir=directory,
        total=total,
        skipped=skipped,
        recorded=counts.recorded,
        failures=failures,
        worker_failures=counts.worker_failures,
        retried=counts.retried,
        wall_seconds=wall,
        problems_per_hour=per_hour,
        mlflow_run_id=mlflow_run,
        tracking_uri=redact(tracking.resolve_tracking_uri(cfg)),
        ui_command=tracking.ui_command(cfg),
        table=table,
        curve=curve,
        files=files,
        infra_failures=infra,
        unrecorded=unrecorded,
    )


def report_files(directory: Path) -> list[Path]:
    """The run's report (`analysis.report`: tables and plots from its records) in
    <run_dir>/report/, logged with the run."""
    from analysis.report import write_report

    return write_report(directory, directory / "report").paths()


def model_name(cfg: Config) -> str:
    """What the records call the configured model."""
    from pipeline.engine.model import EMBEDDED_NAME

    return EMBEDDED_NAME if cfg.model == "embedded" else cfg.model


def format_summary(s: RunSummary) -> str:
    from analysis.tables import markdown

    cols = [
        "method", "problems", "failures", "cot_accuracy", "final_accuracy", "mean_iterations",
        "mean_final_reward", "tokens_per_problem", "mean_wall_seconds",
    ]  # fmt: skip
    lines = [
        "",
        markdown(s.table[[c for c in cols if c in s.table.columns]]),
        f"records:   {s.run_dir.resolve()}/problems, {s.run_dir.resolve()}/iterations "
        f"({s.recorded} new, {s.skipped} resumed, {s.failures} failed "
        f"({s.infra_failures} by the infrastructure), "
        f"{s.worker_failures} workers lost, {s.retried} retries)",
        f"config:    {(s.run_dir / CONFIG_FILE).resolve()}",
        f"summary:   {(s.run_dir / 'summary.md').resolve()}",
        f"report:    {(s.run_dir / 'report' / 'report.md').resolve()}",
        f"mlflow:    run {s.mlflow_run_id} in {s.tracking_uri}",
        f"open UI:   {s.ui_command}",
        f"wall time: {s.wall_seconds:.1f} s ({s.problems_per_hour:.0f} records/hour)",
    ]
    if s.incomplete:
        lines.append(
            f"INCOMPLETE: {s.unrecorded} not recorded, {s.infra_failures} recorded with an "
            "infrastructure error (not the problems' fault): run again with the same run_id "
            "and retry_errors=true"
        )
    return "\n".join(lines)
