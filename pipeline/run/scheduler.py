"""The scheduler: the driver's queue of batches, fed to the workers (`pipeline.run.workers`) one in
flight per worker; a worker gets its next batch the moment it returns one, so a fast worker
takes more of the work (pull).

Faults:
- A worker that dies (its process killed, out of memory, a segfault; Ray restarts it) loses
  its batch, and the batch is charged one death per problem. A batch of several problems goes
  back to the front of the queue split, one batch per problem, so that a problem that kills its
  worker (a poison problem) then costs only itself; a problem alone goes back as it is, until it
  has been in `max_retries + 1` batches that died: then it is recorded with an error that says
  so, and the run goes on. If every worker is gone the run stops with an error; what was
  recorded stays. A worker death is never charged to a problem's raise retries, nor the reverse.
- Nothing waits forever: a batch whose worker has reported no progress (no problem finished, no
  iteration done) for its deadline (`batch_timeout`), counted from its dispatch or its last
  report, has its worker killed (Ray restarts it), which makes it a death as above; a worker that
  is slow (starved by other jobs) but moving keeps its batch.
- A problem that raises inside a worker is retried alone, up to `max_retries` times, then
  recorded with its error; the run goes on.

Results come back to the driver, which is the only writer of records (`pipeline.run.records`), so a
result is recorded exactly once whatever happens to the workers. While a batch runs, its worker
posts progress to a `ProgressBoard` for the driver's progress bar; progress is never recorded.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, RayError

from pipeline.data import Problem
from pipeline.method.results import ProblemResult
from pipeline.run.workers import NoWorkerLeftError, Replica, stop_worker


@dataclass
class Batch:
    batch_id: int
    method: str
    problems: list[Problem]
    attempts: dict[str, int] = field(default_factory=dict)  # problem_id -> outcomes returned
    deaths: dict[str, int] = field(default_factory=dict)  # problem_id -> workers lost running it

    def alone(self, p: Problem, batch_id: int) -> Batch:
        """A batch of `p` alone, with its counts so far."""
        pid = p.problem_id
        attempts = {pid: self.attempts[pid]} if pid in self.attempts else {}
        deaths = {pid: self.deaths[pid]} if pid in self.deaths else {}
        return Batch(batch_id, self.method, [p], attempts, deaths)


@dataclass
class BatchOutcome:
    batch: Batch
    worker: str
    results: list[ProblemResult]  # results to record (errors included once out of retries)
    retry: list[Problem]  # problems that raised and will be tried again


class ProgressBoard:
    """Where workers post progress while their batches run, for the driver to collect: a Ray
    actor of no CPU, one per `Scheduler.run`, owned by the driver (it dies with it).

    Events are `("done", ticket, problem_id)` and `("iteration", ticket, problem_id, k)`, the
    ticket naming one dispatch of a batch. Workers post without waiting, so an event may arrive
    after its batch's results, or from a batch whose worker then died: the scheduler counts an
    event only while its dispatch is in flight. Progress only: nothing here is recorded."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def post(self, *event: Any) -> None:
        self.events.append(event)

    def take(self) -> list[tuple[Any, ...]]:
        events, self.events = self.events, []
        return events


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


# The derived batch deadline (`batch_timeout`): seconds per decoding step, and a floor.
SECONDS_PER_STEP = {"cpu": 2.0, "gpu": 0.25}
BATCH_TIMEOUT_FLOOR_S = 600.0


def batch_timeout(cfg: Any, method: str, problems: int) -> float | None:
    """Seconds a batch of `problems` problems of `method` may go without progress (from its
    dispatch, or from its worker's last report of a problem finished or an iteration done)
    before its worker is taken for hung (`batch_timeout_s`: > 0 that many, 0 none (None), -1
    derived as follows).

    Derived: a floor plus decoding steps x seconds per step, the steps an upper bound for a
    worker that keeps `batch_size` rows decoding (Graham's bound for greedy scheduling: the
    whole work spread over the rows, plus the longest chain that must run one step after
    another):

        per answer  T = max_new_tokens + V x verifier_budget   (V verifiers: reward=self and a
                                                                 method that scores answers)
        work        W = problems x A x T                        (A = the method's max_answers)
        chain       L = A x (max_new_tokens + verifier_budget)  (one problem's answers in turn)
        deadline      = BATCH_TIMEOUT_FLOOR_S + SECONDS_PER_STEP x (W / batch_size + L)

    That bounds the whole batch, so it bounds every wait between two reports too. Generous on
    purpose, since a deadline too short kills healthy batches again and again and
    records their problems as errors, while one too long costs only the wait for a hung worker:
    every answer and verification is taken at its token cap, prefill and the latent steps are
    left to the per-step time (0.25 s on GPU: several times a 7B model's decoding step there;
    2 s on CPU: enough for models of a few billion parameters, larger ones on CPU should set
    `batch_timeout_s`), and the floor covers short tasks. Set `batch_timeout_s` to bound tighter
    and catch a hung worker sooner."""
    if cfg.batch_timeout_s > 0:
        return float(cfg.batch_timeout_s)
    if cfg.batch_timeout_s == 0:
        return None
    from pipeline.method.methods import get_method
    from pipeline.method.prompts import load_verifiers

    spec = get_method(method)
    answers = spec.max_answers(cfg)
    verifiers = 0
    if spec.uses_reward and cfg.reward == "self":
        verifiers = len(load_verifiers(cfg.verifier_prompts).verifiers)
    per_answer = cfg.max_new_tokens + verifiers * cfg.verifier_budget
    chain = answers * (cfg.max_new_tokens + (cfg.verifier_budget if verifiers else 0))
    steps = problems * answers * per_answer / cfg.batch_size + chain
    per_step = SECONDS_PER_STEP["gpu" if cfg.gpus_per_worker > 0 else "cpu"]
    return BATCH_TIMEOUT_FLOOR_S + per_step * steps


@dataclass(eq=False)
class InFlight:
    """A batch sent to a worker, until it comes back or is lost with the worker."""

    worker: Any
    batch: Batch
    ticket: int  # this dispatch's number, which the worker's progress events carry
    started: float  # time.monotonic() when it was sent
    timeout: float | None  # seconds it may go without progress (`batch_timeout`); None: none
    timed_out: bool = False  # its worker was killed for the deadline: its loss is that
    done: set[str] = field(default_factory=set)  # problems the worker reported finished
    steps: set[tuple[str, int]] = field(default_factory=set)  # (problem, k) iterations reported
    moved: float = 0.0  # time.monotonic() of its dispatch or its last progress event taken in


LOST_WORKER = "(lost)"  # the worker column of a problem recorded because its workers died
TICK_S = 0.5  # the scheduler looks at deadlines and progress at least this often


class Scheduler:
    """Feeds batches to workers, one in flight per worker; yields outcomes as they complete, and
    one for each problem recorded because the workers running it died (module doc, Faults).

    `on_worker_lost(why)` is called for each worker lost with a batch; `on_progress()` about
    every `TICK_S` while batches are out, after the workers' progress events were taken in
    (`reported`, `oldest_age`)."""

    def __init__(
        self,
        workers: list[Any],
        batches: Sequence[Batch],
        max_retries: int,
        on_worker_lost: Callable[[str], None] | None = None,
        settings: Any = None,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.workers = list(workers)
        self.settings = settings  # sent with every batch (EvalWorker.run); gives the deadline
        self.queue: deque[Batch] = deque(batches)
        self.max_retries = max_retries
        self.on_worker_lost = on_worker_lost
        self.on_progress = on_progress
        self.worker_failures = 0  # batches lost with their worker (deaths and timeouts)
        self.retried = 0  # problem attempts that raised and were re-queued
        self._next_id = max((b.batch_id for b in batches), default=-1) + 1
        self.in_flight: dict[Any, InFlight] = {}  # object ref of the run call -> its batch
        self._tickets = itertools.count()
        self._timeouts: dict[tuple[str, int], float | None] = {}
        self._pings: dict[Any, Any] = {}  # ping ref -> a worker that died and is restarting
        self._waiting: list[tuple[float, Any]] = []  # (when to ping again, worker)
        self._board: Any = None  # the ProgressBoard while `run` runs
        self._take: Any = None  # the board's pending `take` call
        self._taken_at = float("-inf")

    def reported(self) -> tuple[int, int]:
        """(problems finished, iterations done) that workers reported in batches still out:
        what their results will add to the records when they come back."""
        flights = self.in_flight.values()
        return sum(len(f.done) for f in flights), sum(len(f.steps) for f in flights)

    def oldest_age(self) -> float:
        """Seconds since the oldest batch still out was sent (0 when none is)."""
        now = time.monotonic()
        return max((now - f.started for f in self.in_flight.values()), default=0.0)

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
                self.queue.append(batch.alone(p, self._new_id()))
        return BatchOutcome(batch, worker, results, retry)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _lost(self, flight: InFlight, exc: Exception) -> BatchOutcome | None:
        """A batch lost with its worker: each of its problems charged a death, then the batch
        re-queued at the front, split one problem per batch; a problem alone that has died
        `max_retries + 1` times is returned as an outcome holding its error instead."""
        self.worker_failures += 1
        batch = flight.batch
        if flight.timed_out:
            why = f"timed out after {flight.timeout:g} s without progress (batch_timeout_s)"
        else:
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        for p in batch.problems:
            batch.deaths[p.problem_id] = batch.deaths.get(p.problem_id, 0) + 1
        (first, *rest), outcome = batch.problems, None
        if rest:
            self.queue.extendleft(
                reversed([batch.alone(p, self._new_id()) for p in batch.problems])
            )
            then = f"its {len(batch.problems)} problems re-queued one per batch"
        elif batch.deaths[first.problem_id] <= self.max_retries:
            self.queue.appendleft(batch)
            then = f"{first.problem_id} re-queued"
        else:
            deaths = batch.deaths[first.problem_id]
            batch.attempts[first.problem_id] = batch.attempts.get(first.problem_id, 0) + deaths
            error = f"WorkerDied: worker process died while running this problem ({deaths} times)"
            row = self._error_result(batch, first, f"{error}; the last time: {why}")
            outcome = BatchOutcome(batch, LOST_WORKER, [row], [])
            then = f"{first.problem_id} recorded with its error after {deaths} deaths"
        if self.on_worker_lost:
            self.on_worker_lost(f"{why}; {then}")
        return outcome

    def _dispatch(self, idle: list[Any]) -> None:
        while idle and self.queue:
            worker, batch = idle.pop(), self.queue.popleft()
            ticket = next(self._tickets)
            progress = (self._board, ticket) if self._board is not None else None
            ref = worker.run.remote(batch.method, batch.problems, self.settings, progress)
            now = time.monotonic()
            self.in_flight[ref] = InFlight(
                worker, batch, ticket, now, self._timeout(batch), moved=now
            )

    def _timeout(self, batch: Batch) -> float | None:
        if self.settings is None:
            return None
        key = (batch.method, len(batch.problems))
        if key not in self._timeouts:
            self._timeouts[key] = batch_timeout(self.settings, *key)
        return self._timeouts[key]

    def _enforce_deadlines(self) -> None:
        """Kill the worker of each batch that has gone its deadline without progress; Ray
        restarts it, and the batch's call fails as for any worker that died (`_lost`)."""
        now = time.monotonic()
        for f in self.in_flight.values():
            if f.timeout is not None and not f.timed_out and now - f.moved > f.timeout:
                f.timed_out = True
                actor = f.worker.rank0 if isinstance(f.worker, Replica) else f.worker
                ray.kill(actor, no_restart=False)

    def _poll_progress(self) -> None:
        """Take in the progress events posted since the last look (at most every TICK_S; never
        waiting on the board), then `on_progress()`."""
        if self._board is None:
            return
        if self._take is None:
            if time.monotonic() - self._taken_at >= TICK_S:
                self._take, self._taken_at = self._board.take.remote(), time.monotonic()
            return
        if not ray.wait([self._take], timeout=0)[0]:
            return
        try:
            events = ray.get(self._take)
        except RayError:  # the board is gone: no more progress, the records go on
            self._board = self._take = None
            return
        self._take, now = None, time.monotonic()
        flights = {f.ticket: f for f in self.in_flight.values()}
        for kind, ticket, problem_id, *k in events:
            if ticket not in flights:  # its batch has come back, or was lost, already
                continue
            flights[ticket].moved = now
            if kind == "done":
                flights[ticket].done.add(problem_id)
            else:
                flights[ticket].steps.add((problem_id, *k))
        if self.on_progress:
            self.on_progress()

    def _ping_restarting(self) -> None:
        now = time.monotonic()
        for due, worker in [w for w in self._waiting if w[0] <= now]:
            self._waiting.remove((due, worker))
            self._pings[worker.info.remote()] = worker

    def _answer_ping(self, ref: Any, idle: list[Any]) -> None:
        """A restarting worker answered, or is still restarting, or is gone."""
        worker = self._pings.pop(ref)
        try:
            info = ray.get(ref)
        except ActorUnavailableError:
            self._waiting.append((time.monotonic() + 0.5, worker))
        except RayActorError:
            pass  # dead for good (out of restarts): the others take its share
        else:
            if not info["start_error"]:
                idle.append(worker)
            else:  # restarted, but cannot load its model: dead for good too
                stop_worker(worker)
                if self.on_worker_lost:
                    self.on_worker_lost(
                        f"a restarted worker could not start: {info['start_error']}"
                    )

    def run(self) -> Iterator[BatchOutcome]:
        idle = list(self.workers)
        self._board = ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()
        try:
            while self.queue or self.in_flight:
                self._dispatch(idle)
                self._ping_restarting()
                if not self.in_flight and not self._pings and not self._waiting:
                    raise NoWorkerLeftError(
                        f"no worker left alive; {len(self.queue)} batches were not run "
                        "(what was recorded is kept: run again with the same run_id to resume)"
                    )
                refs = list(self.in_flight) + list(self._pings)
                done = ray.wait(refs, num_returns=1, timeout=TICK_S)[0] if refs else []
                if not refs:
                    time.sleep(TICK_S)  # only restarting workers, to ping again
                self._poll_progress()  # first: a report just in saves its batch
                self._enforce_deadlines()
                if not done:
                    continue
                if done[0] in self._pings:
                    self._answer_ping(done[0], idle)
                    continue
                flight = self.in_flight.pop(done[0])
                try:
                    name, outcomes = ray.get(done[0])
                except (RayActorError, ObjectLostError) as exc:  # lost: its node died, too
                    self._pings[flight.worker.info.remote()] = flight.worker  # Ray restarts it
                    if (outcome := self._lost(flight, exc)) is not None:
                        yield outcome
                    continue
                idle.append(flight.worker)
                yield self._settle(flight.batch, name, outcomes)
        finally:
            with contextlib.suppress(Exception):  # Ray may be gone (an interrupted driver)
                ray.kill(self._board)
            self._board = self._take = None
