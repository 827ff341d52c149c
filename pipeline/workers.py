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
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from pipeline.data import Problem
from pipeline.results import ProblemResult


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


class EvalWorker:
    """Runs batches on one model. Wrapped with `ray.remote` by `make_worker_class`."""

    def __init__(self, cfg: Any) -> None:
        from pipeline.methods import Solver  # heavy imports happen in the worker process

        if cfg.gpus_per_worker == 0:
            cfg = cfg.replace(device="cpu", threads=cfg.threads or cfg.cpus_per_worker)
        self.solver = Solver.from_config(cfg)
        ctx = ray.get_runtime_context()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{ctx.get_node_id()[:8]}"

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "model": self.solver.loaded.name,
            "device": str(self.solver.loaded.device),
            "load_seconds": self.solver.loaded.load_seconds,
        }

    def run(self, method: str, problems: Sequence[Problem]) -> tuple[str, list[Any]]:
        """Run a batch; if it raises, run its problems one by one so one bad problem costs
        only itself. Returns (worker name, [ProblemResult | error text] per problem)."""
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
    ) -> None:
        self.workers = list(workers)
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
                ref = worker.run.remote(batch.method, batch.problems)
                in_flight[ref] = (worker, batch)
            now = time.monotonic()
            for due, worker in [w for w in waiting if w[0] <= now]:
                waiting.remove((due, worker))
                pings[worker.info.remote()] = worker
            if not in_flight and not pings and not waiting:
                raise RuntimeError(
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
                    ray.get(ref)
                    idle.append(worker)
                except ActorUnavailableError:
                    waiting.append((time.monotonic() + 0.5, worker))
                except RayActorError:
                    pass  # dead for good (out of restarts): the others take its share
                continue
            worker, batch = in_flight.pop(ref)
            try:
                name, outcomes = ray.get(ref)
            except RayActorError as exc:
                self.worker_failures += 1
                self.queue.appendleft(batch)  # nothing of it was recorded: run it again
                if self.on_worker_lost:
                    self.on_worker_lost(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                pings[worker.info.remote()] = worker  # Ray restarts it (up to its limit)
                continue
            idle.append(worker)
            yield self._settle(batch, name, outcomes)
