"""The scheduler's fault branches, fast: the real `Scheduler` on the session's local Ray, fed by
stand-in workers (`jobs.chaos.FaultyWorker`: no model, a few tens of milliseconds a problem) that
exit, stop, fail or cannot run on cue. Each test drives one branch that, before these tests,
only a `slow` whole-pipeline test (or nothing) covered."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import ray
from ray.exceptions import (
    ActorUnavailableError,
    ActorUnschedulableError,
    NodeDiedError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    RuntimeEnvSetupError,
)

from jobs.chaos import Faults, faulty_starter
from jobs.run import Background
from pipeline.config import Config
from pipeline.data import Problem
from pipeline.method.results import ProblemResult
from pipeline.run import scheduler as scheduler_module
from pipeline.run.pool import RunError, start_workers
from pipeline.run.records import RecordStore, encodable
from pipeline.run.scheduler import Batch, ProgressBoard, Scheduler, classify
from pipeline.run.workers import NoWorkerLeftError


def problems(n: int) -> list[Problem]:
    return [Problem(f"p-{i}", "toy", f"what is {i} + 1?", str(i + 1)) for i in range(n)]


def start(tmp_path: Path, n: int, restarts: int = 3, **faults) -> list:
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    starter = faulty_starter(Faults(marks=str(marks), **faults), restarts)
    return [starter(Config()) for _ in range(n)]


def drive(workers, batches, log: list[str], **kw) -> tuple[list, Scheduler]:
    kw.setdefault("max_retries", 1)
    s = Scheduler(workers, batches, on_worker_lost=log.append, **kw)
    outcomes = list(s.run())
    return outcomes, s


def recorded(outcomes) -> dict[str, ProblemResult]:
    rows = [r for o in outcomes for r in o.results]
    counts = Counter(r.problem_id for r in rows)
    assert all(n == 1 for n in counts.values()), f"recorded twice: {counts}"
    return {r.problem_id: r for r in rows}


def test_results_stream_per_problem_a_lost_task_requeues_only_the_unfinished_and_a_poison_problem_is_recorded(
    tmp_path, local_ray
):
    """One task of 8; the worker's process exits at p-5 (once): p-0..p-4 reached the driver
    before (streamed, not at the task's end), and only p-5..p-7 run again, as one batch. p-7
    exits its worker every time: left alone unfinished a second time (death 2 = max_retries +
    1) it is recorded with its error, kind "problem"; nothing else is redone."""
    (worker,) = start(tmp_path, 1, problems={"p-5": "exit_once", "p-7": "exit"})
    log: list[str] = []
    outcomes, s = drive([worker], [Batch(0, "cot", problems(8))], log)
    rows = recorded(outcomes)
    assert set(rows) == {f"p-{i}" for i in range(8)}
    before_loss = [o for o in outcomes if o.batch.batch_id == 0]
    assert {r.problem_id for o in before_loss for r in o.results} == {f"p-{i}" for i in range(5)}
    assert "3 of its 8 problems unfinished, re-queued" in log[0], log
    bad = rows.pop("p-7")
    assert "died while running this problem (2 times)" in bad.error
    assert bad.error_kind == "problem"
    assert not any(r.error for r in rows.values())
    assert s.worker_failures == 2 and len(log) == 2, log


def test_a_sick_worker_trips_its_breaker_and_retries_go_elsewhere(tmp_path, local_ray):
    """Worker 0's first process fails every problem; worker 1 is healthy. Each problem that
    fails on worker 0 is retried on worker 1 (never on worker 0 again), and once 3 problems of
    its streak have succeeded there, worker 0 is restarted (healthy)."""
    sick, healthy = start(tmp_path, 2, sick=(0,))
    sick_name = ray.get(sick.info.remote())["name"]
    log: list[str] = []
    batches = [Batch(i, "cot", [p]) for i, p in enumerate(problems(10))]
    outcomes, s = drive([sick, healthy], batches, log, max_retries=1)
    rows = recorded(outcomes)
    assert len(rows) == 10 and not any(r.error for r in rows.values())
    failed_on_sick = {p.problem_id for o in outcomes for p in o.retry}
    assert failed_on_sick and all(o.worker == sick_name for o in outcomes if o.retry)
    assert s.breaker_trips == 1, log
    assert any("breaker" in line for line in log)
    final = {r.problem_id: o for o in outcomes for r in o.results}
    assert all(final[p].worker != sick_name for p in failed_on_sick)  # steered away


def test_a_stopped_worker_is_killed_then_given_up_and_its_batch_runs_elsewhere(
    tmp_path, local_ray, monkeypatch
):
    """p-1 SIGSTOPs its worker. Its batch's deadline (2 s) passes; the kill is sent but (here:
    swallowed) never ends the call, so after the grace (1 s) the batch is lost anyway and the
    worker retired; the other worker records everything once."""
    stopped, other = start(tmp_path, 2, problems={"p-1": "stop_once"})
    pid = ray.get(stopped.info.remote())["pid"]
    kills: list = []

    class NoKill:  # Ray as the scheduler sees it, with a kill that never lands
        def __getattr__(self, name):
            return (
                (lambda actor, **kw: kills.append(actor)) if name == "kill" else getattr(ray, name)
            )

    monkeypatch.setattr(scheduler_module, "ray", NoKill())
    monkeypatch.setattr(scheduler_module, "KILL_GRACE_S", 1.0)
    log: list[str] = []
    batches = [Batch(0, "cot", problems(4)), Batch(1, "cot", problems(8)[4:])]
    try:
        begin = time.monotonic()
        outcomes, s = drive(
            [stopped, other], batches, log, settings=Config(batch_timeout_s=2.0, method=["cot"])
        )
        took = time.monotonic() - begin
    finally:
        os.kill(pid, signal.SIGKILL)  # this test's own stopped actor process
    rows = recorded(outcomes)
    assert len(rows) == 8 and not any(r.error for r in rows.values())
    assert kills, "the deadline's kill was sent"
    assert s.given_up == 1 and any("retired" in line for line in log), log
    assert took < 60


@pytest.mark.parametrize("reports", [True, False])
def test_a_batch_that_reports_progress_outlasts_its_deadline_and_a_silent_one_does_not(
    tmp_path, local_ray, reports
):
    """The deadline counts from a batch's last progress, not from its dispatch: one worker,
    one problem of 7 s against batch_timeout_s=5 (room for the progress board's own start on a
    loaded machine). Posting an iteration every 0.2 s (a long LatentSeek problem), it is never
    killed; silent, it is killed at its deadline and recorded with its error (max_retries=0)."""
    (w,) = start(tmp_path, 1, seconds_per_problem=7.0, progress_every=0.2 if reports else 0.0)
    ray.get(w.info.remote())  # started, as run_evaluation's workers are before any batch
    log: list[str] = []
    settings = Config(batch_timeout_s=5.0, method=["cot"])
    outcomes, s = drive([w], [Batch(0, "cot", problems(1))], log, settings=settings, max_retries=0)
    rows = recorded(outcomes)
    errors = {p: r.error for p, r in rows.items()}
    assert len(rows) == 1
    if reports:
        assert s.worker_failures == 0 and not any(errors.values()), (log, errors)
    else:
        assert s.worker_failures >= 1 and all(errors.values()), (log, errors)


def test_a_restart_that_never_comes_back_is_given_up(tmp_path, local_ray):
    """The only worker exits at p-0 and its restart hangs (no placement, a load that stalls):
    after `restart_timeout` it is retired, naming what the cluster has free, and the run stops
    with "no worker left" (before: the driver pinged it forever)."""
    (w0,) = start(tmp_path, 1, problems={"p-0": "exit_once"}, slow_restart=(0,))
    log: list[str] = []
    begin = time.monotonic()
    with pytest.raises(NoWorkerLeftError, match="no worker left alive; 2 batches were not run"):
        drive([w0], [Batch(0, "cot", problems(2)), Batch(1, "cot", problems(4)[2:])], log,
              restart_timeout=2.0)  # fmt: skip
    assert time.monotonic() - begin < 60
    (line,) = [x for x in log if "not back within 2 s" in x]
    assert "free {" in line and "CPU" in line


def test_worker_faults_are_infra_and_a_raising_call_is_the_problems(
    tmp_path, local_ray, monkeypatch
):
    """p-1 meets a worker that cannot run it (WorkerFault, e.g. `_configure` raised) on both
    workers: recorded as an infrastructure error; p-4's call raises outside the per-problem
    path (a RayTaskError): its problem's error, retried on the other worker first."""
    monkeypatch.setattr(scheduler_module, "BREAKER_FAILURES", 100)  # not the breaker's test
    a, b = start(tmp_path, 2, problems={"p-1": "fault", "p-4": "raise_call"})
    log: list[str] = []
    batches = [Batch(0, "cot", problems(3)), Batch(1, "cot", problems(6)[3:])]
    outcomes, s = drive([a, b], batches, log)
    rows = recorded(outcomes)
    assert len(rows) == 6
    assert rows["p-1"].error_kind == "infra" and "cannot run p-1" in rows["p-1"].error
    assert rows["p-4"].error_kind == "problem" and "the call raised on p-4" in rows["p-4"].error
    assert not any(rows[p].error for p in ("p-0", "p-2", "p-3", "p-5"))
    assert s.worker_failures == 0  # neither is a worker's death


def test_workers_that_cannot_be_placed_stop_the_start_with_the_free_resources(local_ray):
    @ray.remote(num_gpus=1)  # this machine's local Ray has no GPU: never placed
    class Unplaceable:
        def info(self):
            return {"start_error": ""}

    cfg = Config(workers=1, gpus_per_worker=1.0, device="cuda")
    with pytest.raises(RunError, match=r"1 of 1 workers did not start within 1 s") as err:
        start_workers(cfg, lambda c: Unplaceable.remote(), start_timeout=1.0)
    assert "needs {'num_gpus': 1.0" in str(err.value) and "free {" in str(err.value)


def test_a_worker_whose_node_holds_other_model_files_stops_the_start(local_ray):
    """Each worker reports what the model files it loaded hold, read on its node; the driver
    compares them with its own (the embedded model here) before any work is sent."""
    from pipeline.engine.model import model_digest

    @ray.remote(num_cpus=0)
    class Reporting:
        def __init__(self, name, digest):
            self.name, self.digest = name, digest

        def info(self):
            return {"name": self.name, "start_error": "", "model_digest": self.digest}

        def pid(self):
            return os.getpid()

    cfg = Config(workers=2)
    here = model_digest(cfg)
    assert here["sha256"]  # the embedded model: one file, by content
    other = {**here, "sha256": "0" * 64}  # an older copy on the second node
    digests = iter([("node-a", here), ("node-b", other)])
    with pytest.raises(RunError, match=r"worker node-b loaded other model files") as err:
        start_workers(cfg, lambda c: Reporting.remote(*next(digests)))
    assert "'" + "0" * 64 + "' on its node" in str(err.value)
    same = iter([("node-a", here), ("node-b", dict(here))])
    workers, infos = start_workers(cfg, lambda c: Reporting.remote(*next(same)))
    assert [i["name"] for i in infos] == ["node-a", "node-b"]
    for w in workers:
        ray.kill(w)


def test_ray_errors_are_classified():
    assert classify(RuntimeEnvSetupError("pip failed")) == "config"
    for lost in (
        RayActorError(),
        OutOfMemoryError("oom"),
        NodeDiedError("node"),
        ActorUnschedulableError("no gpu"),
        ActorUnavailableError("socket closed", None),  # a killed raylet's actors (jobs.chaos)
    ):
        assert classify(lost) == "lost", lost
    raised = RayTaskError("stream", "Traceback ...", ValueError("bad"))
    assert classify(raised) == "problem"
    env = RayTaskError("stream", "Traceback ...", RuntimeEnvSetupError("pip failed"))
    assert classify(env) == "config"


def test_the_board_stamps_events_with_its_own_clock():
    """A driver that looks late (an MLflow stall) reads how long ago a batch moved, not when
    it looked: each event carries the board's time of arrival, `take` the board's now."""
    board = ProgressBoard()
    board.post("iteration", 3, "p-1", 1)
    time.sleep(0.05)
    now, events = board.take()
    ((at, kind, ticket, pid, k),) = events
    assert (kind, ticket, pid, k) == ("iteration", 3, "p-1", 1)
    assert now - at >= 0.05


def test_progress_logging_never_blocks_and_never_raises():
    """MLflow's live metrics go through a queue of one on their own thread: a stalled call
    does not block the loop, a newer call replaces a waiting one, errors are logged once."""
    import threading

    release, ran, log = threading.Event(), [], []
    bg = Background("progress", log.append)
    bg.submit(lambda: release.wait(10))  # a stalled tracking server
    time.sleep(0.05)
    begin = time.monotonic()
    for i in range(50):
        bg.submit(lambda i=i: ran.append(i))
    bg.submit(lambda: 1 / 0)
    bg.submit(lambda: 1 / 0)
    assert time.monotonic() - begin < 1.0  # never waited on the stalled call
    bg.submit(lambda: ran.append("last"))
    release.set()
    bg.close(10)
    assert ran == ["last"]  # the older ones were replaced while the first stalled
    bg = Background("progress", log.append)
    bg.submit(lambda: 1 / 0)
    bg.submit(lambda: 1 / 0)
    bg.close(10)
    assert len(log) == 1 and "ZeroDivisionError" in log[0]


def test_an_unencodable_result_becomes_its_error_row(tmp_path):
    good = ProblemResult("p-0", "toy", "cot", "q", "1", final_answer="1")
    bad = ProblemResult("p-1", "toy", "cot", "q \ud800", "2", final_answer="2 \ud800")
    assert encodable(good) is good
    row = encodable(bad)
    assert row.error.startswith("UnencodableResult:") and row.error_kind == "problem"
    store = RecordStore(tmp_path / "run")
    store.write([good, row], "r", "m", "w")
    back = store.read_problems().set_index("problem_id")
    assert back.loc["p-1", "question"] == "q \\ud800" and back.loc["p-0", "error"] == ""
    assert back.loc["p-1", "error_kind"] == "problem" and back.loc["p-0", "error_kind"] == ""
