"""What a method declares about itself: the one place the rest of the code learns it from.

A method is one module of `pipeline/method/methods/` holding a `METHOD = Method(...)`: its name, its
task (the generator the batching drivers run, `pipeline.engine.batching`), what it records, whether a
sweep may read its points off a larger run, and how reports label it. The registry
(`pipeline.method.methods`) finds the modules; configs, the driver, sweeps and `analysis/` ask it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pipeline.data import Problem
    from pipeline.engine.backends.base import Task
    from pipeline.method.results import ProblemResult
    from pipeline.method.solver import Solver

# task(solver, problem, prompt ids, the result to fill) -> the problem's task
TaskFactory = Callable[["Solver", "Problem", list[int], "ProblemResult"], "Task"]


@dataclass(frozen=True)
class Derivation:
    """How a sweep reads this method's result at a smaller value of `key` off a run with a
    larger one (`pipeline.run.sweep`, `analysis.derive`).

    - `steps`: the method records one iteration row per step (`key` is the step budget); the
      answer after k steps is the one at step min(k, steps run), or, with `return_best`, the
      best-rewarded of steps 0..k (`analysis.curves.latent_curve`).
    - `samples`: the method draws `key` samples seeded per sample index, so the first n of N are
      the n-sample run's; `pick(row, n)` says which of the first n the method would return,
      from the problem's record alone (a dict of PROBLEM_SCHEMA columns).
    """

    key: str
    kind: Literal["steps", "samples"]
    pick: Callable[[dict[str, Any], int], int] | None = None  # samples: the index returned


def one_answer(cfg: Any) -> int:
    return 1


@dataclass(frozen=True)
class Method:
    name: str  # the config value (`method=`), the records' `method` column, MLflow's tag
    title: str  # what reports call it ("LatentSeek")
    task: TaskFactory
    order: int  # its row in tables (smaller first)
    settings: tuple[str, ...] = ()  # config keys besides the common ones that change its results
    uses_reward: bool = False  # the configured reward changes its results (and labels it)
    iterations: bool = False  # records an iteration row per step k >= 1 (curves after k steps)
    samples: bool = False  # records `samples` (curves with n <= N samples)
    derive: Derivation | None = None  # a key whose smaller values a sweep may read off a run
    reference: bool = False  # the greedy CoT every other method's gain is measured against
    cot_pass: bool = False  # its `cot_correct` is its own greedy CoT pass (a paired reference)
    default: bool = False  # run when the config names no method (`method` key's default)
    # config key naming a prompt file it reads -> that file's loader (preflight loads it, resume
    # compares its content)
    files: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    description: str = ""  # one line for the docs
    # answers one problem may decode at most, under a config (the driver's batch deadline)
    max_answers: Callable[[Any], int] = one_answer


def problem_seed(seed: int, problem_id: str, index: int = 0) -> int:
    """A seed per (run seed, problem, sample): independent of batch composition and order."""
    return zlib.crc32(f"{seed}/{problem_id}/{index}".encode()) & 0x7FFFFFFF


def select_best(rewards: Sequence[float]) -> int:
    """Index of the highest reward; ties go to the earliest."""
    best = 0
    for j, value in enumerate(rewards):
        if value > rewards[best]:
            best = j
    return best
