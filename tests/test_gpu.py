"""GPU checks (`make test-gpu`): the engine on CUDA in bf16. Deselected by default; they need a
CUDA device and fail (not skip) under `-m gpu` when there is none."""

import pytest
import torch

from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.solver import Solver

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_solver():
    assert torch.cuda.is_available(), "make test-gpu needs a CUDA device"
    cfg = Config(device="cuda", reward="psrm", max_new_tokens=64, max_iters=2, rho=0.2, limit=4)
    return Solver.from_config(cfg)


def test_loads_in_bfloat16_on_cuda(gpu_solver):
    assert gpu_solver.loaded.dtype == torch.bfloat16
    assert gpu_solver.loaded.device.type == "cuda"


def test_latentseek_runs_a_batch_on_cuda(gpu_solver):
    problems = load_dataset(gpu_solver.cfg).problems
    results = gpu_solver.run("latentseek", problems)
    assert all(not r.error for r in results)
    assert all(r.cot_length > 0 for r in results)
    assert all(len(r.rewards) == r.iterations for r in results)


def test_batched_cot_matches_one_at_a_time_on_cuda(gpu_solver):
    problems = load_dataset(gpu_solver.cfg).problems
    together = gpu_solver.run("cot", problems)
    alone = [gpu_solver.run("cot", [p])[0] for p in problems]
    same = sum(a.final_answer == b.final_answer for a, b in zip(together, alone))
    assert same >= len(problems) - 1  # bf16 rounding may flip a near-tie once


def test_captured_states_give_back_the_decoded_tokens_on_cuda(gpu_solver):
    # argmax(W z_t) = x_t in bf16 on the GPU: decoding and the latent step share head_logits.
    from pipeline.generation import GenerationRequest

    problems = load_dataset(gpu_solver.cfg).problems
    prompts = [gpu_solver.prompt(p)[0] for p in problems]
    outs = gpu_solver.backend.generate([GenerationRequest(p, 32, capture=32) for p in prompts])
    for out in outs:
        tokens = gpu_solver.head(out.hidden).argmax(-1).tolist()
        assert tokens == out.tokens[: len(tokens)]


def test_reference_mode_runs_with_z_in_bf16_on_cuda(gpu_solver):
    cfg = gpu_solver.cfg.replace(compat="reference")
    solver = Solver(cfg, gpu_solver.loaded)
    results = solver.run("latentseek", load_dataset(cfg).problems[:2])
    assert all(
        not r.error and r.dtype == "bfloat16" and r.device.startswith("cuda") for r in results
    )
