"""The distributed layer with real components: a real local Ray, real worker processes killed
for real, a real two-node local cluster, a real MLflow store. The model is the embedded SmolLM2
with tiny token caps so that each run takes seconds of decoding."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray
import torch
from conftest import problem

from jobs.run import RunError, check_resume, run_evaluation
from pipeline.config import Config, ConfigError
from pipeline.method.results import ProblemResult
from pipeline.run.pool import start_ray
from pipeline.run.records import RecordStore
from pipeline.run.rundir import read_invocations, write_config
from pipeline.run.scheduler import batch_timeout
from pipeline.run.workers import EvalWorker, RankStreams, gather_ranks, worker_device

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def small_cfg(tmp_path: Path, **kw) -> Config:
    base = dict(
        dataset="gsm8k",
        limit=6,
        method=["cot", "latentseek"],
        reward="psrm",
        max_new_tokens=8,
        max_iters=1,
        rho=0.5,
        batch_size=2,
        workers=2,
        output_dir=str(tmp_path / "out"),
        run_id="r1",
    )
    base.update(kw)
    return Config(**base)


def assert_exactly_once(run_dir: Path, n_problems: int, methods: list[str]) -> pd.DataFrame:
    problems = RecordStore(run_dir).read_problems()
    keys = list(zip(problems["problem_id"], problems["method"]))
    assert len(keys) == len(set(keys)), "a (problem, method) was recorded twice"
    assert len(keys) == n_problems * len(methods)
    assert set(problems["method"]) == set(methods)
    return problems


def test_run_records_every_problem_once_and_uses_both_workers(tmp_path, local_ray):
    cfg = small_cfg(tmp_path)
    summary = run_evaluation(cfg, progress=False, log=lambda m: None)
    problems = assert_exactly_once(summary.run_dir, 6, ["cot", "latentseek"])
    assert problems["worker"].nunique() == 2, "pull scheduling should give both workers work"
    assert (problems["error"] == "").all()
    assert summary.recorded == 12 and summary.failures == 0
    assert (summary.run_dir / "config.yaml").exists()
    # each row says where it ran: CPU workers (gpus_per_worker=0), dtype=auto -> float32
    assert set(problems["device"]) == {"cpu"} and set(problems["dtype"]) == {"float32"}
    # the driver wrote the summary files into the run directory, and the report into report/
    top = {p.name for p in summary.files if p.parent == summary.run_dir}
    assert top == {"summary.md", "summary.csv", "accuracy_by_iteration.csv"}
    report = {p.name for p in summary.files if p.parent == summary.run_dir / "report"}
    assert {"report.md", "table.md", "table.csv", "scaling.png"} <= report
    assert len(top) + len(report) == len(summary.files)
    assert all(p.exists() for p in summary.files)
    config_text = (summary.run_dir / "config.yaml").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary.tracking_uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.params["max_new_tokens"] == "8"
    assert run.data.tags["latentseek.run_id"] == "r1"
    (ls,) = client.search_runs(  # each method is a run nested under the evaluation's
        [run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{summary.mlflow_run_id}' "
        "and tags.method = 'latentseek'",
    )
    history = client.get_metric_history(ls.info.run_id, "accuracy_at_iteration")
    assert sorted(m.step for m in history) == [0, 1]
    assert "mean_final_reward" in ls.data.metrics  # the summary column's own name
    # The MLflow run spans the evaluation: it was open while batches were recorded (live
    # progress metrics logged between its start and its end), and ends FINISHED.
    live = client.get_metric_history(summary.mlflow_run_id, "progress/records")
    assert live and live[-1].value == 12 and live[-1].step == 12
    assert all(run.info.start_time <= m.timestamp <= run.info.end_time for m in live)
    assert run.info.status == "FINISHED"
    plots = {a.path for a in client.list_artifacts(summary.mlflow_run_id, "report")}
    assert {"report/report.md", "report/scaling.png"} <= plots  # the report, as artifacts
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # Same run id again, with fewer workers (how it runs, not what it computes): everything is
    # already there, nothing is recomputed or duplicated.
    again = run_evaluation(cfg.replace(workers=1), progress=False, log=lambda m: None)
    assert again.recorded == 0 and again.skipped == 12
    assert_exactly_once(summary.run_dir, 6, ["cot", "latentseek"])
    assert again.mlflow_run_id == summary.mlflow_run_id
    # config.yaml stays the first invocation's; every invocation is in invocations.jsonl
    assert (summary.run_dir / "config.yaml").read_text() == config_text
    first, second = read_invocations(summary.run_dir)
    assert first["changed_from_config_yaml"] == {} and first["config"]["workers"] == 2
    assert first["already_recorded"] == 0 and second["already_recorded"] == 12
    assert second["changed_from_config_yaml"] == {"workers": [2, 1]}
    assert second["config"] == cfg.replace(workers=1).to_dict()
    assert second["time"].endswith("Z") and second["git_commit"]


# long: a whole-pipeline repeat of a branch tests/test_scheduler_faults.py tests fast
@pytest.mark.long
def test_sigkilled_worker_is_replaced_and_nothing_is_lost(tmp_path, local_ray):
    cfg = small_cfg(tmp_path, limit=8, method=["cot"], batch_size=1, max_new_tokens=12)
    killed: list[int] = []

    def kill_one_worker(state):
        busy = [f.worker for f in state["scheduler"].in_flight.values()]
        if not killed and busy:
            pid = state["infos"][state["workers"].index(busy[0])]["pid"]
            os.kill(pid, signal.SIGKILL)  # mid-batch: it holds a batch in flight
            killed.append(pid)

    summary = run_evaluation(cfg, progress=False, on_batch=kill_one_worker, log=lambda m: None)
    assert killed
    assert_exactly_once(summary.run_dir, 8, ["cot"])
    assert summary.worker_failures == 1  # its in-flight batch was re-queued
    problems = RecordStore(summary.run_dir).read_problems()
    assert (problems["error"] == "").all()


# long: a whole-pipeline repeat of a branch tests/test_scheduler_faults.py tests fast
@pytest.mark.long
def test_a_problem_that_raises_is_retried_then_recorded_with_its_error(tmp_path, local_ray):
    cfg = small_cfg(
        tmp_path,
        limit=4,
        method=["latentseek"],
        reward="tests.faulty_reward:fails_on_gsm8k_1",
        max_retries=1,
    )
    summary = run_evaluation(cfg, progress=False, log=lambda m: None)
    problems = assert_exactly_once(summary.run_dir, 4, ["latentseek"])
    bad = problems[problems["problem_id"] == "gsm8k-1"].iloc[0]
    assert "deliberate failure" in bad["error"]
    assert bad["attempts"] == 2  # first try + one retry
    assert (problems[problems["problem_id"] != "gsm8k-1"]["error"] == "").all()
    assert summary.failures == 1 and summary.retried == 1


# long: a whole-pipeline repeat of a branch tests/test_scheduler_faults.py tests fast
@pytest.mark.long
def test_a_problem_that_kills_its_worker_is_recorded_and_the_run_goes_on(tmp_path, local_ray):
    """gsm8k-1 ends its worker's process (os._exit) whenever it is scored. 9 problems in two
    tasks of 5 and 4 on 2 workers, max_retries=1: the task of 5 dies (death 1 of its unfinished
    problems), they go back re-packed as one batch, which dies again (death 2): each then runs
    alone, and gsm8k-1 alone dies a third time (> max_retries + 1 deaths): recorded with its
    error. 3 workers lost in all: max_worker_restarts=2 on each of the 2 workers keeps them."""
    cfg = small_cfg(
        tmp_path,
        limit=9,
        method=["latentseek"],
        reward="tests.faulty_reward:exits_on_gsm8k_1",
        max_retries=1,
        max_worker_restarts=2,
    )
    summary = run_evaluation(cfg, progress=False, log=lambda m: None)
    problems = assert_exactly_once(summary.run_dir, 9, ["latentseek"])
    bad = problems[problems["problem_id"] == "gsm8k-1"].iloc[0]
    assert "worker process died while running this problem (3 times)" in bad["error"]
    assert bad["attempts"] == 3
    assert (problems[problems["problem_id"] != "gsm8k-1"]["error"] == "").all()
    assert summary.recorded == 9 and summary.failures == 1
    assert summary.worker_failures == 3


# long: a whole-pipeline repeat of a branch tests/test_scheduler_faults.py tests fast
@pytest.mark.long
def test_a_problem_that_hangs_times_out_and_the_run_goes_on(tmp_path, local_ray):
    """gsm8k-1 never returns from its reward. One worker, one task of 4 problems,
    batch_timeout_s=15 (a lone problem here takes a few seconds): the task times out (its worker
    is killed and restarted; death 1 of each unfinished problem), goes back re-packed and times
    out again (death 2); then each runs alone, and gsm8k-1 alone times out a third time and is
    recorded with its error; the other three are recorded. Three restarts of the one worker:
    max_worker_restarts=3."""
    cfg = small_cfg(
        tmp_path,
        limit=4,
        workers=1,
        method=["latentseek"],
        reward="tests.faulty_reward:hangs_on_gsm8k_1",
        max_retries=1,
        max_worker_restarts=3,
        batch_timeout_s=15.0,
    )
    lost: list[str] = []
    summary = run_evaluation(cfg, progress=False, log=lost.append)
    problems = assert_exactly_once(summary.run_dir, 4, ["latentseek"])
    bad = problems[problems["problem_id"] == "gsm8k-1"].iloc[0]
    assert "(3 times)" in bad["error"] and "timed out after 15 s" in bad["error"]
    assert (problems[problems["problem_id"] != "gsm8k-1"]["error"] == "").all()
    assert summary.failures == 1 and summary.worker_failures == 3
    assert sum("timed out" in line for line in lost) == 3


# long: a whole-pipeline repeat of a branch tests/test_scheduler_faults.py tests fast
@pytest.mark.long
def test_a_slow_worker_that_keeps_reporting_progress_keeps_its_batch(tmp_path, local_ray):
    """The deadline counts from a batch's last progress report, not from its dispatch: one
    worker, one task of 6 LatentSeek problems, 2 iterations each and 3 s of reward per iteration
    answer, so the task takes over 36 s against batch_timeout_s=12, while the worker reports an
    iteration every ~3 s. Nothing is killed: 6 results, no worker lost (a deadline counted from
    dispatch killed this healthy worker at 12 s)."""
    cfg = small_cfg(
        tmp_path,
        limit=6,
        workers=1,
        task_size=6,
        max_iters=2,
        method=["latentseek"],
        reward="tests.faulty_reward:slow_steps",
        batch_timeout_s=12.0,
    )
    lost: list[str] = []
    summary = run_evaluation(cfg, progress=False, log=lost.append)
    problems = assert_exactly_once(summary.run_dir, 6, ["latentseek"])
    assert (problems["error"] == "").all() and (problems["iterations"] == 2).all()
    assert summary.worker_failures == 0, lost
    assert problems["wall_seconds"].sum() > 36.0  # the one task did outlast its deadline


def test_rank_zero_stops_waiting_for_a_rank_that_hangs_or_dies(local_ray):
    """`gather_ranks`, rank 0's wait for its other ranks: their outcomes, or None (rank 0 then
    ends the replica) for a rank that is not done in time or whose process is gone."""

    @ray.remote(num_cpus=0)
    class Rank:
        def run(self, seconds: float) -> tuple[str, list[str]]:
            time.sleep(seconds)
            return "rank", ["ok"]

        def exit(self) -> None:
            os._exit(1)

    ready, hung, dying = Rank.remote(), Rank.remote(), Rank.remote()
    assert gather_ranks([ready.run.remote(0)], 60) == [["ok"]]
    start = time.monotonic()
    assert gather_ranks([ready.run.remote(0), hung.run.remote(3600)], 2) is None
    assert time.monotonic() - start < 30
    assert gather_ranks([dying.exit.remote()], 60) is None


def test_rank_zero_stops_waiting_for_a_rank_stream_that_hangs_ends_or_dies(local_ray):
    """`RankStreams`, rank 0's wait for each problem of its other ranks' streams: their outcomes
    by index, in whatever order they came, or None for a rank that has not yielded the problem
    in time, ended its stream without it, or whose process is gone."""

    @ray.remote(num_cpus=0, max_restarts=0)
    class Rank:
        def stream(self, then: str) -> Iterator[tuple[str, int, str]]:
            yield "rank", 1, "one"
            yield "rank", 0, "zero"
            if then == "hang":
                time.sleep(3600)
            elif then == "exit":
                os._exit(1)

    ranks = [Rank.remote() for _ in range(3)]

    def streams(*calls: tuple[int, str]) -> RankStreams:
        return RankStreams(
            [ranks[r].stream.options(num_returns="streaming").remote(then) for r, then in calls]
        )

    try:
        ended = streams((0, "end"))
        assert ended.outcomes(0, 60) == ["zero"] and ended.outcomes(1, 0) == ["one"]
        assert ended.outcomes(2, 60) is None
        hung = streams((1, "hang"), (0, "end"))
        assert hung.outcomes(0, 60) == ["zero", "zero"]
        start = time.monotonic()
        assert hung.outcomes(2, 2) is None
        assert 1.9 < time.monotonic() - start < 30  # it waited its 2 s, no more
        assert streams((2, "exit")).outcomes(2, 60) is None
    finally:
        for r in ranks:
            ray.kill(r, no_restart=True)


class TinyRank(EvalWorker):
    """A replica's rank on the tiny model, built by hand (no model load, no process group: these
    ranks share no collectives); rank 0 when it is given the other ranks' handles. Problem "a"
    is accepted at its CoT answer; "b" is scored only once the file `gate` exists (the driver
    makes it when "a" has reached it; a minute without it: "b" raises). `b_rewards`: what this
    rank scores "b" (another rank's answers then differ from rank 0's)."""

    def __init__(self, b_rewards: list[float], gate: str, ranks: list[Any] | None = None) -> None:
        from conftest import ScriptedReward, tiny_loaded

        from pipeline.method.solver import Solver

        def script(problem: Any) -> list[float]:
            if problem.problem_id == "a":
                return [0.0]
            deadline = time.monotonic() + 60
            while not os.path.exists(gate):
                if time.monotonic() > deadline:
                    raise RuntimeError("b was scored before a reached the driver")
                time.sleep(0.05)
            return b_rewards

        cfg = Config(method=["latentseek"], rho=0.5, lr=1.0, max_iters=2, max_new_tokens=8,
                     reward_threshold=-0.2, device="cpu")  # fmt: skip
        self.name, self.rank, self.ranks = "tiny", 0, list(ranks or [])
        self.settings, self.start_error, self.model_digest = cfg, "", {}
        self.solver = Solver(cfg, tiny_loaded(), reward=ScriptedReward(script))


def test_a_replica_streams_each_agreed_problem_as_it_ends(local_ray, tmp_path):
    """Rank 0 of a replica hands each problem to the driver once its other rank has ended that
    problem too, not the batch at the end: "b" is scored only after "a" has reached the driver
    (a replica that returned its batch at the end would wait a minute, then "b" raises). Rank 1
    scores "b" otherwise, so "b" arrives as the ranks' disagreement, in place of rank 0's."""
    gate = tmp_path / "a-arrived"
    rank = ray.remote(num_cpus=0, max_restarts=0)(TinyRank)
    rank1 = rank.remote([-1.0, -0.5], str(gate))
    rank0 = rank.remote([-1.0], str(gate), [rank1])
    problems = [problem(pid="a"), problem("What is 2+3?", "5", "b")]
    try:
        arrived = {}
        for ref in rank0.stream.options(num_returns="streaming").remote("latentseek", problems):
            _, i, outcome = ray.get(ref)
            arrived[problems[i].problem_id] = outcome
            gate.touch()
    finally:
        ray.kill(rank0, no_restart=True)
        ray.kill(rank1, no_restart=True)
    assert list(arrived) == ["a", "b"]
    assert isinstance(arrived["a"], ProblemResult) and arrived["a"].stop_reason == "cot_accepted"
    assert arrived["b"] == (
        "RuntimeError: tensor-parallel ranks disagree: rank 1's answers to this problem differ "
        "from rank 0's"
    )


def test_progress_moves_per_problem_before_the_task_returns(tmp_path, local_ray, capfd):
    """One worker, one task of 4 LatentSeek problems whose reward takes a second per answer, so
    that they finish seconds apart: the bar counts each problem as it finishes (1/4, 2/4, 3/4
    can only come from the worker's progress reports, since the task returns all 4 at once),
    ends at the recorded count, and MLflow's live metrics move in between too."""
    cfg = small_cfg(
        tmp_path, limit=4, workers=1, method=["latentseek"], reward="tests.faulty_reward:slow"
    )
    summary = run_evaluation(cfg, progress=True, log=lambda m: None)
    err = capfd.readouterr().err
    # capfd is not a terminal: plain progress lines (`run_id: 1/4 rec ...`), one per record here
    shown = [int(n) for n in re.findall(r"(?:\| |: )(\d+)/4 (?:\[|rec)", err)]
    assert len({1, 2, 3} & set(shown)) >= 2, f"the bar went {shown}"
    assert shown[-1] == summary.recorded == 4
    problems = RecordStore(summary.run_dir).read_problems()
    iterations = re.findall(r"iters=(\d+)", err)
    assert iterations and int(iterations[-1]) == problems["iterations"].sum() > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary.tracking_uri)
    done = client.get_metric_history(summary.mlflow_run_id, "progress/done")
    assert any(0 < m.value < 4 for m in done), [m.value for m in done]
    assert done[-1].value == 4


@pytest.fixture
def fail_mark(tmp_path, monkeypatch) -> Path:
    """While this file exists, tests.faulty_reward:fails_while_marked fails on gsm8k-1 (set
    before `local_ray` starts Ray, whose workers inherit the variable: the session's Ray, if one
    runs, is shut down so that the next one starts with it)."""
    mark = tmp_path / "fail-while-this-exists"
    mark.touch()
    monkeypatch.setenv("LATENTSEEK_TEST_FAIL_MARK", str(mark))
    if ray.is_initialized():
        ray.shutdown()
    return mark


@pytest.mark.slow
def test_a_failed_row_is_retried_on_resume_and_superseded_once(tmp_path, fail_mark, local_ray):
    cfg = small_cfg(
        tmp_path, limit=3, method=["latentseek"], workers=1, max_retries=0,
        reward="tests.faulty_reward:fails_while_marked",
    )  # fmt: skip
    first = run_evaluation(cfg, progress=False, log=lambda m: None)
    assert first.failures == 1 and first.recorded == 3
    fail_mark.unlink()  # the failure was transient

    logged: list[str] = []
    again = run_evaluation(cfg, progress=False, log=logged.append)
    assert "resuming r1: 2 of 3 records already there; retrying 1 recorded with an error" in logged
    assert (again.recorded, again.skipped, again.failures) == (1, 2, 0)
    problems = assert_exactly_once(again.run_dir, 3, ["latentseek"])
    assert (problems["error"] == "").all()
    iterations = RecordStore(again.run_dir).read_iterations()
    assert not iterations.duplicated(["problem_id", "method", "iteration"]).any()
    retried = iterations[iterations["problem_id"] == "gsm8k-1"]
    assert list(retried["iteration"]) == list(range(len(retried)))  # the new row's, once


def test_resume_with_different_settings_is_refused(tmp_path):
    cfg = small_cfg(tmp_path, limit=2, method=["cot"], workers=1)
    # The run's two problems, recorded as a first invocation left them: it then finishes without
    # starting a worker, and its config.yaml holds what dtype=auto resolves to on this CPU.
    rows = [ProblemResult(f"gsm8k-{i}", "gsm8k", "cot", "?", "0") for i in range(2)]
    RecordStore(tmp_path / "out" / "r1").write(rows, "r1", cfg.model, "w0")
    assert run_evaluation(cfg, progress=False, log=lambda m: None).skipped == 2
    config_text = (tmp_path / "out" / "r1" / "config.yaml").read_text()
    for change, match in [
        ({"max_new_tokens": 9}, "max_new_tokens: 8 -> 9"),
        ({"batch_size": 3}, "batch_size: 2 -> 3"),
        ({"dtype": "bfloat16"}, "dtype: 'float32' in config.yaml -> 'bfloat16'"),
    ]:
        with pytest.raises(RunError, match=match) as err:
            run_evaluation(cfg.replace(**change), progress=False, log=lambda m: None)
        assert "run_id=<new>" in str(err.value)
    # dtype=float32 is what dtype=auto resolved to on CPU: the same run, resumed
    again = run_evaluation(cfg.replace(dtype="float32"), progress=False, log=lambda m: None)
    assert again.recorded == 0 and again.skipped == 2
    assert (tmp_path / "out" / "r1" / "config.yaml").read_text() == config_text
    assert len(read_invocations(tmp_path / "out" / "r1")) == 2  # refused ones are not logged
    assert len(RecordStore(tmp_path / "out" / "r1").read_problems()) == 2


def test_a_worker_reports_what_its_model_files_hold(local_ray):
    """What the driver compares with its own digest before sending work (pipeline.run.pool
    check_model_digests; a node with another copy stops the start: tests/test_scheduler_faults)."""
    from pipeline.engine.model import model_digest
    from pipeline.run.workers import EvalWorker

    cfg = small_cfg(Path("unused"), method=["cot"])
    info = EvalWorker(cfg).info()
    assert info["start_error"] == ""
    assert info["model_digest"] == model_digest(cfg) and info["model_digest"]["sha256"]


# --- which Ray (no Ray started) ---------------------------------------------------------------


def test_a_local_run_starts_a_ray_of_its_own_beside_any_other(monkeypatch):
    """ray_address='' asks Ray for a new local instance (address='local'). Ray's default
    (address=None) joins $RAY_ADDRESS or the cluster `ray start` left on this node and then
    refuses num_cpus (seen here: a sweep beside another session's cluster ended with "When
    connecting to an existing cluster, num_cpus and num_gpus must not be provided")."""
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # what `export RAY_ADDRESS` for submit leaves
    start_ray(Config(workers=3))
    start_ray(Config(ray_address="auto"))
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] >= 3
    assert calls[1]["address"] == "auto" and "num_cpus" not in calls[1]


# --- the batch deadline (no Ray) ------------------------------------------------------------


def test_batch_deadline_from_the_config():
    """batch_timeout_s: > 0 seconds, 0 none, -1 derived (pipeline.run.scheduler.batch_timeout):
    600 s + s/step x (problems x answers x tokens per answer / batch_size + one problem's chain)."""
    cfg = Config(max_new_tokens=100, max_iters=2, reward="psrm", batch_size=4)
    # latentseek, psrm (no verifier): 3 answers of 100 tokens; (8*3*100/4 + 3*100) steps x 2 s
    assert batch_timeout(cfg, "latentseek", 8) == 600 + 2.0 * (600 + 300)
    # cot: 1 answer, no reward; (8*100/4 + 100) steps x 2 s
    assert batch_timeout(cfg, "cot", 8) == 600 + 2.0 * (200 + 100)
    # self-reward, 4 verifiers of 50 tokens each, on GPU workers at 0.25 s a step:
    # (8*3*(100 + 4*50)/4 + 3*(100 + 50)) steps
    gpu = cfg.replace(reward="self", verifier_max_new_tokens=50, gpus_per_worker=1.0)
    assert batch_timeout(gpu, "latentseek", 8) == 600 + 0.25 * (1800 + 450)
    assert batch_timeout(cfg.replace(batch_timeout_s=0.0), "latentseek", 8) is None
    assert batch_timeout(cfg.replace(batch_timeout_s=30.0), "latentseek", 8) == 30.0
    with pytest.raises(ConfigError, match="batch_timeout_s=-2.0: must be -1"):
        cfg.replace(batch_timeout_s=-2.0)


# --- devices and resume, decided before anything starts (no Ray) ----------------------------


@pytest.mark.parametrize(
    "device, gpus, expected",
    [
        ("auto", 0, "cpu"),
        ("cpu", 0, "cpu"),
        ("auto", 1, "cuda"),
        ("auto", 0.5, "cuda"),
        ("cuda", 1, "cuda"),
        ("cuda:1", 2, "cuda:1"),
        ("cuda", 0, "needs gpus_per_worker > 0"),
        ("cuda:0", 0, "needs gpus_per_worker > 0"),
        ("cpu", 1, "reserves GPUs that the workers would not use"),
        ("cuda:1", 1, "sees 1 GPU"),
        ("cudax", 1, "allowed: auto, cpu, cuda, cuda:N"),
    ],
)
def test_worker_device_decision(device, gpus, expected):
    if expected in ("cpu", "cuda", "cuda:1"):
        assert worker_device(device, gpus) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            worker_device(device, gpus)


def _no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"device": "cuda"}, r"device='cuda' needs gpus_per_worker > 0"),
        ({"device": "cpu", "gpus_per_worker": 1.0}, r"device='cpu' with gpus_per_worker=1"),
    ],
)
def test_device_mismatch_stops_before_anything_starts(tmp_path, monkeypatch, change, match):
    _no_ray(monkeypatch)
    with pytest.raises(RunError, match=match):
        run_evaluation(small_cfg(tmp_path, **change), progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPUs")
def test_gpu_workers_on_a_machine_without_gpus_stop_before_ray(tmp_path, monkeypatch):
    _no_ray(monkeypatch)
    cfg = small_cfg(tmp_path, gpus_per_worker=1.0, workers=2)
    with pytest.raises(RunError, match=r"needs 2 GPU\(s\); this machine's local Ray has 0"):
        run_evaluation(cfg, progress=False, log=lambda m: None)


def _cpu_run_dir(tmp_path) -> tuple[Config, Path]:
    cfg = small_cfg(tmp_path)
    directory = tmp_path / "out" / "r1"
    write_config(cfg, directory)
    return cfg, directory


def test_resume_compares_resolved_device_and_dtype(tmp_path):
    cfg, directory = _cpu_run_dir(tmp_path)  # device=auto, gpus_per_worker=0, dtype=auto
    for same in [
        {"dtype": "float32"},  # what auto resolves to on CPU
        {"device": "cpu"},
        {"workers": 5, "threads": 2, "cpus_per_worker": 2, "max_retries": 3},
    ]:
        check_resume(cfg.replace(**same), directory)
    for change, match in [
        ({"dtype": "bfloat16"}, r"dtype: 'float32' in config.yaml -> 'bfloat16' now"),
        ({"gpus_per_worker": 1.0}, r"device type: 'cpu' in config.yaml -> 'cuda' now"),
        ({"batch_size": 4}, r"batch_size: 2 -> 4"),
        ({"rho": 0.2}, r"rho: 0.5 -> 0.2"),
    ]:
        with pytest.raises(RunError, match=match):
            check_resume(cfg.replace(**change), directory)
    # GPU workers with dtype=auto resolve to bfloat16: both keys are named
    with pytest.raises(RunError, match=r"device type.*'cuda'.*dtype: 'float32'.*'bfloat16'"):
        check_resume(cfg.replace(gpus_per_worker=1.0), directory)


def test_resume_compares_the_device_recorded_in_the_rows(tmp_path):
    cfg = small_cfg(tmp_path)
    directory = tmp_path / "out" / "r1"  # records, but no config.yaml (deleted, or older run)
    row = ProblemResult("gsm8k-0", "gsm8k", "cot", "q", "1", device="cuda:0", dtype="bfloat16")
    RecordStore(directory).write([row], "r1", "m", "w0")
    with pytest.raises(RunError, match=r"device type: 'cuda' in the recorded problem rows"):
        check_resume(cfg, directory)
    check_resume(cfg.replace(gpus_per_worker=1.0), directory)  # cuda + auto -> bfloat16: same
    with pytest.raises(RunError, match=r"dtype: 'bfloat16' in the recorded problem rows"):
        check_resume(cfg.replace(gpus_per_worker=1.0, dtype="float16"), directory)

    # rows of a problem that failed outside the model say nothing about where the run ran
    elsewhere = tmp_path / "out" / "r2"
    failed = ProblemResult("gsm8k-0", "gsm8k", "cot", "q", "1", error="boom")
    RecordStore(elsewhere).write([failed], "r2", "m", "w0")
    check_resume(cfg, elsewhere)
    check_resume(cfg.replace(gpus_per_worker=1.0), elsewhere)
    # rows that already mix devices cannot be resumed at all
    cpu_row = ProblemResult("gsm8k-1", "gsm8k", "cot", "q", "1", device="cpu", dtype="float32")
    RecordStore(directory).write([cpu_row], "r1", "m", "w0")
    with pytest.raises(RunError, match=r"already mix \['cpu', 'cuda'\]"):
        check_resume(cfg.replace(gpus_per_worker=1.0), directory)


def test_a_worker_that_cannot_load_its_model_stops_the_run_with_one_line(tmp_path, local_ray):
    model_dir = tmp_path / "broken-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = small_cfg(tmp_path, model=str(model_dir), workers=1, method=["cot"])
    with pytest.raises(RunError) as err:
        run_evaluation(cfg, progress=False, log=lambda m: None)
    msg = str(err.value)
    assert msg.startswith("a worker could not start: ModelError: ")
    assert str(model_dir) in msg and "\n" not in msg and "Traceback" not in msg
    # nothing written for a run that never started, but the lock its driver held
    assert [p.name for p in (tmp_path / "out" / "r1").iterdir()] == ["driver.lock"]


@pytest.mark.slow
def test_killed_driver_resumes_without_loss_or_duplicates(tmp_path):
    out = tmp_path / "out"
    args = [
        str(VENV_BIN / "latentseek"), "run", "dataset=gsm8k", "limit=10", "method=cot",
        "max_new_tokens=24", "batch_size=1", "workers=1", f"output_dir={out}", "run_id=kd",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    shards = out / "kd" / "problems"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if shards.exists() and len(list(shards.glob("part-*.parquet"))) >= 2:
                break
            assert proc.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no shard appeared in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=60)
    before = RecordStore(out / "kd").read_problems()
    assert 2 <= len(before) < 10

    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming kd: {len(before)} of 10" in done.stderr
    after = assert_exactly_once(out / "kd", 10, ["cot"])
    # The records written before the kill are kept as they were.
    merged = before.merge(after, on=["problem_id", "method"], suffixes=("_a", "_b"))
    assert (merged["final_answer_a"] == merged["final_answer_b"]).all()


def test_work_lands_on_both_nodes_of_a_two_node_cluster(tmp_path, monkeypatch):
    # Two real Ray nodes on this machine, started the way Ray's own tests do
    # (`ray.cluster_utils.Cluster`): each node's processes are this test's children, in a session
    # directory of its own, and `shutdown` ends exactly those, never another Ray of the user.
    # Everything listens on 127.0.0.1; Ray would turn a loopback address given to `ray.init`
    # into the machine's own IP, which this test keeps it from doing.
    import tempfile

    import ray._private.services as services
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the session's local Ray (conftest `local_ray`), started again on use
    monkeypatch.setattr(services, "resolve_ip_for_localhost", lambda host: host)
    node = {
        "num_cpus": 1,
        "node_ip_address": "127.0.0.1",
        "temp_dir": tempfile.mkdtemp(prefix="ray", dir="/tmp"),
    }  # short: socket paths
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False, _node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"] * 2
        cfg = small_cfg(tmp_path, limit=4, method=["cot"], ray_address=cluster.address, workers=2)
        summary = run_evaluation(cfg, progress=False, log=lambda m: None)
        problems = assert_exactly_once(summary.run_dir, 4, ["cot"])
        node_ids = {w.rsplit(":", 1)[-1] for w in problems["worker"]}
        assert len(node_ids) == 2, f"work landed on {node_ids}"
    finally:
        ray.shutdown()
        cluster.shutdown()
