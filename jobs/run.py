"""`latentseek run`: evaluate methods over a dataset on Ray workers, record, track in MLflow.

The driver, in rooms:
1. preflight (`jobs.preflight`), before anything is started or written: devices, resume,
   prompt templates, the reward, the dataset selection; then, holding the run directory's lock
   (`pipeline.run.rundir.hold_run_dir`: one driver per run directory, for the whole run), the
   resume again, what is left to do (failed rows included, `retry_errors`), the model source,
   the inputs' contents against the first invocation's, and that the MLflow run of this run_id
   belongs to this directory;
2. the worker pool (`pipeline.run.pool`): Ray (local in-process, or `ray_address`) and `workers`
   actors, a worker that cannot start reported as one line;
3. the batch loop (here): config.yaml (the first invocation's) and invocations.jsonl, the
   workers fed batches (`pipeline.run.scheduler.Scheduler`), each returned batch written as one atomic
   shard pair (`pipeline.run.records`), progress shown;
4. finishing (`jobs.finish`): compaction, summary files, the report, MLflow, the summary.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from jobs.finish import Counts, RunSummary, finish_run, format_summary, model_name
from jobs.preflight import RunError, Work, check_resume, plan_work, preflight, resolve_run_id
from pipeline.config import Config
from pipeline.data import Problem
from pipeline.run.pool import WorkerPool, start_ray, start_workers, stop_workers
from pipeline.run.records import RecordStore
from pipeline.run.rundir import (
    CONFIG_FILE,
    append_invocation,
    hold_run_dir,
    run_dir,
    write_config,
    write_inputs,
)

__all__ = ["RunError", "RunSummary", "check_resume", "main", "run_evaluation"]

PROGRESS_EVERY_S = 2.0  # live MLflow metrics at most this often (and after the last batch)
LINE_EVERY_S = 30.0  # off a terminal (Ray Jobs logs, files): one progress line this often ...
LINE_EVERY_FRACTION = 0.1  # ... or each time this share of the records has come in


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
    from pipeline.engine.model import prepare_model
    from pipeline.run import tracking

    start = time.perf_counter()
    cfg = resolve_run_id(cfg)
    directory = run_dir(cfg)
    dataset = preflight(cfg, directory, log)
    with hold_run_dir(directory):
        work = plan_work(cfg, directory, dataset, log)
        store = RecordStore(directory)
        counts = Counts()
        mlflow_run = ""
        if any(work.todo.values()):
            prepare_model(cfg)
            start_ray(cfg)
            workers, infos = (
                pool.acquire(cfg) if pool is not None else start_workers(cfg, start_worker)
            )
            try:
                open_run(cfg, directory, argv, work)
                mlflow_run = tracking.start_run(
                    cfg, {"run_dir": str(directory.resolve()), **(tags or {})}
                )
                loop = BatchLoop(
                    cfg, workers, infos, store, counts, work.total, work.skipped, log, mlflow_run
                )
                try:
                    loop.run(work.todo, dataset.problems, progress, on_batch)
                except BaseException as exc:
                    failed = not isinstance(exc, KeyboardInterrupt)
                    tracking.end_run(cfg, mlflow_run, "FAILED" if failed else "KILLED")
                    raise
            finally:
                if pool is None:
                    stop_workers(workers)
        else:
            open_run(cfg, directory, argv, work)
        return finish_run(
            cfg, directory, store, dataset, work.total, work.skipped, counts, start, tags,
            mlflow_run,
        )  # fmt: skip


def open_run(cfg: Config, directory: Path, argv: Sequence[str] | None, work: Work) -> None:
    """Keep config.yaml and inputs.yaml (the first invocation's), log this invocation, and clean
    up what a killed driver left (temporary files, orphan iteration shards)."""
    from pipeline.run.tracking import git_commit

    saved_path = directory / CONFIG_FILE
    saved = (yaml.safe_load(saved_path.read_text()) or {}) if saved_path.exists() else {}
    now = cfg.to_dict()
    changed = {k: [saved.get(k), v] for k, v in now.items() if saved and saved.get(k) != v}
    write_config(cfg, directory, keep_existing=True)
    write_inputs(directory, work.inputs)
    append_invocation(
        directory,
        {
            "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "argv": list(argv) if argv is not None else None,
            "git_commit": git_commit(),
            "already_recorded": work.skipped,
            "changed_from_config_yaml": changed,
            "inputs": work.inputs,
            "config": now,
        },
    )
    RecordStore(directory).cleanup()


def plan_batches(cfg: Config, todo: dict[str, list[Problem]], problems: list[Problem]) -> list:
    """The batches of work: per method, tasks of `problems_per_task` problems (small runs: at
    least one task per worker, when there are enough), methods interleaved in problem order."""
    from pipeline.run.scheduler import make_batches

    batches = []
    for method in cfg.method:
        size = cfg.problems_per_task
        if not cfg.task_size:
            size = min(size, max(cfg.batch_size, math.ceil(len(todo[method]) / cfg.workers)))
        batches += [b for b in make_batches(todo[method], [method], size) if b.problems]
    order = {p.problem_id: i for i, p in enumerate(problems)}
    batches.sort(key=lambda b: order[b.problems[0].problem_id])  # stable: methods interleave
    for i, b in enumerate(batches):
        b.batch_id = i
    return batches


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """The run's progress: a tqdm bar on a terminal; anywhere else (Ray Jobs logs, a file) one
    plain line every `every_s` seconds or `every_n` records, whichever comes first, and one at
    the end, instead of a bar redrawn on every event.

    ETA: each method's records cost what that method's records cost so far (their recorded
    `wall_seconds`, the batch's time per problem): the time elapsed x (the remaining records,
    each weighted by its method's mean cost) / (the recorded ones, weighted alike). A method
    without a record yet is weighted as the costliest one seen, and the ETA is then shown as a
    lower bound (`>=`). So the CoT half of a run does not set the pace of its LatentSeek half.
    `clock` and `stream` are injectable (tests)."""

    def __init__(
        self,
        todo: dict[str, int],
        skipped: int,
        desc: str,
        *,
        enabled: bool = True,
        stream: Any = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = LINE_EVERY_S,
        every_n: int = 0,
    ) -> None:
        self.todo, self.skipped, self.desc = dict(todo), skipped, desc
        self.total = skipped + sum(todo.values())
        self.stream = sys.stderr if stream is None else stream
        self.clock, self.start = clock, clock()
        self.every_s = every_s
        self.every_n = every_n or max(1, math.ceil(sum(todo.values()) * LINE_EVERY_FRACTION))
        self.recorded = dict.fromkeys(todo, 0)
        self.cost = dict.fromkeys(todo, 0.0)  # summed wall_seconds of each method's records
        self.done, self.postfix, self.enabled = skipped, "", enabled
        self.last_line, self.last_done = self.start, skipped
        isatty = getattr(self.stream, "isatty", None)
        self.bar: Any = None
        if enabled and isatty is not None and isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=skipped, desc=desc, unit="rec",
                            dynamic_ncols=True, file=self.stream,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")  # fmt: skip

    def recorded_batch(self, method: str, records: int, wall_seconds: float) -> None:
        """A batch of `records` of `method` was written, costing `wall_seconds` in all."""
        self.recorded[method] = self.recorded.get(method, 0) + records
        self.cost[method] = self.cost.get(method, 0.0) + wall_seconds

    def eta(self) -> tuple[float | None, bool]:
        """(seconds left, whether that is a lower bound); None before any record."""
        done = {m: n for m, n in self.recorded.items() if n}
        if not done:
            return None, False
        use_cost = all(self.cost[m] > 0 for m in done)
        weight = {m: (self.cost[m] / n if use_cost else 1.0) for m, n in done.items()}
        costliest = max(weight.values())
        left = {m: self.todo.get(m, 0) - self.recorded.get(m, 0) for m in self.todo}
        unknown = any(n > 0 and m not in weight for m, n in left.items())
        spent = sum(weight[m] * n for m, n in done.items())
        ahead = sum(weight.get(m, costliest) * max(n, 0) for m, n in left.items())
        return (self.clock() - self.start) * ahead / spent, unknown

    def update(self, done: int, **postfix: Any) -> None:
        """`done` records in all (skipped ones included; problems reported finished in batches
        still out count too), with `postfix` shown after them."""
        self.done = done
        eta, lower = self.eta()
        shown = {"eta": ("" if eta is None else (">=" if lower else "") + _duration(eta))}
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**shown, **postfix}.items() if v != "")
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(self.postfix)
            return
        now = self.clock()
        if (
            now - self.last_line >= self.every_s
            or done - self.last_done >= self.every_n
            or done >= self.total
        ):
            self.line(now)

    def line(self, now: float) -> None:
        pct = 100 * self.done / max(self.total, 1)
        methods = " ".join(f"{m} {self.recorded[m]}/{n}" for m, n in self.todo.items())
        print(
            f"{self.desc}: {self.done}/{self.total} rec ({pct:.0f}%) "
            f"[{_duration(now - self.start)} elapsed; {methods}] {self.postfix}".rstrip(),
            file=self.stream,
            flush=True,
        )
        self.last_line, self.last_done = now, self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.last_done != self.done:
            self.line(self.clock())


class BatchLoop:
    """Feeds every batch to the workers and records each result once, as it comes back.

    The bar counts records plus the problems that workers reported finished in batches still
    out (`Scheduler.reported`), so it moves per problem, not per batch; it equals the records
    whenever nothing is out, at the end included. Only records are ever written."""

    def __init__(
        self,
        cfg: Config,
        workers: list[Any],
        infos: list[dict[str, Any]],
        store: RecordStore,
        counts: Counts,
        total: int,
        skipped: int,
        log: Callable[[str], None],
        mlflow_run: str = "",
    ) -> None:
        self.cfg, self.workers, self.infos, self.store = cfg, workers, infos, store
        self.counts, self.total, self.skipped = counts, total, skipped
        self.log, self.mlflow_run = log, mlflow_run
        self.last_logged = float("-inf")
        self.bar: Any = None

    def run(
        self,
        todo: dict[str, list[Problem]],
        problems: list[Problem],
        progress: bool,
        on_batch: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        from pipeline.run.pool import row_memory
        from pipeline.run.scheduler import Scheduler
        from pipeline.run.workers import NoWorkerLeftError

        if memory := row_memory(self.cfg, self.infos):
            self.log(memory)
        scheduler = Scheduler(
            self.workers,
            plan_batches(self.cfg, todo, problems),
            self.cfg.max_retries,
            on_worker_lost=lambda why: self.log(f"worker lost: {why}"),
            settings=self.cfg,
            on_progress=lambda: self.show(scheduler),
        )
        todo_counts = {m: len(todo.get(m, [])) for m in self.cfg.method}
        self.bar = Progress(todo_counts, self.skipped, self.cfg.run_id, enabled=progress)
        try:
            for outcome in scheduler.run():
                if outcome.results:
                    self.record(outcome, scheduler)
                    if on_batch:
                        state = {"workers": self.workers, "infos": self.infos}
                        on_batch(
                            {**state, "recorded": self.counts.recorded, "scheduler": scheduler}
                        )
        except NoWorkerLeftError as exc:
            raise RunError(str(exc)) from None
        finally:
            self.bar.close()
            self.counts.worker_failures = scheduler.worker_failures
            self.counts.retried = scheduler.retried

    def record(self, outcome: Any, scheduler: Any) -> None:
        """Write one returned batch (one shard pair), then advance the bar and the metrics."""
        results = outcome.results
        attempts = {
            (r.problem_id, r.method): outcome.batch.attempts.get(r.problem_id, 1) for r in results
        }
        self.store.write(results, self.cfg.run_id, model_name(self.cfg), outcome.worker, attempts)
        c = self.counts
        c.recorded += len(results)
        c.failures += sum(bool(r.error) for r in results)
        c.correct += sum(r.final_correct for r in results)
        c.iterations += sum(r.iterations for r in results)
        for method in dict.fromkeys(r.method for r in results):
            mine = [r for r in results if r.method == method]
            self.bar.recorded_batch(method, len(mine), sum(r.compute.wall_seconds for r in mine))
        self.show(scheduler)

    def show(self, scheduler: Any) -> None:
        """The bar (problems and iterations done: recorded, or reported in batches still out;
        the age of the oldest batch out) and, at most every PROGRESS_EVERY_S and at the end,
        the live MLflow metrics."""
        c = self.counts
        problems, iterations = scheduler.reported()
        self.bar.update(
            self.skipped + c.recorded + problems,
            acc=f"{c.correct / max(c.recorded, 1):.3f}",
            failed=c.failures,
            lost_workers=scheduler.worker_failures,
            iters=c.iterations + iterations,
            oldest=f"{scheduler.oldest_age():.0f}s",
        )
        finished = c.recorded == self.total - self.skipped
        if self.mlflow_run and (
            finished or time.monotonic() - self.last_logged >= PROGRESS_EVERY_S
        ):
            self.log_progress(scheduler, c.recorded + problems, c.iterations + iterations)
            self.last_logged = time.monotonic()

    def log_progress(self, scheduler: Any, done: int, iterations: int) -> None:
        """Live metrics, step = problems done in this invocation (recorded, or reported finished
        in a batch still out): what the progress bar shows."""
        from pipeline.run import tracking

        c = self.counts
        tracking.log_progress(
            self.cfg,
            self.mlflow_run,
            done,
            {
                "records": float(c.recorded + self.skipped),
                "done": float(done + self.skipped),
                "accuracy": c.correct / max(c.recorded, 1),
                "failures": float(c.failures),
                "workers_lost": float(scheduler.worker_failures),
                "iterations": float(iterations),
                "oldest_batch_s": scheduler.oldest_age(),
            },
        )


def main(cfg: Config, argv: Sequence[str] | None = None) -> int:
    summary = run_evaluation(cfg, argv=argv)
    print(format_summary(summary))
    return 0
