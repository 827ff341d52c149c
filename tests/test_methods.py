"""`pipeline.method.methods`: the LatentSeek loop's control flow on a tiny random Llama with scripted
rewards (a reward's n-th call for a problem returns script[n]; call 0 scores the CoT answer),
plus `select_best` and `majority_vote`, self-consistency on scripted samples whose majority is
known, and greedy CoT on the embedded SmolLM2 against Hugging Face's own greedy `generate`.

With max_new_tokens 16 the tiny model never emits EOS (asserted), so T = 16 and
U = min(floor(rho * 16), max_update_length) is known in advance: rho 0.5 -> U = 8.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict

import pytest
import torch
from conftest import ScriptedReward, problem, tiny_loaded

from pipeline.config import Config
from pipeline.engine.batching import run_static
from pipeline.engine.generation import GenerationRequest, GenerationResult
from pipeline.method.methods import problem_seed, select_best
from pipeline.method.methods.sc import majority_vote
from pipeline.method.prompts import render_chat
from pipeline.method.solver import Solver

TAU = -0.2


def make_cfg(**kw) -> Config:
    base = dict(
        method=["latentseek"],
        reward="psrm",
        rho=0.5,
        lr=1.0,  # large: the tiny model's prefix tokens change at every step
        max_iters=3,
        max_new_tokens=16,
        reward_threshold=TAU,
        n_samples=3,
    )
    return Config(**{**base, **kw})


def run(script, problems=None, method="latentseek", **kw):
    reward = ScriptedReward(script)
    solver = Solver(make_cfg(**kw), tiny_loaded(), reward=reward)
    results = solver.run(method, problems or [problem()])
    return results, reward


def test_no_update_when_u_is_zero():
    # rho 0: U = floor(0 * 16) = 0, nothing to optimise.
    (r,), reward = run([-1.0], rho=0.0)
    assert (r.update_length, r.iterations, r.stop_reason) == (0, 0, "no_update")
    assert r.final_answer == r.cot_answer and r.answers == [] and r.rewards == []
    assert r.initial_reward == -1.0 and reward.calls["p0"] == 1


def test_cot_accepted_when_initial_reward_above_tau():
    (r,), _ = run([0.0])  # 0 > tau = -0.2
    assert (r.iterations, r.stop_reason, r.initial_reward) == (0, "cot_accepted", 0.0)
    assert r.final_answer == r.cot_answer and r.final_length == r.cot_length == 16


def test_k_bounds_the_iterations():
    (r,), reward = run([-1.0], max_iters=3)
    assert r.cot_length == 16  # no early EOS: T = 16
    assert r.update_length == 8  # floor(0.5 * 16)
    assert (r.iterations, r.stop_reason) == (3, "max_iters")
    assert r.rewards == [-1.0, -1.0, -1.0] and len(r.answers) == len(r.iteration_stats) == 3
    assert reward.calls["p0"] == 4  # r0 + 3 iterations
    assert reward.seen["p0"][1:] == r.answers
    assert r.final_answer == r.answers[-1]  # the last answer, not the best (reference)
    # The cap is on the whole answer: 8 prefix tokens + 16 - 8 continuation tokens.
    assert [s.tokens for s in r.iteration_stats] == [16, 16, 16] and r.final_length == 16
    assert all(s.tokens_changed > 0 for s in r.iteration_stats)  # lr 1.0 does move the prefix
    assert len({r.cot_answer, *r.answers}) > 1
    # Forced prefix tokens count as generated: CoT 16 + 3 answers of 8 forced + 8 decoded.
    assert r.compute.solver_generated_tokens == 16 + 3 * 16
    assert r.compute.flops > 0 and r.compute.forward_calls > 0


def test_max_iters_zero():
    (r,), _ = run([-1.0], max_iters=0)
    assert (r.iterations, r.stop_reason, r.final_answer) == (0, "max_iters", r.cot_answer)


def test_stops_at_the_threshold():
    # r0 = -1, k=1 -> -1, k=2 -> 0 > tau: stop after iteration 2 of at most 5.
    (r,), reward = run([-1.0, -1.0, 0.0], max_iters=5)
    assert (r.iterations, r.stop_reason, r.rewards) == (2, "threshold", [-1.0, 0.0])
    assert r.final_answer == r.answers[1] and reward.calls["p0"] == 3


def test_threshold_is_strict():
    # r = tau is not above tau: keep going.
    (r,), _ = run([-1.0, TAU, TAU], max_iters=2)
    assert (r.iterations, r.stop_reason) == (2, "max_iters")


def test_return_best_picks_the_best_rewarded_answer():
    script = [-1.0, -0.5, -0.9]  # r0, k=1, k=2: the best answer is iteration 1's
    (last,), _ = run(script, max_iters=2)
    (best,), _ = run(script, max_iters=2, return_best=True)
    assert last.answers == best.answers and last.answers[0] != last.answers[1]
    assert last.final_answer == last.answers[1]
    assert best.final_answer == best.answers[0]
    assert best.final_length == best.iteration_stats[0].tokens
    # The best can be the CoT answer itself.
    (cot_best,), _ = run([-0.3, -1.0, -1.0], max_iters=2, return_best=True)
    assert cot_best.final_answer == cot_best.cot_answer


def test_update_length_capped_by_max_update_length():
    (r,), _ = run([-1.0], rho=1.0, max_update_length=3, max_iters=1)
    assert r.update_length == 3  # min(floor(1.0 * 16), 3)


def test_nan_reward_stops_with_nan_loss():
    (r,), _ = run([math.nan])
    assert (r.iterations, r.stop_reason, r.final_answer) == (0, "nan_loss", r.cot_answer)


def test_batch_gives_each_problem_its_own_run():
    # Three problems stop at different rounds; each must match running it alone.
    scripts = {"a": [0.0], "b": [-1.0, -1.0, 0.0], "c": [-1.0]}
    probs = [problem(f"What is {i}+{i}?", str(2 * i), pid) for i, pid in enumerate(scripts, 1)]
    batch, _ = run(lambda p: scripts[p.problem_id], probs)
    assert [r.stop_reason for r in batch] == ["cot_accepted", "threshold", "max_iters"]
    assert [r.iterations for r in batch] == [0, 2, 3]
    for p, r in zip(probs, batch):
        (alone,), _ = run(scripts[p.problem_id], [p])
        assert (r.answers, r.rewards, r.final_answer) == (
            alone.answers,
            alone.rewards,
            alone.final_answer,
        )


def test_bad_problems_are_reported_without_failing_the_others():
    probs = [
        problem("", pid="empty"),
        problem("What is 2+2?", "4", "good"),
        problem("x" * 600, pid="long"),  # ~680 prompt tokens + 16 > the tiny model's 512
    ]
    results, reward = run([-1.0], probs, max_iters=1)
    assert [r.problem_id for r in results] == ["empty", "good", "long"]
    assert results[0].error == "empty question" and results[0].stop_reason == "error"
    assert "exceeds the model's context" in results[2].error
    assert results[2].stop_reason == "error"
    assert results[1].error == "" and results[1].iterations == 1
    assert set(reward.calls) == {"good"}  # failed problems never reach the reward


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="unknown method"):
        run([-1.0], method="beam")


def test_cot_is_the_greedy_decode_of_the_prompt(make_solver, embedded_cfg):
    # On the embedded SmolLM2 (the tiny random model's greedy decode only repeats the prompt's
    # last token, which any decoder reproduces). The reference: Hugging Face's own greedy decode
    # (its own cache, do_sample=False) of the rendered prompt, capped at max_new_tokens, stopped
    # at the model's EOS; the engine's CoT answer must be those very tokens.
    cfg = embedded_cfg.replace(method=["cot"], max_new_tokens=24)
    reward = ScriptedReward([-1.0])
    solver = make_solver(cfg, reward)
    p = problem("Tom has 3 apples and buys 4 more. How many apples does he have?", "7")
    (r,) = solver.run("cot", [p])
    model, tok = solver.loaded.model, solver.tokenizer
    prompt = render_chat(tok, solver.template.messages(p.question))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    expected = out[0, len(prompt) :].tolist()
    assert len(set(expected)) > 5  # a real answer, not one token repeated
    assert r.cot_answer == tok.decode(expected, skip_special_tokens=True)
    assert r.cot_length == r.final_length == len(expected)
    assert r.final_answer == r.cot_answer and r.answers == []
    stop = "eos" if expected[-1] == tok.eos_token_id else "length"
    assert r.stop_reason == stop and r.initial_reward is None
    assert not reward.calls  # CoT never calls the reward


def test_best_of_n_picks_the_best_sample():
    (r,), reward = run([-1.0, 0.0, -0.5], method="bon")  # the 3 samples score -1, 0, -0.5
    assert len(r.samples) == 3 and len(set(r.samples)) == 3
    assert r.sample_rewards == [-1.0, 0.0, -0.5]
    assert r.final_answer == r.samples[1] and r.stop_reason == "best_of_n"
    (again,), _ = run([-1.0, 0.0, -0.5], method="bon")
    assert again.samples == r.samples  # seeded per (run seed, problem, sample)


class ScriptedSampler:
    """A generation backend (`pipeline.engine.backends.base.Backend`) that stands in for the engine:
    the sample drawn with seed `problem_seed(seed, pid, j)` is `texts[pid][j]` (any other seed
    is a KeyError); keeps the requests. Byte tokens, so the engine decodes each text back."""

    name = "scripted"

    def __init__(self, loaded, texts: dict[str, list[str]], seed: int) -> None:
        self.tokenizer = loaded.tokenizer
        self.eos_ids = {loaded.tokenizer.eos_token_id}
        self.max_positions = 512  # the solver checks prompt lengths against it
        self.by_seed = {
            problem_seed(seed, pid, j): text
            for pid, samples in texts.items()
            for j, text in enumerate(samples)
        }
        self.requests: list[GenerationRequest] = []

    def generate(self, requests):
        self.requests.extend(requests)
        return [
            GenerationResult(self.tokenizer.encode(self.by_seed[req.seed]), "eos")
            for req in requests
        ]

    def run(self, tasks, max_rows, batching="continuous"):  # every row is done at once
        run_static(self, tasks)


def test_self_consistency_returns_the_majority_answer():
    # Gold 18 everywhere; 4 samples each. Extracted answers, by hand:
    # maj:  5, 18, 18.0, 18 -> "18" three times (grouped by equivalence): sample 1, its first;
    # tie:  -, 9, 7, -      -> 1-1 tie: the group that appeared first, sample 1 ("9");
    # late: -, 4, 18, 18    -> "18" twice beats "4" once (no answer, no vote): sample 2;
    # none: no number at all -> no answer: sample 0 is returned as it is.
    texts = {
        "maj": ["so \\boxed{5}", "so \\boxed{18}", "it is \\boxed{18.0}", "x = 18"],
        "tie": ["no idea", "\\boxed{9}", "\\boxed{7}", "hmm"],
        "late": ["hmm", "\\boxed{4}", "thus \\boxed{18}", "\\boxed{18}"],
        "none": ["no idea", "still thinking", "hmm", "?"],
    }
    expected = {  # pid: (stop reason, index of the returned sample, its extracted answer)
        "maj": ("majority", 1, "18"),
        "tie": ("majority", 1, "9"),
        "late": ("majority", 2, "18"),
        "none": ("no_answer", 0, None),
    }
    probs = [problem(f"Question {pid}?", "18", pid) for pid in texts]
    reward = ScriptedReward([-1.0])
    cfg = make_cfg(n_samples=4)
    loaded = tiny_loaded()
    sampler = ScriptedSampler(loaded, texts, cfg.seed)
    solver = Solver(cfg, loaded, reward=reward, backend=sampler)
    results = solver.run("sc", probs)
    assert [r.problem_id for r in results] == list(texts)
    for r in results:
        stop, pick, extracted = expected[r.problem_id]
        samples = texts[r.problem_id]
        assert r.samples == samples and r.cot_answer == samples[0]
        assert (r.stop_reason, r.final_answer) == (stop, samples[pick]), r.problem_id
        assert (r.final_extracted, r.final_correct) == (extracted, extracted == "18")
        assert r.final_length == len(samples[pick])  # one byte token per character
    # N sampled requests per problem with the configured settings, and no reward calls.
    assert len(sampler.requests) == 4 * len(probs)
    settings = (True, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
    assert all(
        (q.sample, q.temperature, q.top_p, q.max_new_tokens) == settings for q in sampler.requests
    )
    assert not reward.calls


def test_self_consistency_samples_are_seeded_per_problem_and_sample():
    # On the real tiny model: sample j of a problem is what the generator draws alone with
    # seed problem_seed(seed, problem, j), whatever else is in the batch.
    probs = [problem("What is 1+1?", "2", "p0"), problem("What is 2+5?", "7", "p1")]
    loaded = tiny_loaded()
    solver = Solver(make_cfg(n_samples=3), loaded, reward=ScriptedReward([-1.0]))
    results = solver.run("sc", probs)
    for p, r in zip(probs, results):
        prompt = render_chat(loaded.tokenizer, solver.template.messages(p.question))
        alone = [
            solver.backend.generate(
                [
                    GenerationRequest(
                        prompt,
                        16,
                        sample=True,
                        temperature=solver.cfg.temperature,
                        top_p=solver.cfg.top_p,
                        seed=problem_seed(solver.cfg.seed, p.problem_id, j),
                    )
                ]
            )[0]
            for j in range(3)
        ]
        assert r.samples == [loaded.tokenizer.decode(o.tokens) for o in alone]
        assert len(set(r.samples)) == 3  # three seeds, three samples


def test_problem_seed_is_stable_and_distinct():
    # CRC-32 of "seed/problem/index" (31 bits): the same in every process, unlike hash().
    assert problem_seed(42, "gsm8k-0", 0) == zlib.crc32(b"42/gsm8k-0/0") & 0x7FFFFFFF
    assert problem_seed(7, "p", 3) == zlib.crc32(b"7/p/3") & 0x7FFFFFFF
    seeds = {problem_seed(42, "gsm8k-0", j) for j in range(3)} | {problem_seed(43, "gsm8k-0", 0)}
    assert len(seeds) == 4


# --- select_best and majority_vote -------------------------------------------------------------


@pytest.mark.parametrize(
    "rewards, expected",
    [
        ([-1.0, 0.0, -0.5], 1),
        ([-0.5, -0.5, -1.0], 0),  # tie: the earliest
        ([-1.0, -0.2, -0.2], 1),
        ([-1.0], 0),
        ([-1.0, -1.0, -1.0], 0),
    ],
)
def test_select_best(rewards, expected):
    assert select_best(rewards) == expected


@pytest.mark.parametrize(
    "extracted, expected",
    [
        (["18", "18", "5"], 0),
        (["5", "18", "18"], 1),
        (["18", "18.0", "5"], 0),  # grouped by equivalence, not by string
        (["5", "18"], 0),  # tie: the group whose first member came first
        (["5", "18", "18", "5"], 0),  # 2-2 tie: "5" appeared first
        ([None, "3", None, "4", "4"], 3),  # no answer, no vote
        ([None, "7", None], 1),
        ([None, None, None], None),
        ([], None),
        (["\\frac{1}{2}", "0.5", "2"], 0),
    ],
)
def test_majority_vote(extracted, expected):
    assert majority_vote(extracted) == expected


def test_a_grade_is_decided_once_per_text():
    # A grader that times out on its first call for a text and answers "correct" on the next
    # (a loaded worker): every use of that text in the problem (the PSRM reward of r0, and the
    # final row) must read the one decision, and the timeout is recorded as such.
    from pipeline.method.grading import Grade

    cfg = make_cfg(max_iters=0)
    solver = Solver(cfg, tiny_loaded())  # reward=psrm: it grades through the solver
    calls = defaultdict(int)

    def flaky(p, text):
        calls[text] += 1
        return Grade(None, False, "timeout") if calls[text] == 1 else Grade("2", True)

    solver.grader = flaky
    (r,) = solver.run("latentseek", [problem()])
    assert calls[r.cot_answer] == 1  # graded once, read three times
    assert (r.initial_reward, r.cot_correct, r.final_correct) == (-1.0, False, False)
    assert r.grade_status == "timeout" and r.error == ""
    (again,) = solver.run("latentseek", [problem()])  # a new run grades afresh
    assert (again.initial_reward, again.final_correct, again.grade_status) == (0.0, True, "ok")


def test_a_grading_failure_is_the_problems_error():
    from pipeline.method.grading import GradingError

    solver = Solver(make_cfg(max_iters=0), tiny_loaded())

    def broken(p, text):
        raise GradingError("math-verify failed: TypeError: API changed")

    solver.grader = broken
    (r,) = solver.run("cot", [problem()])
    assert r.grade_status == "error" and r.error.startswith("GradingError: math-verify failed")
    assert r.final_correct is False


def test_capture_mismatch_is_zero_on_the_native_engine():
    # The CoT's captured z_t are the states the engine chose x_t from: none may disagree.
    (r,), _ = run([-1.0, -1.0, -1.0, -1.0])
    assert r.update_length == 8 and r.capture_mismatch == 0
    (c,), _ = run([-1.0], method="cot")  # nothing captured: no count
    assert c.capture_mismatch is None


def test_capture_mismatch_counts_positions_whose_z_predicts_another_token():
    from pipeline.engine.backends.base import capture_mismatch

    loaded = tiny_loaded()
    solver = Solver(make_cfg(), loaded)
    (out,) = solver.backend.generate([GenerationRequest([5, 6, 7], 6, capture=6)])
    assert capture_mismatch(solver.head, out.hidden, out.tokens) == 0
    wrong = list(out.tokens)
    wrong[2] = (wrong[2] + 1) % 256
    wrong[4] = (wrong[4] + 1) % 256
    assert capture_mismatch(solver.head, out.hidden, wrong) == 2
    assert capture_mismatch(solver.head, out.hidden[:3], wrong) == 1  # only captured positions
