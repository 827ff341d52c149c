"""`compat=reference`: the official code's budgets, stops, answer text and grading
(`pipeline.method.compat`), checked by hand and on the tiny model and the embedded tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_EOS, ScriptedReward, problem, tiny_loaded

from pipeline.benchmarks.official import official_extract, official_number
from pipeline.config import Config, ConfigError
from pipeline.data import Problem, load_dataset
from pipeline.method.compat import decode_rules, make_grader
from pipeline.method.solver import Solver

# --- the official GSM8K extraction, worked out by hand from SPEC §6 ---------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        # 1. the first numeric \boxed{} wins, even before a later boxed one
        ("so \\boxed{18} and later \\boxed{20}", "18"),
        ("\\boxed{$1,234.50}", "1234.50"),  # currency and commas removed, decimals kept as is
        ("\\boxed{18.0}", "18.0"),  # no normalisation: "18.0" stays "18.0"
        # 2. "Answer:" (case-insensitive) before "="
        ("x = 5\nanswer: 7", "7"),
        # 3. the first "= N"
        ("3 + 4 = 7, then 7 * 2 = 14", "7"),
        # 4. "is N dollars"
        ("The total is $ 12 dollars", "12"),
        # 5. the trailing number of the last line that ends in one, from the bottom up
        ("first 3 apples\nshe has 9\nthe end.", "9"),
        # 6. else the last number anywhere
        ("between 4 and 6 apples.", "6"),
        ("no digits at all", None),
        # a non-numeric box falls through to the other rules
        ("\\boxed{x} and 3 + 2 = 5", "5"),
    ],
)
def test_official_number(text, expected):
    assert official_number(text) == expected


def test_official_json_extraction():
    assert official_extract('{"thought process": "a", "final answer": "1,000"}', "json") == "1000"
    assert official_extract('{"final answer": 42}', "json") == "42"  # a number is str()-ed
    # Not JSON (the answer text keeps <|im_end|> in compat mode): the text after "final answer"
    # up to "}" or "<".
    assert official_extract('{"final answer": "17"}<|im_end|>', "json") == "17"
    assert official_extract("my answer: 8<|im_end|>", "json") == "8"


def test_official_grading_is_string_equality_with_the_label():
    grader = make_grader("reference", "boxed")
    # GSM8K row 146's label is "2,125" as written: the official extraction drops the comma, so
    # the official code never counts it correct, and neither does this mode.
    (p,) = load_dataset(Config(dataset="gsm8k", ids=["gsm8k-146"])).problems
    assert p.label == "2,125" and p.gold == "2125"
    assert not grader(p, "\\boxed{2125}").correct
    assert make_grader("none", "boxed")(p, "\\boxed{2125}").correct
    gsm = Problem("gsm8k-0", "gsm8k", "q", "18", label="18")
    assert grader(gsm, "\\boxed{18}").correct
    assert not grader(gsm, "\\boxed{18.0}").correct  # "18.0" != "18", as in the official code
    assert make_grader("none", "boxed")(gsm, "\\boxed{18.0}").correct
    # Datasets the official judge does not cover keep this engine's grading.
    math = Problem("math500-0", "math500", "q", "\\frac{1}{2}")
    assert grader(math, "\\boxed{0.5}").correct


# --- budgets and stops --------------------------------------------------------------------------


def test_decode_rules_budgets(embedded):
    tok = embedded.tokenizer
    none = decode_rules("none", 128, tok, {2})
    ref = decode_rules("reference", 128, tok, {2})
    assert (none.cot_max_new_tokens, ref.cot_max_new_tokens) == (128, 129)
    assert none.continuation_max_new_tokens(25) == 103  # the cap is on the whole answer
    assert ref.continuation_max_new_tokens(25) == 129  # the full cap + 1, whatever U
    assert none.continuation_max_new_tokens(200) == 0
    # SmolLM2: <|endoftext|> is id 0, <|im_end|> (the EOS) id 2, and "</s>" is no token.
    assert ref.cot_stop_ids == {0, 2} and ref.continuation_stop_ids == {2}
    assert none.cot_stop_ids == none.continuation_stop_ids == {2}
    assert ref.keep_special_tokens and not none.keep_special_tokens


def test_config_rejects_unknown_compat():
    with pytest.raises(ConfigError, match="compat"):
        Config(compat="official")


def _tiny_solver(cfg: Config, reward=None) -> Solver:
    torch.manual_seed(0)
    return Solver(cfg, tiny_loaded(), reward=reward)


def _tiny_cfg(**kw) -> Config:
    base = dict(method=["latentseek"], rho=0.5, lr=0.5, max_iters=2, max_new_tokens=6)
    return Config(**{**base, **kw})


def test_reference_budget_on_the_tiny_model():
    # The tiny random model almost never emits its EOS in a few tokens; with a reward that stays
    # at -1, every answer runs to its budget, so the lengths show the budget rule.
    reward = ScriptedReward([-1.0, -1.0, -1.0])
    ref = _tiny_solver(_tiny_cfg(compat="reference"), reward).run("latentseek", [problem()])[0]
    none = _tiny_solver(_tiny_cfg(), ScriptedReward([-1.0] * 3)).run("latentseek", [problem()])[0]
    assert ref.error == "" and none.error == ""
    # (Deterministic: the tiny model's weights are seeded, and it emits no EOS within 7 tokens.)
    assert chr(TINY_EOS) not in ref.cot_answer
    assert ref.cot_length == 7  # cap + 1
    assert none.cot_length == 6
    assert (ref.update_length, none.update_length) == (3, 3)  # int(0.5 * 7), int(0.5 * 6)
    assert [s.tokens for s in ref.iteration_stats] == [3 + 7, 3 + 7]  # U + cap + 1
    assert [s.tokens for s in none.iteration_stats] == [6, 6]  # the whole answer: the cap
