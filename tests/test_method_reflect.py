"""`method=reflect` (Self-Reflection) on the tiny random Llama with a scripted reward: its control
flow (accept the CoT above tau, else rounds of critique and revision, stop above tau, at most K
rounds), the conversation it builds, and what it records."""

from __future__ import annotations

from conftest import ScriptedReward, make_tiny_model, problem, tiny_loaded

from pipeline.config import Config
from pipeline.method.prompts import load_reflect_prompts
from pipeline.method.solver import Solver

TAU = -0.2


class Recorder:
    """Wraps the solver's backend: keeps every request (the tiny model's byte tokenizer decodes
    each prompt back to the text of its conversation)."""

    def __init__(self, backend):
        self.real = backend
        self.requests = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def run(self, tasks, max_rows, batching="continuous"):
        def watch(task):
            results = None
            while True:
                try:
                    requests = task.send(results)
                except StopIteration:
                    return
                self.requests.extend(requests)
                results = yield requests

        self.real.run([watch(t) for t in tasks], max_rows, batching)


def solve(script, max_iters=3, context=4096):
    cfg = Config(method=["reflect"], reward="psrm", max_iters=max_iters, max_new_tokens=12,
                 reward_threshold=TAU)  # fmt: skip
    loaded = tiny_loaded(make_tiny_model(max_positions=context))  # a byte is a token
    solver = Solver(cfg, loaded, reward=ScriptedReward(script))
    solver.backend = recorder = Recorder(solver.backend)
    (result,) = solver.run("reflect", [problem()])
    return result, recorder, loaded.tokenizer


def test_a_cot_above_tau_is_kept_without_a_round():
    r, rec, _ = solve([0.0])
    assert (r.iterations, r.stop_reason, r.final_answer) == (0, "cot_accepted", r.cot_answer)
    assert len(rec.requests) == 1 and r.final_reward == 0.0


def test_rounds_critique_then_revise_and_stop_above_tau():
    r, rec, tok = solve([-1.0, -1.0, 0.0], max_iters=5)
    # r0 -1, round 1 -1, round 2 0 > tau: two rounds of two generations after the CoT.
    assert (r.iterations, r.stop_reason, r.rewards) == (2, "threshold", [-1.0, 0.0])
    assert len(rec.requests) == 1 + 2 * 2
    assert r.final_answer == r.answers[-1] and r.final_reward == 0.0
    assert [s.iteration for s in r.iteration_stats] == [1, 2]
    assert all(s.loss is None and s.tokens_changed is None for s in r.iteration_stats)
    prompts = load_reflect_prompts("reflect")
    texts = [tok.decode(q.prompt_ids) for q in rec.requests]
    # Round 1's critique follows the CoT answer; its revision follows the critique; round 2
    # continues the same conversation from round 1's answer.
    assert texts[1].endswith(f"{prompts.critique}\n<assistant>")
    assert r.cot_answer in texts[1] and texts[2].startswith(texts[1])
    assert texts[2].endswith(f"{prompts.revise}\n<assistant>")
    assert texts[3].startswith(texts[2]) and r.answers[0] in texts[3]


def test_at_most_k_rounds_and_the_last_answer_is_returned():
    r, rec, _ = solve([-1.0], max_iters=2)
    assert (r.iterations, r.stop_reason) == (2, "max_iters")
    assert len(rec.requests) == 1 + 2 * 2 and r.final_answer == r.answers[-1]


def test_rounds_stop_before_the_conversation_outgrows_the_context():
    # 512 positions (a byte is a token): the conversation outgrows them within three rounds.
    r, rec, _ = solve([-1.0], max_iters=3, context=512)
    assert r.stop_reason == "context_full" and r.iterations < 3
    assert r.final_answer == (r.answers[-1] if r.answers else r.cot_answer)
    assert all(len(q.prompt_ids) + q.max_new_tokens <= 512 for q in rec.requests)
