"""The driver under faults, end to end and small (`jobs.chaos`, `latentseek chaos` runs a larger
one on two local nodes): the real `run_evaluation` (scheduler, record windows, MLflow, summary)
over stand-in workers that exit mid-task once, raise on a problem, return an answer Parquet
cannot encode, and cannot run a problem at all, while the driver's live MLflow metrics stall
past the batch deadline (the poison problem, the stopped worker, the sick worker and the lost
restart have their fast tests in tests/test_scheduler_faults.py; SIGTERM in tests/test_stop.py).
The full run, `slow`: the driver SIGTERM'd and resumed, MLflow stalled, a raylet killed."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

import jobs.chaos
import jobs.run
from jobs.chaos import Faults, chaos, stalled_progress
from jobs.finish import format_summary
from pipeline.config import Config

BOUND_S = 300.0  # a hang guard, far above the ~20 s this takes on 2 loaded cores
DEADLINE_S = 3.0  # batch_timeout_s: a batch that streams nothing this long has its worker killed


def test_a_small_chaos_run_records_every_problem_once_and_says_it_is_incomplete(
    tmp_path, local_ray, monkeypatch
):
    faults = Faults(
        problems={
            "problems-2": "exit_once",  # streamed results kept; only the unfinished redone
            "problems-5": "raise",  # retried elsewhere, then its error
            "problems-12": "surrogate",  # an error row, not a failed shard or run
            "problems-14": "fault",  # the workers cannot run it: an infrastructure error
        },
        seconds_per_problem=0.2,  # results keep coming while MLflow stalls
    )
    with stalled_progress(DEADLINE_S + 1.0) as stall:  # longer than a batch's deadline
        # asserts every problem recorded exactly once
        r = chaos(tmp_path, 16, faults, workers=2, batch_timeout_s=DEADLINE_S)
    assert r.records == 16 and r.wall_s < BOUND_S
    # The stall held the live metrics only: results came in meanwhile, and the one worker lost
    # is problems-2's exit (no healthy worker was killed for its deadline)
    assert stall.ended - stall.began >= DEADLINE_S + 1.0
    assert any(stall.began < t < stall.ended for t in r.outcomes_at)
    assert r.workers_lost == 1 and not any("batch_timeout_s" in line for line in r.log), r.log
    assert r.errors == {
        "problems-5": "problem",
        "problems-12": "problem",
        "problems-14": "infra",
    }
    s = r.summary
    assert s.failures == 3 and s.infra_failures == 1 and s.unrecorded == 0
    assert (
        s.incomplete and "INCOMPLETE: 0 not recorded, 1 recorded with an infra" in format_summary(s)
    )
    run = MlflowClient(tracking_uri=s.tracking_uri).get_run(s.mlflow_run_id)
    assert run.data.tags["latentseek.incomplete"] == "true"
    assert run.data.metrics["run_infra_failures"] == 1.0

    monkeypatch.setattr(jobs.run, "run_evaluation", lambda cfg, argv=None: s)
    assert jobs.run.main(Config()) == 1  # `latentseek run` exits non-zero


@pytest.mark.slow
def test_the_full_chaos_run_survives_sigterm_and_resume_an_mlflow_stall_and_a_raylet_kill(
    tmp_path, capsys
):
    """`latentseek chaos problems=40`: two local nodes; a driver SIGTERM'd after its first
    records (exit 143, MLflow KILLED), resumed (FINISHED) while its MLflow stalls past the
    deadline and the worker node's raylet is killed; every problem recorded exactly once, within
    the bound (`jobs.chaos.check`: any check that fails is a FAILED line and exit 1)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the session's local Ray (conftest `local_ray`): this run makes its own
    code = jobs.chaos.main(["problems=40", f"out={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "FAILED" not in out and "records:  40 over both drivers" in out, out
    assert "exit 143, MLflow KILLED" in out and "MLflow FINISHED" in out, out
