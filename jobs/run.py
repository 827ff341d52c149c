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
   workers fed batches (`pipeline.run.scheduler.Scheduler`), which stream each problem's result
   back as it finishes; the results written a window at a time (a few seconds, or
   RECORD_WINDOW_ROWS), each window one atomic shard pair (`pipeline.run.records`), progress
   shown, MLflow's live metrics logged on a thread of their own (`Background`);
4. finishing (`jobs.finish`): compaction, summary files, the report, MLflow, the summary.

SIGTERM (what `ray job stop`, Slurm and Kubernetes send) and SIGINT (Ctrl-C) are a requested
stop (`stop_on_signals`): the driver raises `StopRequested` where it is, its MLflow runs end
KILLED, the workers are stopped (the batches they held were never recorded: a resume runs them
again, since a shard pair is committed whole or not at all), the run directory's lock is let
go, and `main` prints one line saying how to resume, exiting 128 + the signal's number (143 for
SIGTERM, 130 for SIGINT). Ray's `ray.init` installs its own SIGTERM handler in the driver
(`sys.exit(15)`: a SystemExit in the middle of a `ray.get`, a C++ stack dump and FAILED runs),
so ours is installed again after Ray starts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import queue
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from jobs.finish import Counts, RunSummary, finish_run, format_summary, model_name
from jobs.preflight import (
    RunError,
    Work,
    check_memory,
    check_resume,
    plan_work,
    preflight,
    resolve_run_id,
)
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

__all__ = ["RunError", "RunSummary", "StopRequested", "check_resume", "main", "run_evaluation"]

PROGRESS_EVERY_S = 2.0  # live MLflow metrics at most this often (and after the last batch)
PROGRESS_FLUSH_S = 30.0  # at the loop's end, how long the last live metrics may take to log
# Results stream in per problem; the driver writes them as one shard pair per window: when this
# many wait, or the oldest has waited this long (so a driver killed loses at most a window).
RECORD_WINDOW_ROWS = 256
RECORD_WINDOW_S = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PROGRAM = "latentseek"  # the command a resume line names when no argv was given


class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: stop, keep what is recorded, end the MLflow runs KILLED.

    A KeyboardInterrupt, so that no `except Exception` swallows it and every place that marks
    an interrupted run KILLED (`jobs.finish`, `pipeline.run.tracking`) treats it as one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_id = ""
        self.directory: Path | None = None
        self.recorded = 0  # records written by this invocation before the stop

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process a signal ended


class _StopSignals:
    """SIGTERM and SIGINT raise `StopRequested` in the main thread; the first one only (a
    second signal while the driver stops is ignored, so that the cleanup is not cut short).
    Inside `held` (a window of records being committed and counted) the stop waits for the
    block's end. `install` again after something else took the signals (`ray.init` takes
    SIGTERM)."""

    def __init__(self) -> None:
        self.signum = 0  # the signal that asked for the stop; 0: none yet
        self.saved: dict[int, Any] = {}
        self.holding = False  # inside `held`
        self.deferred = False  # the stop arrived inside `held`: raised at its end

    def handler(self, signum: int, frame: Any) -> None:
        if self.signum:
            return
        self.signum = signum
        if self.holding:
            self.deferred = True
            return
        raise StopRequested(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """For the block, a stop signal waits: `StopRequested` is raised when the block ends.
        Around a window's commit and its count, so that a stop landing just after the commit
        does not leave the window pending, to be written again by the loop's last flush."""
        if self.holding:
            yield
            return
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.deferred:
            self.deferred = False
            raise StopRequested(self.signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; a driver run elsewhere keeps Python's
        for sig in STOP_SIGNALS:
            self.saved.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self.handler)

    def restore(self) -> None:
        for sig, old in self.saved.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[_StopSignals]:
    """For the block, SIGTERM and SIGINT are a requested stop (`StopRequested`); the handlers
    that were there before come back after it."""
    signals = _StopSignals()
    signals.install()
    try:
        yield signals
    finally:
        signals.restore()


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
    `pool`, which starts its own). SIGTERM and SIGINT stop it with `StopRequested`."""
    from pipeline.engine.model import pin_revision

    start = time.perf_counter()
    cfg = pin_revision(resolve_run_id(cfg))  # a hub id's commit, the same for every worker
    directory = run_dir(cfg)
    counts = Counts()
    with stop_on_signals() as signals:
        try:
            return _run(cfg, directory, counts, signals, start, progress, on_batch, log, argv,
                        pool, tags, start_worker)  # fmt: skip
        except KeyboardInterrupt as exc:
            if not signals.signum:
                raise
            # Ray's `ray.wait`/`ray.get` turn what our handler raised into a bare
            # KeyboardInterrupt; the handler kept the signal.
            stop = exc if isinstance(exc, StopRequested) else StopRequested(signals.signum)
            stop.run_id, stop.directory, stop.recorded = str(cfg.run_id), directory, counts.recorded
            if stop is exc:
                raise
            raise stop from None


def _run(
    cfg: Config,
    directory: Path,
    counts: Counts,
    signals: _StopSignals,
    start: float,
    progress: bool,
    on_batch: Callable[[dict[str, Any]], None] | None,
    log: Callable[[str], None],
    argv: Sequence[str] | None,
    pool: WorkerPool | None,
    tags: dict[str, str] | None,
    start_worker: Callable[[Config], Any] | None,
) -> RunSummary:
    from pipeline.engine.model import prepare_model
    from pipeline.run import tracking

    dataset = preflight(cfg, directory, log)
    with hold_run_dir(directory):
        work = plan_work(cfg, directory, dataset, log)
        store = RecordStore(directory)
        mlflow_run = ""
        if any(work.todo.values()):
            prepare_model(cfg)  # a GGUF file's first load writes the config.json the plan reads
            check_memory(cfg, log)
            start_ray(cfg)
            signals.install()  # again: ray.init has put its own SIGTERM handler in place
            workers, infos = (
                pool.acquire(cfg) if pool is not None else start_workers(cfg, start_worker)
            )
            try:
                open_run(cfg, directory, argv, work)
                mlflow_run = tracking.start_run(
                    cfg, {"run_dir": str(directory.resolve()), **(tags or {})}
                )
                loop = BatchLoop(
                    cfg, workers, infos, store, counts, work.total, work.skipped, log, mlflow_run,
                    hold=signals.held,
                )  # fmt: skip
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
    """Feeds every batch to the workers and records each result once, within a window of its
    coming back.

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
        hold: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.cfg, self.workers, self.infos, self.store = cfg, workers, infos, store
        self.counts, self.total, self.skipped = counts, total, skipped
        self.log, self.mlflow_run = log, mlflow_run
        self.hold = hold  # a stop signal waits while a window is committed and counted
        self.last_logged = float("-inf")
        self.bar: Any = None
        self.mlflow = Background("MLflow progress logging", log)
        self.pending: list[tuple[Any, str, int]] = []  # (result, worker, attempts) to write
        self.pending_since = 0.0

    def run(
        self,
        todo: dict[str, list[Problem]],
        problems: list[Problem],
        progress: bool,
        on_batch: Callable[[dict[str, Any]], None] | None,
    ) -> None:
        from pipeline.run.pool import restart_timeout
        from pipeline.run.scheduler import Scheduler
        from pipeline.run.workers import NoWorkerLeftError

        scheduler = Scheduler(
            self.workers,
            plan_batches(self.cfg, todo, problems),
            self.cfg.max_retries,
            on_worker_lost=lambda why: self.log(f"worker lost: {why}"),
            settings=self.cfg,
            on_progress=lambda: self.tick(scheduler),
            restart_timeout=restart_timeout(self.infos),
        )
        todo_counts = {m: len(todo.get(m, [])) for m in self.cfg.method}
        self.bar = Progress(todo_counts, self.skipped, self.cfg.run_id, enabled=progress)
        try:
            for outcome in scheduler.run():
                if outcome.results:
                    self.take(outcome, scheduler)
                    if on_batch:
                        state = {"workers": self.workers, "infos": self.infos}
                        recorded = self.counts.recorded + len(self.pending)
                        on_batch(
                            {**state, "recorded": recorded, "results": len(outcome.results),
                             "scheduler": scheduler}
                        )  # fmt: skip
        except NoWorkerLeftError as exc:
            raise RunError(str(exc)) from None
        finally:
            self.flush(scheduler)  # what came back is recorded, whatever ends the loop
            self.bar.close()
            self.mlflow.close(PROGRESS_FLUSH_S)
            self.counts.worker_failures = scheduler.worker_failures
            self.counts.retried = scheduler.retried

    def take(self, outcome: Any, scheduler: Any) -> None:
        """Hold what came back of a batch for the window's write (`flush`), which happens once
        RECORD_WINDOW_ROWS wait or the oldest has waited RECORD_WINDOW_S."""
        if not self.pending:
            self.pending_since = time.monotonic()
        for r in outcome.results:
            self.pending.append((r, outcome.worker, outcome.batch.attempts.get(r.problem_id, 1)))
        if len(self.pending) >= RECORD_WINDOW_ROWS:
            self.flush(scheduler)
        else:
            self.tick(scheduler)

    def tick(self, scheduler: Any) -> None:
        """About every TICK_S and at every outcome: the window written when due, the bar."""
        if self.pending and time.monotonic() - self.pending_since >= RECORD_WINDOW_S:
            self.flush(scheduler)
        else:
            self.show(scheduler)

    def flush(self, scheduler: Any) -> None:
        """Write the window's results (one shard pair), then advance the bar and the metrics.
        A result that cannot be written (text Parquet cannot encode, such as a lone surrogate)
        is recorded as that problem's error instead (`encodable`). A stop signal waits until
        the window is written and counted (`hold`): else a stop just after the commit left it
        pending, and the loop's last flush committed the same records again."""
        from pipeline.run.records import encodable

        if not self.pending:
            return
        results = [r for r, _, _ in self.pending]
        workers = [w for _, w, _ in self.pending]
        attempts = {(r.problem_id, r.method): n for r, _, n in self.pending}
        model = model_name(self.cfg)
        c = self.counts
        with self.hold():
            try:
                self.store.write(results, self.cfg.run_id, model, workers, attempts)
            except (pa.ArrowException, UnicodeError):
                results = [encodable(r) for r in results]
                self.store.write(results, self.cfg.run_id, model, workers, attempts)
            self.pending = []
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
            self.skipped + c.recorded + len(self.pending) + problems,
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
        metrics = {
            "records": float(c.recorded + self.skipped),
            "done": float(done + self.skipped),
            "accuracy": c.correct / max(c.recorded, 1),
            "failures": float(c.failures),
            "workers_lost": float(scheduler.worker_failures),
            "iterations": float(iterations),
            "oldest_batch_s": scheduler.oldest_age(),
        }
        cfg, run = self.cfg, self.mlflow_run
        self.mlflow.submit(lambda: tracking.log_progress(cfg, run, done, metrics))


class Background:
    """Calls that may stall (MLflow's live metrics: a slow server, a locked SQLite store) run
    on a thread of their own, so that the scheduler's loop never waits on them: a queue of one,
    the newest call replacing one not yet started; an error is logged (the first of each
    kind), never raised."""

    def __init__(self, what: str, log: Callable[[str], None]) -> None:
        self.what, self.log = what, log
        self.calls: queue.Queue[Callable[[], Any] | None] = queue.Queue(maxsize=1)
        self.errors: set[str] = set()
        self.thread = threading.Thread(target=self._work, name=what, daemon=True)
        self.thread.start()

    def submit(self, call: Callable[[], Any]) -> None:
        try:
            self.calls.put_nowait(call)
        except queue.Full:  # the one waiting is older: the newest replaces it
            try:
                self.calls.get_nowait()
            except queue.Empty:
                pass
            self.calls.put_nowait(call)

    def _work(self) -> None:
        while (call := self.calls.get()) is not None:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - progress only: logged, never fatal
                kind = type(exc).__name__
                if kind not in self.errors:
                    self.errors.add(kind)
                    self.log(f"{self.what} failed (the run goes on): {kind}: {exc}")

    def close(self, timeout: float) -> None:
        """Let the last call finish (up to `timeout` seconds), then stop the thread."""
        try:
            self.calls.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)


def main(cfg: Config, argv: Sequence[str] | None = None) -> int:
    """Exits 1 when the run's records fall short (`RunSummary.incomplete`), 128 + N when signal N
    stopped it."""
    try:
        summary = run_evaluation(cfg, argv=argv)
    except StopRequested as stop:
        print(stopped_line(stop, argv), file=sys.stderr)
        return stop.exit_code
    print(format_summary(summary))
    return 1 if summary.incomplete else 0


def stopped_line(stop: StopRequested, argv: Sequence[str] | None) -> str:
    """One line: what stopped the run, what is kept, and the command that resumes it (the same
    command, with the run_id it got if it had none: a resume is found by run_id)."""
    command = list(argv or [PROGRAM, "run"])
    if stop.run_id and not any(a.startswith("run_id=") for a in command):
        command.append(f"run_id={stop.run_id}")
    where = f" in {stop.directory}" if stop.directory else ""
    return (
        f"stopped by {signal.Signals(stop.signum).name}: {stop.recorded} new records kept{where}; "
        f"the work in flight was not recorded and runs again on resume: {shlex.join(command)}"
    )
