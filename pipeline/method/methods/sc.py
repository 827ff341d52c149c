"""`sc`: self-consistency. N sampled answers, the majority of the extracted answers wins
(answers grouped by equivalence; ties: the group that appeared first; samples without an answer
do not vote)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.method.grading import extract_answer, same_answer
from pipeline.method.methods.base import Derivation, Method
from pipeline.method.methods.samples import SAMPLING_SETTINGS, draw_samples

if TYPE_CHECKING:
    from pipeline.data import Problem
    from pipeline.engine.backends.base import Task
    from pipeline.method.results import ProblemResult
    from pipeline.method.solver import Solver


def sc(s: Solver, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
    lengths = yield from draw_samples(s, p, prompt, r)
    r.sample_groups = answer_groups([extract_answer(t, s.style) for t in r.samples])
    winner = majority(r.sample_groups)
    r.stop_reason = "majority" if winner is not None else "no_answer"
    pick_ = 0 if winner is None else winner
    s.finish(p, r, r.samples[pick_], lengths[pick_])


def answer_groups(extracted: Sequence[str | None]) -> list[int]:
    """Each sample's group of equivalent answers (numbered in order of first appearance), -1
    for a sample without an answer."""
    firsts: list[int] = []  # the first sample of each group
    groups = []
    for j, ans in enumerate(extracted):
        if ans is None:
            groups.append(-1)
            continue
        group = next((g for g, i in enumerate(firsts) if same_answer(extracted[i], ans)), None)
        if group is None:
            group = len(firsts)
            firsts.append(j)
        groups.append(group)
    return groups


def majority(groups: Sequence[int]) -> int | None:
    """Index of the first sample of the most common group, or None if no sample has an answer.
    Ties go to the group whose first member came first."""
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for j, g in enumerate(groups):
        if g < 0:
            continue
        counts[g] = counts.get(g, 0) + 1
        first.setdefault(g, j)
    if not counts:
        return None
    top = max(counts.values())
    return min(first[g] for g, c in counts.items() if c == top)


def majority_vote(extracted: Sequence[str | None]) -> int | None:
    """Index of a sample of the most common answer (grouped by equivalence), or None."""
    return majority(answer_groups(extracted))


def pick(row: dict[str, Any], n: int) -> int:
    """The sample self-consistency returns among the first n recorded ones."""
    winner = majority(list(row["sample_groups"])[:n])
    return 0 if winner is None else winner


METHOD = Method(
    name="sc",
    title="SC",
    task=sc,
    order=20,
    settings=SAMPLING_SETTINGS,
    samples=True,
    derive=Derivation("n_samples", "samples", pick),
    description="self-consistency: N sampled answers, the majority of the extracted answers",
    max_answers=lambda cfg: cfg.n_samples,
)
