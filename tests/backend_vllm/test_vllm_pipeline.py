"""backend=vllm through the rest of the pipeline (`make test-vllm`): every registered method runs
on it, LatentSeek's trajectory equals the native engine's where their CoTs agree, and
`latentseek run backend=vllm` records every method through a Ray worker."""

from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.method.methods import all_methods
from pipeline.run.records import RecordStore

pytestmark = pytest.mark.vllm

SMALL = dict(max_new_tokens=24, verifier_max_new_tokens=8, max_iters=2, rho=0.2, lr=0.05,
             n_samples=2, limit=3)  # fmt: skip


def _problems():
    return load_dataset(Config(dataset="gsm8k", limit=3)).problems


@pytest.mark.parametrize("method", list(all_methods()))
def test_every_method_runs_on_vllm(vllm_loaded, vllm_backend, vllm_cfg, method):
    from pipeline.method.solver import Solver

    cfg = vllm_cfg.replace(method=[method], reward="self", backend="vllm", **SMALL)
    results = Solver(cfg, vllm_loaded, backend=vllm_backend).run(method, _problems())
    assert [r.error for r in results] == ["", "", ""]
    assert all(r.final_answer and r.cot_answer for r in results)
    if method == "latentseek":  # z belongs to the CoT's tokens
        assert [r.capture_mismatch for r in results] == [0, 0, 0]


def test_capture_mismatch_is_zero_with_z_from_the_prefill_in_fp32(
    vllm_loaded, vllm_backend, vllm_cfg
):
    from pipeline.method.solver import Solver

    cfg = vllm_cfg.replace(method=["latentseek"], reward="self", backend="vllm", **SMALL)
    before, vllm_backend.capture_on = vllm_backend.capture_on, "prefill"
    try:
        results = Solver(cfg, vllm_loaded, backend=vllm_backend).run("latentseek", _problems())
    finally:
        vllm_backend.capture_on = before
    assert [r.capture_mismatch for r in results] == [0, 0, 0]


def test_latentseek_trajectory_equals_native_where_the_cot_agrees(
    vllm_loaded, vllm_backend, vllm_cfg
):
    from pipeline.method.solver import Solver

    cfg = vllm_cfg.replace(method=["latentseek"], reward="psrm", **SMALL)
    native = Solver(cfg, vllm_loaded).run("latentseek", _problems())
    served = Solver(cfg.replace(backend="vllm"), vllm_loaded, backend=vllm_backend).run(
        "latentseek", _problems()
    )
    agree = [(a, b) for a, b in zip(native, served) if a.cot_answer == b.cot_answer]
    assert agree, "no CoT agreed: nothing to compare"
    for a, b in agree:
        assert (a.answers, a.rewards, a.final_answer, a.update_length) == (
            b.answers, b.rewards, b.final_answer, b.update_length,
        ), a.problem_id  # fmt: skip
    assert sum(a.iterations for a, _ in agree) > 0  # latent steps were compared, not only CoTs


def test_a_ray_run_on_backend_vllm_records_each_problem_once(tmp_path, local_ray):
    # The driver, a Ray worker and its vLLM engine together, on the CoT and LatentSeek (every
    # method on this engine: test_every_method_runs_on_vllm, in this process).
    from jobs.run import run_evaluation

    methods = ["cot", "latentseek"]
    cfg = Config(
        backend="vllm", method=methods, reward="self", workers=1, batch_size=8, dtype="float32",
        output_dir=str(tmp_path), run_id="v", **{**SMALL, "limit": 2},
    )  # fmt: skip
    summary = run_evaluation(cfg, progress=False, log=lambda msg: None)
    problems = RecordStore(summary.run_dir).read_problems()
    assert sorted(problems["method"]) == sorted(methods * 2)
    assert (problems["error"] == "").all(), problems["error"].tolist()
