"""One worker's engine: a loaded model, its generation backend, the prompts, grader and reward,
and `Solver.run`, which runs any registered method (`pipeline.method.methods`) on a batch of problems.

The methods are written once per problem as tasks (`pipeline.engine.batching`); the helpers here are
what they share: the prompt and its budget, the answer request, decoding the answer text,
scoring with the reward, grading, and charging compute to the problem's record.

Decisions the spec leaves open (documented in docs/method.md), in the default mode:
- `max_new_tokens` caps the whole answer, so a continuation after a U-token prefix gets
  `max_new_tokens - U` tokens and LatentSeek answers have the same budget as CoT answers.
  `compat=reference` follows the official code instead (`pipeline.method.compat.DecodeRules`).
- `wall_seconds` of a problem is its batch's wall time from the previous problem's end to its
  own (problems finish one by one and are streamed as they do; the batch's add up to its time).
- `flops` is an estimate: 2 x parameters x token-passes (attention's quadratic term ignored).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from collections.abc import Generator as PyGenerator
from typing import Any

import torch

from pipeline.benchmarks import prompt_suffix
from pipeline.data import Problem
from pipeline.engine.backends import make_backend
from pipeline.engine.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    Task,
    capture_mismatch,
)
from pipeline.engine.model import LoadedModel, load_model
from pipeline.method.compat import decode_rules, make_grader
from pipeline.method.grading import GRADE_STATUSES, Grade, GradingError
from pipeline.method.methods import get_method
from pipeline.method.prompts import load_solver_template, load_verifiers, render_chat
from pipeline.method.results import ProblemResult
from pipeline.method.rewards import Reward, RewardResult, build_reward


class Solver:
    """Owns one loaded model, its backend, the prompt templates, the grader and the reward."""

    def __init__(
        self,
        cfg: Any,
        loaded: LoadedModel,
        reward: Reward | None = None,
        backend: Backend | None = None,
        agree: Callable[[float], float] | None = None,
    ) -> None:
        self.cfg = cfg
        # On a rank of a tensor-parallel replica every reward is rank 0's (`rank0_value`), so
        # that all ranks take the same steps; elsewhere the value itself.
        if agree is None and getattr(cfg, "tensor_parallel", 1) > 1:
            from pipeline.engine.shards import rank0_value

            agree = rank0_value
        self.agree = agree or (lambda value: value)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.backend = backend or make_backend(getattr(cfg, "backend", "native"), loaded, cfg)
        self.rules = decode_rules(
            cfg.compat, cfg.max_new_tokens, loaded.tokenizer, self.backend.eos_ids
        )
        self.template = load_solver_template(cfg.prompt)
        self.style = self.template.style
        self.grader = make_grader(cfg.compat, self.style)
        self.verifiers = load_verifiers(cfg.verifier_prompts)
        self.reward = reward or build_reward(
            cfg.reward,
            self.tokenizer,
            self.verifiers,
            self.style,
            cfg.verifier_budget,
            cfg.format_rule,
            grader=self.grade,
            reference=self.rules.reference,
            generation_config=getattr(loaded.model, "generation_config", None),
            seed=cfg.seed,
        )
        self._on_iteration: Callable[[str, int], None] | None = None  # during `run` only
        # A grade is a fact, decided once: (problem id, text) -> its grade, during `run` only,
        # so the reward, an iteration's correctness and the final row read the same decision.
        self._grades: dict[tuple[str, str], Grade] = {}
        self._grading_errors: dict[str, str] = {}

    @property
    def head(self) -> Any:
        """The LM head, [..., D] -> [..., V] logits (`Backend.logits`)."""
        return self.backend.logits

    @classmethod
    def from_config(cls, cfg: Any) -> Solver:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        return cls(cfg, load_model(cfg))

    def reconfigure(self, cfg: Any) -> Solver:
        """A solver for `cfg` (a sweep's next point) on this solver's model, which it replaces:
        it keeps this backend when the backend `serves(cfg)` as it is (one serving engine per
        process for its whole life), and otherwise closes it before the new one starts."""
        serves = getattr(self.backend, "serves", None)
        if serves is not None and serves(cfg):
            return Solver(cfg, self.loaded, backend=self.backend)
        self.close()
        return Solver(cfg, self.loaded)

    def close(self) -> None:
        """Free the backend's engine, if it holds one (the model stays loaded)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    # -------------------------------------------------------------------------------------
    def run(
        self,
        method: str,
        problems: Sequence[Problem],
        on_problem_done: Callable[[ProblemResult], None] | None = None,
        on_iteration: Callable[[str, int], None] | None = None,
    ) -> list[ProblemResult]:
        """Run `method` on a batch; problems that cannot run are returned with `error` set.

        `on_problem_done(result)` as each problem's task ends, with its row final (device,
        dtype, grade status, FLOPs, wall time): a worker streams it to the driver from there
        (`pipeline.run.workers`); `on_iteration(problem_id, k)` as a method ends its k-th
        iteration (`iteration_done`). A problem's `wall_seconds` is the batch's wall time since
        the previous problem finished (so they add up to the batch's), not its own latency."""
        task = get_method(method).task
        results = [self._blank(method, p) for p in problems]
        device, dtype = str(self.loaded.device), str(self.loaded.dtype).removeprefix("torch.")
        last = [time.perf_counter()]

        def done(r: ProblemResult) -> None:
            r.device, r.dtype = device, dtype
            r.grade_status, failure = self._grade_status(r.problem_id)
            if failure and not r.error:
                r.error, r.stop_reason = failure, "error"
            now = time.perf_counter()
            r.compute.wall_seconds, last[0] = now - last[0], now
            r.compute.flops = 2.0 * self.loaded.num_parameters * r.compute.flops
            if on_problem_done:
                on_problem_done(r)

        tasks = []
        self._on_iteration = on_iteration
        self._grades, self._grading_errors = {}, {}
        try:
            for p, r in zip(problems, results):
                prompt, error = self.prompt(p)
                if error:
                    r.error, r.stop_reason = error, "error"
                    done(r)
                else:
                    tasks.append(_reporting(task(self, p, prompt, r), r, done))
            if tasks:
                self.backend.run(tasks, self.cfg.batch_size, self.cfg.batching)
        finally:
            self._on_iteration = None
            self._grades, self._grading_errors = {}, {}
        return results

    # -------------------------------------------------------------------------------------
    # What the tasks share

    def _blank(self, method: str, p: Problem) -> ProblemResult:
        return ProblemResult(
            problem_id=p.problem_id,
            dataset=p.dataset,
            method=method,
            question=p.question,
            gold=p.gold,
        )

    def prompt(self, p: Problem) -> tuple[list[int], str]:
        """The problem's prompt ids, or an error text when it cannot run."""
        if not p.question or not p.question.strip():
            return [], "empty question"
        prompt = self.render(self.messages(p))
        limit = self.backend.max_positions
        budget = self.rules.cot_max_new_tokens
        if limit and len(prompt) + budget > limit:
            return prompt, (
                f"prompt of {len(prompt)} tokens + {budget} answer tokens "
                f"exceeds the model's context of {limit} tokens"
            )
        return prompt, ""

    def messages(self, p: Problem) -> list[dict[str, str]]:
        """The solver prompt's chat messages for `p` (with its benchmark's note, if any)."""
        return self.template.messages(p.question, prompt_suffix(p.dataset, self.template.name))

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages as prompt ids, with a generation prompt, the mode's way."""
        return render_chat(self.tokenizer, messages, as_text=self.rules.render_as_text)

    def decode(self, tokens: Sequence[int]) -> str:
        """Answer text of `tokens` (special tokens kept in compat=reference)."""
        return self.tokenizer.decode(
            list(tokens), skip_special_tokens=not self.rules.keep_special_tokens
        )

    def answer_request(self, prompt: Sequence[int], **kw: Any) -> GenerationRequest:
        """A request for a whole answer (CoT or sample): the mode's budget and stop tokens."""
        return GenerationRequest(
            prompt, self.rules.cot_max_new_tokens, stop_ids=self.rules.cot_stop_ids, **kw
        )

    @staticmethod
    def charge_solver(r: ProblemResult, out: GenerationResult, forced: int = 0) -> None:
        c = r.compute
        c.solver_prompt_tokens += out.prompt_tokens
        c.solver_generated_tokens += len(out.tokens) + forced
        c.forward_calls += out.forward_calls
        c.flops += out.token_passes  # token-passes; turned into FLOPs in run()

    @staticmethod
    def charge_reward(r: ProblemResult, rr: RewardResult) -> None:
        c = r.compute
        c.verifier_prompt_tokens += rr.prompt_tokens
        c.verifier_generated_tokens += rr.generated_tokens
        c.forward_calls += rr.forward_calls
        c.flops += rr.token_passes
        r.unparsed_verdicts += rr.unparsed

    def iteration_done(self, p: Problem, k: int) -> None:
        """A method's k-th iteration of `p` is done (for `run`'s `on_iteration`)."""
        if self._on_iteration is not None:
            self._on_iteration(p.problem_id, k)

    def grade(self, p: Problem, text: str) -> Grade:
        """`text` graded against `p`'s answer, once per run whatever asks (the reward, an
        iteration, the final row): a grade that timed out stays a timeout, so a loaded worker
        cannot record reward 0 beside correct=False for the same text. A math-verify failure is
        an "error" grade (incorrect), and its problem records the error."""
        key = (p.problem_id, text)
        if key not in self._grades:
            try:
                self._grades[key] = self.grader(p, text)
            except GradingError as exc:
                self._grades[key] = Grade(None, False, "error")
                self._grading_errors.setdefault(p.problem_id, f"GradingError: {exc}")
        return self._grades[key]

    def _grade_status(self, problem_id: str) -> tuple[str, str]:
        """(the worst status of the problem's grades so far, its grading error or '')."""
        worst = "ok"
        for (pid, _), g in self._grades.items():
            if pid == problem_id and GRADE_STATUSES.index(g.status) > GRADE_STATUSES.index(worst):
                worst = g.status
        return worst, self._grading_errors.get(problem_id, "")

    def correct(self, p: Problem, text: str) -> bool:
        return self.grade(p, text).correct

    def finish(self, p: Problem, r: ProblemResult, text: str, length: int) -> None:
        """Record `text` (of `length` tokens) as the problem's returned answer."""
        g = self.grade(p, text)
        r.final_answer, r.final_extracted, r.final_correct = text, g.extracted, g.correct
        r.final_length = length

    def score(self, p: Problem, answer: str, index: int = 0) -> PyGenerator[Any, Any, RewardResult]:
        """The reward of `answer` (the problem's `index`-th answer scored: 0 the CoT, k the k-th
        iteration), after the generations it needs (self-reward's verifiers)."""
        requests = self.reward.requests(p, answer, index)
        outputs = (yield requests) if requests else []
        result = self.reward.result(p, answer, outputs)
        result.value = self.agree(result.value)
        return result

    def cot(self, p: Problem, prompt: list[int], r: ProblemResult, **kw: Any) -> PyGenerator:
        """The greedy CoT answer into `r` (cot_answer, cot_length, cot_correct); returns the
        generation result (its `hidden` and `prompt_state` when asked for by `kw`)."""
        (out,) = yield [self.answer_request(prompt, **kw)]
        self.charge_solver(r, out)
        text = self.decode(out.tokens)
        r.cot_answer, r.cot_length = text, len(out.tokens)
        r.cot_correct = self.correct(p, text)
        if out.hidden is not None:
            r.capture_mismatch = capture_mismatch(self.head, out.hidden, out.tokens)
        return out


def _reporting(task: Task, r: ProblemResult, on_done: Callable[[ProblemResult], None]) -> Task:
    """`task`, then `on_done(r)` once it has ended (and filled `r`)."""
    yield from task
    on_done(r)
