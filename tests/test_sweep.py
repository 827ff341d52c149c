"""Sweeps (`pipeline/run/sweep.py` plans, `jobs/sweep.py` runs): a 2 x 2 grid on a tiny setting with a
real local Ray, the embedded model and a real MLflow store; resume; derived points checked against
the records they are read from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from jobs.sweep import run_sweep
from pipeline.config import ConfigError
from pipeline.run.records import RecordStore, read_records
from pipeline.run.rundir import read_invocations
from pipeline.run.sweep import load_sweep, plan

SWEEP = """
name: tiny
set:
  dataset: gsm8k
  limit: 2
  method: [latentseek]
  reward: psrm
  rho: 0.5
  max_new_tokens: 8
  batch_size: 2
  workers: 1
grid:
  lr: [0.01, 0.2]
  max_iters: [1, 2]
"""


def write_sweep(tmp_path: Path, text: str = SWEEP) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_plan_derives_smaller_k_from_the_largest(tmp_path):
    points = plan(load_sweep(write_sweep(tmp_path)), [f"output_dir={tmp_path}"])
    executed = [p.run_id for p in points if p.executed]
    assert executed == ["tiny-lr_0.01-max_iters_2", "tiny-lr_0.2-max_iters_2"]
    derived = {p.run_id: (p.derived_from, p.derived) for p in points if not p.executed}
    assert derived == {
        "tiny-lr_0.01-max_iters_1": ("tiny-lr_0.01-max_iters_2", {"max_iters": 1}),
        "tiny-lr_0.2-max_iters_1": ("tiny-lr_0.2-max_iters_2", {"max_iters": 1}),
    }
    assert all(p.cfg.run_id == p.run_id for p in points)


def test_plan_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="swept"):
        plan(load_sweep(write_sweep(tmp_path)), ["lr=0.5"])
    with pytest.raises(ConfigError, match="unknown sweep keys"):
        load_sweep(write_sweep(tmp_path, "name: x\ngrids: {lr: [1]}\n"))
    with pytest.raises(ConfigError, match="rho=2.0"):
        plan(load_sweep(write_sweep(tmp_path, "name: x\ngrid: {rho: [0.1, 2.0]}\n")))


def _children(uri: str, parent: str) -> dict:
    """name -> the runs nested under `parent`."""
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
    )
    return {r.info.run_name: r for r in runs}


def test_sweep_runs_derives_and_resumes(tmp_path, local_ray):
    path = write_sweep(tmp_path)
    out = tmp_path / "out"
    first = run_sweep(path, [f"output_dir={out}"], progress=False, log=lambda m: None)
    sweep_dir = out / "tiny"
    assert first.worker_starts == 1  # one model load for both executed points

    manifest = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    assert [p["status"] for p in manifest["points"]] == ["done"] * 4
    for run_id in first.seconds:  # the executed points: 2 problems each, exactly once
        problems = RecordStore(sweep_dir / run_id).read_problems()
        assert sorted(problems["problem_id"]) == ["gsm8k-0", "gsm8k-1"]

    # MLflow: the sweep's run, a run per point named after what varies (executed and derived
    # alike), and under each a run per method with the metric names of any other run.
    children = _children(first.tracking_uri, first.mlflow_run_id)
    names = [
        "lr=0.01 max_iters=1",
        "lr=0.01 max_iters=2",
        "lr=0.2 max_iters=1",
        "lr=0.2 max_iters=2",
    ]
    assert sorted(children) == names
    assert sorted(r.data.tags["latentseek.run_id"] for r in children.values()) == sorted(
        p.run_id for p in first.points
    )
    methods = {n: _children(first.tracking_uri, r.info.run_id) for n, r in children.items()}
    assert all(list(m) == [f"{n} · latentseek"] for n, m in methods.items())
    point_metrics = {n: m[f"{n} · latentseek"].data.metrics for n, m in methods.items()}
    # the same names everywhere; a derived point leaves out the timings it cannot know
    executed_names = set(point_metrics["lr=0.2 max_iters=2"])
    assert set(point_metrics["lr=0.01 max_iters=2"]) == executed_names
    derived_names = set(point_metrics["lr=0.2 max_iters=1"])
    assert executed_names - derived_names == {"mean_wall_seconds", "problems_per_hour"}
    assert {"final_accuracy", "accuracy_at_iteration", "mean_reward_at_iteration"} <= set(
        point_metrics["lr=0.2 max_iters=1"]
    )
    # A derived point's metrics are the records of its executed point read at K = 1: the
    # iteration-1 answer of each problem that iterated, the final answer of one that did not.
    problems, iterations = read_records(sweep_dir / "tiny-lr_0.2-max_iters_2")
    at_1 = iterations[iterations["iteration"] == 1].set_index("problem_id")["correct"]
    expected = [
        bool(at_1[pid]) if pid in at_1.index else bool(final)
        for pid, final in zip(problems["problem_id"], problems["final_correct"])
    ]
    derived = point_metrics["lr=0.2 max_iters=1"]
    assert derived["final_accuracy"] == pytest.approx(sum(expected) / len(expected))
    assert derived["mean_iterations"] == pytest.approx(problems["iterations"].clip(upper=1).mean())
    # its curve is the executed point's up to k = 1 (step = k), ending at its final accuracy
    client = MlflowClient(first.tracking_uri)
    derived_run = methods["lr=0.2 max_iters=1"]["lr=0.2 max_iters=1 · latentseek"]
    curve = client.get_metric_history(derived_run.info.run_id, "accuracy_at_iteration")
    assert sorted(m.step for m in curve) == [0, 1]
    assert max(curve, key=lambda m: m.step).value == pytest.approx(derived["final_accuracy"])
    assert (sweep_dir / "report" / "report.md").is_file()
    # The report's scaling laws on the sweep's run: with 2 problems each law says why it refused.
    refusals = {k: v for k, v in client.get_run(first.mlflow_run_id).data.params.items()
                if k.startswith("law.")}  # fmt: skip
    assert "law.LatentSeek_PSRM_lr_0.01.accuracy_k.refused" in refusals
    assert set(refusals.values()) == {"2 problems (a law needs 8)"}

    # Re-running the same sweep redoes nothing: no new records, no new MLflow runs.
    shards = sorted(p.name for p in (sweep_dir / "tiny-lr_0.01-max_iters_2" / "problems").iterdir())
    again = run_sweep(path, [f"output_dir={out}"], progress=False, log=lambda m: None)
    assert again.worker_starts == 0  # nothing to run: no worker was started
    after = sorted(p.name for p in (sweep_dir / "tiny-lr_0.01-max_iters_2" / "problems").iterdir())
    assert after == shards
    assert len(read_invocations(sweep_dir / "tiny-lr_0.01-max_iters_2")) == 2
    assert again.mlflow_run_id == first.mlflow_run_id
    assert sorted(_children(again.tracking_uri, again.mlflow_run_id)) == sorted(children)
    experiment = client.get_run(first.mlflow_run_id).info.experiment_id
    assert len(client.search_runs([experiment])) == 1 + 4 + 4  # sweep, points, method runs


def test_a_point_the_plan_adds_gets_the_sweeps_name(tmp_path):
    # No point has both maxima (max_iters 2 and n_samples 2), so the plan adds one to execute;
    # it is named after the whole sweep, dashes and all, like the points the file lists.
    text = (
        "name: my-big-sweep\nset: {method: [bon, latentseek], limit: 1}\n"
        "points:\n  - {max_iters: 2, n_samples: 1}\n  - {max_iters: 1, n_samples: 2}\n"
    )
    points = plan(load_sweep(write_sweep(tmp_path, text)), [f"output_dir={tmp_path}"])
    (added,) = [p for p in points if p.executed]
    assert added.run_id == "my-big-sweep-max_iters_2-n_samples_2" == added.cfg.run_id
    assert {p.derived_from for p in points if not p.executed} == {added.run_id}


def test_values_added_to_a_grid_keep_the_points_already_run(tmp_path):
    grid = "name: grow\nset: {{limit: 1}}\ngrid: {{lr: {}, max_iters: [1, 2]}}\n"
    before = plan(load_sweep(write_sweep(tmp_path, grid.format("[0.1, 0.2]"))))
    after = plan(load_sweep(write_sweep(tmp_path, grid.format("[0.1, 0.2, 0.3]"))))
    assert {p.run_id for p in before} < {p.run_id for p in after}
    assert [p.run_id for p in after if p.run_id not in {q.run_id for q in before}] == [
        "grow-lr_0.3-max_iters_2", "grow-lr_0.3-max_iters_1",
    ]  # fmt: skip
