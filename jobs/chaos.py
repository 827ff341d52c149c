"""`latentseek chaos`: the driver under faults, repeatable. The real driver (`run_evaluation`:
the scheduler, the single record writer, MLflow, the summary) runs over stand-in workers that
stream plausible results (`jobs.simulate.plausible_result`) and misbehave on cue, on a local
Ray of two nodes (`ray.cluster_utils.Cluster` on 127.0.0.1) or the one already running:

    fault (per problem id, or per worker)   what the driver must do
    exit_once     the worker's process exits mid-batch once   re-queue only the unfinished problems
    exit          it exits every time (a poison problem)      record it with its error, go on
    stop_once     the worker SIGSTOPs itself (a hung GPU)     deadline, kill, escalate, go on
    raise         the problem raises every time               retry elsewhere, record its error
    raise_call    the worker's call itself raises             its unfinished problems' errors
    surrogate     its answer holds a lone surrogate           record an error row, not fail a shard
    fault         the worker cannot run it (WorkerFault)      retry elsewhere, record "infra"
    sick worker   its first process fails every problem       breaker: restart it, charge nothing

Faults that happen once are claimed with a file under `marks` (O_EXCL), so a restarted process
does not repeat them.

`python -m jobs.chaos` (or `latentseek chaos`) runs the default schedule on two local nodes
(`full_run`) with three faults of the driver's surroundings as well:

    SIGTERM       the driver (a child process,            exit 143, MLflow KILLED, one line;
                  `python -m jobs.chaos drive`) after     the same command resumes it: every
                  its first records                       problem recorded once over both
    MLflow stall  the resumed driver's live metrics hang  they run on their own thread: results
                  2 x batch_timeout_s                     keep coming, no worker killed for it
    raylet kill   the worker node, without warning        its batches re-queued, its workers
                  (`Cluster.remove_node`), mid-run        restarted on the head; a fresh node

and prints a one-screen summary; every check (`check`) that fails is a FAILED line and exit 1.
tests/test_chaos.py runs a small one in `make test` (with the MLflow stall) and the full one
as `slow`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.data import Problem
from pipeline.run.workers import WorkerFault


def claim(marks: str, name: str) -> bool:
    """True the first time `name` is claimed under the directory `marks` (any process)."""
    try:
        os.close(os.open(os.path.join(marks, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@dataclass(frozen=True)
class Faults:
    """What goes wrong: `problems` maps a problem id to its fault (module doc); `sick` names
    workers (by start order) whose first process fails every problem; `slow_restart` those
    whose restarted process never finishes starting."""

    problems: dict[str, str] = field(default_factory=dict)
    sick: tuple[int, ...] = ()
    slow_restart: tuple[int, ...] = ()
    seconds_per_problem: float = 0.05
    progress_every: float = 0.0  # > 0: post an "iteration" every this many seconds of a problem
    marks: str = ""  # a directory for the once-only faults' claims


class FaultyWorker:
    """EvalWorker's `info` and `stream` without a model, misbehaving as `faults` says. Wrapped
    with `ray.remote` by `faulty_starter`."""

    def __init__(self, cfg: Any, faults: Faults, index: int) -> None:
        import ray

        self.faults, self.index = faults, index
        self.node_id = ray.get_runtime_context().get_node_id()
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.node_id[:8]}"
        first = claim(faults.marks, f"started-{index}")
        self.sick = first and index in faults.sick
        if not first and index in faults.slow_restart:
            time.sleep(3600)  # a restart that never finishes (no placement, a load that hangs)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "node_id": self.node_id,
                "start_error": "", "model": "stand-in", "device": "cpu", "load_seconds": 0.0}  # fmt: skip

    def stream(
        self, method: str, problems: Sequence[Problem], settings: Any = None, progress: Any = None
    ) -> Iterator[tuple[str, int, Any]]:
        from jobs.simulate import Workload, plausible_result

        each = self.faults.seconds_per_problem
        for i, p in enumerate(problems):
            self._work(each, p.problem_id, progress)
            fault = self.faults.problems.get(p.problem_id, "")
            marks = self.faults.marks
            if fault == "exit" or (fault == "exit_once" and claim(marks, p.problem_id)):
                os._exit(1)
            if fault == "stop_once" and claim(marks, p.problem_id):
                os.kill(os.getpid(), signal.SIGSTOP)
            if fault == "raise_call":
                raise RuntimeError(f"the call raised on {p.problem_id}")
            if self.sick or fault == "raise":
                why = "sick worker" if self.sick else "deliberate failure"
                yield self.name, i, f"Traceback ...\nRuntimeError: {why} on {p.problem_id}"
            elif fault == "fault":
                yield self.name, i, WorkerFault(f"RuntimeError: cannot run {p.problem_id} here")
            else:
                result = plausible_result(p, method, each, Workload())
                result.device, result.dtype = "cpu", "float32"  # what a CPU run records (resume)
                if fault == "surrogate":
                    result.final_answer += "\ud800"
                yield self.name, i, result

    def _work(self, seconds: float, problem_id: str, progress: Any) -> None:
        """Sleep `seconds`, posting an iteration to the scheduler's board every
        `progress_every` seconds (what a long LatentSeek problem does) when asked to."""
        every = self.faults.progress_every
        if every <= 0 or progress is None:
            time.sleep(seconds)
            return
        board, ticket = progress
        end, k = time.monotonic() + seconds, 0
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(every, left))
            k += 1
            board.post.remote("iteration", ticket, problem_id, k)


def faulty_starter(faults: Faults, max_restarts: int) -> Any:
    """`start_worker` for run_evaluation (and the tests' schedulers): FaultyWorker actors of
    no CPU, numbered in start order, spread over the nodes."""
    import ray

    remote = ray.remote(num_cpus=0, max_restarts=max_restarts, max_task_retries=0)
    cls = remote(FaultyWorker).options(scheduling_strategy="SPREAD")
    started = [0]

    def start(cfg: Any) -> Any:
        started[0] += 1
        return cls.remote(cfg, faults, started[0] - 1)

    return start


# ------------------------------------------------------------------------------------------
# The chaos run


@dataclass
class ChaosReport:
    problems: int
    records: int
    errors: dict[str, str]  # problem id -> its error kind
    workers_lost: int
    retried: int
    wall_s: float
    incomplete: bool
    log: list[str]
    summary: Any = None  # the RunSummary
    log_at: list[float] = field(default_factory=list)  # time.monotonic() of each log line
    outcomes_at: list[float] = field(default_factory=list)  # ... of each outcome with results
    started: float = 0.0  # time.monotonic() at the driver's start


def chaos_config(out: Path, problems: int, workers: int = 3, **cfg_keys: Any) -> Config:
    """The chaos run's config, the same for a driver and its resume: `problems` stand-in
    problems (out/problems.jsonl), run_id "chaos" under `out`, and `cfg_keys` on top."""
    from jobs.simulate import write_problems

    data = write_problems(out / "problems.jsonl", problems)
    keys = dict(method=["cot"], workers=workers, batch_size=4, task_size=4, max_retries=1,
                max_worker_restarts=4, output_dir=str(out), run_id="chaos", dataset=str(data))  # fmt: skip
    return Config(**{**keys, **cfg_keys})


def chaos(
    out: Path,
    problems: int,
    faults: Faults,
    workers: int = 3,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    echo: Callable[[str], None] | None = None,
    **cfg_keys: Any,
) -> ChaosReport:
    """One run (or the resume of one) of `problems` stand-in problems through `run_evaluation`
    on the Ray that is running (or a local one), with `faults`; asserts every problem recorded
    exactly once. `on_batch` as for run_evaluation (faults of the driver's surroundings);
    `echo` is given the driver's log lines as they come."""
    from jobs.run import run_evaluation
    from jobs.simulate import check_exactly_once
    from pipeline.run.records import RecordStore

    marks = out / "marks"
    marks.mkdir(parents=True, exist_ok=True)
    faults = Faults(**{**faults.__dict__, "marks": str(marks)})
    cfg = chaos_config(out, problems, workers, **cfg_keys)
    log: list[str] = []
    log_at: list[float] = []
    outcomes_at: list[float] = []

    def note(line: str) -> None:
        log.append(line)
        log_at.append(time.monotonic())
        if echo:
            echo(line)

    def batch(state: dict[str, Any]) -> None:
        outcomes_at.append(time.monotonic())
        if on_batch:
            on_batch(state)

    start = time.monotonic()
    summary = run_evaluation(
        cfg,
        progress=False,
        log=note,
        on_batch=batch,
        start_worker=faulty_starter(faults, cfg.max_worker_restarts),
    )
    wall = time.monotonic() - start
    records = check_exactly_once(summary.run_dir, problems)
    rows = RecordStore(summary.run_dir).read_problems()
    failed = rows[rows["error"] != ""]
    return ChaosReport(
        problems, records, dict(zip(failed["problem_id"], failed["error_kind"])),
        summary.worker_failures, summary.retried, wall, summary.incomplete, log, summary,
        log_at, outcomes_at, start,
    )  # fmt: skip


DEFAULT_FAULTS = {
    "problems-3": "exit_once", "problems-11": "exit", "problems-33": "stop_once",
    "problems-23": "raise", "problems-29": "surrogate", "problems-31": "exit_once",
}  # fmt: skip
BATCH_TIMEOUT_S = 5.0  # the full run's deadline: the SIGSTOPped worker is caught in seconds
FULL_KEYS = {"batch_timeout_s": BATCH_TIMEOUT_S}
STALL_S = 2 * BATCH_TIMEOUT_S  # the MLflow stall: longer than a batch may go without progress
STOP_BOUND_S = 60.0  # a SIGTERM'd driver must be gone this long after the signal
FRESH_AFTER_S = 5.0  # a node is added back this long after the raylet kill
FIRST_RECORDS_S = 180.0  # ... and must have written its first records this long after its start


def default_faults() -> Faults:
    """The full run's faults (the SIGTERM'd driver's and its resume's): DEFAULT_FAULTS, worker
    1 sick, 0.2 s a problem (so that the first driver is stopped with work left)."""
    return Faults(problems=DEFAULT_FAULTS, sick=(1,), seconds_per_problem=0.2)


# --- faults of the driver's surroundings (the full run) -------------------------------------


@dataclass
class Stall:
    """The driver's live MLflow metrics stalled (a tracking server that hangs)."""

    seconds: float
    began: float = 0.0  # time.monotonic() when the stalled call began; 0: not yet
    ended: float = 0.0


@contextlib.contextmanager
def stalled_progress(seconds: float) -> Iterator[Stall]:
    """For the block, the driver's first live-metrics call (`tracking.log_progress`, which
    `jobs.run.BatchLoop` calls on its own thread) hangs `seconds` before it logs."""
    from pipeline.run import tracking

    real, stall = tracking.log_progress, Stall(seconds)

    def stalled(*args: Any, **kwargs: Any) -> None:
        if not stall.began:
            stall.began = time.monotonic()
            time.sleep(seconds)
            stall.ended = time.monotonic()
        real(*args, **kwargs)

    tracking.log_progress = stalled
    try:
        yield stall
    finally:
        tracking.log_progress = real


def workers_on(node_id: str) -> int:
    """The stand-in workers alive on the node `node_id` (Ray's actor table)."""
    from ray._private import state

    table = state.actors(actor_state_name="ALIVE").values()
    return sum(
        a["Address"]["NodeID"] == node_id and a["ActorClassName"].endswith("FaultyWorker")
        for a in table
    )


@dataclass
class NodeKill:
    """An `on_batch` hook: once results come in while a stand-in worker runs on `node`, kill
    the node (its raylet and every process on it, without warning: `Cluster.remove_node`, as
    Ray's own tests kill a raylet); at the first results FRESH_AFTER_S later, start a fresh
    node of `node_args` without waiting for it (Ray starts a node from the main thread only:
    that holds the driver's loop meanwhile, so not before the loss has been seen)."""

    cluster: Any
    node: Any
    node_args: dict[str, Any]
    at: float = 0.0  # time.monotonic() of the kill; 0: not yet
    on_node: int = 0  # stand-in workers alive on the node at the kill
    add_s: float = 0.0  # seconds the fresh node's start held the driver's loop
    fresh: Any = None  # the fresh node

    def __call__(self, state: dict[str, Any]) -> None:
        if self.at:
            if self.fresh is None and time.monotonic() - self.at >= FRESH_AFTER_S:
                begin = time.monotonic()
                self.fresh = self.cluster.add_node(wait=False, **self.node_args)
                self.add_s = time.monotonic() - begin
        elif on_node := workers_on(self.node.node_id):
            self.at, self.on_node = time.monotonic(), on_node
            self.cluster.remove_node(self.node, allow_graceful=False)

    def fresh_alive(self) -> bool:
        """Whether the fresh node has joined the cluster (and is alive)."""
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        return self.fresh is not None and self.fresh.node_id in alive


@dataclass
class Stopped:
    """The first driver, SIGTERM'd after its first records landed."""

    exit_code: int
    kept: int  # the records it wrote
    stop_s: float  # from the signal to its exit
    status: str  # its MLflow run's status after it
    stop_line: str  # its line saying it was stopped, and how to resume
    lost: int  # the workers it lost before (its log's "worker lost" lines)


def mlflow_status(cfg: Config) -> tuple[str, dict[str, str]]:
    """The status and tags of the chaos run's MLflow run (its evaluation run)."""
    from mlflow.tracking import MlflowClient

    from pipeline.run.tracking import KIND_TAG, METHOD, RUN_ID_TAG, resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    experiments = [e.experiment_id for e in client.search_experiments()]
    tag = f"tags.`{RUN_ID_TAG}` = '{cfg.run_id}'"
    (run,) = [
        r for r in client.search_runs(experiments, tag) if r.data.tags.get(KIND_TAG) != METHOD
    ]
    return run.info.status, run.data.tags


def sigterm_driver(out: Path, problems: int, address: str) -> Stopped:
    """Run the chaos driver in a child process (`python -m jobs.chaos drive`), SIGTERM it once
    its first records are written, as `ray job stop` or Slurm would, and see how it ended."""
    import subprocess

    from pipeline.run.records import RecordStore

    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, "-m", "jobs.chaos", "drive", f"out={out}", f"problems={problems}",
            f"address={address}"]  # fmt: skip
    paths = [str(root), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    shards = out / "chaos" / "problems"
    err_path = out / "driver-1.log"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(args, cwd=root, env=env, stdout=err, stderr=err,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + FIRST_RECORDS_S
        while not (shards.exists() and any(shards.glob("part-*.parquet"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the first driver wrote no record: {err_path.read_text()[-3000:]}"
                )
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            proc.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            pass
        stop_s = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's group, past its bound
            proc.wait()
    lines = err_path.read_text().splitlines()
    said = [line for line in lines if line.startswith("stopped by")]
    lost = sum(line.startswith("worker lost") for line in lines)
    status, _ = mlflow_status(chaos_config(out, problems, **FULL_KEYS, ray_address=address))
    kept = len(RecordStore(out / "chaos").read_problems())
    return Stopped(proc.returncode, kept, stop_s, status, said[-1] if said else "", lost)


def _stay_on_localhost() -> None:
    import ray._private.services as services

    services.resolve_ip_for_localhost = lambda host: host  # stay on 127.0.0.1


def drive(options: dict[str, str], argv: Sequence[str]) -> int:
    """`python -m jobs.chaos drive out=DIR problems=N address=ADDR`: the full run's driver with
    its faults, on the running cluster at ADDR; a SIGTERM ends it as `latentseek run` ends (one
    line, 143)."""
    import ray

    from jobs.run import StopRequested, stopped_line

    _stay_on_localhost()
    out, problems, address = Path(options["out"]), int(options["problems"]), options["address"]
    ray.init(address=address, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        chaos(out, problems, default_faults(), echo=lambda line: print(line, file=sys.stderr),
              **FULL_KEYS, ray_address=address)  # fmt: skip
    except StopRequested as stop:
        print(stopped_line(stop, ["python", "-m", "jobs.chaos", *argv]), file=sys.stderr)
        return stop.exit_code
    finally:
        ray.shutdown()
    return 0


@dataclass
class FullRun:
    """The full run's parts: the SIGTERM'd driver, its resume (with the MLflow stall and the
    raylet kill), and what was checked."""

    stopped: Stopped
    resumed: ChaosReport
    stall: Stall
    kill: NodeKill
    status: str  # the MLflow run's status after the resume
    incomplete_tag: str
    fresh_up: bool  # the node added after the kill joined the cluster
    stop_once_here: int  # stop_once faults that fired in the resume (each times out once)
    wall_s: float  # both drivers, from the first's start
    failed: list[str] = field(default_factory=list)  # the checks that did not hold


WORKER_ENDING = ("exit", "exit_once", "stop_once")  # faults that end or stop their worker


def healthy_timeouts(r: ChaosReport, kill: NodeKill) -> list[str]:
    """The timeouts of batches whose worker was healthy: a timeout line (the scheduler's
    "worker lost" line names the problems its batch had not finished) naming no problem whose
    fault ends or stops its worker, and not in the raylet kill's wake (a batch on the lost node
    may time out before Ray reports the node's loss, on a loaded machine)."""
    ending = [p for p, f in DEFAULT_FAULTS.items() if f in WORKER_ENDING]
    wake = (kill.at, kill.at + 2 * BATCH_TIMEOUT_S) if kill.at else (0.0, 0.0)
    return [
        line
        for t, line in zip(r.log_at, r.log, strict=True)
        if "batch_timeout_s" in line
        and not any(re.search(rf"\b{re.escape(p)}\b", line) for p in ending)
        and not wake[0] <= t <= wake[1]
    ]


def check(run: FullRun, problems: int, bound_s: float) -> list[str]:
    """The full run's checks that did not hold (every problem exactly once is `chaos`'s)."""
    s, r, stall, kill = run.stopped, run.resumed, run.stall, run.kill
    healthy = healthy_timeouts(r, kill)
    during = sum(stall.began < t < stall.ended for t in r.outcomes_at)
    checks = {
        f"the SIGTERM'd driver exited {s.exit_code}, not 143": s.exit_code == 143,
        f"the SIGTERM'd driver took {s.stop_s:.0f} s to stop": s.stop_s <= STOP_BOUND_S,
        f"the SIGTERM'd driver's MLflow run is {s.status}, not KILLED": s.status == "KILLED",
        f"the SIGTERM'd driver kept {s.kept} records": 1 <= s.kept < problems,
        "it did not say how to resume": s.stop_line.startswith("stopped by SIGTERM")
        and s.stop_line.endswith("run_id=chaos"),
        f"the resume skipped {r.summary.skipped}, not {s.kept}": r.summary.skipped == s.kept,
        f"the resumed MLflow run is {run.status}, not FINISHED": run.status == "FINISHED",
        f"the incomplete tag {run.incomplete_tag!r} is not the summary's": run.incomplete_tag
        == str(r.incomplete).lower(),
        "the MLflow stall did not happen": stall.ended - stall.began >= stall.seconds,
        "no result came in during the MLflow stall": during > 0,
        f"healthy workers killed for their deadline: {healthy}": not healthy,
        "no worker ran on the killed node": kill.on_node > 0,
        "the fresh node did not join": run.fresh_up or kill.fresh is None,
        f"took {run.wall_s:.0f} s, past the bound": run.wall_s <= bound_s,
    }
    return [what for what, held in checks.items() if not held]


def full_run(out: Path, problems: int, bound_s: float) -> FullRun:
    """Two local nodes; a driver SIGTERM'd after its first records; its resume in this process
    with the MLflow stall and the worker node's raylet killed mid-run (a fresh node added)."""
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    _stay_on_localhost()
    out.mkdir(parents=True, exist_ok=True)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1",
            "temp_dir": tempfile.mkdtemp(prefix="ray", dir="/tmp")}  # fmt: skip
    # A lost node is declared dead within a few seconds (Ray's default: about 30)
    health = {"health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
              "health_check_failure_threshold": 5,
              "health_check_initial_delay_ms": 1000}  # fmt: skip
    head = {**node, "include_dashboard": False, "_system_config": health}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        worker_node = cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False, _node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        begin = time.monotonic()
        stopped = sigterm_driver(out, problems, cluster.address)
        stop_once = [p for p, f in DEFAULT_FAULTS.items() if f == "stop_once"]
        fired_before = {p for p in stop_once if (out / "marks" / p).exists()}
        kill = NodeKill(cluster, worker_node, node)
        with stalled_progress(STALL_S) as stall:
            resumed = chaos(out, problems, default_faults(), on_batch=kill, **FULL_KEYS,
                            ray_address=cluster.address)  # fmt: skip
        wall = time.monotonic() - begin
        fresh_up = kill.fresh_alive()
        cfg = chaos_config(out, problems, **FULL_KEYS, ray_address=cluster.address)
        status, tags = mlflow_status(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    fired = {p for p in stop_once if (out / "marks" / p).exists()} - fired_before
    incomplete = tags.get("latentseek.incomplete", "")
    run = FullRun(stopped, resumed, stall, kill, status, incomplete, fresh_up, len(fired), wall)
    run.failed = check(run, problems, bound_s)
    return run


def short(line: str, width: int = 160) -> str:
    return line if len(line) <= width else line[: width - 5] + " ... " + line[-60:]


def summary_lines(run: FullRun, faults: Faults, bound_s: float) -> list[str]:
    """One screen: the faults, what the two drivers recorded, each fault's recovery, the checks
    that failed."""
    s, r, stall, kill = run.stopped, run.resumed, run.stall, run.kill
    after = [(t - kill.at, line) for t, line in zip(r.log_at, r.log) if kill.at and t >= kill.at]
    node_lost = [(t, line) for t, line in after if "Unavailable" in line or "NodeDied" in line]
    first = f" (the first {node_lost[0][0]:.1f} s after)" if node_lost else ""
    during = sum(stall.began < t < stall.ended for t in r.outcomes_at)
    timeouts = sum("batch_timeout_s" in line for line in r.log)
    fresh = "no fresh node (the run ended first)"
    if kill.fresh is not None:
        up = "up" if run.fresh_up else "NOT up"
        fresh = (
            f"a fresh node added {FRESH_AFTER_S:g} s after ({kill.add_s:.1f} s), {up} at the end"
        )
    kinds = sorted(set(faults.problems.values()))
    return [
        f"chaos:    {r.problems} problems; faults {', '.join(kinds)}, sick workers "
        f"{list(faults.sick)}; driver SIGTERM + resume, MLflow stall, raylet kill",
        f"records:  {r.records} over both drivers (every problem exactly once); errors {r.errors}",
        f"sigterm:  driver 1 gone {s.stop_s:.1f} s after SIGTERM (bound {STOP_BOUND_S:.0f} s), "
        f"exit {s.exit_code}, MLflow {s.status}, {s.kept} records kept; workers lost before it: "
        f"{s.lost}",
        f"resume:   driver 2 skipped {r.summary.skipped}, recorded {r.summary.recorded}; MLflow "
        f"{run.status}, incomplete={run.incomplete_tag}",
        f"mlflow:   live metrics stalled {stall.ended - stall.began:.1f} s (batch_timeout_s "
        f"{BATCH_TIMEOUT_S:g}); {during} results came in meanwhile; batches timed out: "
        f"{timeouts} (of healthy workers: {len(healthy_timeouts(r, kill))}), workers SIGSTOPped "
        f"in driver 2: {run.stop_once_here}",
        f"raylet:   worker node killed {kill.at - r.started:.1f} s into driver 2 (stand-ins "
        f"on it: {kill.on_node}); workers lost after it: {len(node_lost)}{first}; "
        f"{fresh}; "
        f"driver 2 ended {r.started + r.wall_s - kill.at:.1f} s after the kill",
        f"recovery: driver 2 lost {r.workers_lost} batches with their worker, {r.retried} retries",
        f"time:     {run.wall_s:.1f} s for both drivers (bound {bound_s:.0f} s); "
        f"incomplete: {r.incomplete}",
        *[f"log:      {short(line)}" for line in r.log if "lost" in line or "retired" in line][:6],
        *[f"FAILED:   {what}" for what in run.failed],
    ]


def main(argv: Sequence[str]) -> int:
    """`latentseek chaos [problems=N] [out=DIR]`: the default fault schedule on two local
    nodes, the driver SIGTERM'd and resumed, its MLflow stalled and a worker node's raylet
    killed under the resume; prints the summary, exits 1 if a problem was not recorded exactly
    once, a check failed (`check`) or the run took longer than its bound."""
    import tempfile

    options = dict(item.partition("=")[::2] for item in argv[1:] if argv[:1] == ["drive"])
    if options:
        return drive(options, argv)
    options = dict(item.partition("=")[::2] for item in argv)
    problems = int(options.get("problems", 40))
    out = Path(options.get("out") or tempfile.mkdtemp(prefix="latentseek-chaos-"))
    bound = 120.0 + 2.0 * problems
    run = full_run(out, problems, bound)
    print("\n".join(summary_lines(run, default_faults(), bound)))
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
