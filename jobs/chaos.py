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
does not repeat them. `python -m jobs.chaos` (or `latentseek chaos`) runs the default schedule
and prints a one-screen summary; tests/test_chaos.py runs a small one in `make test`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            time.sleep(each)
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
                if fault == "surrogate":
                    result.final_answer += "\ud800"
                yield self.name, i, result


def faulty_starter(faults: Faults, max_restarts: int) -> Any:
    """`start_worker` for run_evaluation (and the tests' schedulers): FaultyWorker actors of
    no CPU, numbered in start order."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=max_restarts, max_task_retries=0)(FaultyWorker)
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


def chaos(
    out: Path, problems: int, faults: Faults, workers: int = 3, **cfg_keys: Any
) -> ChaosReport:
    """One run of `problems` stand-in problems through `run_evaluation` on the Ray that is
    running (or a local one), with `faults`; asserts every problem recorded exactly once."""
    from jobs.run import run_evaluation
    from jobs.simulate import check_exactly_once, write_problems
    from pipeline.config import Config
    from pipeline.run.records import RecordStore

    marks = out / "marks"
    marks.mkdir(parents=True, exist_ok=True)
    faults = Faults(**{**faults.__dict__, "marks": str(marks)})
    data = write_problems(out / "problems.jsonl", problems)
    keys = dict(method=["cot"], workers=workers, batch_size=4, task_size=4, max_retries=1,
                max_worker_restarts=4, output_dir=str(out), run_id="chaos", dataset=str(data))  # fmt: skip
    cfg = Config(**{**keys, **cfg_keys})
    log: list[str] = []
    start = time.monotonic()
    summary = run_evaluation(
        cfg,
        progress=False,
        log=log.append,
        start_worker=faulty_starter(faults, cfg.max_worker_restarts),
    )
    wall = time.monotonic() - start
    records = check_exactly_once(summary.run_dir, problems)
    rows = RecordStore(summary.run_dir).read_problems()
    failed = rows[rows["error"] != ""]
    return ChaosReport(
        problems, records, dict(zip(failed["problem_id"], failed["error_kind"])),
        summary.worker_failures, summary.retried, wall, summary.incomplete, log, summary,
    )  # fmt: skip


DEFAULT_FAULTS = {
    "problems-3": "exit_once", "problems-11": "exit", "problems-17": "stop_once",
    "problems-23": "raise", "problems-29": "surrogate", "problems-31": "exit_once",
}  # fmt: skip


def summary_lines(r: ChaosReport, faults: Faults, bound_s: float) -> list[str]:
    kinds = sorted(set(faults.problems.values()))
    return [
        f"chaos:    {r.problems} problems, faults {', '.join(kinds)}"
        + (f", sick workers {list(faults.sick)}" if faults.sick else ""),
        f"records:  {r.records} (every problem exactly once); errors {r.errors}",
        f"recovery: {r.workers_lost} batches lost with their worker, {r.retried} retries",
        f"time:     {r.wall_s:.1f} s (bound {bound_s:.0f} s); incomplete: {r.incomplete}",
        *[f"log:      {line}" for line in r.log if "lost" in line or "retired" in line][:8],
    ]


def main(argv: Sequence[str]) -> int:
    """`latentseek chaos [problems=N] [out=DIR]`: the default fault schedule on two local
    nodes; prints the summary, exits 1 if a problem was not recorded exactly once or the run
    took longer than its bound."""
    import tempfile

    import ray
    import ray._private.services as services
    from ray.cluster_utils import Cluster

    options = dict(item.partition("=")[::2] for item in argv)
    problems = int(options.get("problems", 40))
    out = Path(options.get("out") or tempfile.mkdtemp(prefix="latentseek-chaos-"))
    bound = 120.0 + 2.0 * problems
    services.resolve_ip_for_localhost = lambda host: host  # stay on 127.0.0.1
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1",
            "temp_dir": tempfile.mkdtemp(prefix="ray", dir="/tmp")}  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False, _node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        faults = Faults(problems=DEFAULT_FAULTS, sick=(1,))
        report = chaos(out, problems, faults, batch_timeout_s=5.0, ray_address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("\n".join(summary_lines(report, faults, bound)))
    return 0 if report.wall_s <= bound else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
