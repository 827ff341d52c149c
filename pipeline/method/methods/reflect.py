"""`reflect`: Self-Reflection, the training-free baseline of the paper's Table 1 (after Reflexion,
Shinn et al., 2023): the model answers, reviews its own answer, and answers again.

The paper gives no prompts, rounds or stop rule for it; Table 1's caption asks only for "a rollout
number comparable to LatentSeek's update iterations". This project's choices (docs/method.md):
the first answer is the greedy CoT and is scored by the configured reward; as in LatentSeek, a
first answer whose reward exceeds tau is kept, else up to K = `max_iters` rounds follow, each a
critique (`reflect_prompts`: a user message asking for a review, after the answer) and a revised
answer (a second user message asking to answer again), both greedy in one growing conversation
from the latest answer; a round's answer is scored and the rounds stop once its reward exceeds
tau, or before a turn that would not fit the model's context (`context_full`). The last answer
is returned. Each round is recorded as an iteration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.method.methods.base import Derivation, Method
from pipeline.method.prompts import load_reflect_prompts
from pipeline.method.results import IterationStats

if TYPE_CHECKING:
    from pipeline.data import Problem
    from pipeline.engine.backends.base import Task
    from pipeline.method.results import ProblemResult
    from pipeline.method.solver import Solver


def reflect(s: Solver, p: Problem, prompt: list[int], r: ProblemResult) -> Task:
    cfg = s.cfg
    prompts = load_reflect_prompts(cfg.reflect_prompts)
    cot = yield from s.cot(p, prompt, r)
    rr = yield from s.score(p, r.cot_answer)
    s.charge_reward(r, rr)
    r.initial_reward = r.final_reward = rr.value
    text, tokens = r.cot_answer, list(cot.tokens)
    r.stop_reason = "cot_accepted" if rr.value > cfg.reward_threshold else "max_iters"
    rounds = cfg.max_iters if rr.value <= cfg.reward_threshold else 0
    messages = s.messages(p)
    for k in range(1, rounds + 1):
        messages += [
            {"role": "assistant", "content": _plain(s, tokens)},
            {"role": "user", "content": prompts.critique},
        ]
        if not _fits(s, messages):
            r.stop_reason = "context_full"
            break
        (review,) = yield [s.answer_request(s.render(messages))]
        s.charge_solver(r, review)
        messages += [
            {"role": "assistant", "content": _plain(s, review.tokens)},
            {"role": "user", "content": prompts.revise},
        ]
        if not _fits(s, messages):
            r.stop_reason = "context_full"
            break
        (out,) = yield [s.answer_request(s.render(messages))]
        s.charge_solver(r, out)
        text, tokens = s.decode(out.tokens), list(out.tokens)
        rr = yield from s.score(p, text, k)
        s.charge_reward(r, rr)
        r.iterations, r.final_reward = k, rr.value
        r.rewards.append(rr.value)
        r.answers.append(text)
        r.iteration_stats.append(IterationStats(k, rr.value, text, s.correct(p, text), len(tokens)))
        s.iteration_done(p, k)
        if rr.value > cfg.reward_threshold:
            r.stop_reason = "threshold"
            break
    s.finish(p, r, text, len(tokens))


def _fits(s: Solver, messages: list[dict[str, str]]) -> bool:
    """Whether the conversation and a whole answer fit the model's context."""
    limit = s.backend.max_positions
    return not limit or len(s.render(messages)) + s.rules.cot_max_new_tokens <= limit


def _plain(s: Solver, tokens: list[int]) -> str:
    """A turn's text for the conversation: special tokens (a stop token) left out."""
    return s.tokenizer.decode(list(tokens), skip_special_tokens=True)


METHOD = Method(
    name="reflect",
    title="Self-Reflection",
    task=reflect,
    order=30,
    settings=("max_iters", "reward_threshold", "reflect_prompts"),
    uses_reward=True,
    iterations=True,
    derive=Derivation("max_iters", "steps"),
    cot_pass=True,
    files={"reflect_prompts": load_reflect_prompts},
    description="Self-Reflection: answer, review the answer, answer again (K rounds)",
    max_answers=lambda cfg: 1 + 2 * cfg.max_iters,  # the CoT, then a review and an answer a round
)
