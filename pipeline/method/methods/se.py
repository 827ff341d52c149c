"""`se`: the unguided latent search of the paper's Table 5 ("SE: Stochastic Exploration", arXiv
2505.13308 v3, §3.5): instead of gradient steps, Gaussian noise eps ~ N(0, se_sigma2 I) is added
once to the CoT's latents, z <- z + eps, which are decoded and continued like one LatentSeek step.

The paper states only the noise and its variances (0.5, 0.75, 1.0). This project's choices,
made to match a LatentSeek step as closely as possible: the noise goes on the same Z (the first
U = min(floor(rho T), max_update_length) post-norm hidden states), SE runs only where LatentSeek
would iterate (initial reward <= tau, U > 0), and its one answer is returned whatever its
reward. The noise is drawn on the CPU in float32 from a generator seeded per (seed, problem), so
it is the same on every device; Z is float32 (the model's dtype under compat=reference).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from pipeline.engine.backends.base import GenerationRequest
from pipeline.method.methods.base import Method, problem_seed
from pipeline.method.results import IterationStats

if TYPE_CHECKING:
    from pipeline.data import Problem
    from pipeline.engine.backends.base import Task
    from pipeline.method.results import ProblemResult
    from pipeline.method.solver import Solver


def perturbed(z: torch.Tensor, sigma2: float, seed: int) -> torch.Tensor:
    """z + eps, eps ~ N(0, sigma2 I) drawn on the CPU in float32 from `seed`: [U, D] -> [U, D]."""
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
    return z + (math.sqrt(sigma2) * noise).to(device=z.device, dtype=z.dtype)


def se(s: Solver, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
    cfg = s.cfg
    cot = yield from s.cot(p, prompt, r, capture=cfg.max_update_length, keep_prompt_state=True)
    rr = yield from s.score(p, r.cot_answer)
    s.charge_reward(r, rr)
    r.initial_reward = r.final_reward = rr.value
    u = min(int(cfg.rho * len(cot.tokens)), cfg.max_update_length)
    r.update_length = u
    if rr.value > cfg.reward_threshold or u == 0:
        r.stop_reason = "cot_accepted" if u else "no_update"
        s.finish(p, r, r.cot_answer, len(cot.tokens))
        return
    z_dtype = s.loaded.dtype if s.rules.reference else torch.float32
    z = cot.hidden[:u].to(z_dtype)  # [U, D]
    with torch.no_grad():
        before = s.head(z).argmax(dim=-1)  # [U] the CoT's own tokens
        after = s.head(perturbed(z, cfg.se_sigma2, problem_seed(cfg.seed, f"{p.problem_id}/se")))
        prefix = after.argmax(dim=-1).tolist()  # [U]
    (cont,) = yield [
        GenerationRequest(
            prompt,
            s.rules.continuation_max_new_tokens(len(prefix)),
            prefix_ids=prefix,
            prompt_state=cot.prompt_state,
            stop_ids=s.rules.continuation_stop_ids,
        )
    ]
    s.charge_solver(r, cont, forced=len(prefix))
    tokens = prefix + cont.tokens
    text = s.decode(tokens)
    rr = yield from s.score(p, text, 1)
    s.charge_reward(r, rr)
    r.iterations, r.rewards, r.answers, r.final_reward = 1, [rr.value], [text], rr.value
    r.iteration_stats.append(
        IterationStats(
            iteration=1,
            reward=rr.value,
            answer=text,
            correct=s.correct(p, text),
            tokens=len(tokens),
            tokens_changed=int((torch.tensor(prefix) != before.cpu()).sum()),
        )
    )
    s.iteration_done(p, 1)
    r.stop_reason = "explored"
    s.finish(p, r, text, len(tokens))


METHOD = Method(
    name="se",
    title="SE",
    task=se,
    order=50,
    settings=("se_sigma2", "rho", "max_update_length", "reward_threshold", "seed"),
    uses_reward=True,
    iterations=True,
    cot_pass=True,
    description="the paper's unguided latent search: Gaussian noise added once to the CoT's Z",
    max_answers=lambda cfg: 2,  # the CoT, then the explored answer
)
