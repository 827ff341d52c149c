"""The Ray workers: the evaluation actor, tensor-parallel replicas, starting and stopping them.
Nothing of the method; the scheduler that feeds them is `pipeline.run.scheduler`.

`EvalWorker` is a Ray actor that owns one device (a GPU, or `cpus_per_worker` CPU threads) and
one loaded model (`pipeline.method.solver.Solver`), loaded once in its constructor. It runs one batch
per call (`stream`, a Ray streaming generator) and hands each problem's result or error text
back as soon as that problem finishes; while it runs, it posts progress (each problem finished,
each iteration) to the driver's board (`progress_hooks`). A batch it cannot run at all (no
model, a config it cannot take) comes back as a `WorkerFault` per problem.

A worker process that dies (killed, out of memory, a segfault) fails its in-flight call with a
Ray actor error, and the actor is restarted by Ray (up to `max_worker_restarts` times; it
reloads the model); what the scheduler then does with the batch is in `pipeline.run.scheduler`.
Rank 0 of a replica waits at most `RANK_WAIT_S` for its other ranks to finish each problem it
has finished.

Tensor-parallel replicas (`tensor_parallel` = G > 1): the driver reserves a placement group of
G bundles (one device each, `STRICT_PACK`: one node) and starts rank 0 in bundle 0; rank 0 starts
ranks 1..G-1 in the other bundles, and the G processes form one torch.distributed group over
which the model is sharded (`pipeline.engine.shards`). The scheduler sees rank 0 only: rank 0 takes a
batch, sends the same call to every other rank, runs it itself and streams each problem's result
as for any worker, once every other rank has finished that problem too and agrees with it. A rank
that dies breaks the group: rank 0 then ends its own process, so the scheduler re-queues the
batch's unfinished problems as for any lost worker, and Ray restarts rank 0, whose constructor
builds the replica again (the other ranks, owned by rank 0, die with it).

A worker whose constructor fails (the model cannot be loaded, a reward cannot be imported) stays
alive and reports the error from `info()` (`start_error`), so that the driver can show it as one
line instead of a Ray traceback; the scheduler treats a restarted worker that reports one as
dead for good.
"""

from __future__ import annotations

import math
import os
import queue
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from pipeline.data import Problem
from pipeline.method.results import ProblemResult


class NoWorkerLeftError(RuntimeError):
    """Every worker is gone (out of restarts, or unable to start again)."""


@dataclass(frozen=True)
class WorkerFault:
    """An outcome that is the worker's fault, not the problem's (it could not take the batch's
    config, or has no model): the scheduler re-queues the problem uncharged, away from this
    worker, and counts it against the worker's breaker (`pipeline.run.scheduler`)."""

    error: str


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


def model_files_digest(cfg: Any) -> dict[str, str]:
    """What the model files this worker loaded hold (`pipeline.engine.model.model_digest`, read
    on this node: its weights by content, once per file and node), for the driver to compare
    with its own (`pipeline.run.pool.check_model_digests`); {} if it cannot be taken here."""
    from pipeline.engine.model import model_digest

    try:
        return model_digest(cfg)
    except OSError:
        return {}


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
        self.model_digest: dict[str, str] = {}  # what this node's model files hold (info())
        try:
            if cfg.tensor_parallel > 1:
                self._join_replica(cfg, group)
            from pipeline.method.solver import Solver  # heavy imports happen in the worker process

            self.solver = Solver.from_config(self._local(cfg))
            self.model_digest = model_files_digest(cfg)
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

        from pipeline.engine.shards import free_port, join_group

        world = cfg.tensor_parallel
        if self.rank == 0:
            pg = ray.util.get_current_placement_group()
            if pg is None:
                raise RuntimeError(
                    f"tensor_parallel={world}: rank 0 must run in a placement group "
                    "(start it with pipeline.run.workers.start_worker)"
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
        the driver reuses a worker only for configs that load the same model (MODEL role). A
        serving engine (backend=vllm) is kept when it serves `cfg` as it is, else closed first:
        one engine in this process at a time."""
        self.solver = self.solver.reconfigure(self._local(cfg))
        self.settings = cfg

    def info(self) -> dict[str, Any]:
        from pipeline.engine.generation import kv_bytes_per_token

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
            "model_digest": self.model_digest,
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

    def stream(
        self,
        method: str,
        problems: Sequence[Problem],
        settings: Any = None,
        progress: tuple[Any, int] | None = None,
    ) -> Iterator[tuple[str, int, Any]]:
        """`run`, streamed: yields (worker name, index in `problems`, outcome) for each problem
        as it finishes (called with `num_returns="streaming"`), so that the driver records it
        at once and a lost task costs only its unfinished problems. The batch runs on a thread
        of this process while this generator hands its results on; if it raises, the problems
        not yet finished run one by one.

        Rank 0 of a replica streams the same call from every other rank (`RankStreams`), runs
        the batch itself, and yields each of its problems once every other rank has yielded
        that problem too and their answers agree (`rank_agrees`: an error in its place if not).
        A rank lost on the way, or not done with a problem `RANK_WAIT_S` after rank 0, ends this
        process (module doc); the problems already yielded are recorded."""
        if not self.ranks:
            yield from self._stream(method, problems, settings, progress)
            return
        calls = [r.stream.options(num_returns="streaming") for r in self.ranks]
        others = RankStreams([call.remote(method, problems, settings) for call in calls])
        for name, i, outcome in self._stream(method, problems, settings, progress):
            theirs = others.outcomes(i, RANK_WAIT_S)
            if theirs is None:
                self._end_replica()
            yield name, i, rank_agrees(outcome, theirs)

    def _stream(
        self,
        method: str,
        problems: Sequence[Problem],
        settings: Any = None,
        progress: tuple[Any, int] | None = None,
    ) -> Iterator[tuple[str, int, Any]]:
        """This process's part of `stream`: the batch on a thread, each outcome as it ends."""
        if (fault := self._prepare(settings)) is not None:
            for i in range(len(problems)):
                yield self.name, i, fault
            return
        hooks = progress_hooks(progress)
        index = {p.problem_id: i for i, p in enumerate(problems)}
        finished: queue.Queue[tuple[str, Any]] = queue.Queue()

        def on_done(r: ProblemResult) -> None:
            if "on_problem_done" in hooks:
                hooks["on_problem_done"](r)
            finished.put(("result", r))

        def work() -> None:
            from pipeline.engine.backends.base import EngineError

            try:
                self.solver.run(method, problems, on_done, hooks.get("on_iteration"))
                finished.put(("end", None))
            except EngineError:
                self._end_engine()
            except BaseException:  # noqa: BLE001 - the unfinished problems run one by one
                finished.put(("raised", traceback.format_exc(limit=8)))

        thread = threading.Thread(target=work, name="batch", daemon=True)
        thread.start()
        sent: set[int] = set()
        while True:
            kind, item = finished.get()
            if kind == "result":
                sent.add(index[item.problem_id])
                yield self.name, index[item.problem_id], item
                continue
            thread.join()
            rest = [i for i in range(len(problems)) if i not in sent]
            if kind == "raised" and len(problems) == 1:
                yield self.name, 0, item
            elif kind == "raised":
                for i in rest:
                    yield self.name, i, self._one(method, problems[i], hooks)
            return

    def _one(self, method: str, problem: Problem, hooks: dict[str, Any]) -> Any:
        from pipeline.engine.backends.base import EngineError

        try:
            (result,) = self.solver.run(method, [problem], **hooks)
            return result
        except EngineError:
            self._end_engine()
        except Exception:  # noqa: BLE001 - recorded as the problem's error
            return traceback.format_exc(limit=8)

    def _prepare(self, settings: Any) -> WorkerFault | None:
        """Take the batch's config (a sweep's next point); a worker without a model, or one
        that cannot take it, returns the fault instead (the problems are not to blame)."""
        if self.solver is None:  # the scheduler sends it no work; if it did: a fault each
            return WorkerFault(f"RuntimeError: worker could not start: {self.start_error}")
        if settings is not None and settings != self.settings:
            try:
                self._configure(settings)
            except Exception as exc:  # noqa: BLE001 - the worker's fault, reported per problem
                return WorkerFault(f"worker could not take the batch's config: {one_line(exc)}")
        return None

    def _run(
        self,
        method: str,
        problems: Sequence[Problem],
        settings: Any = None,
        progress: tuple[Any, int] | None = None,
    ) -> tuple[str, list[Any]]:
        if (fault := self._prepare(settings)) is not None:
            return self.name, [fault] * len(problems)
        from pipeline.engine.backends.base import EngineError

        hooks = progress_hooks(progress)
        try:
            return self.name, list(self.solver.run(method, problems, **hooks))
        except EngineError:
            self._end_engine()
        except Exception:  # noqa: BLE001 - isolate the failing problem(s) below
            if len(problems) == 1:
                return self.name, [traceback.format_exc(limit=8)]
        return self.name, [self._one(method, p, hooks) for p in problems]

    def _end_engine(self) -> None:
        """The engine failed and its state is unknown (`EngineError`): end this process, so the
        driver re-queues the batch and Ray restarts the worker with a clean engine (as a lost
        rank does, `_end_replica`)."""
        os._exit(1)


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


class RankStreams:
    """The other ranks' `EvalWorker.stream` calls as rank 0 reads them: each rank's outcomes by
    problem index, taken from its stream as they come (in whatever order that rank ends them)."""

    def __init__(self, streams: Sequence[Any]) -> None:
        self.streams = list(streams)  # ray.ObjectRefGenerator per rank 1..G-1
        self.taken: list[dict[int, Any]] = [{} for _ in self.streams]

    def outcomes(self, index: int, timeout_s: float) -> list[Any] | None:
        """Every other rank's outcome for problem `index`, or None when a rank is gone, ended
        its stream without it, or has not yielded it within `timeout_s` (as `gather_ranks`: the
        ranks move in lockstep, so one that has not is hung)."""
        deadline = time.monotonic() + timeout_s
        for stream, taken in zip(self.streams, self.taken):
            while index not in taken:
                left = max(0.0, deadline - time.monotonic())
                if not ray.wait([stream], timeout=left)[0]:
                    return None
                try:
                    _, i, outcome = ray.get(next(stream))
                except (StopIteration, RayActorError):
                    return None
                taken[i] = outcome
        return [taken.pop(index) for taken in self.taken]


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
    """Rank 0's outcomes, each checked against the other ranks' (`rank_agrees`)."""
    return [rank_agrees(mine, [theirs[i] for theirs in others]) for i, mine in enumerate(outcomes)]


def rank_agrees(mine: Any, theirs: Sequence[Any]) -> Any:
    """Rank 0's outcome for a problem, or an error in its place when another rank's answers (in
    `theirs`, ranks 1..G-1) differ (its collectives would no longer line up; recorded as an
    error, never as a result)."""
    if not isinstance(mine, ProblemResult):
        return mine
    for rank, other in enumerate(theirs, start=1):
        if _answer_key(mine) != _answer_key(other):
            return (
                f"RuntimeError: tensor-parallel ranks disagree: rank {rank}'s answers to "
                f"this problem differ from rank 0's"
            )
    return mine


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
    scripts/shard_latency.py. `fn` loads its own shard (`pipeline.engine.model.load_model(cfg)`)."""
    from pipeline.engine.shards import free_port, join_group

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
