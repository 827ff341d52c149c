"""Rewards: self-verification, the PSRM oracle, and user rewards (SPEC.md §2).

Every reward scores a batch of (problem, answer) pairs and reports the tokens it spent.

- `SelfReward`: the solver model judges an answer with the verifier templates of
  `configs/prompts/verifiers.yaml` (the paper's four, verbatim, weights 2/1/2/1; each prompt is
  the user message alone). reward = -(weights of False verdicts [+ format_penalty when the format
  rule is on and the answer lacks the format]) / (sum of weights), in [-1, 0] without the format
  rule (down to -8/6 with it, as the official code).
- `PsrmReward`: 0 if the extracted final answer equals the gold answer (math-verify), else -1.
- `CallableReward`: any `module:function` taking `(problem, answer) -> float`.

The self-reward's two modes:

| | default (`compat=none`) | `compat=reference` (the official code's `"self"` branch) |
|---|---|---|
| decoding | greedy | the model's `generation_config` (sampling where it says so), seeded |
| budget | `verifier_max_new_tokens` (1024) | `verifier_max_new_tokens` (the official 4096) |
| verdict read from | the generated text only: the last `<marker> True/False`, quotes, backticks, braces, `\\boxed{}` and bold around the word allowed | prompt + answer decoded together (special tokens skipped): the text after the *last* marker, `*` removed, lower-cased; "true" in it, else "false", else the same test on its first word, else False |
| a verifier without a verdict | False, and counted as unparsed | whatever the text after the last marker says |
| format rule | a boxed (or JSON) answer for the prompt's style | the official regex `\\boxed{(.*)}` |

The official rule reads a verifier that writes no marker from its own prompt: the last marker of
the calculation_check prompt is followed by "True", so a silent calculation_check approves; the
other three prompts' last markers are followed by "False", but as the whole rest of the text is
searched for "true" first, any "true" in the verifier's answer (even "untrue") approves. Seeds:
a sampled verifier draws from a generator seeded by (seed, problem, verifier, the call's index: 0
for the CoT answer, k for iteration k or sample k), so runs repeat (the official code seeds once
per process, so its draws depend on everything decoded before).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.data import Problem
from pipeline.engine.backends.base import GenerationRequest, GenerationResult
from pipeline.method.grading import Grade, extract_answer, is_equivalent
from pipeline.method.methods.base import problem_seed
from pipeline.method.prompts import VerifierSet, render_chat


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

    def requests(self, problem: Problem, answer: str, index: int = 0) -> list[GenerationRequest]:
        """The generations this reward needs to score `answer` (none for model-free rewards);
        `index` numbers the answers scored for one problem (0: the first), for seeding."""
        return []

    def result(
        self, problem: Problem, answer: str, outputs: Sequence[GenerationResult]
    ) -> RewardResult:
        """The reward of `answer`, given the results of `requests(problem, answer)`."""
        raise NotImplementedError

    def score(
        self, problems: Sequence[Problem], answers: Sequence[str], backend: Any = None
    ) -> list[RewardResult]:
        """Score a batch: every request of every answer decoded together in one static batch of
        `backend` (`Backend.generate`; not needed by model-free rewards)."""
        wanted = [self.requests(p, a) for p, a in zip(problems, answers, strict=True)]
        flat = [r for rs in wanted for r in rs]
        outputs = iter(backend.generate(flat) if flat else [])
        return [
            self.result(p, a, [next(outputs) for _ in rs])
            for p, a, rs in zip(problems, answers, wanted)
        ]


OFFICIAL_FORMAT = re.compile(r"\\boxed{(.*)}", re.DOTALL)  # `--rule_format_string boxed`


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


def official_verdict(text: str, marker: str) -> bool:
    """The official verdict of a verifier's whole decoded sequence (prompt and answer): the text
    after the last `marker` (any case), `*` removed, lower-cased; True if it holds "true", False
    if it holds "false", else the same test on its first word, else False."""
    found = re.search(r".*" + re.escape(marker.lower()) + r"(.*)", text, re.DOTALL | re.IGNORECASE)
    answer = found.group(1).strip() if found else ""
    answer = answer.replace("*", "").strip().lower()
    if not answer:
        return False
    if "true" in answer:
        return True
    # The official code then tries "false", then both on the first word, then gives False; the
    # first word is part of the text already searched, so only "false" or nothing is left.
    return False


@dataclass(frozen=True)
class VerifierDecoding:
    """How a verifier decodes: greedy by default; the model's generation config in reference."""

    max_new_tokens: int
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_ids: frozenset[int] | None = None  # None: the backend's EOS ids

    @classmethod
    def of_model(
        cls, generation_config: Any, tokenizer: Any, max_new_tokens: int
    ) -> VerifierDecoding:
        """What `model.generate(**inputs, max_new_tokens=...)` does with the model's own
        `generation_config` (missing fields: transformers' defaults)."""

        def get(name: str, default: Any) -> Any:
            value = getattr(generation_config, name, None)
            return default if value is None else value

        eos = get("eos_token_id", tokenizer.eos_token_id)
        stops = frozenset(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        sample = bool(get("do_sample", False))
        return cls(
            max_new_tokens=max_new_tokens,
            sample=sample,
            temperature=float(get("temperature", 1.0)) if sample else 1.0,
            top_p=float(get("top_p", 1.0)) if sample else 1.0,
            top_k=int(get("top_k", 50)) if sample else 0,
            repetition_penalty=float(get("repetition_penalty", 1.0)),
            stop_ids=stops or None,
        )


class SelfReward(Reward):
    name = "self"

    def __init__(
        self,
        tokenizer: Any,
        verifiers: VerifierSet,
        max_new_tokens: int,
        style: str,
        format_rule: bool = False,
        *,
        reference: bool = False,
        decoding: VerifierDecoding | None = None,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.verifiers = verifiers
        self.max_new_tokens = max_new_tokens
        self.style = style
        self.format_rule = format_rule
        self.reference = reference  # compat=reference: the official verdict and format rule
        self.decoding = decoding or VerifierDecoding(max_new_tokens)
        self.seed = seed

    def _prompts(self, problem: Problem, answer: str) -> list[list[int]]:
        """Each verifier's prompt ids: its user message through the chat template, tokenized by
        the template call (an `<|im_end|>` kept in the answer text is read back as that token,
        as in the official code)."""
        tok = self.tokenizer
        return [
            render_chat(tok, v.messages(problem.question, answer)) for v in self.verifiers.verifiers
        ]

    def requests(self, problem: Problem, answer: str, index: int = 0) -> list[GenerationRequest]:
        d = self.decoding
        return [
            GenerationRequest(
                prompt_ids=prompt,
                max_new_tokens=d.max_new_tokens,
                stop_ids=d.stop_ids,
                sample=d.sample,
                temperature=d.temperature,
                top_p=d.top_p,
                top_k=d.top_k,
                repetition_penalty=d.repetition_penalty,
                seed=problem_seed(self.seed, f"{problem.problem_id}/verifier/{v.name}", index),
            )
            for v, prompt in zip(self.verifiers.verifiers, self._prompts(problem, answer))
        ]

    def result(
        self, problem: Problem, answer: str, outputs: Sequence[GenerationResult]
    ) -> RewardResult:
        tok, marker = self.tokenizer, self.verifiers.marker
        texts = [tok.decode(o.tokens, skip_special_tokens=True) for o in outputs]
        if self.reference:
            whole = [
                tok.decode([*prompt, *o.tokens], skip_special_tokens=True)
                for prompt, o in zip(self._prompts(problem, answer), outputs)
            ]
            verdicts: list[bool | None] = [official_verdict(t, marker) for t in whole]
            unparsed = sum(marker.lower() not in t.lower() for t in texts)
            format_ok = not self.format_rule or OFFICIAL_FORMAT.search(answer) is not None
        else:
            verdicts = [self.verifiers.parse_verdict(t) for t in texts]
            unparsed = sum(d is None for d in verdicts)
            format_ok = not self.format_rule or has_format(answer, self.style)
        weights = [v.weight for v in self.verifiers.verifiers]
        return RewardResult(
            value=combine_verdicts(verdicts, weights, format_ok, self.verifiers.format_penalty),
            verdicts={v.name: d for v, d in zip(self.verifiers.verifiers, verdicts)},
            unparsed=unparsed,
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
    """'package.module:function' -> the function, with an error that names what is missing.

    Importing runs the module's code, whatever it raises: any exception of the import is the
    user's module failing to import, reported as one ValueError."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward={path!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a user module may raise anything on import
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ValueError(f"reward={path!r}: cannot import module {module_name!r}: {why}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward={path!r}: {module_name} has no callable {attr!r}")
    return fn


def build_reward(
    name: str,
    tokenizer: Any,
    verifiers: VerifierSet,
    style: str,
    verifier_max_new_tokens: int,
    format_rule: bool,
    grader: Callable[[Problem, str], Grade] | None = None,
    *,
    reference: bool = False,
    generation_config: Any = None,
    seed: int = 0,
) -> Reward:
    """`grader` decides PSRM's correctness (the solver's grader, so that PSRM and the recorded
    correctness agree, in both compat modes). `reference` (compat=reference): the self-reward
    decodes with the model's `generation_config` and reads verdicts the official way."""
    if name == "self":
        decoding = (
            VerifierDecoding.of_model(generation_config, tokenizer, verifier_max_new_tokens)
            if reference
            else VerifierDecoding(verifier_max_new_tokens)
        )
        return SelfReward(
            tokenizer, verifiers, verifier_max_new_tokens, style, format_rule,
            reference=reference, decoding=decoding, seed=seed,
        )  # fmt: skip
    if name == "psrm":
        return PsrmReward(style, grader)
    return CallableReward(import_callable(name), name)
