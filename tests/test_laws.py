"""analysis.laws on records generated from known laws (issue 28, item 4).

- SC, 200 problems x N = 32 samples: problem i's samples are Bernoulli(p_i) with
  p_i ~ Beta(alpha = 0.3, beta = 2.0) (a heavy left tail: pass@1 = 0.3 / 2.3 = 13%). The
  beta-binomial fit must hold the true alpha and beta inside its 95% bootstrap intervals, and
  its pass@k must match the unbiased estimator's.
- LatentSeek (PSRM), 200 problems, K = 16: a problem is right at k = 0 with probability
  a0 = 0.2; else, with probability (A - a0) / (1 - a0), it is solved at a step T ~ Geometric(h),
  h = 1 - exp(-1/s), and stops there (PSRM); so E[acc(k)] = A - (A - a0) exp(-k / s) with
  A = 70%, a0 = 20%, s = 3 steps: the saturating form, whose three parameters must lie
  inside their intervals.
- Forecasts, fitted on the budgets <= half the largest (k <= 16 samples, k <= 8 steps), predict
  the largest; the stated bound: |predicted - observed| <= 5 points for the laws of the known
  forms, and the observed value inside the forecast's interval for every law.
- Refusals: too few problems, no variation, one budget.
"""

from __future__ import annotations

import math
import re
from itertools import combinations

import numpy as np
import pytest

from analysis.laws import (
    SATURATING,
    Law,
    _frontier,
    fit_beta_binomial,
    fit_laws,
    pass_at_k,
    saturating,
)
from analysis.laws_report import laws_markdown, mlflow_values, plot_frontier, plot_laws
from analysis.records import load_records
from pipeline.method.methods.sc import answer_groups, majority
from pipeline.method.results import Compute, IterationStats, ProblemResult
from pipeline.run.records import RecordStore

ALPHA, BETA, N = 0.3, 2.0, 32
A, A0, S, K = 70.0, 20.0, 3.0, 16
FORECAST_BOUND = 5.0  # points of %


def sc_results(rng, problems: int, p: np.ndarray | None = None) -> list[ProblemResult]:
    """SC records: sample j of problem i right with probability p_i (answer "1", else a wrong
    answer among 2..4), the majority answer returned, as `pipeline.method.methods.sc` records."""
    p = rng.beta(ALPHA, BETA, size=problems) if p is None else p
    out = []
    for i in range(problems):
        right = rng.random(N) < p[i]
        answers = ["1" if r else str(rng.integers(2, 5)) for r in right]
        groups = answer_groups(answers)
        pick = majority(groups)
        samples = [f"\\boxed{{{a}}}" for a in answers]
        out.append(ProblemResult(
            problem_id=f"q{i}", dataset="gsm8k", method="sc", question="?", gold="1",
            cot_answer=samples[0], final_answer=samples[pick], final_extracted=answers[pick],
            cot_correct=bool(right[0]), final_correct=bool(right[pick]), samples=samples,
            stop_reason="majority", sample_correct=[bool(r) for r in right],
            sample_groups=groups,
            compute=Compute(solver_prompt_tokens=20 * N, solver_generated_tokens=100 * N,
                            flops=1e6 * 120 * N),
        ))  # fmt: skip
    return out


def latentseek_results(rng, problems: int, a0=A0, a_inf=A, s=S) -> list[ProblemResult]:
    """LatentSeek-PSRM records whose accuracy after k steps is `saturating(k, A, a0, s, 0)` in
    expectation: a problem stops at its first correct answer; every answer is 50 tokens."""
    h = 1 - math.exp(-1 / s)
    out = []
    for i in range(problems):
        right0 = rng.random() < a0 / 100
        solvable = rng.random() < (a_inf - a0) / (100 - a0)
        solved_at = rng.geometric(h) if solvable and not right0 else K + 1
        steps = 0 if right0 else min(solved_at, K)
        stats = [
            IterationStats(
                iteration=k, reward=0.0 if k == solved_at else -1.0, answer=f"a{k}",
                correct=k == solved_at, tokens=50, loss=0.1, grad_norm=1.0, tokens_changed=1,
            )
            for k in range(1, steps + 1)
        ]  # fmt: skip
        final = right0 or solved_at <= K
        out.append(ProblemResult(
            problem_id=f"q{i}", dataset="gsm8k", method="latentseek", question="?", gold="1",
            cot_answer="c", final_answer="f", cot_correct=right0, final_correct=final,
            initial_reward=0.0 if right0 else -1.0, rewards=[x.reward for x in stats],
            iterations=steps, update_length=8, cot_length=50, final_length=50,
            stop_reason="threshold" if final else "max_iters", iteration_stats=stats,
            compute=Compute(solver_prompt_tokens=20, solver_generated_tokens=50 * (steps + 1),
                            flops=1e6 * (70 + 50 * steps)),
        ))  # fmt: skip
    return out


def write(run_dir, results, model: str = "tiny") -> None:
    RecordStore(run_dir).write(results, run_dir.name, model, worker="w0")


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """The laws fitted to 200 SC and 200 LatentSeek problems drawn from the known laws."""
    root = tmp_path_factory.mktemp("laws")
    rng = np.random.default_rng(1)
    write(root / "sc", sc_results(rng, 200))
    write(root / "ls", latentseek_results(rng, 200))
    return fit_laws(load_records(root))


def law(result, label_start: str, name: str) -> Law:
    return next(w for w in result.laws if w.label.startswith(label_start) and w.law == name)


def test_pass_at_k_is_the_unbiased_estimator():
    # The share of k-subsets of the n samples that hold a correct one, by enumeration.
    n = 6
    for c in range(n + 1):
        grades = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(grades, k))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(np.array([n]), np.array([c]), k)[0] == pytest.approx(expected)
    # 1 - C(3, 2) / C(5, 2) = 1 - 3 / 10
    assert pass_at_k(np.array([5]), np.array([2]), 2)[0] == pytest.approx(0.7)


def test_beta_binomial_fit_recovers_a_known_beta_from_counts():
    rng = np.random.default_rng(0)
    p = rng.beta(ALPHA, BETA, size=4000)
    c = rng.binomial(N, p)
    alpha, beta = fit_beta_binomial(c, np.full(len(c), N))[0]
    assert alpha == pytest.approx(ALPHA, rel=0.1) and beta == pytest.approx(BETA, rel=0.15)


def test_sampled_laws_recover_the_known_beta(known):
    beta = law(known, "SC", "coverage_beta")
    assert not beta.refused and beta.resamples >= 190
    lo, hi = beta.intervals["alpha"]
    assert lo <= ALPHA <= hi and hi - lo < 0.3
    lo, hi = beta.intervals["beta"]
    assert lo <= BETA <= hi
    assert beta.r2 > 0.99  # its pass@k against the unbiased estimator's, k = 1..32
    power = law(known, "SC", "coverage_power")
    assert not power.refused and power.r2 > 0.99 and 0 < power.params["b"] < 1
    # The law's pass@k at large k against the true Beta's (pass@1000: 1 - B(a, b + k) / B(a, b))
    truth = 100 * (1 - math.exp(math.lgamma(BETA + 1000) + math.lgamma(ALPHA + BETA)
                                - math.lgamma(BETA) - math.lgamma(ALPHA + BETA + 1000)))  # fmt: skip
    lo, hi = beta.band(np.array([1000.0]))
    assert lo[0] <= truth <= hi[0]


def test_iterative_law_recovers_the_known_saturating_curve(known):
    w = law(known, "LatentSeek", "accuracy_k")
    assert not w.refused and w.form == SATURATING
    for name, truth in (("A", A), ("a0", A0), ("s", S)):
        lo, hi = w.intervals[name]
        assert lo <= truth <= hi, (name, truth, lo, hi)
    assert w.params["x0"] == 0 and w.r2 > 0.98
    assert w.predict(np.array([0.0, 100.0])) == pytest.approx(
        [w.params["a0"], w.params["A"]], abs=0.01
    )


def test_forecasts_of_the_largest_budget_stay_within_the_bound(known):
    """The bound holds for the laws whose form generated the data (the Beta; the saturating
    curve in k) and for the power law; accuracy against tokens (LatentSeek's tokens grow less
    than linearly in k, as problems stop) and SC's majority vote only approximate the form, so
    for them the observed value must lie inside the forecast's interval."""
    by_law = {(f.label.split(" ")[0], f.law): f for f in known.forecasts}
    for key in [("SC", "coverage_power"), ("SC", "coverage_beta"), ("SC", "accuracy_n"),
                ("LatentSeek", "accuracy_k"), ("LatentSeek", "accuracy_compute")]:  # fmt: skip
        f = by_law[key]
        assert not f.refused, key
        assert f.within, (key, f.lo, f.observed, f.hi)
    for key in [("SC", "coverage_power"), ("SC", "coverage_beta"), ("LatentSeek", "accuracy_k")]:
        f = by_law[key]
        assert abs(f.error) <= FORECAST_BOUND, (key, f.predicted, f.observed)
    assert by_law[("SC", "coverage_beta")].cut == 16 and by_law[("SC", "coverage_beta")].target == N
    assert by_law[("LatentSeek", "accuracy_k")].cut == 8


def test_refusals_say_why(tmp_path):
    rng = np.random.default_rng(2)
    write(tmp_path / "few", latentseek_results(rng, 5), model="few")
    write(tmp_path / "flat", latentseek_results(rng, 12, a0=30.0, a_inf=30.0), model="flat")
    write(tmp_path / "never", sc_results(rng, 12, p=np.zeros(12)), model="never")
    old = sc_results(rng, 12, p=np.full(12, 0.5))
    for r in old:  # records written before per-sample grades were recorded
        r.sample_correct, r.sample_groups = [], []
    write(tmp_path / "old", old, model="old")
    result = fit_laws(load_records(tmp_path), resamples=20)
    refused = {(w.model, w.law): w.refused for w in result.laws}
    assert refused[("few", "accuracy_k")] == "5 problems (a law needs 8)"
    assert refused[("flat", "accuracy_k")] == "no variation: 16.7% at every budget"  # 2 of 12
    assert refused[("never", "coverage_beta")] == (
        "no variation: no sample of any problem is correct"
    )
    assert refused[("never", "coverage_power")] == "no variation: 0.0% at every budget"
    assert refused[("old", "coverage_beta")] == (
        "the records hold no per-sample grades (written before sample_correct)"
    )
    assert all(f.refused for f in result.forecasts)
    assert all(w.predict is None for w in result.laws if w.refused)


def test_a_beta_at_its_bound_says_that_only_the_mean_rate_is_known(tmp_path):
    # Every problem has one success rate (0.05: no spread beyond chance), as in the embedded
    # model's study (docs/sweeps-and-reports.md): the likelihood grows towards the binomial limit,
    # alpha and beta stop at the bound, and the law says what of it can be read.
    rng = np.random.default_rng(3)
    write(tmp_path / "flat", sc_results(rng, 60, p=np.full(60, 0.05)))
    w = law(fit_laws(load_records(tmp_path), resamples=20), "SC", "coverage_beta")
    assert not w.refused and max(w.params.values()) > 1000
    assert w.note.startswith("at the fit's bound") and "one rate for every problem" in w.note
    assert re.search(r"alpha / \(alpha \+ beta\) = 0\.0[3-7]", w.note), w.note


def test_the_known_beta_is_read_without_a_note(known):
    assert law(known, "SC", "coverage_beta").note == ""


def test_frontier_names_the_best_configuration_and_the_crossover():
    """Configuration X: 30% whatever the budget (100..1000 tokens); Y: 10% at 100 tokens rising
    linearly to 50% at 1000, so Y overtakes X at 550 tokens."""
    import pandas as pd

    def flat(x):
        return np.full(np.shape(x), 30.0)

    def rising(x):
        return 10.0 + 40.0 * (np.asarray(x, float) - 100.0) / 900.0

    laws = [
        Law("X", "sc", "gsm8k", "m", "accuracy_compute", SATURATING, "", predict=f,
            band=lambda x, f=f: (f(x) - 5, f(x) + 5))
        for f in [flat]
    ] + [
        Law("Y", "latentseek", "gsm8k", "m", "accuracy_compute", SATURATING, "", predict=rising,
            band=lambda x: (rising(x) - 5, rising(x) + 5))
    ]  # fmt: skip
    points = pd.DataFrame(
        [{"label": label, "dataset": "gsm8k", "model": "m", "law": "accuracy_compute",
          "budget": 0, "tokens": t, "value": f(t), "lo": 0.0, "hi": 100.0}
         for label, f in (("X", flat), ("Y", rising)) for t in (100.0, 1000.0)]
    )  # fmt: skip
    frontier, crossovers = _frontier(laws, points)
    assert frontier["label"].iloc[0] == "X" and frontier["label"].iloc[-1] == "Y"
    assert frontier["accuracy_pct"].iloc[-1] == pytest.approx(50.0)
    assert frontier["hi"].iloc[-1] == pytest.approx(55.0)
    (cross,) = crossovers.to_dict("records")
    assert (cross["from"], cross["to"]) == ("X", "Y") and 520 < cross["tokens"] < 580


def test_saturating_form_is_what_the_docstring_says():
    # A - (A - a0) exp(-(x - x0) / s): a0 at x0, then 1/e and 1/e^2 of the gap left one and two
    # scales later, A at infinity
    assert saturating(np.array([2.0, 5.0, 8.0, 1e9]), 70.0, 20.0, 3.0, 2.0) == pytest.approx(
        [20.0, 70.0 - 50.0 / math.e, 70.0 - 50.0 / math.e**2, 70.0]
    )


def test_the_report_section_figures_and_mlflow_values_carry_the_laws(known, tmp_path):
    # (write_report's files: tests/test_report.py; the sweep's parent run: tests/test_sweep.py.)
    text = laws_markdown(known, "laws.png", "frontier.png")
    assert "**1.6 points** over 6 forecasts" in text  # the median |error|, the headline
    assert "6 of 6 observed values lie inside" in text
    assert "| SC (N=32) | gsm8k | coverage_beta | 16 | 32 | 54.2 [46.9, 63.4] |" in text
    assert "alpha = 0.295 [0.23, 0.374]; beta = 2.37 [1.95, 2.99]" in text
    assert "| gsm8k | tiny | 70 | 3.84e+03 | LatentSeek (?) |" in text  # the frontier
    for draw in (plot_laws, plot_frontier):
        png = draw(known, tmp_path / f"{draw.__name__}.png")
        assert png is not None and png.stat().st_size > 10_000

    metrics, params = mlflow_values(known)
    assert metrics["law.LatentSeek.accuracy_k.A"] == pytest.approx(known.laws[-2].params["A"])
    assert metrics["law.LatentSeek.accuracy_k.A_lo"] == known.laws[-2].intervals["A"][0]
    assert "forecast.SC_N_32.coverage_beta.error_pts" in metrics
    assert params["law.SC_N_32.coverage_beta.form"] == known.laws[1].form
    # MLflow's rule for metric and param names
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-/ ]{1,250}", k) for k in [*metrics, *params])
