"""Derived sweep points (`analysis.derive`) against executed ones: a point read off a larger run's
records must equal the run made with that setting, `return_best` included."""

from __future__ import annotations

import pytest
from conftest import ScriptedReward

from analysis.derive import derived_metrics
from analysis.tables import summary_table
from pipeline.data import load_dataset
from pipeline.run.records import RecordStore, read_records

COMPARED = ["final_accuracy", "mean_final_reward", "mean_iterations", "problems"]


def _run(make_solver, cfg, script, run_dir):
    # r0 = -0.5 is below tau (-0.2), so each problem iterates; step 1 scores worse (-1) than the
    # CoT, step 2 better (-0.3): with return_best the answer after one step is the CoT's, after
    # two the step-2 answer. Without return_best they are the step-1 and step-2 answers.
    problems = load_dataset(cfg).problems
    results = make_solver(cfg, reward=ScriptedReward(script)).run("latentseek", problems)
    RecordStore(run_dir).write(results, run_dir.name, "embedded", worker="w0")
    cfg.save(run_dir / "config.yaml")
    return results


@pytest.mark.parametrize("return_best", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_derived_k_equals_the_executed_k(tmp_path, make_solver, embedded_cfg, return_best):
    cfg = embedded_cfg.replace(
        dataset="gsm8k", limit=2, max_new_tokens=16, rho=0.5, reward="psrm", max_iters=2,
        reward_threshold=-0.2, return_best=return_best,
    )  # fmt: skip
    script = [-0.5, -1.0, -0.3]
    larger = _run(make_solver, cfg, script, tmp_path / "k2")
    executed = _run(make_solver, cfg.replace(max_iters=1), script, tmp_path / "k1")
    assert all(r.iterations == 2 for r in larger) and all(r.iterations == 1 for r in executed)

    derived = derived_metrics(tmp_path / "k2", cfg, {"max_iters": 1})["latentseek"]
    (row,) = summary_table(read_records(tmp_path / "k1")[0]).to_dict("records")
    for key in COMPARED:
        assert derived[key] == pytest.approx(row[key]), key
    # the rule is visible: the kept answer after one step scored -0.5 (the CoT) or -1 (step 1)
    assert row["mean_final_reward"] == pytest.approx(-0.5 if return_best else -1.0)
    assert [r.final_answer for r in executed] == [
        r.cot_answer if return_best else r.iteration_stats[0].answer for r in larger
    ]
