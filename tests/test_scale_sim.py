"""The driver at cluster scale, by simulation (`jobs.simulate`): the real driver
(`run_evaluation`), scheduler and record store, with stand-in Ray actors that sleep a random
lognormal latency instead of running a model, while the driver kills random busy workers (one
of them for good), stand-ins die mid-batch at random, some problem attempts raise and some
problems always raise.

What is asserted is exactness only: every problem recorded exactly once, none lost, none
duplicated, its iteration rows complete, the always-failing problems recorded with their error
after their retries. The driver's cost per batch is measured and reported (printed under `-s`,
and written to `driver_cost.json` in the test's tmp dir), never asserted: timing decides
nothing here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.simulate import Measurement, Workload, is_poison, simulate
from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.run.records import ITERATION_KEY, RecordStore


def run_simulation(tmp_path: Path, workers: int, problems: int, workload: Workload) -> Measurement:
    cfg = Config(
        method=["latentseek"],
        workers=workers,
        batch_size=8,
        task_size=8,
        max_retries=3,
        max_worker_restarts=5,
        output_dir=str(tmp_path / "out"),
        run_id="sim",
    )
    m = simulate(cfg, problems, workload)
    report = {**m.to_dict(), "workload": workload.__dict__}
    (tmp_path / "driver_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    parts = ", ".join(f"{k} {m.ms_per_batch(k):.2f}" for k in sorted(m.activity_s))
    print(
        f"\n{workers} workers, {problems} problems, {m.batches} batches in {m.wall_s:.1f} s "
        f"({m.batches_per_s:.1f} batches/s): driver busy {m.driver_ms_per_batch:.2f} ms per batch "
        f"(wall ms per batch: {parts}); {m.cpu_ms_per_batch:.2f} ms CPU of its thread, "
        f"{m.process_cpu_ms_per_batch:.2f} ms with Ray's threads; {m.kills} kills "
        f"({m.lost_for_good} for good), {m.worker_failures} batches re-queued, {m.retried} "
        f"retries; workers started in {m.startup_s:.1f} s, finished {m.finish_s:.1f} s after "
        f"the last batch -> {tmp_path / 'driver_cost.json'}"
    )
    return m


def assert_recorded_exactly_once(m: Measurement, workload: Workload, max_retries: int) -> None:
    run_dir = Path(m.run_dir)
    expected = {
        p.problem_id
        for p in load_dataset(
            Config(dataset=str(run_dir.parent / "simulated" / f"problems-{m.problems}.jsonl"))
        ).problems
    }
    assert len(expected) == m.problems
    store = RecordStore(run_dir)
    problems = store.read_problems()  # raises DuplicateRecordError on a twice-committed pair
    assert len(problems) == m.problems
    assert set(problems["problem_id"]) == expected, "a problem was lost (or one appeared)"
    assert not problems.duplicated(["problem_id", "method"]).any()
    assert set(problems["method"]) == {"latentseek"}

    # Every answer of every problem once: iteration 0 (the CoT answer), then one per iteration.
    iterations = store.read_iterations()
    assert not iterations.duplicated(ITERATION_KEY).any()
    rows = iterations.groupby("problem_id").size()
    assert (rows.reindex(problems["problem_id"]).to_numpy() == problems["iterations"] + 1).all()

    # The problems that always raise are recorded once, with their error, after their retries;
    # every other problem ran (a flaky attempt was retried until it passed).
    poison = {pid for pid in expected if is_poison(pid, workload)}
    failed = problems[problems["error"] != ""]
    assert set(failed["problem_id"]) == poison
    assert (failed["attempts"] == max_retries + 1).all()
    assert failed["error"].str.contains("always fails").all()
    assert m.failures == len(poison)
    assert m.retried >= len(poison) * max_retries


def test_driver_records_every_problem_once_while_workers_die(tmp_path, local_ray):
    """4 stand-ins, 500 problems in 63 tasks of 8; the driver kills a busy worker every 15
    batches (the second for good), stand-ins die mid-batch at random."""
    workload = Workload(
        latency_s=0.1,
        crash_rate=0.02,
        flaky_rate=0.02,
        poison_rate=0.01,
        kill_every=15,
        lose_for_good=1,
        seed=3,
    )
    m = run_simulation(tmp_path, workers=4, problems=500, workload=workload)
    assert_recorded_exactly_once(m, workload, max_retries=3)
    assert m.kills >= 2 and m.lost_for_good == 1
    assert m.worker_failures >= 1  # the worker lost for good held (or got) a batch: re-queued
    assert (tmp_path / "driver_cost.json").exists()


@pytest.mark.slow
def test_driver_at_64_workers_and_10000_problems(tmp_path, local_ray):
    """Cluster scale: 64 stand-ins, 10,000 problems in 1,250 tasks of 8, a mean batch
    latency of 1 s (64 batches/s asked of the driver: what ~1,300-3,800 GPU workers at 20-60 s
    a batch would ask); a busy worker killed every 100 batches (two of them for good), random
    crashes, flaky and always-failing problems. About 90 s on a 2-core machine (64 actor
    processes take ~30 s to start there)."""
    workload = Workload(
        latency_s=1.0,
        crash_rate=0.003,
        flaky_rate=0.01,
        poison_rate=0.002,
        kill_every=100,
        lose_for_good=2,
        seed=7,
    )
    m = run_simulation(tmp_path, workers=64, problems=10_000, workload=workload)
    assert_recorded_exactly_once(m, workload, max_retries=3)
    assert m.kills >= 10 and m.lost_for_good == 2
    assert m.worker_failures >= 2
