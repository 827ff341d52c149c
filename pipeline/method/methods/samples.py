"""What the sampling methods (`bon`, `sc`) share: N answers drawn with per-sample seeds."""

from __future__ import annotations

from collections.abc import Generator as PyGenerator
from typing import TYPE_CHECKING, Any

from pipeline.method.methods.base import problem_seed

if TYPE_CHECKING:
    from pipeline.data import Problem
    from pipeline.method.results import ProblemResult
    from pipeline.method.solver import Solver

# Config keys that change what a sampling method draws.
SAMPLING_SETTINGS = ("n_samples", "temperature", "top_p", "seed")


def draw_samples(
    s: Solver, p: Problem, prompt: list[int], r: ProblemResult
) -> PyGenerator[Any, Any, list[int]]:
    """Decode `n_samples` answers into `r.samples` (sample j seeded by (seed, problem, j), so
    the first n of N are the n-sample run's); returns their token lengths."""
    cfg = s.cfg
    outs = yield [
        s.answer_request(
            prompt,
            sample=True,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=problem_seed(cfg.seed, p.problem_id, j),
        )
        for j in range(cfg.n_samples)
    ]
    for out in outs:
        s.charge_solver(r, out)
    r.samples = [s.decode(o.tokens) for o in outs]
    r.cot_answer, r.cot_length = r.samples[0], len(outs[0].tokens)
    r.cot_correct = s.correct(p, r.samples[0])
    r.sample_correct = [r.cot_correct] + [s.correct(p, t) for t in r.samples[1:]]
    return [len(o.tokens) for o in outs]
