"""`latentseek run`: evaluate methods over a dataset on Ray workers, record, track in MLflow.

The driver, in order:
1. preflight, before anything is started or written: the device settings agree with each
   other (`pipeline.workers.worker_device`), an existing run directory may be resumed with
   these settings (`check_resume`), the prompt templates load, the dataset loads, and the
   model source exists (`pipeline.model.check_model_source`). A user error stops here with
   one message.
2. skips what the run directory already holds (resume), starts Ray (local in-process, or
   `ray_address`) and `workers` actors, and reports a worker that cannot start as one line;
3. keeps config.yaml (the first invocation's config), appends this invocation to
   invocations.jsonl, feeds the workers batches and writes each returned batch as one atomic
   shard pair, showing progress;
4. compacts the records, writes summary.md / summary.csv / accuracy_by_iteration.csv into the
   run directory, logs the run to MLflow and returns a summary with the paths.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config
from pipeline.data import Dataset, Problem, load_dataset
from pipeline.records import (
    CONFIG_FILE,
    RecordStore,
    append_invocation,
    run_dir,
    write_config,
)

# Keys that may change between a run and its resume: how it runs, not what it computes.
# `device`, `dtype` and `gpus_per_worker` may change only as long as the resolved device type
# (cpu / cuda) and the resolved dtype stay the same (`resolved_precision`, checked apart).
# `batch_size`, `batching` and `task_size` are not here: they decide which rows decode
# together, and padding to a common length changes floating-point rounding, so a resume with
# other values could mix results.
RESUMABLE_KEYS = {
    "workers", "cpus_per_worker", "gpus_per_worker", "ray_address", "threads", "max_retries",
    "max_worker_restarts", "mlflow_tracking_uri", "mlflow_experiment", "device", "dtype",
    "model_cache_dir", "output_dir", "allow_download",
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
    files: list[Path]  # the summary files written into run_dir


@dataclass
class _Counts:
    recorded: int = 0
    failures: int = 0
    correct: int = 0
    worker_failures: int = 0
    retried: int = 0


def resolve_run_id(cfg: Config) -> Config:
    if cfg.run_id:
        return cfg
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return cfg.replace(run_id=f"{stamp}-{uuid.uuid4().hex[:6]}")


# ------------------------------------------------------------------------------------------
# Preflight: everything a user can get wrong, checked before anything starts


def resolved_precision(device: str, gpus_per_worker: float, dtype: str) -> tuple[str, str]:
    """(device type, dtype name) the workers will use, e.g. ("cpu", "float32"), worked out from
    the settings alone (no CUDA needed): GPU workers run on cuda, `dtype=auto` follows it."""
    import torch

    from pipeline.model import resolve_dtype

    device_type = "cuda" if gpus_per_worker > 0 or device.startswith("cuda") else "cpu"
    resolved = resolve_dtype(dtype, torch.device(device_type))
    return device_type, str(resolved).removeprefix("torch.")


def check_devices(cfg: Config) -> None:
    """`device` and `gpus_per_worker` agree, and a local Ray has the GPUs the workers ask for."""
    from pipeline.workers import worker_device

    try:
        worker_device(cfg.device, cfg.gpus_per_worker)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if cfg.gpus_per_worker > 0 and not cfg.ray_address:
        import ray
        import torch

        have = (
            ray.cluster_resources().get("GPU", 0.0)
            if ray.is_initialized()
            else torch.cuda.device_count()
        )
        need = cfg.gpus_per_worker * cfg.workers * cfg.tensor_parallel
        if have < need:
            tp = f" x tensor_parallel={cfg.tensor_parallel}" if cfg.tensor_parallel > 1 else ""
            raise RunError(
                f"workers={cfg.workers}{tp} x gpus_per_worker={cfg.gpus_per_worker:g} needs "
                f"{math.ceil(need)} GPU(s); this machine's local Ray has {have:g}. Lower workers or "
                "gpus_per_worker, set gpus_per_worker=0 for CPU workers, or give ray_address"
            )


def check_resume(cfg: Config, directory: Path) -> None:
    """A run id can be resumed only with the same settings of what it computes: the keys not in
    RESUMABLE_KEYS, the resolved device type and dtype, compared with config.yaml, and the
    device and dtype recorded in the run's problem rows."""
    changed: list[str] = []
    saved_path = directory / CONFIG_FILE
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        now = cfg.to_dict()
        for k in sorted(now):
            if k not in RESUMABLE_KEYS and k in saved and saved[k] != now[k]:
                changed.append(f"{k}: {saved[k]!r} -> {now[k]!r}")
        defaults = Config().to_dict()
        before = resolved_precision(
            *(saved.get(k, defaults[k]) for k in ("device", "gpus_per_worker", "dtype"))
        )
        changed += _precision_changes(before, cfg, "config.yaml")
    store = RecordStore(directory)
    types = {str(d).partition(":")[0] for d in store.distinct("device") if d}
    dtypes = {str(d) for d in store.distinct("dtype") if d}
    if len(types) > 1 or len(dtypes) > 1:
        changed.append(f"the recorded rows already mix {sorted(types)} / {sorted(dtypes)}")
    else:
        recorded = (next(iter(types), ""), next(iter(dtypes), ""))  # "": nothing recorded
        changed += _precision_changes(recorded, cfg, "the recorded problem rows")
    if changed:
        raise RunError(
            f"run_id={cfg.run_id!r} already exists in {directory} with different settings of "
            f"what it computes ({'; '.join(dict.fromkeys(changed))}); resuming would mix "
            "results. Use a new run_id (run_id=<new>) for these settings, or the same settings "
            "to resume it."
        )


def _precision_changes(before: tuple[str, str], cfg: Config, where: str) -> list[str]:
    now = resolved_precision(cfg.device, cfg.gpus_per_worker, cfg.dtype)
    out = []
    if before[0] and before[0] != now[0]:
        out.append(
            f"device type: {before[0]!r} in {where} -> {now[0]!r} now (device={cfg.device!r}, "
            f"gpus_per_worker={cfg.gpus_per_worker:g})"
        )
    if before[1] and before[1] != now[1]:
        out.append(f"dtype: {before[1]!r} in {where} -> {now[1]!r} now (dtype={cfg.dtype!r})")
    return out


def check_prompts(cfg: Config) -> None:
    """The solver and verifier templates load; a ConfigError names the key, the file and the
    problem."""
    from pipeline.config import ConfigError
    from pipeline.prompts import load_solver_template, load_verifiers

    for key, load in (("prompt", load_solver_template), ("verifier_prompts", load_verifiers)):
        try:
            load(getattr(cfg, key))
        except ConfigError as exc:
            raise ConfigError(f"{key}={getattr(cfg, key)!r}: {exc}") from None


def load_selection(cfg: Config, log: Callable[[str], None]) -> Dataset:
    dataset: Dataset = load_dataset(cfg)
    if dataset.skipped_rows:
        log(f"skipped {dataset.skipped_rows} malformed rows of {dataset.source}")
    if not dataset.problems:
        raise RunError(f"the selection of {dataset.source} holds no problems")
    ids = [p.problem_id for p in dataset.problems]
    if len(set(ids)) != len(ids):
        raise RunError("problem ids are not unique in the selection")
    return dataset


# ------------------------------------------------------------------------------------------
# Ray: the cluster and the workers


def start_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, log_to_driver=False)
    else:
        per_rank = cfg.cpus_per_worker if cfg.gpus_per_worker == 0 else 1
        need = cfg.workers * cfg.tensor_parallel * per_rank
        ray.init(
            num_cpus=max(need, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


def start_workers(
    cfg: Config, start_worker: Callable[[Config], Any] | None = None
) -> tuple[list[Any], list[dict[str, Any]]]:
    """`cfg.workers` actors with their models loaded, and their `info()`; a worker that cannot
    start (its constructor raised, or its process died) stops the run with one line.

    `start_worker(cfg)` starts one actor and returns its handle; by default an `EvalWorker`, or
    a tensor-parallel replica's rank 0 (`pipeline.workers.start_worker`). Another actor with EvalWorker's `info` and `run` may stand in for it
    (`jobs.simulate`: the driver at cluster scale without models)."""
    import ray
    from ray.exceptions import RayActorError

    from pipeline.workers import NoWorkerLeftError
    from pipeline.workers import start_worker as start_eval_worker

    start = start_worker or start_eval_worker
    workers: list[Any] = []
    try:
        for _ in range(cfg.workers):
            workers.append(start(cfg))
    except NoWorkerLeftError as exc:  # a replica's placement group could not be placed
        _kill(workers)
        raise RunError(str(exc)) from None
    try:
        infos = ray.get([w.info.remote() for w in workers])
    except RayActorError as exc:
        _kill(workers)
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise RunError(f"a worker died while starting: {first}") from None
    errors = [i["start_error"] for i in infos if i["start_error"]]
    if errors:
        _kill(workers)
        raise RunError(f"a worker could not start: {errors[0]}")
    return workers, infos


# Keys that decide which model a worker loads and how it is placed: configs equal on these can
# share workers (a sweep's points); anything else is sent with each batch.
MODEL_KEYS = (
    "model", "device", "dtype", "trust_remote_code", "allow_download", "model_cache_dir",
    "threads", "tensor_parallel", "shard_backend", "device_map", "workers", "cpus_per_worker",
    "gpus_per_worker", "max_worker_restarts", "ray_address",
)  # fmt: skip


def row_memory(cfg: Config, infos: Sequence[dict[str, Any]]) -> str:
    """One line: the KV cache a worker holds for `batch_size` rows of the longest answer (a
    512-token prompt assumed), and per problem waiting in a task (its cached prompt)."""
    per_token = max((int(i.get("kv_bytes_per_token", 0)) for i in infos), default=0)
    if not per_token:
        return ""
    row = per_token * (512 + cfg.max_new_tokens + 1)
    return (
        f"KV cache: {per_token / 1024:.0f} KiB per token; a row of a 512-token prompt and "
        f"{cfg.max_new_tokens} new tokens {row / 2**20:.0f} MiB; batch_size={cfg.batch_size} "
        f"rows {cfg.batch_size * row / 2**30:.2f} GiB per worker, plus the cached prompt of "
        f"each problem of a task (up to {cfg.problems_per_task})"
    )


class WorkerPool:
    """Workers kept across evaluations that load the same model (a sweep's points): the next
    evaluation reuses them when its config agrees on MODEL_KEYS, else they are replaced."""

    def __init__(self) -> None:
        self.cfg: Config | None = None
        self.workers: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.starts = 0  # how many times workers were started (for the sweep's report)

    def acquire(self, cfg: Config) -> tuple[list[Any], list[dict[str, Any]]]:
        same = self.cfg is not None and all(
            getattr(self.cfg, k) == getattr(cfg, k) for k in MODEL_KEYS
        )
        if not same:
            self.close()
            self.workers, self.infos = start_workers(cfg)
            self.starts += 1
        self.cfg = cfg
        return self.workers, self.infos

    def close(self) -> None:
        _kill(self.workers)
        self.workers, self.infos, self.cfg = [], [], None


def _kill(workers: Sequence[Any]) -> None:
    from pipeline.workers import stop_worker

    for w in workers:
        stop_worker(w)


# ------------------------------------------------------------------------------------------
# The run


def run_evaluation(
    cfg: Config,
    *,
    progress: bool = True,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    argv: Sequence[str] | None = None,
    pool: WorkerPool | None = None,
    tags: dict[str, str] | None = None,
    start_worker: Callable[[Config], Any] | None = None,
) -> RunSummary:
    """Run (or resume) the evaluation described by `cfg`. `on_batch` is called after every
    recorded batch with the scheduler's state (tests use it to inject faults); `argv` is the
    command line, kept in invocations.jsonl; `pool` keeps the workers for the caller's next
    evaluation (a sweep) instead of stopping them; `tags` go to the MLflow run;
    `start_worker` starts each worker instead of `EvalWorker` (`start_workers`; not with
    `pool`, which starts its own)."""
    from pipeline import tracking
    from pipeline.model import check_model_source, prepare_model

    start = time.perf_counter()
    cfg = resolve_run_id(cfg)
    directory = run_dir(cfg)
    check_devices(cfg)
    check_resume(cfg, directory)
    check_prompts(cfg)
    dataset = load_selection(cfg, log)
    store = RecordStore(directory)
    done = store.completed()
    todo = {m: [p for p in dataset.problems if (p.problem_id, m) not in done] for m in cfg.method}
    total = len(dataset.problems) * len(cfg.method)
    skipped = total - sum(len(v) for v in todo.values())
    if skipped:
        log(f"resuming {cfg.run_id}: {skipped} of {total} records already there")

    counts = _Counts()
    if any(todo.values()):
        check_model_source(cfg)
        prepare_model(cfg)
        start_ray(cfg)
        if pool is not None:
            workers, infos = pool.acquire(cfg)
        else:
            workers, infos = start_workers(cfg, start_worker)
        if memory := row_memory(cfg, infos):
            log(memory)
        try:
            _open_run(cfg, directory, argv, skipped)
            mlflow_run = tracking.start_run(
                cfg, {"run_dir": str(directory.resolve()), **(tags or {})}
            )
            try:
                _run_batches(cfg, workers, infos, todo, dataset.problems, store, counts,
                             total, skipped, progress, on_batch, log, mlflow_run)  # fmt: skip
            except BaseException as exc:
                failed = not isinstance(exc, KeyboardInterrupt)
                tracking.end_run(cfg, mlflow_run, "FAILED" if failed else "KILLED")
                raise
        finally:
            if pool is None:
                _kill(workers)
    else:
        _open_run(cfg, directory, argv, skipped)
    return _finish(cfg, directory, store, dataset, total, skipped, counts, start, tags)


def _open_run(cfg: Config, directory: Path, argv: Sequence[str] | None, skipped: int) -> None:
    """Keep config.yaml (the first invocation's), log this invocation, and clean up what a
    killed driver left (temporary files, orphan iteration shards)."""
    from pipeline.tracking import git_commit

    saved_path = directory / CONFIG_FILE
    saved = (yaml.safe_load(saved_path.read_text()) or {}) if saved_path.exists() else {}
    now = cfg.to_dict()
    changed = {k: [saved.get(k), v] for k, v in now.items() if saved and saved.get(k) != v}
    write_config(cfg, directory, keep_existing=True)
    append_invocation(
        directory,
        {
            "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "argv": list(argv) if argv is not None else None,
            "git_commit": git_commit(),
            "already_recorded": skipped,
            "changed_from_config_yaml": changed,
            "config": now,
        },
    )
    RecordStore(directory).cleanup()


def _run_batches(
    cfg: Config,
    workers: list[Any],
    infos: list[dict[str, Any]],
    todo: dict[str, list[Problem]],
    problems: list[Problem],
    store: RecordStore,
    counts: _Counts,
    total: int,
    skipped: int,
    progress: bool,
    on_batch: Callable[[dict[str, Any]], None] | None,
    log: Callable[[str], None],
    mlflow_run: str = "",
) -> None:
    """Feed every batch to the workers and record each result once, as it comes back."""
    from tqdm import tqdm

    from pipeline.workers import NoWorkerLeftError, Scheduler, make_batches

    batches = []
    for method in cfg.method:
        size = cfg.problems_per_task
        if not cfg.task_size:  # small runs: at least one task per worker, when there are enough
            size = min(size, max(cfg.batch_size, math.ceil(len(todo[method]) / cfg.workers)))
        batches += [b for b in make_batches(todo[method], [method], size) if b.problems]
    order = {p.problem_id: i for i, p in enumerate(problems)}
    batches.sort(key=lambda b: order[b.problems[0].problem_id])  # stable: methods interleave
    for i, b in enumerate(batches):
        b.batch_id = i
    scheduler = Scheduler(
        workers,
        batches,
        cfg.max_retries,
        on_worker_lost=lambda why: log(f"worker lost, its batch is re-queued: {why}"),
        settings=cfg,
    )
    bar = tqdm(total=total, initial=skipped, disable=not progress, desc=cfg.run_id, unit="rec",
               dynamic_ncols=True)  # fmt: skip
    last_logged = float("-inf")
    try:
        for outcome in scheduler.run():
            if not outcome.results:
                continue
            attempts = {
                (r.problem_id, r.method): outcome.batch.attempts.get(r.problem_id, 1)
                for r in outcome.results
            }
            store.write(outcome.results, cfg.run_id, _model_name(cfg), outcome.worker, attempts)
            counts.recorded += len(outcome.results)
            counts.failures += sum(bool(r.error) for r in outcome.results)
            counts.correct += sum(r.final_correct for r in outcome.results)
            bar.update(len(outcome.results))
            bar.set_postfix(
                acc=f"{counts.correct / max(counts.recorded, 1):.3f}",
                failed=counts.failures,
                lost_workers=scheduler.worker_failures,
            )
            done = counts.recorded == total - skipped
            if mlflow_run and (done or time.monotonic() - last_logged >= PROGRESS_EVERY_S):
                _log_progress(cfg, mlflow_run, counts, skipped, scheduler.worker_failures)
                last_logged = time.monotonic()
            if on_batch:
                state = {"workers": workers, "infos": infos, "recorded": counts.recorded}
                on_batch({**state, "scheduler": scheduler})
    except NoWorkerLeftError as exc:
        raise RunError(str(exc)) from None
    finally:
        bar.close()
        counts.worker_failures, counts.retried = scheduler.worker_failures, scheduler.retried


PROGRESS_EVERY_S = 2.0  # live MLflow metrics at most this often (and after the last batch)


def _log_progress(cfg: Config, mlflow_run: str, counts: _Counts, skipped: int, lost: int) -> None:
    """Live metrics, step = records done in this invocation: what the progress bar shows."""
    from pipeline import tracking

    tracking.log_progress(
        cfg,
        mlflow_run,
        counts.recorded,
        {
            "records": float(counts.recorded + skipped),
            "accuracy": counts.correct / max(counts.recorded, 1),
            "failures": float(counts.failures),
            "workers_lost": float(lost),
        },
    )


def _finish(
    cfg: Config,
    directory: Path,
    store: RecordStore,
    dataset: Dataset,
    total: int,
    skipped: int,
    counts: _Counts,
    start: float,
    tags: dict[str, str] | None = None,
) -> RunSummary:
    """Compact the records, write the summary files and the report, log the run to MLflow
    (the report's Table 1 also as an MLflow table)."""
    import pandas as pd

    from analysis.tables import CURVE_COLUMNS, iteration_curves, summary_table, write_summary
    from pipeline import tracking

    store.compact()
    ids = [p.problem_id for p in dataset.problems]
    problems, iterations = store.read_problems(), store.read_iterations()
    selected = problems[problems["problem_id"].isin(ids)]
    table = summary_table(selected)
    curves = iteration_curves(selected, iterations[iterations["problem_id"].isin(ids)])
    curve = curves[CURVE_COLUMNS]  # accuracy_by_iteration; curves adds the mean reward
    files = write_summary(directory, table, curve)
    files += _report(directory)
    table_csv = directory / "report" / "table.csv"
    tables = {"report/table.json": pd.read_csv(table_csv)} if table_csv.is_file() else {}
    wall = time.perf_counter() - start
    per_hour = 3600.0 * counts.recorded / wall if counts.recorded else 0.0
    failures = int((selected["error"] != "").sum())
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
            "worker_failures": float(counts.worker_failures),
        },
        tags={"run_dir": str(directory.resolve()), **(tags or {})},
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
        tracking_uri=tracking.resolve_tracking_uri(cfg),
        ui_command=tracking.ui_command(cfg),
        table=table,
        curve=curve,
        files=files,
    )


def _report(directory: Path) -> list[Path]:
    """The run's report (`analysis.report`: tables and plots from its records) in
    <run_dir>/report/, logged with the run."""
    from analysis.report import write_report

    return write_report(directory, directory / "report").paths()


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
        f"report:    {(s.run_dir / 'report' / 'report.md').resolve()}",
        f"mlflow:    run {s.mlflow_run_id} in {s.tracking_uri}",
        f"open UI:   {s.ui_command}",
        f"wall time: {s.wall_seconds:.1f} s ({s.problems_per_hour:.0f} records/hour)",
    ]
    return "\n".join(lines)


def main(cfg: Config, argv: Sequence[str] | None = None) -> int:
    summary = run_evaluation(cfg, argv=argv)
    print(format_summary(summary))
    return 0
