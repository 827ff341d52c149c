"""`latentseek`: SPEC.md §1 with any reward; the latent step itself is `pipeline.method.latent`.

For one problem: the greedy CoT with z_t captured and its reward r0; stop unless r0 <= tau,
U = min(floor(rho T), max_update_length) > 0 and K > 0; then up to K rounds of (latent step on
Z = z_1..z_U, the new prefix argmax(W z_t), a continuation from prompt + prefix, its reward),
stopping as soon as the reward exceeds tau. The answer returned is the last one (the
reference), or the best-rewarded one with `return_best` (ties: the earliest).

Forced prefix tokens are fed as they are, even if one of them is EOS (as the official code).
"""

from __future__ import annotations

from collections.abc import Generator as PyGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.engine.backends.base import GenerationRequest, GenerationResult
from pipeline.method.latent import hidden_rms, latent_step
from pipeline.method.methods.base import Derivation, Method, problem_seed
from pipeline.method.results import IterationStats

if TYPE_CHECKING:
    from pipeline.data import Problem
    from pipeline.engine.backends.base import Task
    from pipeline.method.results import ProblemResult
    from pipeline.method.solver import Solver

LATENT_SETTINGS = (
    "lr", "rho", "max_iters", "lr_relative", "reward_threshold", "grad_clip", "sample_update",
    "return_best", "max_update_length",
)  # fmt: skip


@dataclass
class Search:
    """One problem's latent search between rounds."""

    cot: GenerationResult  # the CoT pass (its captured z and prompt handle)
    z: torch.Tensor  # [1, U, D] the trainable hidden states
    optimizer: torch.optim.Optimizer
    sampler: torch.Generator | None  # sample_update only
    reward: float  # the reward of the current answer
    best: tuple[float, str, int]  # (reward, text, length) of the best answer so far
    tokens: list[int]  # the current answer's tokens


def latentseek(s: Solver, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
    capture = s.cfg.max_update_length
    cot = yield from s.cot(p, prompt, r, capture=capture, keep_prompt_state=True)
    rr = yield from s.score(p, r.cot_answer)
    s.charge_reward(r, rr)
    r.initial_reward = rr.value
    search = start(s, p, r, cot, rr.value)
    if search is not None:
        for k in range(1, s.cfg.max_iters + 1):
            if (yield from step(s, p, prompt, r, search, k)):
                break
    settle(s, p, r, search, cot)


def start(
    s: Solver, p: Problem, r: ProblemResult, cot: GenerationResult, r0: float
) -> Search | None:
    """U, and the search's state; None (with the stop reason) when no round runs."""
    cfg = s.cfg
    u = min(int(cfg.rho * len(cot.tokens)), cfg.max_update_length)
    r.update_length = u
    if r0 > cfg.reward_threshold:
        r.stop_reason = "cot_accepted"
    elif u == 0:
        r.stop_reason = "no_update"
    elif cfg.max_iters == 0:
        r.stop_reason = "max_iters"
    else:
        z_dtype = s.loaded.dtype if s.rules.reference else torch.float32
        z = cot.hidden[None, :u].to(z_dtype).clone().requires_grad_(True)  # [1, U, D]
        lr = cfg.lr * (hidden_rms(z) if cfg.lr_relative else 1.0)
        sampler = None
        if cfg.sample_update:
            sampler = torch.Generator(device=z.device)
            sampler.manual_seed(problem_seed(cfg.seed, p.problem_id))
        best = (r0, r.cot_answer, len(cot.tokens))
        return Search(cot, z, torch.optim.Adam([z], lr=lr), sampler, r0, best, list(cot.tokens))
    return None


def step(
    s: Solver, p: Problem, prompt: list[int], r: ProblemResult, search: Search, k: int
) -> PyGenerator[Any, Any, bool]:
    """Round k: the latent step, the continuation from the new prefix, its reward. Returns True
    when the search ends here (reward above tau, K reached, or a non-finite loss)."""
    cfg = s.cfg
    with torch.enable_grad():
        out = latent_step(
            search.z,
            None,
            torch.tensor([search.reward], device=search.z.device),
            s.head,
            search.optimizer,
            sample=cfg.sample_update,
            grad_clip=cfg.grad_clip,
            generator=search.sampler,
            reference=s.rules.reference,
        )
    if not bool(out.finite[0]):
        r.stop_reason = "nan_loss"
        return True
    prefix = out.tokens[0].tolist()
    (cont,) = yield [
        GenerationRequest(
            prompt,
            s.rules.continuation_max_new_tokens(len(prefix)),
            prefix_ids=prefix,
            prompt_state=search.cot.prompt_state,
            stop_ids=s.rules.continuation_stop_ids,
        )
    ]
    s.charge_solver(r, cont, forced=len(prefix))
    search.tokens = prefix + cont.tokens
    text = s.decode(search.tokens)
    rr = yield from s.score(p, text, k)
    s.charge_reward(r, rr)
    r.iterations = k
    r.rewards.append(rr.value)
    r.answers.append(text)
    r.iteration_stats.append(
        IterationStats(
            iteration=k,
            reward=rr.value,
            answer=text,
            correct=s.correct(p, text),
            tokens=len(search.tokens),
            loss=float(out.loss[0]),
            grad_norm=float(out.grad_norm[0]),
            tokens_changed=int(out.tokens_changed[0]),
            mean_logprob=float(out.mean_logprob[0]),
        )
    )
    s.iteration_done(p, k)
    if rr.value > search.best[0]:
        search.best = (rr.value, text, len(search.tokens))
    search.reward = rr.value
    if rr.value > cfg.reward_threshold:
        r.stop_reason = "threshold"
        return True
    if k == cfg.max_iters:
        r.stop_reason = "max_iters"
    return False


def settle(
    s: Solver, p: Problem, r: ProblemResult, search: Search | None, cot: GenerationResult
) -> None:
    """The returned answer: the last one (reference), or the best-rewarded (`return_best`)."""
    if search is None:
        r.final_reward = r.initial_reward
        s.finish(p, r, r.cot_answer, len(cot.tokens))
    elif s.cfg.return_best:
        r.final_reward, text, length = search.best
        s.finish(p, r, text, length)
    else:
        r.final_reward = r.rewards[-1] if r.rewards else r.initial_reward
        s.finish(p, r, r.answers[-1] if r.answers else r.cot_answer, len(search.tokens))


METHOD = Method(
    name="latentseek",
    title="LatentSeek",
    task=latentseek,
    order=40,
    settings=LATENT_SETTINGS,
    uses_reward=True,
    iterations=True,
    derive=Derivation("max_iters", "steps"),
    cot_pass=True,
    default=True,
    description="the CoT, then a policy gradient on the hidden states behind its first rho*T tokens",
    max_answers=lambda cfg: 1 + cfg.max_iters,  # the CoT, then one per iteration
)
