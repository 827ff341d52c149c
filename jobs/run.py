"""`latentseek run`: evaluate methods over a dataset on Ray workers, record, track in MLflow.

The driver: resolves the config, loads the dataset, skips what the run directory already holds
(resume), starts Ray (local in-process, or `ray_address`), creates `workers` actors, feeds them
batches, writes each returned batch as one atomic shard pair, shows progress, then compacts the
records, logs the run to MLflow and prints a summary with the paths.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config
from pipeline.data import Dataset, load_dataset
from pipeline.records import CONFIG_FILE, RecordStore, run_dir, write_config

# Keys that may change between a run and its resume (how it runs, not what it computes).
RESUMABLE_KEYS = {
    "workers", "cpus_per_worker", "gpus_per_worker", "ray_address", "batch_size", "threads",
    "max_retries", "max_worker_restarts", "mlflow_tracking_uri", "mlflow_experiment",
    "device", "model_cache_dir", "output_dir",
}  # fmt: skip


class RunError(RuntimeError):
    """A run that cannot start or finish; the message says why and what to do."""


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


def resolve_run_id(cfg: Config) -> Config:
    if cfg.run_id:
        return cfg
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return cfg.replace(run_id=f"{stamp}-{uuid.uuid4().hex[:6]}")


def check_resume(cfg: Config, directory: Path) -> None:
    """A run id can be resumed only with the same settings of what it computes."""
    saved_path = directory / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    now = cfg.to_dict()
    changed = sorted(
        k for k in now if k not in RESUMABLE_KEYS and k in saved and saved[k] != now[k]
    )
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise RunError(
            f"run_id={cfg.run_id!r} already exists in {directory} with different settings "
            f"({detail}). Use a new run_id, or the same settings to resume it."
        )


def start_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=False)
    else:
        need = cfg.workers * (cfg.cpus_per_worker if cfg.gpus_per_worker == 0 else 1)
        ray.init(
            num_cpus=max(need, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


def run_evaluation(
    cfg: Config,
    *,
    progress: bool = True,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> RunSummary:
    """Run (or resume) the evaluation described by `cfg`. `on_batch` is called after every
    recorded batch with the scheduler's state (tests use it to inject faults)."""
    import ray
    from tqdm import tqdm

    from analysis.tables import accuracy_by_iteration, summary_table
    from pipeline import tracking
    from pipeline.model import prepare_model
    from pipeline.workers import Scheduler, make_batches, make_worker_class

    start = time.perf_counter()
    cfg = resolve_run_id(cfg)
    directory = run_dir(cfg)
    check_resume(cfg, directory)
    dataset: Dataset = load_dataset(cfg)
    if dataset.skipped_rows:
        log(f"skipped {dataset.skipped_rows} malformed rows of {dataset.source}")
    if not dataset.problems:
        raise RunError(f"the selection of {dataset.source} holds no problems")
    ids = [p.problem_id for p in dataset.problems]
    if len(set(ids)) != len(ids):
        raise RunError("problem ids are not unique in the selection")

    store = RecordStore(directory)
    write_config(cfg, directory)
    store.cleanup()  # leftovers of a killed driver: temp files, orphan iteration shards
    done = store.completed()
    total = len(dataset.problems) * len(cfg.method)
    todo = {m: [p for p in dataset.problems if (p.problem_id, m) not in done] for m in cfg.method}
    skipped = total - sum(len(v) for v in todo.values())
    if skipped:
        log(f"resuming {cfg.run_id}: {skipped} of {total} records already there")

    worker_failures = retried = recorded = failures = correct = 0
    if any(todo.values()):
        prepare_model(cfg)
        start_ray(cfg)
        worker_cls = make_worker_class(cfg)
        workers = [worker_cls.remote(cfg) for _ in range(cfg.workers)]
        infos = ray.get([w.info.remote() for w in workers])  # models loaded, or fail early
        batches = []
        for method in cfg.method:
            batches += [
                b for b in make_batches(todo[method], [method], cfg.batch_size) if b.problems
            ]
        order = {p.problem_id: i for i, p in enumerate(dataset.problems)}
        batches.sort(key=lambda b: order[b.problems[0].problem_id])  # stable: methods interleave
        for i, b in enumerate(batches):
            b.batch_id = i
        scheduler = Scheduler(
            workers,
            batches,
            cfg.max_retries,
            on_worker_lost=lambda why: log(f"worker lost, its batch is re-queued: {why}"),
        )
        bar = tqdm(
            total=total,
            initial=skipped,
            disable=not progress,
            desc=cfg.run_id,
            unit="rec",
            dynamic_ncols=True,
        )
        try:
            for outcome in scheduler.run():
                if not outcome.results:
                    continue
                attempts = {
                    (r.problem_id, r.method): outcome.batch.attempts.get(r.problem_id, 1)
                    for r in outcome.results
                }
                store.write(outcome.results, cfg.run_id, _model_name(cfg), outcome.worker, attempts)
                recorded += len(outcome.results)
                failures += sum(bool(r.error) for r in outcome.results)
                correct += sum(r.final_correct for r in outcome.results)
                bar.update(len(outcome.results))
                bar.set_postfix(
                    acc=f"{correct / max(recorded, 1):.3f}",
                    failed=failures,
                    lost_workers=scheduler.worker_failures,
                )
                if on_batch:
                    on_batch(
                        {
                            "workers": workers,
                            "infos": infos,
                            "recorded": recorded,
                            "scheduler": scheduler,
                        }
                    )
        finally:
            bar.close()
            worker_failures, retried = scheduler.worker_failures, scheduler.retried
            for w in workers:
                ray.kill(w)

    store.compact()
    problems, iterations = store.read_problems(), store.read_iterations()
    selected = problems[problems["problem_id"].isin(ids)]
    table = summary_table(selected)
    curve = accuracy_by_iteration(selected, iterations[iterations["problem_id"].isin(ids)])
    wall = time.perf_counter() - start
    per_hour = 3600.0 * recorded / wall if recorded else 0.0
    mlflow_run = tracking.log_run(
        cfg,
        directory,
        table,
        curve,
        {"name": dataset.name, "digest": dataset.digest, "source": dataset.source},
        extra_metrics={
            "run_problems_per_hour": per_hour,
            "run_failures": float(int((selected["error"] != "").sum())),
            "worker_failures": float(worker_failures),
        },
        tags={"run_dir": str(directory.resolve())},
    )
    return RunSummary(
        run_dir=directory,
        total=total,
        skipped=skipped,
        recorded=recorded,
        failures=int((selected["error"] != "").sum()),
        worker_failures=worker_failures,
        retried=retried,
        wall_seconds=wall,
        problems_per_hour=per_hour,
        mlflow_run_id=mlflow_run,
        tracking_uri=tracking.resolve_tracking_uri(cfg),
        ui_command=tracking.ui_command(cfg),
        table=table,
        curve=curve,
    )


def _model_name(cfg: Config) -> str:
    from pipeline.model import EMBEDDED_NAME

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
        f"({s.recorded} new, {s.skipped} resumed, {s.failures} failed, "
        f"{s.worker_failures} workers lost, {s.retried} retries)",
        f"config:    {(s.run_dir / CONFIG_FILE).resolve()}",
        f"summary:   {(s.run_dir / 'summary.md').resolve()}",
        f"mlflow:    run {s.mlflow_run_id} in {s.tracking_uri}",
        f"open UI:   {s.ui_command}",
        f"wall time: {s.wall_seconds:.1f} s ({s.problems_per_hour:.0f} records/hour)",
    ]
    return "\n".join(lines)


def write_local_summary(s: RunSummary) -> None:
    from analysis.tables import write_summary

    write_summary(s.run_dir, s.table, s.curve)


def main(cfg: Config) -> int:
    summary = run_evaluation(cfg)
    write_local_summary(summary)
    print(format_summary(summary))
    return 0
