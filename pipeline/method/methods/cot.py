"""`cot`: greedy chain of thought, the baseline every other method is measured against."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.method.methods.base import Method

if TYPE_CHECKING:
    from pipeline.data import Problem
    from pipeline.engine.backends.base import Task
    from pipeline.method.results import ProblemResult
    from pipeline.method.solver import Solver


def cot(s: Solver, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
    out = yield from s.cot(p, prompt, r)
    r.answers = []
    r.stop_reason = out.finish_reason
    s.finish(p, r, r.cot_answer, len(out.tokens))


METHOD = Method(
    name="cot",
    title="CoT",
    task=cot,
    order=0,
    reference=True,
    default=True,
    description="greedy chain of thought",
)
