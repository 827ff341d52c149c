"""The driver under faults, end to end and small (`jobs.chaos`, `latentseek chaos` runs a larger
one on two local nodes): the real `run_evaluation` (scheduler, record windows, MLflow, summary)
over stand-in workers that exit mid-task once, raise on a problem, return an answer Parquet
cannot encode, and cannot run a problem at all (the poison problem, the stopped worker, the
sick worker and the lost restart have their fast tests in tests/test_scheduler_faults.py)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

import jobs.run
from jobs.chaos import Faults, chaos
from jobs.finish import format_summary
from pipeline.config import Config

BOUND_S = 300.0  # a hang guard, far above the ~20 s this takes on 2 loaded cores


def test_a_small_chaos_run_records_every_problem_once_and_says_it_is_incomplete(
    tmp_path, local_ray, monkeypatch
):
    faults = Faults(
        problems={
            "problems-2": "exit_once",  # streamed results kept; only the unfinished redone
            "problems-5": "raise",  # retried elsewhere, then its error
            "problems-12": "surrogate",  # an error row, not a failed shard or run
            "problems-14": "fault",  # the workers cannot run it: an infrastructure error
        }
    )
    r = chaos(tmp_path, 16, faults, workers=2)  # asserts every problem recorded exactly once
    assert r.records == 16 and r.wall_s < BOUND_S
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
