"""argmax(W z_t) = x_t in bf16: decoding and the latent step compute head logits with one function
(`pipeline.engine.generation.head_logits`) in the head's dtype, so the hidden states captured while
decoding give back the decoded tokens when the latent step reads them. Run on the CPU in bf16
(the precision a GPU run uses by default), on the embedded model."""

from __future__ import annotations

import functools

import pytest
import torch

from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.engine.generation import GenerationRequest, Generator, head_logits
from pipeline.engine.model import load_model
from pipeline.method.latent import latent_step
from pipeline.method.prompts import load_solver_template, render_chat
from pipeline.method.solver import Solver

CFG = dict(model="embedded", device="cpu", dtype="bfloat16", reward="psrm", method=["latentseek"])


@pytest.fixture(scope="module")
def bf16():
    return load_model(Config(**CFG))


@pytest.fixture(scope="module")
def captured(bf16):
    """Greedy answers of four GSM8K problems with every z_t captured, in bf16."""
    gen = Generator(bf16.model, bf16.tokenizer)
    template = load_solver_template("boxed")
    problems = load_dataset(Config(dataset="gsm8k", limit=4)).problems
    prompts = [render_chat(bf16.tokenizer, template.messages(p.question)) for p in problems]
    return gen, gen.generate([GenerationRequest(p, 48, capture=48) for p in prompts])


def test_model_is_bf16(bf16):
    assert bf16.dtype == torch.bfloat16
    assert bf16.model.get_output_embeddings().weight.dtype == torch.bfloat16


def test_captured_states_give_back_the_decoded_tokens(captured):
    gen, outs = captured
    for out in outs:
        tokens = head_logits(gen.lm_head, out.hidden).argmax(dim=-1)  # [T]
        assert tokens.tolist() == out.tokens[: len(tokens)]


def test_a_float32_copy_of_the_head_would_not(captured):
    # Why one function: the float32 product of the same bf16 weights picks another token at a few
    # positions (measured: 7 of the 192 of GSM8K rows 0-3), so a latent step computed that way
    # would start from a prefix that is not the answer it optimises.
    gen, outs = captured
    weight = gen.lm_head.weight.float()  # [V, D]
    differ = sum(
        int(
            (
                (out.hidden.float() @ weight.T).argmax(-1)
                != torch.tensor(out.tokens[: len(out.hidden)])
            ).sum()
        )
        for out in outs
    )
    assert differ > 0


@pytest.mark.parametrize("reference", [False, True])
def test_zero_reward_step_keeps_the_prefix(captured, reference):
    # r = 0: the loss and its gradient are zero, Adam does not move Z, so the new prefix must be
    # the CoT's own first U tokens, in either mode's numerics (Z float32, or Z in bf16). Two of
    # the four answers, U = 12 of their 48 tokens: a step's backward through the bf16 head takes
    # seconds on a CPU (torch's bf16 matmul of [U, V] by [V, D]: 3.3 s at U = 48 here, 0.08 s
    # in float32), the same on each answer.
    gen, outs = captured
    head = functools.partial(head_logits, gen.lm_head)
    for out in outs[:2]:
        u = min(12, len(out.hidden))
        dtype = torch.bfloat16 if reference else torch.float32
        z = out.hidden[None, :u].to(dtype).clone().requires_grad_(True)  # [1, U, D]
        step = latent_step(
            z, None, torch.zeros(1), head, torch.optim.Adam([z], lr=0.05), reference=reference
        )
        assert step.tokens[0].tolist() == out.tokens[:u]
        assert int(step.tokens_changed[0]) == 0


@pytest.mark.parametrize("compat", ["none", "reference"])
def test_latentseek_runs_in_bf16_and_records_it(bf16, compat):
    cfg = Config(**CFG, compat=compat, max_new_tokens=16, max_iters=1, rho=0.25, lr=0.05)
    (result,) = Solver(cfg, bf16).run("latentseek", load_dataset(cfg.replace(limit=1)).problems)
    assert result.error == ""
    assert result.iterations == 1 and len(result.iteration_stats) == 1
    assert (result.device, result.dtype) == ("cpu", "bfloat16")
