"""The Ray layer: evaluation workers and the scheduler that feeds them. Nothing of the method.

`EvalWorker` is a Ray actor that owns one device (a GPU, or `cpus_per_worker` CPU threads) and
one loaded model (`pipeline.methods.Solver`), loaded once in its constructor. `Scheduler` holds
the queue of batches on the driver and keeps exactly one batch in flight per worker: a worker
gets its next batch the moment it returns one, so a fast worker takes more of the work (pull).

Faults:
- A worker process that dies (killed, out of memory) fails its in-flight task with a Ray actor
  error: the batch goes back to the front of the queue and the actor is restarted by Ray (up to
  `max_worker_restarts` times; it reloads the model); once it is out of restarts the others take
  its share. If every worker is gone the run stops with an error; what was recorded stays.
- A problem that raises inside a worker is retried alone, up to `max_retries` times, then
  recorded with its error; the run goes on.

Results come back to the driver, which is the only writer of records (`pipeline.records`), so a
result is recorded exactly once whatever happens to the workers.

A worker whose constructor fails (the model cannot be loaded, a reward cannot be imported) stays
alive and reports the error from `info()` (`start_error`), so that the driver can show it as one
line instead of a Ray traceback; the scheduler treats a restarted worker that reports one as
dead for good.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError

from pipeline.data import Problem
from pipeline.results import ProblemResult


class NoWorkerLeftError(RuntimeError):
    """Every worker is gone (out of restarts, or unable to start again)."""


@dataclass
class Batch:
    batch_id: int
    method: str
    problems: list[Problem]
    attempts: dict[str, int] = field(default_factory=dict)  # problem_id -> attempts so far


@dataclass
class BatchOutcome:
    batch: Batch
    worker: str
    results: list[ProblemResult]  # results to record (errors included once out of retries)
    retry: list[Problem]  # problems that raised and will be tried again


def worker_device(device: str, gpus_per_worker: float) -> str:
    """The device a worker runs on, from the config's `device` and `gpus_per_worker`.

    Ray hands a worker a GPU only when it asks for one (`gpus_per_worker > 0`), and then numbers
    the GPUs it was given from 0, so:

        device       gpus_per_worker = 0    gpus_per_worker > 0
        auto         cpu                    cuda
        cpu          cpu                    error (GPUs reserved and never used)
        cuda[:N]     error (no GPU given)   cuda[:N], N < the GPUs each worker gets

    Raises ValueError with what to set instead. Pure: the driver calls it before anything
    starts, and each worker calls it again to pick its device.
    """
    if gpus_per_worker == 0:
        if device in ("auto", "cpu"):
            return "cpu"
        raise ValueError(
            f"device={device!r} needs gpus_per_worker > 0 (a Ray worker gets a GPU only when it "
            "asks for one); set gpus_per_worker=1, or device=cpu (or auto) for CPU workers"
        )
    if device == "cpu":
        raise ValueError(
            f"device='cpu' with gpus_per_worker={gpus_per_worker:g} reserves GPUs that the "
            "workers would not use; set gpus_per_worker=0 for CPU workers, or device=auto"
        )
    if device == "auto":
        return "cuda"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"device={device!r}: allowed: auto, cpu, cuda, cuda:N")
    visible = max(1, math.ceil(gpus_per_worker))
    if match.group(1) is not None and int(match.group(1)) >= visible:
        raise ValueError(
            f"device={device!r}: a worker with gpus_per_worker={gpus_per_worker:g} sees "
            f"{visible} GPU(s), numbered from 0 (Ray picks which); use device=cuda"
        )
    return device


class EvalWorker:
    """Runs batches on one model. Wrapped with `ray.remote` by `make_worker_class`."""

    def __init__(self, cfg: Any) -> None:
        ctx = ray.get_runtime_context()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{ctx.get_node_id()[:8]}"
        self.solver: Any = None
        self.settings: Any = cfg  # the config of the work it runs now
        self.start_error = ""  # one line: why this worker has no model (see the module doc)
        try:
            from pipeline.methods import Solver  # heavy imports happen in the worker process

            self.solver = Solver.from_config(self._local(cfg))
        except Exception as exc:  # noqa: BLE001 - reported by info(), shown by the driver
            self.start_error = one_line(exc)

    @staticmethod
    def _local(cfg: Any) -> Any:
        """The config as this worker runs it: its device, and CPU threads for CPU workers."""
        device = worker_device(cfg.device, cfg.gpus_per_worker)
        if device == "cpu":
            return cfg.replace(device=device, threads=cfg.threads or cfg.cpus_per_worker)
        return cfg.replace(device=device)

    def _configure(self, cfg: Any) -> None:
        """Run the next work with `cfg` (a sweep's next point) on the model already loaded;
        the driver reuses a worker only for configs that load the same model (MODEL_KEYS)."""
        from pipeline.methods import Solver

        self.solver = Solver(self._local(cfg), self.solver.loaded)
        self.settings = cfg

    def info(self) -> dict[str, Any]:
        from pipeline.generation import kv_bytes_per_token

        loaded = self.solver.loaded if self.solver is not None else None
        return {
            "name": self.name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "start_error": self.start_error,
            "model": loaded.name if loaded else "",
            "device": str(loaded.device) if loaded else "",
            "load_seconds": loaded.load_seconds if loaded else 0.0,
            "kv_bytes_per_token": kv_bytes_per_token(loaded.model) if loaded else 0,
        }

    def run(
        self, method: str, problems: Sequence[Problem], settings: Any = None
    ) -> tuple[str, list[Any]]:
        """Run a batch (with `settings`, when given: the config of the batch's run, so a worker
        restarted by Ray with its first config still runs each batch as its run says); if it
        raises, run its problems one by one so one bad problem costs only itself. Returns
        (worker name, [ProblemResult | error text] per problem)."""
        if self.solver is None:  # the scheduler sends it no work; if it did: an error each
            error = f"RuntimeError: worker could not start: {self.start_error}"
            return self.name, [error] * len(problems)
        if settings is not None and settings != self.settings:
            self._configure(settings)
        try:
            return self.name, list(self.solver.run(method, problems))
        except Exception:  # noqa: BLE001 - isolate the failing problem(s) below
            if len(problems) == 1:
                return self.name, [traceback.format_exc(limit=8)]
        outcomes: list[Any] = []
        for p in problems:
            try:
                outcomes.extend(self.solver.run(method, [p]))
            except Exception:  # noqa: BLE001 - recorded as the problem's error
                outcomes.append(traceback.format_exc(limit=8))
        return self.name, outcomes


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line (a multi-line message is joined with spaces)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def make_worker_class(cfg: Any) -> Any:
    """`EvalWorker` as a Ray actor class with the resources the config asks for."""
    if cfg.gpus_per_worker > 0:
        resources = {"num_gpus": cfg.gpus_per_worker, "num_cpus": 1}
    else:
        resources = {"num_cpus": cfg.cpus_per_worker}
    return ray.remote(max_restarts=cfg.max_worker_restarts, max_task_retries=0, **resources)(
        EvalWorker
    )


def make_batches(
    problems: Sequence[Problem], methods: Sequence[str], batch_size: int
) -> list[Batch]:
    """Chunks of problems, each chunk once per method (so every problem's methods finish close
    together and partial runs hold complete comparisons)."""
    batches = []
    for start in range(0, len(problems), batch_size):
        chunk = list(problems[start : start + batch_size])
        for method in methods:
            batches.append(Batch(len(batches), method, chunk))
    return batches


class Scheduler:
    """Feeds batches to workers, one in flight per worker; yields outcomes as they complete."""

    def __init__(
        self,
        workers: list[Any],
        batches: Sequence[Batch],
        max_retries: int,
        on_worker_lost: Callable[[str], None] | None = None,
        settings: Any = None,
    ) -> None:
        self.workers = list(workers)
        self.settings = settings  # sent with every batch (EvalWorker.run)
        self.queue: deque[Batch] = deque(batches)
        self.max_retries = max_retries
        self.on_worker_lost = on_worker_lost
        self.worker_failures = 0
        self.retried = 0
        self._next_id = max((b.batch_id for b in batches), default=-1) + 1
        self.in_flight: dict[Any, tuple[Any, Batch]] = {}  # object ref -> (worker, batch)

    def _error_result(self, batch: Batch, p: Problem, error: str) -> ProblemResult:
        return ProblemResult(
            problem_id=p.problem_id,
            dataset=p.dataset,
            method=batch.method,
            question=p.question,
            gold=p.gold,
            stop_reason="exception",
            error=error.strip().splitlines()[-1][:2000] if error.strip() else "error",
        )

    def _settle(self, batch: Batch, worker: str, outcomes: list[Any]) -> BatchOutcome:
        results, retry = [], []
        for p, out in zip(batch.problems, outcomes):
            batch.attempts[p.problem_id] = batch.attempts.get(p.problem_id, 0) + 1
            if isinstance(out, ProblemResult):
                results.append(out)
            elif batch.attempts[p.problem_id] <= self.max_retries:
                retry.append(p)
            else:
                results.append(self._error_result(batch, p, str(out)))
        if retry:
            self.retried += len(retry)
            for p in retry:  # retried alone, so a bad problem cannot sink a batch again
                again = Batch(
                    self._next_id, batch.method, [p], {p.problem_id: batch.attempts[p.problem_id]}
                )
                self._next_id += 1
                self.queue.append(again)
        return BatchOutcome(batch, worker, results, retry)

    def run(self) -> Iterator[BatchOutcome]:
        in_flight = self.in_flight
        idle = list(self.workers)
        pings: dict[Any, Any] = {}  # ping ref -> a worker that died and is being restarted
        waiting: list[tuple[float, Any]] = []  # (when to ping again, worker) while restarting
        while self.queue or in_flight:
            while idle and self.queue:
                worker = idle.pop()
                batch = self.queue.popleft()
                ref = worker.run.remote(batch.method, batch.problems, self.settings)
                in_flight[ref] = (worker, batch)
            now = time.monotonic()
            for due, worker in [w for w in waiting if w[0] <= now]:
                waiting.remove((due, worker))
                pings[worker.info.remote()] = worker
            if not in_flight and not pings and not waiting:
                raise NoWorkerLeftError(
                    f"no worker left alive; {len(self.queue)} batches were not run "
                    "(what was recorded is kept: run again with the same run_id to resume)"
                )
            refs = list(in_flight) + list(pings)
            done, _ = ray.wait(refs, num_returns=1, timeout=0.5 if waiting else None)
            if not done:
                continue
            ref = done[0]
            if ref in pings:  # a restarting worker answered, or is still restarting, or is gone
                worker = pings.pop(ref)
                try:
                    info = ray.get(ref)
                except ActorUnavailableError:
                    waiting.append((time.monotonic() + 0.5, worker))
                except RayActorError:
                    pass  # dead for good (out of restarts): the others take its share
                else:
                    if not info["start_error"]:
                        idle.append(worker)
                    else:  # restarted, but cannot load its model: dead for good too
                        ray.kill(worker, no_restart=True)
                        if self.on_worker_lost:
                            self.on_worker_lost(
                                f"a restarted worker could not start: {info['start_error']}"
                            )
                continue
            worker, batch = in_flight.pop(ref)
            try:
                name, outcomes = ray.get(ref)
            except (RayActorError, ObjectLostError) as exc:  # lost: its node died before we read it
                self.worker_failures += 1
                self.queue.appendleft(batch)  # nothing of it was recorded: run it again
                if self.on_worker_lost:
                    self.on_worker_lost(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                pings[worker.info.remote()] = worker  # Ray restarts it (up to its limit)
                continue
            idle.append(worker)
            yield self._settle(batch, name, outcomes)
