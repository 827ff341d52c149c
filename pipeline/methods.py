"""The methods, with one interface: a batch of problems in, one `ProblemResult` per problem out.

- `cot`: greedy chain of thought.
- `bon`: N sampled answers, the one with the highest reward (ties: the earliest sample).
- `sc`: N sampled answers, the majority of the extracted answers (answers grouped by
  equivalence; ties: the group that appeared first).
- `latentseek`: SPEC.md §1 with any reward. The latent step itself is
  `pipeline.latent.latent_step`.

Each method is written once, per problem, as a task that yields the generations it needs next
(`pipeline.batching`); `batching=static` decodes each round's generations of all problems
together (the round waits for its longest row), `batching=continuous` keeps up to `batch_size`
rows decoding and lets a problem move on as soon as its own generations are done.

Decisions the spec leaves open (documented in the README), in the default mode:
- `max_new_tokens` caps the whole answer, so a continuation after a U-token prefix gets
  `max_new_tokens - U` tokens and LatentSeek answers have the same budget as CoT answers.
  `compat=reference` follows the official code instead (`pipeline.compat.DecodeRules`: cap + 1
  tokens for the CoT and for every continuation, its stop sets, answer text with special tokens,
  its latent-step numerics and its GSM8K/AIME grading).
- Forced prefix tokens are fed as they are, even if one of them is EOS (as the official code).
- `wall_seconds` of a problem is its batch's wall time divided by the batch's problems.
- `flops` is an estimate: 2 x parameters x token-passes (attention's quadratic term ignored).
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import Generator as PyGenerator
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.batching import Task, run_continuous, run_static
from pipeline.compat import decode_rules, make_grader
from pipeline.data import Problem
from pipeline.generation import GenerationRequest, GenerationResult, Generator, head_logits
from pipeline.grading import extract_answer, same_answer
from pipeline.latent import hidden_rms, latent_step
from pipeline.model import LoadedModel, load_model
from pipeline.prompts import load_solver_template, load_verifiers, render_chat
from pipeline.results import IterationStats, ProblemResult
from pipeline.rewards import Reward, RewardResult, build_reward


def problem_seed(seed: int, problem_id: str, index: int = 0) -> int:
    """A seed per (run seed, problem, sample): independent of batch composition and order."""
    return zlib.crc32(f"{seed}/{problem_id}/{index}".encode()) & 0x7FFFFFFF


class Solver:
    """Owns one loaded model, its generator, the prompt templates, the grader and the reward."""

    def __init__(self, cfg: Any, loaded: LoadedModel, reward: Reward | None = None) -> None:
        self.cfg = cfg
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.generator = Generator(loaded.model, loaded.tokenizer)
        self.rules = decode_rules(
            cfg.compat, cfg.max_new_tokens, loaded.tokenizer, self.generator.eos_ids
        )
        self.template = load_solver_template(cfg.prompt)
        self.style = self.template.style
        self.grader = make_grader(cfg.compat, self.style)
        self.verifiers = load_verifiers(cfg.verifier_prompts)
        self.reward = reward or build_reward(
            cfg.reward,
            self.generator,
            self.verifiers,
            self.style,
            cfg.verifier_max_new_tokens,
            cfg.format_rule,
            grader=self.grader,
        )
        self.head = functools.partial(head_logits, self.generator.lm_head)  # [.., D] -> [.., V]

    @classmethod
    def from_config(cls, cfg: Any) -> Solver:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        return cls(cfg, load_model(cfg))

    # -------------------------------------------------------------------------------------
    def run(self, method: str, problems: Sequence[Problem]) -> list[ProblemResult]:
        """Run `method` on a batch; problems that cannot run are returned with `error` set."""
        start = time.perf_counter()
        results = [self._blank(method, p) for p in problems]
        prompts: list[list[int]] = []
        runnable: list[int] = []
        for i, p in enumerate(problems):
            prompt, error = self._prompt(p)
            prompts.append(prompt)
            if error:
                results[i].error = error
                results[i].stop_reason = "error"
            else:
                runnable.append(i)
        if runnable:
            sub_problems = [problems[i] for i in runnable]
            sub_prompts = [prompts[i] for i in runnable]
            sub_results = [results[i] for i in runnable]
            work = {
                "cot": self._cot,
                "bon": self._bon,
                "sc": self._sc,
                "latentseek": self._latentseek,
            }.get(method)
            if work is None:
                raise ValueError(f"unknown method {method!r}")
            tasks = [work(*args) for args in zip(sub_problems, sub_prompts, sub_results)]
            if self.cfg.batching == "static":
                run_static(self.generator, tasks)
            else:
                run_continuous(self.generator, tasks, self.cfg.batch_size)
        elapsed = time.perf_counter() - start
        device, dtype = str(self.loaded.device), str(self.loaded.dtype).removeprefix("torch.")
        for r in results:
            r.device, r.dtype = device, dtype
            r.compute.wall_seconds = elapsed / len(results)
            r.compute.flops = 2.0 * self.loaded.num_parameters * r.compute.flops
        return results

    # -------------------------------------------------------------------------------------
    def _blank(self, method: str, p: Problem) -> ProblemResult:
        return ProblemResult(
            problem_id=p.problem_id,
            dataset=p.dataset,
            method=method,
            question=p.question,
            gold=p.gold,
        )

    def _prompt(self, p: Problem) -> tuple[list[int], str]:
        if not p.question or not p.question.strip():
            return [], "empty question"
        messages = self.template.messages(p.question, p.dataset)
        prompt = render_chat(self.tokenizer, messages, as_text=self.rules.render_as_text)
        limit = self.generator.max_positions
        budget = self.rules.cot_max_new_tokens
        if limit and len(prompt) + budget > limit:
            return prompt, (
                f"prompt of {len(prompt)} tokens + {budget} answer tokens "
                f"exceeds the model's context of {limit} tokens"
            )
        return prompt, ""

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(tokens), skip_special_tokens=not self.rules.keep_special_tokens
        )

    def _answer_request(self, prompt: Sequence[int], **kw: Any) -> GenerationRequest:
        """A request for a whole answer (CoT or sample): the mode's budget and stop tokens."""
        return GenerationRequest(
            prompt, self.rules.cot_max_new_tokens, stop_ids=self.rules.cot_stop_ids, **kw
        )

    @staticmethod
    def _charge_solver(r: ProblemResult, out: GenerationResult, forced: int = 0) -> None:
        c = r.compute
        c.solver_prompt_tokens += out.prompt_tokens
        c.solver_generated_tokens += len(out.tokens) + forced
        c.forward_calls += out.forward_calls
        c.flops += out.token_passes  # token-passes; turned into FLOPs in run()

    @staticmethod
    def _charge_reward(r: ProblemResult, rr: RewardResult) -> None:
        c = r.compute
        c.verifier_prompt_tokens += rr.prompt_tokens
        c.verifier_generated_tokens += rr.generated_tokens
        c.forward_calls += rr.forward_calls
        c.flops += rr.token_passes
        r.unparsed_verdicts += rr.unparsed

    def _correct(self, p: Problem, text: str) -> bool:
        return self.grader(p, text).correct

    def _finish(self, p: Problem, r: ProblemResult, text: str, length: int) -> None:
        g = self.grader(p, text)
        r.final_answer, r.final_extracted, r.final_correct = text, g.extracted, g.correct
        r.final_length = length

    def _score(self, p: Problem, answer: str) -> PyGenerator[Any, Any, RewardResult]:
        """The reward of `answer`, after the generations it needs (self-reward's verifiers)."""
        requests = self.reward.requests(p, answer)
        outputs = (yield requests) if requests else []
        return self.reward.result(p, answer, outputs)

    # -------------------------------------------------------------------------------------
    def _cot(self, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
        (out,) = yield [self._answer_request(prompt)]
        self._charge_solver(r, out)
        text = self._decode(out.tokens)
        r.cot_answer, r.cot_length = text, len(out.tokens)
        r.cot_correct = self._correct(p, text)
        r.answers = []
        r.stop_reason = out.finish_reason
        self._finish(p, r, text, len(out.tokens))

    def _samples(
        self, p: Problem, prompt: list[int], r: ProblemResult
    ) -> PyGenerator[Any, Any, list[int]]:
        """Decode N samples into `r.samples`; returns their token lengths."""
        cfg = self.cfg
        outs = yield [
            self._answer_request(
                prompt,
                sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=problem_seed(cfg.seed, p.problem_id, j),
            )
            for j in range(cfg.n_samples)
        ]
        for out in outs:
            self._charge_solver(r, out)
        r.samples = [self._decode(o.tokens) for o in outs]
        r.cot_answer, r.cot_length = r.samples[0], len(outs[0].tokens)
        r.cot_correct = self._correct(p, r.samples[0])
        return [len(o.tokens) for o in outs]

    def _bon(self, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
        lengths = yield from self._samples(p, prompt, r)
        wanted = [self.reward.requests(p, a) for a in r.samples]
        flat = [req for reqs in wanted for req in reqs]
        outputs = iter((yield flat) if flat else [])
        for answer, reqs in zip(r.samples, wanted):
            rr = self.reward.result(p, answer, [next(outputs) for _ in reqs])
            self._charge_reward(r, rr)
            r.sample_rewards.append(rr.value)
        best = select_best(r.sample_rewards)
        r.stop_reason = "best_of_n"
        self._finish(p, r, r.samples[best], lengths[best])

    def _sc(self, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
        lengths = yield from self._samples(p, prompt, r)
        extracted = [extract_answer(s, self.style) for s in r.samples]
        winner = majority_vote(extracted)
        r.stop_reason = "majority" if winner is not None else "no_answer"
        pick = 0 if winner is None else winner
        self._finish(p, r, r.samples[pick], lengths[pick])

    # -------------------------------------------------------------------------------------
    def _latentseek(self, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
        """SPEC §1 for one problem: the CoT with z_t captured and its reward r0; iterate unless
        r0 > tau, U = 0 or K = 0; then K rounds of (latent step, continuation from the new
        prefix, reward), stopping early once the reward exceeds tau."""
        cfg = self.cfg
        (cot,) = yield [
            self._answer_request(prompt, capture=cfg.max_update_length, keep_prompt_state=True)
        ]
        self._charge_solver(r, cot)
        text = self._decode(cot.tokens)
        r.cot_answer, r.cot_length = text, len(cot.tokens)
        r.cot_correct = self._correct(p, text)
        rr = yield from self._score(p, text)
        self._charge_reward(r, rr)
        r.initial_reward = rr.value
        tokens = list(cot.tokens)
        best = (rr.value, text, len(tokens))  # (reward, text, length) of the best answer so far
        u = min(int(cfg.rho * len(cot.tokens)), cfg.max_update_length)
        r.update_length = u
        if rr.value > cfg.reward_threshold:
            r.stop_reason = "cot_accepted"
        elif u == 0:
            r.stop_reason = "no_update"
        elif cfg.max_iters == 0:
            r.stop_reason = "max_iters"
        else:
            z_dtype = self.loaded.dtype if self.rules.reference else torch.float32
            z = cot.hidden[None, :u].to(z_dtype).clone().requires_grad_(True)  # [1, U, D]
            lr = cfg.lr * (hidden_rms(z) if cfg.lr_relative else 1.0)
            optimizer = torch.optim.Adam([z], lr=lr)
            sampler = None
            if cfg.sample_update:
                sampler = torch.Generator(device=z.device)
                sampler.manual_seed(problem_seed(cfg.seed, p.problem_id))
            reward = rr.value
            for k in range(1, cfg.max_iters + 1):
                with torch.enable_grad():
                    step = latent_step(
                        z,
                        None,
                        torch.tensor([reward], device=z.device),
                        self.head,
                        optimizer,
                        sample=cfg.sample_update,
                        grad_clip=cfg.grad_clip,
                        generator=sampler,
                        reference=self.rules.reference,
                    )
                if not bool(step.finite[0]):
                    r.stop_reason = "nan_loss"
                    break
                prefix = step.tokens[0].tolist()
                (cont,) = yield [
                    GenerationRequest(
                        prompt,
                        self.rules.continuation_max_new_tokens(len(prefix)),
                        prefix_ids=prefix,
                        prompt_state=cot.prompt_state,
                        stop_ids=self.rules.continuation_stop_ids,
                    )
                ]
                self._charge_solver(r, cont, forced=len(prefix))
                tokens = prefix + cont.tokens
                text = self._decode(tokens)
                rr = yield from self._score(p, text)
                self._charge_reward(r, rr)
                r.iterations = k
                r.rewards.append(rr.value)
                r.answers.append(text)
                r.iteration_stats.append(
                    IterationStats(
                        iteration=k,
                        reward=rr.value,
                        answer=text,
                        correct=self._correct(p, text),
                        tokens=len(tokens),
                        loss=float(step.loss[0]),
                        grad_norm=float(step.grad_norm[0]),
                        tokens_changed=int(step.tokens_changed[0]),
                        mean_logprob=float(step.mean_logprob[0]),
                    )
                )
                if rr.value > best[0]:
                    best = (rr.value, text, len(tokens))
                reward = rr.value
                if rr.value > cfg.reward_threshold:
                    r.stop_reason = "threshold"
                    break
                if k == cfg.max_iters:
                    r.stop_reason = "max_iters"
        # The returned answer: the last one (reference), or the best-rewarded (`return_best`).
        if cfg.return_best:
            _, text, length = best
        else:
            text = r.answers[-1] if r.answers else r.cot_answer
            length = len(tokens)
        self._finish(p, r, text, length)


def select_best(rewards: Sequence[float]) -> int:
    """Index of the highest reward; ties go to the earliest sample."""
    best = 0
    for j, value in enumerate(rewards):
        if value > rewards[best]:
            best = j
    return best


def majority_vote(extracted: Sequence[str | None]) -> int | None:
    """Index of a sample of the most common answer (grouped by equivalence), or None.

    Samples without an answer do not vote. Ties go to the group whose first member came first;
    the index returned is that first member.
    """
    groups: list[list[int]] = []  # each group: sample indices with equivalent answers
    for j, ans in enumerate(extracted):
        if ans is None:
            continue
        for group in groups:
            if same_answer(extracted[group[0]], ans):
                group.append(j)
                break
        else:
            groups.append([j])
    if not groups:
        return None
    top = max(len(g) for g in groups)
    return next(g[0] for g in groups if len(g) == top)
