"""The scheduler: the driver's queue of batches, fed to the workers (`pipeline.run.workers`) one in
flight per worker; a worker gets its next batch the moment it returns one, so a fast worker
takes more of the work (pull).

Workers stream each problem's result back as it finishes (`EvalWorker.stream`, a Ray streaming
generator); the scheduler yields them as outcomes per batch per look.

Faults (docs/cluster.md says the same for users):
- A worker that dies (its process killed, out of memory, a segfault, its node lost; Ray
  restarts it) loses its batch's unfinished problems only, each charged one death: re-queued at
  the front, re-packed into batches of the usual size after a first death, alone after a
  second; a problem left alone that has died `max_retries + 1` times is recorded with an error
  that says so (kind "problem"), and the run goes on. A worker death is never charged to a
  problem's raise retries, nor the reverse. Ray errors are sorted by `classify`.
- Nothing waits forever: a batch that has not moved (a problem finished, an iteration done: the
  progress board's clock, or a result streamed in) for its deadline (`batch_timeout`) has its
  worker killed, a death as above; a worker that has not died `kill_grace` after its kill is
  retired and the batch lost at once. A restarting worker not back within `restart_timeout` is
  retired, naming the cluster's free resources; with no worker left the run stops.
- A problem that raises is retried alone, away from the worker it failed on, up to
  `max_retries` times, then recorded with its error. A worker that cannot run a batch at all
  (`WorkerFault`) has it retried elsewhere, charged as an infrastructure failure (kind
  "infra" once out of retries). A worker whose failure streak holds `breaker` problems that
  then succeeded elsewhere is sick: restarted, its streak's waiting retries uncharged.

Results come back to the driver, which is the only writer of records (`pipeline.run.records`), and
a problem's result is taken in once per dispatch (by its index), so a result is recorded exactly
once whatever happens to the workers. While a batch runs, its worker
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
from ray.exceptions import (
    ActorUnavailableError,
    OutOfMemoryError,
    RayActorError,
    RayError,
    RayTaskError,
    RuntimeEnvSetupError,
)

from pipeline.data import Problem
from pipeline.method.results import ProblemResult
from pipeline.run.pool import free_resources
from pipeline.run.workers import NoWorkerLeftError, Replica, WorkerFault, one_line, stop_worker


@dataclass
class Batch:
    batch_id: int
    method: str
    problems: list[Problem]
    attempts: dict[str, int] = field(default_factory=dict)  # problem_id -> outcomes returned
    deaths: dict[str, int] = field(default_factory=dict)  # problem_id -> workers lost running it
    avoid: set[Any] = field(default_factory=set)  # workers (`worker_key`) it failed on

    def alone(self, p: Problem, batch_id: int) -> Batch:
        """A batch of `p` alone, with its counts so far."""
        pid = p.problem_id
        attempts = {pid: self.attempts[pid]} if pid in self.attempts else {}
        deaths = {pid: self.deaths[pid]} if pid in self.deaths else {}
        return Batch(batch_id, self.method, [p], attempts, deaths, set(self.avoid))


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
    ticket naming one dispatch of a batch; the board stamps each with its own clock as it
    arrives, and `take` returns that clock too, so the driver reads how long ago a batch moved
    however late it looks (a driver stalled on I/O does not make healthy batches look hung).
    Workers post without waiting, so an event may arrive after its batch's results, or from a
    batch whose worker then died: the scheduler counts an event only while its dispatch is in
    flight. Progress only: nothing here is recorded."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def post(self, *event: Any) -> None:
        self.events.append((time.monotonic(), *event))

    def take(self) -> tuple[float, list[tuple[Any, ...]]]:
        events, self.events = self.events, []
        return time.monotonic(), events


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
    """A batch sent to a worker, until its stream ends or is lost with the worker."""

    worker: Any
    batch: Batch
    ticket: int  # this dispatch's number, which the worker's progress events carry
    started: float  # time.monotonic() when it was sent
    timeout: float | None  # seconds it may go without progress (`batch_timeout`); None: none
    timed_out: bool = False  # its worker was killed for the deadline: its loss is that
    killed_at: float = 0.0  # time.monotonic() of that kill (escalated after KILL_GRACE_S)
    tripped: bool = False  # its worker was restarted by its breaker: the loss is not charged
    done: set[str] = field(default_factory=set)  # problems the worker reported finished
    steps: set[tuple[str, int]] = field(default_factory=set)  # (problem, k) iterations reported
    moved: float = 0.0  # time.monotonic() of its dispatch or its last progress
    finished: set[int] = field(default_factory=set)  # indices of problems streamed back


LOST_WORKER = "(lost)"  # the worker column of a problem recorded because its workers died
TICK_S = 0.5  # the scheduler looks at deadlines and progress at least this often
BOARD_START_S = 120.0  # the progress board answers within this, or the run goes on without it
KILL_GRACE_S = 60.0  # a batch whose worker was killed and has not failed this long after: lost
BREAKER_FAILURES = 3  # a worker's consecutive failed problems that succeed elsewhere: restarted
RESTART_TIMEOUT_S = 900.0  # a restarting worker not back after this long is given up


def worker_key(worker: Any) -> Any:
    """What identifies a worker across its restarts (its actor; a replica's rank 0)."""
    return worker.rank0 if isinstance(worker, Replica) else worker


def _escaped(text: str) -> str:
    """`text` with what UTF-8 cannot encode (lone surrogates) escaped: an error row's fields."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _ids(problems: Sequence[Problem], most: int = 6) -> str:
    """The problems' ids for a log line: the first `most`, and how many more."""
    ids = ", ".join(p.problem_id for p in problems[:most])
    return ids + (f" and {len(problems) - most} more" if len(problems) > most else "")


def error_result(method: str, p: Problem, error: str, kind: str) -> ProblemResult:
    """The row of a problem recorded with its error (the last line of `error`); `kind` says
    whose fault: "problem" (it raised, or killed or hung its worker alone every time) or
    "infra" (the workers could not run it)."""
    return ProblemResult(
        problem_id=p.problem_id,
        dataset=p.dataset,
        method=method,
        question=_escaped(p.question),
        gold=_escaped(str(p.gold)),
        stop_reason="exception",
        error=_escaped(error.strip().splitlines()[-1][:2000] if error.strip() else "error"),
        error_kind=kind,
    )


class Scheduler:
    """Feeds batches to workers, one in flight per worker; yields outcomes as problems finish
    (one per batch per look, holding what its worker streamed since the last), and one for
    each problem recorded because the workers running it died (module doc, Faults).

    `on_worker_lost(why)` is called for each worker lost with a batch, or given up;
    `on_progress()` about every `TICK_S` while batches are out, after the workers' progress
    events were taken in (`reported`, `oldest_age`). `restart_timeout` bounds the wait for a
    restarting worker (placement and its model load)."""

    def __init__(
        self,
        workers: list[Any],
        batches: Sequence[Batch],
        max_retries: int,
        on_worker_lost: Callable[[str], None] | None = None,
        settings: Any = None,
        on_progress: Callable[[], None] | None = None,
        restart_timeout: float = RESTART_TIMEOUT_S,
    ) -> None:
        self.workers = list(workers)
        self.settings = settings  # sent with every batch (EvalWorker.stream); gives the deadline
        self.queue: deque[Batch] = deque(batches)
        self.max_retries = max_retries
        self.on_worker_lost = on_worker_lost
        self.on_progress = on_progress
        self.restart_timeout = restart_timeout
        self.kill_grace = KILL_GRACE_S
        self.breaker = BREAKER_FAILURES
        self.task_size = max((len(b.problems) for b in batches), default=1)
        self.worker_failures = 0  # batches lost with their worker (deaths and timeouts)
        self.retried = 0  # problem attempts that raised (or met a sick worker), re-queued
        self.breaker_trips = 0  # workers restarted by their breaker
        self.given_up = 0  # workers retired: not back from a restart in time, or hung past a kill
        self._next_id = max((b.batch_id for b in batches), default=-1) + 1
        self.in_flight: dict[Any, InFlight] = {}  # the run call's stream -> its batch
        self._tickets = itertools.count()
        self._timeouts: dict[tuple[str, int], float | None] = {}
        self._pings: dict[Any, tuple[Any, float]] = {}  # ping ref -> (restarting worker, since)
        self._waiting: list[tuple[float, Any, float]] = []  # (ping again at, worker, since)
        self._strikes: dict[Any, list[tuple[Batch, str]]] = {}  # worker -> its failure streak
        self._confirmed: dict[Any, set[str]] = {}  # worker -> streak problems solved elsewhere
        self._holders: dict[Any, Any] = {}  # worker_key -> the worker handle it was seen with
        self._idle: list[Any] = []  # workers waiting for a batch (while `run` runs)
        self._board: Any = None  # the ProgressBoard while `run` runs
        self._take: Any = None  # the board's pending `take` call
        self._taken_at = float("-inf")

    def reported(self) -> tuple[int, int]:
        """(problems finished, iterations done) that workers reported in batches still out
        and not yet streamed back: what their results will add to the records."""
        flights = self.in_flight.values()
        pending = sum(len(f.done) - len(f.finished) for f in flights)
        return max(pending, 0), sum(len(f.steps) for f in flights)

    def oldest_age(self) -> float:
        """Seconds since the oldest batch still out was sent (0 when none is)."""
        now = time.monotonic()
        return max((now - f.started for f in self.in_flight.values()), default=0.0)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    # --- results as they stream in ----------------------------------------------------------
    def _take_in(self, flight: InFlight, items: list[tuple[str, int, Any]]) -> BatchOutcome:
        """The problems a worker streamed back: results recorded; a problem that raised retried
        alone away from this worker (then recorded with its error once out of retries); a
        worker's fault re-queued uncharged, and counted against the worker's breaker."""
        batch, key = flight.batch, worker_key(flight.worker)
        results, retry = [], []
        name = items[-1][0] if items else LOST_WORKER
        for _, i, out in items:
            if i in flight.finished or not 0 <= i < len(batch.problems):
                continue  # sent twice (a replica's rerun, say): recorded once
            flight.finished.add(i)
            p = batch.problems[i]
            pid = p.problem_id
            if isinstance(out, ProblemResult):
                batch.attempts[pid] = batch.attempts.get(pid, 0) + 1
                results.append(out)
                if not out.error:
                    self._solved(key, pid)
                continue
            fault = isinstance(out, WorkerFault)
            text = out.error if fault else str(out)
            if fault:  # not the problem's: charged as an infrastructure failure
                batch.deaths[pid] = batch.deaths.get(pid, 0) + 1
                spent = batch.deaths[pid] > self.max_retries
            else:
                batch.attempts[pid] = batch.attempts.get(pid, 0) + 1
                spent = batch.attempts[pid] > self.max_retries
            if spent:
                results.append(error_result(batch.method, p, text, "infra" if fault else "problem"))
                continue
            again = batch.alone(p, self._new_id())
            again.avoid = {*batch.avoid, key}
            self.queue.append(again)
            retry.append(p)
            self._strikes.setdefault(key, []).append((again, pid))
        self.retried += len(retry)
        if key in self._strikes:
            self._holders[key] = flight.worker
        return BatchOutcome(batch, name, results, retry)

    def _solved(self, key: Any, pid: str) -> None:
        """`pid` succeeded on worker `key`: that worker's failure streak ends, and each other
        worker whose streak holds `pid` failed a problem that succeeds elsewhere; one with
        `breaker` of those is tripped (`_trip`). A problem that fails everywhere (a poison
        problem) trips nothing."""
        self._strikes.pop(key, None)
        self._confirmed.pop(key, None)
        for other, streak in list(self._strikes.items()):
            if any(p == pid for _, p in streak):
                self._confirmed.setdefault(other, set()).add(pid)
                if len(self._confirmed[other]) >= self.breaker:
                    self._trip(self._holders[other], other)

    def _trip(self, worker: Any, key: Any) -> None:
        """A worker that failed `breaker` problems in a row that then succeeded on other
        workers is sick (a broken CUDA context, a dead engine): restarted as a worker death,
        and the problems of its streak still waiting for their retry get that attempt back."""
        streak = self._strikes.pop(key)
        self._confirmed.pop(key, None)
        for batch, pid in streak:
            if batch.attempts.get(pid, 0) > 0:
                batch.attempts[pid] -= 1
            if batch.deaths.get(pid, 0) > 0:
                batch.deaths[pid] -= 1
        self.breaker_trips += 1
        for f in self.in_flight.values():
            if f.worker is worker:
                f.tripped = True
        actor = worker_key(worker)
        with contextlib.suppress(RayError):
            ray.kill(actor, no_restart=False)
        if worker in self._idle:  # idle: waits for its restart instead
            self._idle.remove(worker)
            self._ping(worker, time.monotonic())
        if self.on_worker_lost:
            self.on_worker_lost(
                f"a worker failed {len(streak)} problems in a row that other workers solve: "
                "restarted (its breaker), the problems re-queued uncharged"
            )

    def _lost(self, flight: InFlight, exc: Exception) -> list[BatchOutcome]:
        """A batch lost with its worker: its unfinished problems each charged a death (not for
        a breaker's restart), then re-queued at the front: after a first death re-packed into
        batches of the usual size; a problem that died before, or was the only one still
        running, alone; a problem alone that has died `max_retries + 1` times is returned in
        an outcome holding its error instead."""
        self.worker_failures += 1
        batch = flight.batch
        if flight.timed_out:
            why = f"timed out after {flight.timeout:g} s without progress (batch_timeout_s)"
        else:
            why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        left = [p for i, p in enumerate(batch.problems) if i not in flight.finished]
        if not flight.tripped:
            for p in left:
                batch.deaths[p.problem_id] = batch.deaths.get(p.problem_id, 0) + 1
        outcomes, front = [], []
        if len(left) == 1 and not flight.tripped:
            (p,) = left
            deaths = batch.deaths[p.problem_id]
            if deaths <= self.max_retries:
                front.append(batch.alone(p, self._new_id()))
                then = f"{p.problem_id} re-queued"
            else:
                batch.attempts[p.problem_id] = batch.attempts.get(p.problem_id, 0) + deaths
                error = (
                    f"WorkerDied: worker process died while running this problem ({deaths} "
                    f"times); the last time: {why}"
                )
                row = error_result(batch.method, p, error, "problem")
                outcomes.append(BatchOutcome(batch, LOST_WORKER, [row], []))
                then = f"{p.problem_id} recorded with its error after {deaths} deaths"
        else:
            fresh = [p for p in left if flight.tripped or batch.deaths[p.problem_id] <= 1]
            suspects = [p for p in left if p not in fresh]
            for start in range(0, len(fresh), self.task_size):
                chunk = fresh[start : start + self.task_size]
                front.append(self._packed(batch, chunk))
            front += [batch.alone(p, self._new_id()) for p in suspects]
            then = f"{len(left)} of its {len(batch.problems)} problems unfinished, re-queued" + (
                f" ({len(suspects)} that died before, alone)" if suspects else ""
            )
            then += f": {_ids(left)}"
            if not left:
                then = f"all of its {len(batch.problems)} problems had come back"
        self.queue.extendleft(reversed(front))
        if self.on_worker_lost:
            self.on_worker_lost(f"{why}; {then}")
        return outcomes

    def _packed(self, batch: Batch, problems: list[Problem]) -> Batch:
        ids = {p.problem_id for p in problems}
        return Batch(
            self._new_id(),
            batch.method,
            problems,
            {k: v for k, v in batch.attempts.items() if k in ids},
            {k: v for k, v in batch.deaths.items() if k in ids},
        )

    # --- dispatch and deadlines ---------------------------------------------------------------
    def _dispatch(self, idle: list[Any]) -> None:
        """One batch to each idle worker: the first in the queue that does not avoid it (a
        retry goes to another worker than the one it failed on, while another is there)."""
        alive = len(idle) + len(self.in_flight) + len(self._pings) + len(self._waiting)
        for worker in list(idle):
            if not self.queue:
                return
            key = worker_key(worker)
            pick = next((b for b in self.queue if key not in b.avoid), None)
            if pick is None:
                if all(len(b.avoid) < alive for b in self.queue):
                    continue  # another worker may take them
                pick = self.queue[0]
            self.queue.remove(pick)
            idle.remove(worker)
            self._send(worker, pick)

    def _send(self, worker: Any, batch: Batch) -> None:
        ticket = next(self._tickets)
        progress = (self._board, ticket) if self._board is not None else None
        call = worker.stream.options(num_returns="streaming")
        stream = call.remote(batch.method, batch.problems, self.settings, progress)
        now = time.monotonic()
        self.in_flight[stream] = InFlight(
            worker, batch, ticket, now, self._timeout(batch), moved=now
        )

    def _timeout(self, batch: Batch) -> float | None:
        if self.settings is None:
            return None
        key = (batch.method, len(batch.problems))
        if key not in self._timeouts:
            self._timeouts[key] = batch_timeout(self.settings, *key)
        return self._timeouts[key]

    def _enforce_deadlines(self) -> list[BatchOutcome]:
        """Kill the worker of each batch that has gone its deadline without progress (Ray
        restarts it, and the batch's stream fails as for any worker that died, `_lost`); a
        batch whose worker has not failed `kill_grace` seconds after its kill (a stopped
        process, a node that does not answer) is lost now, and its worker retired."""
        now, outcomes = time.monotonic(), []
        for stream, f in list(self.in_flight.items()):
            if f.timeout is None:
                continue
            if not f.timed_out and now - f.moved > f.timeout:
                f.timed_out, f.killed_at = True, now
                with contextlib.suppress(RayError):
                    ray.kill(worker_key(f.worker), no_restart=False)
            elif f.timed_out and now - f.killed_at > self.kill_grace:
                del self.in_flight[stream]
                stop_worker(f.worker)
                self.given_up += 1
                outcomes += self._lost(f, TimeoutError("killed, and still not gone"))
                if self.on_worker_lost:
                    self.on_worker_lost(
                        f"a worker killed for its deadline did not end within {self.kill_grace:g}"
                        " s: retired"
                    )
        return outcomes

    def _poll_progress(self) -> None:
        """Take in the progress events posted since the last look (at most every TICK_S; never
        waiting on the board), then `on_progress()`. Each event carries the board's clock at
        its post, so a batch's last progress is when it moved, not when the driver looked."""
        if self._board is None:
            return
        if self._take is None:
            if time.monotonic() - self._taken_at >= TICK_S:
                self._take, self._taken_at = self._board.take.remote(), time.monotonic()
            return
        if not ray.wait([self._take], timeout=0)[0]:
            return
        try:
            board_now, events = ray.get(self._take)
        except ActorUnavailableError:  # restarting (its node's process died): ask again
            self._take = None
            return
        except RayError:  # gone for good: no more progress; results still move deadlines
            self._board = self._take = None
            return
        self._take, now = None, time.monotonic()
        flights = {f.ticket: f for f in self.in_flight.values()}
        for at, kind, ticket, problem_id, *k in events:
            if ticket not in flights:  # its batch has come back, or was lost, already
                continue
            f = flights[ticket]
            f.moved = max(f.moved, now - max(board_now - at, 0.0))
            if kind == "done":
                f.done.add(problem_id)
            else:
                f.steps.add((problem_id, *k))
        if self.on_progress:
            self.on_progress()

    # --- restarting workers ---------------------------------------------------------------------
    def _ping(self, worker: Any, since: float) -> None:
        self._pings[worker.info.remote()] = (worker, since)

    def _ping_restarting(self) -> None:
        now = time.monotonic()
        for due, worker, since in [w for w in self._waiting if w[0] <= now]:
            self._waiting.remove((due, worker, since))
            self._ping(worker, since)

    def _give_up_late(self) -> None:
        """Retire each restarting worker not back within `restart_timeout` (it cannot be
        placed again, or its model load hangs), naming what the cluster has free."""
        now = time.monotonic()
        late = [r for r, (_, since) in self._pings.items() if now - since > self.restart_timeout]
        late_waiting = [w for w in self._waiting if now - w[2] > self.restart_timeout]
        workers = [self._pings.pop(r)[0] for r in late] + [w[1] for w in late_waiting]
        for w in late_waiting:
            self._waiting.remove(w)
        for worker in workers:
            with contextlib.suppress(RayError):
                stop_worker(worker)
            self.given_up += 1
            if self.on_worker_lost:
                self.on_worker_lost(
                    f"a restarting worker was not back within {self.restart_timeout:g} s (it "
                    f"could not be placed, or its model did not load): retired; the cluster has "
                    f"free {free_resources()}"
                )

    def _answer_ping(self, ref: Any, idle: list[Any]) -> None:
        """A restarting worker answered, or is still restarting, or is gone."""
        worker, since = self._pings.pop(ref)
        try:
            info = ray.get(ref)
        except ActorUnavailableError:
            self._waiting.append((time.monotonic() + 0.5, worker, since))
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

    # --- the loop -------------------------------------------------------------------------------
    def _drain(self, stream: Any) -> tuple[list[Any], bool, Exception | None]:
        """What a ready stream holds now: (items, ended, the error that ended it)."""
        items: list[Any] = []
        while ray.wait([stream], timeout=0)[0]:
            try:
                ref = next(stream)
            except StopIteration:
                return items, True, None
            try:
                items.append(ray.get(ref))
            except RayError as exc:
                return items, True, exc
        return items, False, None

    def _settle(self, stream: Any, idle: list[Any]) -> list[BatchOutcome]:
        """Take in a ready stream: its results, then its end or its worker's loss."""
        flight = self.in_flight[stream]
        items, ended, error = self._drain(stream)
        outcomes = []
        if items:
            flight.moved = time.monotonic()
            outcomes.append(self._take_in(flight, items))
        if not ended:
            return outcomes
        del self.in_flight[stream]
        left = len(flight.finished) < len(flight.batch.problems)
        kind = classify(error) if error is not None else ("lost" if left else "")
        if kind == "config":
            raise NoWorkerLeftError(f"the workers cannot run here: {one_line(error)}")
        if kind == "lost":
            self._ping(flight.worker, time.monotonic())  # Ray restarts it
            outcomes += self._lost(flight, error or RuntimeError("its stream ended early"))
        elif kind == "problem":  # the call itself raised: each unfinished problem an error
            self._back(flight, idle)
            why = one_line(getattr(error, "cause", None) or error)
            items = [
                (LOST_WORKER, i, why)
                for i in range(len(flight.batch.problems))
                if i not in flight.finished
            ]
            outcomes.append(self._take_in(flight, items))
        else:
            self._back(flight, idle)
        return [o for o in outcomes if o.results or o.retry]

    def _back(self, flight: InFlight, idle: list[Any]) -> None:
        """A worker whose call ended: idle, or (restarted by its breaker) waited for."""
        if flight.tripped:
            self._ping(flight.worker, time.monotonic())
        else:
            idle.append(flight.worker)

    def _await_board(self) -> None:
        """Wait for the progress board to answer before the first batch goes out: a batch's
        deadline counts from its dispatch until a report of it is read, and a board still
        starting (a new Ray worker process: 14 s measured on a loaded 2-core machine, under a
        second there when idle) would let healthy batches pass their deadlines unseen. A board
        not up within BOARD_START_S is dropped: deadlines then count from results only."""
        try:
            ray.get(self._board.take.remote(), timeout=BOARD_START_S)
        except RayError as exc:  # GetTimeoutError too
            with contextlib.suppress(Exception):
                ray.kill(self._board)
            self._board = None
            if self.on_worker_lost:
                self.on_worker_lost(
                    f"the progress board did not start ({type(exc).__name__}): batch deadlines "
                    "count from their results only"
                )

    def run(self) -> Iterator[BatchOutcome]:
        idle = self._idle = list(self.workers)
        self._board = start_board()
        try:
            self._await_board()
            while self.queue or self.in_flight:
                self._dispatch(idle)
                self._ping_restarting()
                self._give_up_late()
                if not self.in_flight and not self._pings and not self._waiting and not idle:
                    raise NoWorkerLeftError(
                        f"no worker left alive; {len(self.queue)} batches were not run "
                        "(what was recorded is kept: run again with the same run_id to resume)"
                    )
                refs = list(self.in_flight) + list(self._pings)
                ready = ray.wait(refs, num_returns=1, timeout=TICK_S)[0] if refs else []
                if not refs:
                    time.sleep(TICK_S)  # only restarting workers, to ping again
                self._poll_progress()  # first: a report just in saves its batch
                yield from self._enforce_deadlines()
                if not ready:
                    continue
                ready = ray.wait(refs, num_returns=len(refs), timeout=0)[0] or ready
                for ref in ready:
                    if ref in self._pings:
                        self._answer_ping(ref, idle)
                    elif ref in self.in_flight:
                        yield from self._settle(ref, idle)
        finally:
            with contextlib.suppress(Exception):  # Ray may be gone (an interrupted driver)
                ray.kill(self._board)
            self._board = self._take = None


def classify(error: Exception) -> str:
    """Whose fault a Ray error on a batch's call is: "lost" (the worker: its process or node
    died, it ran out of memory, it cannot be placed now; re-queue the batch), "config" (no
    worker can run here: its runtime environment cannot be set up; stop the run with one
    line) or "problem" (the call raised: its problems' errors)."""
    if isinstance(error, RuntimeEnvSetupError):
        return "config"
    if isinstance(error, RayTaskError) and not isinstance(error, (RayActorError, OutOfMemoryError)):
        cause = getattr(error, "cause", None)
        if isinstance(cause, RayError) and not isinstance(cause, RayTaskError):
            return classify(cause)
        return "problem"
    return "lost"  # RayActorError, ObjectLostError, OutOfMemoryError, NodeDiedError, ...


def start_board() -> Any:
    """The run's ProgressBoard: on the driver's node (it stamps events with that node's clock;
    a node lost elsewhere does not take it along), restarted if its process dies."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(ProgressBoard)
    return board.options(scheduling_strategy=here).remote()
