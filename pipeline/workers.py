"""The Ray layer: evaluation workers and the scheduler that feeds them. Nothing of the method.

`EvalWorker` is a Ray actor that owns one device (a GPU, or `cpus_per_worker` CPU threads) and
one loaded model (`pipeline.solver.Solver`), loaded once in its constructor. `Scheduler` holds
the queue of batches on the driver and keeps exactly one batch in flight per worker: a worker
gets its next batch the moment it returns one, so a fast worker takes more of the work (pull).

Faults:
- A worker process that dies (killed, out of memory, a segfault) fails its in-flight task with a
  Ray actor error, and the actor is restarted by Ray (up to `max_worker_restarts` times; it
  reloads the model); once it is out of restarts the others take its share. If every worker is
  gone the run stops with an error; what was recorded stays.
- The batch it held is charged one death per problem. A batch of several problems goes back to
  the front of the queue split, one batch per problem, so that a problem that kills its worker
  (a poison problem) then costs only itself; a problem alone goes back as it is, until it has
  been in `max_retries + 1` batches that died: then it is recorded with an error that says so,
  and the run goes on. A worker death is never charged to a problem's raise retries, nor the
  reverse.
- Nothing waits forever: a batch whose worker has reported no progress (no problem finished, no
  iteration done) for its deadline (`batch_timeout`), counted from its dispatch or its last
  report, has its worker killed (Ray restarts it), which makes it a death as above; a worker that
  is slow (starved by other jobs) but moving keeps its batch. Rank 0 of a replica waits for its
  other ranks at most `RANK_WAIT_S` after its own part.
- A problem that raises inside a worker is retried alone, up to `max_retries` times, then
  recorded with its error; the run goes on.

Results come back to the driver, which is the only writer of records (`pipeline.records`), so a
result is recorded exactly once whatever happens to the workers. While a batch runs, its worker
posts progress (each problem finished, each iteration) to a `ProgressBoard` for the driver's
progress bar; progress is never recorded.

Tensor-parallel replicas (`tensor_parallel` = G > 1): the driver reserves a placement group of
G bundles (one device each, `STRICT_PACK`: one node) and starts rank 0 in bundle 0; rank 0 starts
ranks 1..G-1 in the other bundles, and the G processes form one torch.distributed group over
which the model is sharded (`pipeline.shards`). The scheduler sees rank 0 only: rank 0 takes a
batch, sends the same call to every other rank, runs it itself and returns its results once the
others agree with them. A rank that dies breaks the group: rank 0 then ends its own process, so
the scheduler re-queues the batch as for any lost worker, and Ray restarts rank 0, whose
constructor builds the replica again (the other ranks, owned by rank 0, die with it).

A worker whose constructor fails (the model cannot be loaded, a reward cannot be imported) stays
alive and reports the error from `info()` (`start_error`), so that the driver can show it as one
line instead of a Ray traceback; the scheduler treats a restarted worker that reports one as
dead for good.
"""

from __future__ import annotations

import contextlib
import itertools
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
from ray.exceptions import (
    ActorUnavailableError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayError,
)

from pipeline.data import Problem
from pipeline.results import ProblemResult


class NoWorkerLeftError(RuntimeError):
    """Every worker is gone (out of restarts, or unable to start again)."""


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
    """Runs batches on one model, or on rank `rank` of a tensor-parallel replica. Wrapped with
    `ray.remote` by `make_worker_class`."""

    def __init__(self, cfg: Any, rank: int = 0, group: tuple[str, int] | None = None) -> None:
        ctx = ray.get_runtime_context()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{ctx.get_node_id()[:8]}"
        self.solver: Any = None
        self.settings: Any = cfg  # the config of the work it runs now
        self.start_error = ""  # one line: why this worker has no model (see the module doc)
        self.rank = rank
        self.ranks: list[Any] = []  # rank 0 of a replica: the handles of ranks 1..G-1
        try:
            if cfg.tensor_parallel > 1:
                self._join_replica(cfg, group)
            from pipeline.solver import Solver  # heavy imports happen in the worker process

            self.solver = Solver.from_config(self._local(cfg))
            if self.ranks:
                infos = ray.get([r.info.remote() for r in self.ranks])
                failed = [
                    (i + 1, x["start_error"]) for i, x in enumerate(infos) if x["start_error"]
                ]
                if failed:
                    raise RuntimeError(f"rank {failed[0][0]} could not start: {failed[0][1]}")
        except Exception as exc:  # noqa: BLE001 - reported by info(), shown by the driver
            self.start_error = one_line(exc)

    def _join_replica(self, cfg: Any, group: tuple[str, int] | None) -> None:
        """Rank 0: start the other ranks in this placement group's other bundles; every rank:
        join the replica's process group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from pipeline.shards import free_port, join_group

        world = cfg.tensor_parallel
        if self.rank == 0:
            pg = ray.util.get_current_placement_group()
            if pg is None:
                raise RuntimeError(
                    f"tensor_parallel={world}: rank 0 must run in a placement group "
                    "(start it with pipeline.workers.start_worker)"
                )
            group = (ray.util.get_node_ip_address(), free_port())
            cls = make_worker_class(cfg, max_restarts=0)
            self.ranks = [
                cls.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=rank
                    )
                ).remote(cfg, rank, group)
                for rank in range(1, world)
            ]
        assert group is not None
        device = worker_device(cfg.device, cfg.gpus_per_worker)
        join_group(self.rank, world, group[0], group[1], torch_device_type(device))
        self.name += f":rank{self.rank}"

    @staticmethod
    def _local(cfg: Any) -> Any:
        """The config as this worker runs it: its device, and CPU threads for CPU workers."""
        device = worker_device(cfg.device, cfg.gpus_per_worker)
        if device == "cpu":
            return cfg.replace(device=device, threads=cfg.threads or cfg.cpus_per_worker)
        return cfg.replace(device=device)

    def _configure(self, cfg: Any) -> None:
        """Run the next work with `cfg` (a sweep's next point) on the model already loaded;
        the driver reuses a worker only for configs that load the same model (MODEL role)."""
        from pipeline.solver import Solver

        self.solver = Solver(self._local(cfg), self.solver.loaded)
        self.settings = cfg

    def info(self) -> dict[str, Any]:
        from pipeline.generation import kv_bytes_per_token

        loaded = self.solver.loaded if self.solver is not None else None
        world = self.settings.tensor_parallel
        return {
            "rank": self.rank,
            "tensor_parallel": world,
            "rank_pids": [os.getpid()] + self._rank_pids(),
            "name": self.name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "start_error": self.start_error,
            "model": loaded.name if loaded else "",
            "device": str(loaded.device) if loaded else "",
            "load_seconds": loaded.load_seconds if loaded else 0.0,
            # per device: a rank holds 1/G of the KV heads (about, when they do not divide)
            "kv_bytes_per_token": kv_bytes_per_token(loaded.model) // world if loaded else 0,
        }

    def pid(self) -> int:
        return os.getpid()

    def _rank_pids(self) -> list[int]:
        """The other ranks' process ids (-1 for a rank that is gone)."""
        pids = []
        for r in self.ranks:
            try:
                pids.append(ray.get(r.pid.remote()))
            except RayActorError:
                pids.append(-1)
        return pids

    def run(
        self,
        method: str,
        problems: Sequence[Problem],
        settings: Any = None,
        progress: tuple[Any, int] | None = None,
    ) -> tuple[str, list[Any]]:
        """Run a batch (with `settings`, when given: the config of the batch's run, so a worker
        restarted by Ray with its first config still runs each batch as its run says); if it
        raises, run its problems one by one so one bad problem costs only itself. Returns
        (worker name, [ProblemResult | error text] per problem). With `progress` = (a
        `ProgressBoard`, the dispatch's ticket), each problem finished and each iteration is
        posted there as it happens (`progress_hooks`).

        Rank 0 of a replica sends the same call to the other ranks first (they run this same
        method, so every rank takes the same steps and meets the same collectives; only rank 0
        posts progress), and returns its results once theirs agree (`ranks_agree`). A rank lost
        on the way, or not done `RANK_WAIT_S` after rank 0, ends this process (module doc)."""
        pending = [r.run.remote(method, problems, settings) for r in self.ranks]
        name, outcomes = self._run(method, problems, settings, progress)
        if not pending:
            return name, outcomes
        others = gather_ranks(pending, RANK_WAIT_S)
        if others is None:
            self._end_replica()
        return name, ranks_agree(outcomes, others)

    def _end_replica(self) -> None:
        """A rank is gone and the process group with it: end this process, so the driver
        re-queues the batch and Ray restarts rank 0, which builds the replica again."""
        for r in self.ranks:
            ray.kill(r, no_restart=True)
        os._exit(1)

    def _run(
        self,
        method: str,
        problems: Sequence[Problem],
        settings: Any = None,
        progress: tuple[Any, int] | None = None,
    ) -> tuple[str, list[Any]]:
        if self.solver is None:  # the scheduler sends it no work; if it did: an error each
            error = f"RuntimeError: worker could not start: {self.start_error}"
            return self.name, [error] * len(problems)
        if settings is not None and settings != self.settings:
            self._configure(settings)
        hooks = progress_hooks(progress)
        try:
            return self.name, list(self.solver.run(method, problems, **hooks))
        except Exception:  # noqa: BLE001 - isolate the failing problem(s) below
            if len(problems) == 1:
                return self.name, [traceback.format_exc(limit=8)]
        outcomes: list[Any] = []
        for p in problems:
            try:
                outcomes.extend(self.solver.run(method, [p], **hooks))
            except Exception:  # noqa: BLE001 - recorded as the problem's error
                outcomes.append(traceback.format_exc(limit=8))
        return self.name, outcomes


RANK_WAIT_S = 300.0  # rank 0 of a replica waits this long for the others once it is done


def gather_ranks(pending: Sequence[Any], timeout_s: float) -> list[list[Any]] | None:
    """The other ranks' outcomes (their `EvalWorker.run` calls), or None when a rank is gone or
    not done within `timeout_s`. The ranks of a replica move in lockstep (every collective waits
    for all of them), so once rank 0 is done the others are moments from done: one that is not
    within `timeout_s` is hung, and the replica is ended as for a lost rank."""
    try:
        return [out for _, out in ray.get(list(pending), timeout=timeout_s)]
    except (RayActorError, GetTimeoutError):
        return None


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


def progress_hooks(progress: tuple[Any, int] | None) -> dict[str, Any]:
    """`Solver.run`'s progress callbacks that post to (board, ticket); none without a board."""
    if progress is None:
        return {}
    board, ticket = progress
    return {
        "on_problem_done": lambda r: board.post.remote("done", ticket, r.problem_id),
        "on_iteration": lambda pid, k: board.post.remote("iteration", ticket, pid, k),
    }


def torch_device_type(device: str) -> str:
    """'cpu' or 'cuda' from a worker's device string ('cuda:0' -> 'cuda')."""
    return device.split(":")[0]


def _answer_key(outcome: Any) -> Any:
    """What every rank of a replica must agree on for a problem: its answers and rewards."""
    if isinstance(outcome, ProblemResult):
        return (outcome.cot_answer, outcome.answers, outcome.final_answer, outcome.rewards,
                outcome.samples, outcome.error)  # fmt: skip
    return ("error", str(outcome).strip().splitlines()[-1:])


def ranks_agree(outcomes: list[Any], others: Sequence[list[Any]]) -> list[Any]:
    """Rank 0's outcomes, with an error in place of each problem on which another rank's answers
    differ (its collectives would no longer line up; recorded as an error, never as a result)."""
    agreed = list(outcomes)
    for rank, theirs in enumerate(others, start=1):
        for i, (mine, other) in enumerate(zip(outcomes, theirs)):
            if _answer_key(mine) != _answer_key(other) and isinstance(agreed[i], ProblemResult):
                agreed[i] = (
                    f"RuntimeError: tensor-parallel ranks disagree: rank {rank}'s answers to "
                    f"this problem differ from rank 0's"
                )
    return agreed


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line (a multi-line message is joined with spaces)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def make_worker_class(cfg: Any, max_restarts: int | None = None) -> Any:
    """`EvalWorker` as a Ray actor class with the resources the config asks for (per rank, for
    a tensor-parallel replica)."""
    restarts = cfg.max_worker_restarts if max_restarts is None else max_restarts
    return ray.remote(max_restarts=restarts, max_task_retries=0, **_resources(cfg))(EvalWorker)


def _resources(cfg: Any) -> dict[str, float]:
    if cfg.gpus_per_worker > 0:
        return {"num_gpus": cfg.gpus_per_worker, "num_cpus": 1}
    return {"num_cpus": cfg.cpus_per_worker}


PLACEMENT_TIMEOUT_S = 300.0


@dataclass(eq=False)
class Replica:
    """A tensor-parallel replica as the driver holds it: rank 0's actor handle, which the
    scheduler calls as it calls a worker (`run`, `info`), and the placement group that
    `stop_worker` removes with it."""

    rank0: Any
    placement: Any

    def __getattr__(self, name: str) -> Any:  # run, info, ... of rank 0
        if name.startswith("__") or name in ("rank0", "placement"):
            raise AttributeError(name)  # not set yet (copy, pickle): no recursion
        return getattr(self.rank0, name)


def start_worker(cfg: Any) -> Any:
    """Start one worker (an `EvalWorker`), or one tensor-parallel replica: a placement group of
    `tensor_parallel` bundles on one node and its rank 0 (which starts the others). Returns the
    handle the scheduler uses; `stop_worker` ends it."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cls = make_worker_class(cfg)
    world = cfg.tensor_parallel
    if world == 1:
        return cls.remote(cfg)
    bundle = {"CPU": 1.0, "GPU": 1.0} if cfg.gpus_per_worker > 0 else {"CPU": cfg.cpus_per_worker}
    need = {k: v * world for k, v in bundle.items()}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
        biggest = max(nodes, key=lambda r: r.get("CPU", 0), default={})
        raise NoWorkerLeftError(
            f"tensor_parallel={world} needs {world} x {bundle} on one node, and no node of "
            f"this cluster has {need} (the largest has CPU {biggest.get('CPU', 0):g}, GPU "
            f"{biggest.get('GPU', 0):g}). Lower tensor_parallel, or add a larger node"
        )
    pg = placement_group([dict(bundle) for _ in range(world)], strategy="STRICT_PACK")
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        raise NoWorkerLeftError(
            f"tensor_parallel={world} needs {world} x {bundle} on one node; the cluster could not "
            f"place them within {PLACEMENT_TIMEOUT_S:.0f} s (it has "
            f"{ray.cluster_resources()}). Lower tensor_parallel or workers, or add a larger node"
        )
    rank0 = cls.options(
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    ).remote(cfg)
    return Replica(rank0, pg)


def stop_worker(worker: Any) -> None:
    """End a worker for good (a replica: rank 0, hence its other ranks, and its placement
    group, so that its resources are free for the next workers)."""
    from ray.util.placement_group import remove_placement_group

    if isinstance(worker, Replica):
        ray.kill(worker.rank0, no_restart=True)
        remove_placement_group(worker.placement)
    else:
        ray.kill(worker, no_restart=True)


def run_on_ranks(cfg: Any, fn: Callable[..., Any], *args: Any, timeout: float = 600.0) -> list[Any]:
    """`fn(cfg, *args)` on each of `cfg.tensor_parallel` fresh Ray actors joined as one
    replica's process group on this node (one device each): every rank's result, rank 0 first.
    For work on a sharded model outside the scheduler: the tests, `make gpu-check`,
    scripts/shard_latency.py. `fn` loads its own shard (`pipeline.model.load_model(cfg)`)."""
    from pipeline.shards import free_port, join_group

    world = cfg.tensor_parallel
    device_type = torch_device_type(worker_device(cfg.device, cfg.gpus_per_worker))

    @ray.remote(**_resources(cfg))
    class Rank:
        def call(self, rank: int, port: int) -> Any:
            import torch

            torch.set_num_threads(cfg.threads or cfg.cpus_per_worker)
            if world > 1:
                join_group(rank, world, "127.0.0.1", port, device_type)
            return fn(cfg, *args)

    port = free_port()
    ranks = [Rank.remote() for _ in range(world)]
    try:
        return ray.get([r.call.remote(i, port) for i, r in enumerate(ranks)], timeout=timeout)
    finally:
        for r in ranks:
            ray.kill(r)


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
    from pipeline.methods import get_method
    from pipeline.prompts import load_verifiers

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
