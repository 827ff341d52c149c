"""`bon`: Best-of-N. N sampled answers, each scored by the reward; the highest wins (ties: the
earliest sample)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.method.methods.base import Derivation, Method, select_best
from pipeline.method.methods.samples import SAMPLING_SETTINGS, draw_samples

if TYPE_CHECKING:
    from pipeline.data import Problem
    from pipeline.engine.backends.base import Task
    from pipeline.method.results import ProblemResult
    from pipeline.method.solver import Solver


def bon(s: Solver, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
    lengths = yield from draw_samples(s, p, prompt, r)
    wanted = [s.reward.requests(p, a, j) for j, a in enumerate(r.samples)]
    flat = [req for reqs in wanted for req in reqs]
    outputs = iter((yield flat) if flat else [])
    for answer, reqs in zip(r.samples, wanted):
        rr = s.reward.result(p, answer, [next(outputs) for _ in reqs])
        s.charge_reward(r, rr)
        r.sample_rewards.append(rr.value)
    best = select_best(r.sample_rewards)
    r.final_reward = r.sample_rewards[best]
    r.stop_reason = "best_of_n"
    s.finish(p, r, r.samples[best], lengths[best])


def pick(row: dict[str, Any], n: int) -> int:
    """The sample Best-of-n returns among the first n recorded ones."""
    return select_best(list(row["sample_rewards"])[:n])


METHOD = Method(
    name="bon",
    title="BoN",
    task=bon,
    order=10,
    settings=SAMPLING_SETTINGS,
    uses_reward=True,
    samples=True,
    derive=Derivation("n_samples", "samples", pick),
    description="Best-of-N: N sampled answers, the one with the highest reward",
    max_answers=lambda cfg: cfg.n_samples,
)
