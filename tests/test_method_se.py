"""`method=se` (the paper's unguided latent search, Table 5) on the tiny random Llama: it runs where
LatentSeek would iterate, adds seeded Gaussian noise of variance `se_sigma2` once to Z, and
continues from the new prefix; with no noise it gives back the CoT."""

from __future__ import annotations

import torch
from conftest import ScriptedReward, problem, tiny_loaded

from pipeline.config import Config
from pipeline.method.methods.se import perturbed
from pipeline.method.solver import Solver


def solve(script, **kw):
    base = dict(method=["se"], reward="psrm", rho=0.5, max_new_tokens=16, se_sigma2=4.0)
    solver = Solver(Config(**{**base, **kw}), tiny_loaded(), reward=ScriptedReward(script))
    return solver.run("se", [problem()])[0]


def test_noise_is_seeded_and_has_the_variance_asked():
    z = torch.zeros(200, 64)
    a, b = perturbed(z, 0.5, seed=7), perturbed(z, 0.5, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, perturbed(z, 0.5, seed=8))
    assert abs(float(a.var()) - 0.5) < 0.02  # 12,800 draws
    assert torch.equal(perturbed(z, 0.0, seed=7), z)


def test_one_exploration_step_replaces_the_cot_answer():
    r = solve([-1.0, 0.0])
    assert (r.iterations, r.stop_reason, r.rewards) == (1, "explored", [0.0])
    assert r.final_answer == r.answers[0] != r.cot_answer
    assert r.update_length == 8 and r.iteration_stats[0].tokens_changed > 0


def test_without_noise_the_step_gives_back_the_cot():
    # Z decodes to the CoT's own first U tokens, and the greedy continuation from them is the
    # rest of the CoT: sigma^2 = 0 must reproduce it token for token.
    r = solve([-1.0], se_sigma2=0.0)
    assert r.iteration_stats[0].tokens_changed == 0 and r.answers[0] == r.cot_answer


def test_a_cot_above_tau_is_not_explored():
    r = solve([0.0])
    assert (r.iterations, r.stop_reason, r.final_answer) == (0, "cot_accepted", r.cot_answer)
