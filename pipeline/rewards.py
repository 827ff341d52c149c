"""Rewards: self-verification, the PSRM oracle, and user rewards (SPEC.md §2).

Every reward scores a batch of (problem, answer) pairs and reports the tokens it spent.

- `SelfReward`: the solver model judges an answer with the verifier templates of
  `configs/prompts/verifiers.yaml` (four by default, weights 2/1/2/1). All verifier prompts of all
  pending answers are decoded together in one greedy batch, capped at `verifier_max_new_tokens`.
  The verdict is read from the *generated* text only (the last `Verdict: True|False`); a
  verifier without a verdict counts as False and is counted. reward = -(weights of False
  verdicts [+ format_penalty when the format rule is on and the answer lacks the format]) / (sum
  of weights), in [-1, 0] without the format rule.
- `PsrmReward`: 0 if the extracted final answer equals the gold answer (math-verify), else -1.
- `CallableReward`: any `module:function` taking `(problem, answer) -> float`.

Departures from the reference code: verifiers decode greedily with a token cap instead of the
model's default (often sampling) generation config for up to 4096 tokens; the verdict regex never
sees the prompt (so a silent verifier cannot "approve" by matching the prompt's own example);
verifiers of all answers run in one batch instead of one after another.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.data import Problem
from pipeline.generation import GenerationRequest, GenerationResult, Generator
from pipeline.grading import Grade, extract_answer, is_equivalent
from pipeline.prompts import VerifierSet, render_chat


@dataclass
class RewardResult:
    value: float
    verdicts: dict[str, bool | None] = field(default_factory=dict)  # self-reward only
    unparsed: int = 0  # verifiers that gave no verdict
    prompt_tokens: int = 0  # verifier prompt tokens run through the model
    generated_tokens: int = 0  # verifier tokens decoded
    token_passes: int = 0
    forward_calls: int = 0


class Reward:
    """Scores answers. A reward that spends solver-model compute (self-reward) says which
    generations it needs (`requests`) and reads its value from their results (`result`), so
    that the caller decides how they are batched; `score` does both for a batch at once."""

    name = "reward"
    generator: Generator | None = None

    def requests(self, problem: Problem, answer: str) -> list[GenerationRequest]:
        """The generations this reward needs to score `answer` (none for model-free rewards)."""
        return []

    def result(
        self, problem: Problem, answer: str, outputs: Sequence[GenerationResult]
    ) -> RewardResult:
        """The reward of `answer`, given the results of `requests(problem, answer)`."""
        raise NotImplementedError

    def score(self, problems: Sequence[Problem], answers: Sequence[str]) -> list[RewardResult]:
        """Score a batch: every request of every answer decoded together in one batch."""
        wanted = [self.requests(p, a) for p, a in zip(problems, answers)]
        flat = [r for rs in wanted for r in rs]
        outputs = iter(self.generator.generate(flat) if flat else [])
        return [
            self.result(p, a, [next(outputs) for _ in rs])
            for p, a, rs in zip(problems, answers, wanted)
        ]


def has_format(answer: str, style: str) -> bool:
    """The format rule: a boxed answer for the boxed style, a JSON final answer for json."""
    if style == "boxed":
        return "\\boxed" in answer or "\\fbox" in answer
    return '"final answer"' in answer.lower() and extract_answer(answer, "json") is not None


def combine_verdicts(
    verdicts: Sequence[bool | None],
    weights: Sequence[float],
    format_ok: bool = True,
    format_penalty: float = 0.0,
) -> float:
    """-(weights of False or missing verdicts [+ penalty if the format fails]) / sum(weights)."""
    failed = sum(w for v, w in zip(verdicts, weights) if v is not True)
    if not format_ok:
        failed += format_penalty
    return -failed / sum(weights)


class SelfReward(Reward):
    name = "self"

    def __init__(
        self,
        generator: Generator,
        verifiers: VerifierSet,
        max_new_tokens: int,
        style: str,
        format_rule: bool = False,
    ) -> None:
        self.generator = generator
        self.verifiers = verifiers
        self.max_new_tokens = max_new_tokens
        self.style = style
        self.format_rule = format_rule

    def requests(self, problem: Problem, answer: str) -> list[GenerationRequest]:
        tok = self.generator.tokenizer
        return [
            GenerationRequest(
                prompt_ids=render_chat(tok, v.messages(problem.question, answer)),
                max_new_tokens=self.max_new_tokens,
            )
            for v in self.verifiers.verifiers
        ]

    def result(
        self, problem: Problem, answer: str, outputs: Sequence[GenerationResult]
    ) -> RewardResult:
        tok = self.generator.tokenizer
        texts = [tok.decode(o.tokens, skip_special_tokens=True) for o in outputs]
        verdicts = [self.verifiers.parse_verdict(t) for t in texts]
        weights = [v.weight for v in self.verifiers.verifiers]
        format_ok = not self.format_rule or has_format(answer, self.style)
        return RewardResult(
            value=combine_verdicts(verdicts, weights, format_ok, self.verifiers.format_penalty),
            verdicts={v.name: d for v, d in zip(self.verifiers.verifiers, verdicts)},
            unparsed=sum(d is None for d in verdicts),
            prompt_tokens=sum(o.prompt_tokens for o in outputs),
            generated_tokens=sum(len(o.tokens) for o in outputs),
            token_passes=sum(o.token_passes for o in outputs),
            forward_calls=max((o.forward_calls for o in outputs), default=0),
        )


class PsrmReward(Reward):
    """The perfect sparse reward model: an oracle upper bound that reads the gold answer."""

    name = "psrm"

    def __init__(self, style: str, grader: Callable[[Problem, str], Grade] | None = None) -> None:
        self.style = style
        self.grader = grader  # (problem, answer) -> Grade; None: extract and compare (default)

    def _correct(self, problem: Problem, answer: str) -> bool:
        if self.grader is not None:
            return self.grader(problem, answer).correct
        return is_equivalent(extract_answer(answer, self.style), problem.gold)

    def result(
        self, problem: Problem, answer: str, outputs: Sequence[GenerationResult] = ()
    ) -> RewardResult:
        return RewardResult(0.0 if self._correct(problem, answer) else -1.0)


class CallableReward(Reward):
    def __init__(self, fn: Callable[[Problem, str], float], name: str) -> None:
        self.fn = fn
        self.name = name

    def result(
        self, problem: Problem, answer: str, outputs: Sequence[GenerationResult] = ()
    ) -> RewardResult:
        value = float(self.fn(problem, answer))
        if not math.isfinite(value):
            raise ValueError(f"reward {self.name} returned {value} for {problem.problem_id}")
        return RewardResult(value)


def import_callable(path: str) -> Callable[..., Any]:
    """'package.module:function' -> the function, with an error that names what is missing."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward={path!r}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward={path!r}: {module_name} has no callable {attr!r}")
    return fn


def build_reward(
    name: str,
    generator: Generator,
    verifiers: VerifierSet,
    style: str,
    verifier_max_new_tokens: int,
    format_rule: bool,
    grader: Callable[[Problem, str], Grade] | None = None,
) -> Reward:
    """`grader` decides PSRM's correctness (the solver's grader, so that PSRM and the recorded
    correctness agree, in both compat modes)."""
    if name == "self":
        return SelfReward(generator, verifiers, verifier_max_new_tokens, style, format_rule)
    if name == "psrm":
        return PsrmReward(style, grader)
    return CallableReward(import_callable(name), name)
