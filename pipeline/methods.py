"""The methods, with one interface: a batch of problems in, one `ProblemResult` per problem out.

- `cot`: greedy chain of thought.
- `bon`: N sampled answers, the one with the highest reward (ties: the earliest sample).
- `sc`: N sampled answers, the majority of the extracted answers (answers grouped by
  equivalence; ties: the group that appeared first).
- `latentseek`: SPEC.md §1 with any reward. Every problem of the batch keeps moving: problems that
  stop leave the batch, and each round's pending generations (continuations, then verifier
  prompts) go through the model together. The latent step itself is `pipeline.latent.latent_step`.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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


@dataclass
class _Latent:
    """The optimisation state of one problem between rounds."""

    index: int  # position in the batch
    z: torch.Tensor  # [1, U, D] leaf, requires grad (float32; the model's dtype in compat mode)
    optimizer: torch.optim.Optimizer
    prefix: list[int]  # current prefix tokens
    reward: float  # reward of the current answer
    generator: torch.Generator | None
    step: Any = None  # the last `LatentStepResult`


@dataclass
class _LatentBatch:
    """What a LatentSeek batch carries between its phases (init, rounds, settle)."""

    problems: Sequence[Problem]
    prompts: Sequence[list[int]]
    results: Sequence[ProblemResult]
    cot: list[GenerationResult]  # the CoT pass, with each prompt's cached state
    tokens: list[list[int]]  # each problem's current answer tokens
    best: list[tuple[float, str, int]]  # (reward, text, length) of the best answer so far
    active: list[_Latent]  # problems still iterating


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
            run = {
                "cot": self._cot,
                "bon": self._bon,
                "sc": self._sc,
                "latentseek": self._latentseek,
            }.get(method)
            if run is None:
                raise ValueError(f"unknown method {method!r}")
            run(sub_problems, sub_prompts, sub_results)
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

    # -------------------------------------------------------------------------------------
    def _cot(self, problems, prompts, results) -> None:
        outs = self.generator.generate([self._answer_request(p) for p in prompts])
        for p, r, out in zip(problems, results, outs):
            self._charge_solver(r, out)
            text = self._decode(out.tokens)
            r.cot_answer, r.cot_length = text, len(out.tokens)
            r.cot_correct = self._correct(p, text)
            r.answers = []
            r.stop_reason = out.finish_reason
            self._finish(p, r, text, len(out.tokens))

    def _samples(self, problems, prompts, results) -> list[list[int]]:
        """Decode N samples per problem into `r.samples`; returns their token lengths."""
        cfg = self.cfg
        requests = [
            self._answer_request(
                prompt,
                sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=problem_seed(cfg.seed, p.problem_id, j),
            )
            for p, prompt in zip(problems, prompts)
            for j in range(cfg.n_samples)
        ]
        outs = self.generator.generate(requests)
        lengths: list[list[int]] = []
        n = cfg.n_samples
        for k, (p, r) in enumerate(zip(problems, results)):
            mine = outs[k * n : (k + 1) * n]
            for out in mine:
                self._charge_solver(r, out)
            r.samples = [self._decode(o.tokens) for o in mine]
            r.cot_answer, r.cot_length = r.samples[0], len(mine[0].tokens)
            r.cot_correct = self._correct(p, r.samples[0])
            lengths.append([len(o.tokens) for o in mine])
        return lengths

    def _bon(self, problems, prompts, results) -> None:
        lengths = self._samples(problems, prompts, results)
        n = self.cfg.n_samples
        flat_p = [p for p in problems for _ in range(n)]
        scored = self.reward.score(flat_p, [a for r in results for a in r.samples])
        for k, (p, r) in enumerate(zip(problems, results)):
            mine = scored[k * n : (k + 1) * n]
            for rr in mine:
                self._charge_reward(r, rr)
            r.sample_rewards = [rr.value for rr in mine]
            best = select_best(r.sample_rewards)
            r.stop_reason = "best_of_n"
            self._finish(p, r, r.samples[best], lengths[k][best])

    def _sc(self, problems, prompts, results) -> None:
        lengths = self._samples(problems, prompts, results)
        for k, (p, r) in enumerate(zip(problems, results)):
            extracted = [extract_answer(s, self.style) for s in r.samples]
            winner = majority_vote(extracted)
            r.stop_reason = "majority" if winner is not None else "no_answer"
            pick = 0 if winner is None else winner
            self._finish(p, r, r.samples[pick], lengths[k][pick])

    # -------------------------------------------------------------------------------------
    # LatentSeek: init (CoT pass, r0, who iterates), rounds (step, continue, rescore), settle.

    def _latentseek(self, problems, prompts, results) -> None:
        batch = self._latent_init(problems, prompts, results)
        for k in range(1, self.cfg.max_iters + 1):
            if not batch.active:
                break
            batch.active = self._latent_round(batch, k)
        self._latent_settle(batch)

    def _latent_init(self, problems, prompts, results) -> _LatentBatch:
        """The CoT pass with z_t captured, the initial reward r0, and SPEC §1 steps 2-3: a problem
        iterates unless r0 > tau, U = 0 or K = 0."""
        cfg = self.cfg
        outs = self.generator.generate(
            [
                self._answer_request(p, capture=cfg.max_update_length, keep_prompt_state=True)
                for p in prompts
            ]
        )
        texts = [self._decode(o.tokens) for o in outs]
        for p, r, out, text in zip(problems, results, outs, texts):
            self._charge_solver(r, out)
            r.cot_answer, r.cot_length = text, len(out.tokens)
            r.cot_correct = self._correct(p, text)
        batch = _LatentBatch(
            problems, prompts, results, outs, [list(o.tokens) for o in outs], [], []
        )
        z_dtype = self.loaded.dtype if self.rules.reference else torch.float32
        scored = self.reward.score(problems, texts)
        for i, (r, out, rr) in enumerate(zip(results, outs, scored)):
            self._charge_reward(r, rr)
            r.initial_reward = rr.value
            batch.best.append((rr.value, texts[i], len(out.tokens)))
            u = min(int(cfg.rho * len(out.tokens)), cfg.max_update_length)
            r.update_length = u
            if rr.value > cfg.reward_threshold:
                r.stop_reason = "cot_accepted"
            elif u == 0:
                r.stop_reason = "no_update"
            elif cfg.max_iters == 0:
                r.stop_reason = "max_iters"
            else:
                z = out.hidden[None, :u].to(z_dtype).clone().requires_grad_(True)  # [1, U, D]
                lr = cfg.lr * (hidden_rms(z) if cfg.lr_relative else 1.0)
                gen = None
                if cfg.sample_update:
                    gen = torch.Generator(device=z.device)
                    gen.manual_seed(problem_seed(cfg.seed, problems[i].problem_id))
                optimizer = torch.optim.Adam([z], lr=lr)
                batch.active.append(_Latent(i, z, optimizer, out.tokens[:u], rr.value, gen))
        return batch

    def _latent_round(self, batch: _LatentBatch, k: int) -> list[_Latent]:
        """Iteration k: a latent step per active problem, all continuations decoded together,
        then all new answers rescored together. Returns the problems that go on."""
        cfg = self.cfg
        stepped: list[_Latent] = []
        for st in batch.active:
            with torch.enable_grad():
                st.step = latent_step(
                    st.z,
                    None,
                    torch.tensor([st.reward], device=st.z.device),
                    self.head,
                    st.optimizer,
                    sample=cfg.sample_update,
                    grad_clip=cfg.grad_clip,
                    generator=st.generator,
                    reference=self.rules.reference,
                )
            if not bool(st.step.finite[0]):
                batch.results[st.index].stop_reason = "nan_loss"
                continue
            st.prefix = st.step.tokens[0].tolist()
            stepped.append(st)
        if not stepped:
            return []
        conts = self.generator.generate(
            [
                GenerationRequest(
                    batch.prompts[st.index],
                    self.rules.continuation_max_new_tokens(len(st.prefix)),
                    prefix_ids=st.prefix,
                    prompt_state=batch.cot[st.index].prompt_state,
                    stop_ids=self.rules.continuation_stop_ids,
                )
                for st in stepped
            ]
        )
        texts = []
        for st, cont in zip(stepped, conts):
            self._charge_solver(batch.results[st.index], cont, forced=len(st.prefix))
            batch.tokens[st.index] = st.prefix + cont.tokens
            texts.append(self._decode(batch.tokens[st.index]))
        scored = self.reward.score([batch.problems[st.index] for st in stepped], texts)
        going_on: list[_Latent] = []
        for st, text, rr in zip(stepped, texts, scored):
            r = batch.results[st.index]
            self._charge_reward(r, rr)
            n_tokens = len(batch.tokens[st.index])
            r.iterations = k
            r.rewards.append(rr.value)
            r.answers.append(text)
            r.iteration_stats.append(
                IterationStats(
                    iteration=k,
                    reward=rr.value,
                    answer=text,
                    correct=self._correct(batch.problems[st.index], text),
                    tokens=n_tokens,
                    loss=float(st.step.loss[0]),
                    grad_norm=float(st.step.grad_norm[0]),
                    tokens_changed=int(st.step.tokens_changed[0]),
                    mean_logprob=float(st.step.mean_logprob[0]),
                )
            )
            if rr.value > batch.best[st.index][0]:
                batch.best[st.index] = (rr.value, text, n_tokens)
            st.reward = rr.value
            if rr.value > cfg.reward_threshold:
                r.stop_reason = "threshold"
            elif k == cfg.max_iters:
                r.stop_reason = "max_iters"
            else:
                going_on.append(st)
        return going_on

    def _latent_settle(self, batch: _LatentBatch) -> None:
        """The returned answer: the last one (reference), or the best-rewarded (`return_best`)."""
        for i, (p, r) in enumerate(zip(batch.problems, batch.results)):
            if self.cfg.return_best:
                _, text, length = batch.best[i]
            else:
                text = r.answers[-1] if r.answers else r.cot_answer
                length = len(batch.tokens[i])
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
