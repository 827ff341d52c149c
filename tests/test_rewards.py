"""Rewards (SPEC.md §2): verdict arithmetic worked out by hand, verdict parsing, PSRM, user
callables, and the prompt-template loaders' errors.

Default verifiers (configs/prompts/verifiers.yaml), in order, with weights:
calculation 2, answer_correct 1, completeness 2, understanding 1 -> total 6.
reward = -(weights of verifiers that did not say True [+ 2 if the format rule fails]) / 6.
"""

from __future__ import annotations

import itertools
import math
import textwrap

import pytest
from conftest import ByteTokenizer, problem, tiny_loaded

from pipeline.config import ConfigError
from pipeline.generation import GenerationResult, Generator
from pipeline.prompts import load_solver_template, load_verifiers, render_chat
from pipeline.rewards import (
    CallableReward,
    PsrmReward,
    SelfReward,
    build_reward,
    combine_verdicts,
    has_format,
    import_callable,
)

WEIGHTS = (2, 1, 2, 1)
T, F = True, False

# All 16 verdict combinations (calculation, answer_correct, completeness, understanding) and the
# reward by hand: the weights of the False ones, negated, over 6.
COMBINATIONS = [
    ((T, T, T, T), 0 / 6),
    ((T, T, T, F), -1 / 6),
    ((T, T, F, T), -2 / 6),
    ((T, T, F, F), -3 / 6),
    ((T, F, T, T), -1 / 6),
    ((T, F, T, F), -2 / 6),
    ((T, F, F, T), -3 / 6),
    ((T, F, F, F), -4 / 6),
    ((F, T, T, T), -2 / 6),
    ((F, T, T, F), -3 / 6),
    ((F, T, F, T), -4 / 6),
    ((F, T, F, F), -5 / 6),
    ((F, F, T, T), -3 / 6),
    ((F, F, T, F), -4 / 6),
    ((F, F, F, T), -5 / 6),
    ((F, F, F, F), -6 / 6),
]


def test_the_table_covers_every_combination():
    assert sorted(v for v, _ in COMBINATIONS) == sorted(itertools.product((T, F), repeat=4))


@pytest.mark.parametrize("verdicts, expected", COMBINATIONS)
def test_combine_verdicts(verdicts, expected):
    assert combine_verdicts(verdicts, WEIGHTS) == pytest.approx(expected)
    # With the format rule satisfied nothing changes; failed adds the penalty 2 before dividing.
    assert combine_verdicts(verdicts, WEIGHTS, True, 2.0) == pytest.approx(expected)
    assert combine_verdicts(verdicts, WEIGHTS, False, 2.0) == pytest.approx(expected - 2 / 6)


@pytest.mark.parametrize(
    "verdicts, format_ok, expected",
    [
        ((None, None, None, None), True, -1.0),  # unparsed counts as False
        ((None, T, T, T), True, -2 / 6),
        ((T, None, T, None), True, -2 / 6),
        ((T, T, T, T), False, -2 / 6),  # all True, bad format: -(0 + 2) / 6
        ((F, F, F, F), False, -8 / 6),  # -(6 + 2) / 6: below -1 with the format rule only
        ((None, F, T, T), False, -5 / 6),  # -(2 + 1 + 2) / 6
    ],
)
def test_combine_verdicts_none_and_format(verdicts, format_ok, expected):
    assert combine_verdicts(verdicts, WEIGHTS, format_ok, 2.0) == pytest.approx(expected)


def test_default_verifiers_are_the_spec_roles():
    v = load_verifiers("verifiers")
    assert [(x.name, x.weight) for x in v.verifiers] == [
        ("calculation", 2),
        ("answer_correct", 1),
        ("completeness", 2),
        ("understanding", 1),
    ]
    assert (v.marker, v.format_penalty, v.total_weight) == ("Verdict:", 2, 6)


# --- verdict parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "generated, expected",
    [
        ("All steps check out.\nVerdict: True", True),
        ("Verdict: False", False),
        ("verdict: true", True),  # case-insensitive
        ("VERDICT: FALSE.", False),
        ("**Verdict:** True", True),  # markdown bold around the marker
        ("Verdict:   **False**", False),
        ("Verdict: False\nOn second thought... Verdict: True", True),  # the last one wins
        ("Verdict: True, no wait. Verdict: False", False),
        ("I think it is true.", None),  # no marker
        ("The answer is correct.", None),
        ("", None),
        ("Verdict: Truely", None),  # not a whole word
        ("Verdict: maybe", None),
    ],
)
def test_parse_verdict(generated, expected):
    assert load_verifiers("verifiers").parse_verdict(generated) is expected


class ScriptedGenerator:
    """Stands in for `Generator`: each request's 'generated' text comes from `texts` in turn,
    and the prompts it was given are kept."""

    def __init__(self, texts: list[str]) -> None:
        self.tokenizer = ByteTokenizer()
        self.texts = texts
        self.prompts: list[str] = []

    def generate(self, requests):
        out = []
        for req, text in zip(requests, itertools.cycle(self.texts)):
            self.prompts.append(self.tokenizer.decode(req.prompt_ids))
            ids = self.tokenizer.encode(text)
            out.append(GenerationResult(ids, "eos", prompt_tokens=len(req.prompt_ids)))
        return out


def test_self_reward_reads_only_generated_text():
    # The verifier prompts themselves contain 'write "Verdict: True" if ...'; a verifier that
    # generates nothing must not approve by matching its own prompt.
    gen = ScriptedGenerator([""])
    reward = SelfReward(gen, load_verifiers("verifiers"), 32, "boxed")
    (rr,) = reward.score([problem()], ["\\boxed{2}"])
    assert all("Verdict: True" in p for p in gen.prompts) and len(gen.prompts) == 4
    assert rr.value == -1.0 and rr.unparsed == 4
    assert rr.verdicts == dict.fromkeys(
        ["calculation", "answer_correct", "completeness", "understanding"]
    )


def test_self_reward_combines_the_four_verdicts():
    # calculation True, answer_correct False, completeness unparsed, understanding True:
    # -(1 + 2) / 6 = -0.5; two answers, each scored by its own 4 verifier outputs.
    gen = ScriptedGenerator(["Verdict: True", "Verdict: False", "hmm", "**Verdict:** true"])
    reward = SelfReward(gen, load_verifiers("verifiers"), 32, "boxed", format_rule=True)
    first, second = reward.score([problem(), problem(pid="p1")], ["\\boxed{2}", "it is 2"])
    assert first.value == pytest.approx(-0.5) and first.unparsed == 1
    assert first.verdicts == {
        "calculation": True,
        "answer_correct": False,
        "completeness": None,
        "understanding": True,
    }
    assert second.value == pytest.approx(-5 / 6)  # the same verdicts, no \boxed: -(3 + 2) / 6
    assert first.prompt_tokens == sum(
        len(render_chat(gen.tokenizer, v.messages("What is 1+1?", "\\boxed{2}")))
        for v in load_verifiers("verifiers").verifiers
    )


def test_self_reward_on_the_tiny_model_is_unparsed():
    # A random model never writes a verdict: every verifier unparsed, reward -1 (not 0).
    loaded = tiny_loaded()
    reward = build_reward(
        "self",
        Generator(loaded.model, loaded.tokenizer),
        load_verifiers("verifiers"),
        "boxed",
        8,
        False,
    )
    (rr,) = reward.score([problem()], ["\\boxed{2}"])
    assert rr.value == -1.0 and rr.unparsed == 4 and rr.generated_tokens == 4 * 8


@pytest.mark.parametrize(
    "answer, style, ok",
    [
        ("so \\boxed{18}", "boxed", True),
        ("\\fbox{18}", "boxed", True),
        ("the answer is 18", "boxed", False),
        ('{"thought process": "x", "final answer": 18}', "json", True),
        ('{"thought process": "x"}', "json", False),
        ("\\boxed{18}", "json", False),
    ],
)
def test_has_format(answer, style, ok):
    assert has_format(answer, style) is ok


# --- PSRM and user callables ------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, gold, value",
    [
        ("... so \\boxed{18}", "18", 0.0),
        ("\\boxed{18.0}", "18", 0.0),  # not string equality (a reference defect)
        ("\\boxed{17}", "18", -1.0),
        ("I do not know", "18", -1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 0.0),
    ],
)
def test_psrm(answer, gold, value):
    (rr,) = PsrmReward("boxed").score([problem(gold=gold)], [answer])
    assert rr.value == value


def test_psrm_json_style():
    rr = PsrmReward("json").score(
        [problem(gold="7")] * 2, ['{"final answer": 7}', '{"final answer": 8}']
    )
    assert [r.value for r in rr] == [0.0, -1.0]


def length_reward(p, answer):  # a user reward, as 'test_rewards:length_reward'
    return -len(answer) / 10


def test_callable_reward_via_build_reward():
    reward = build_reward("test_rewards:length_reward", None, None, "boxed", 8, False)
    assert isinstance(reward, CallableReward) and reward.name == "test_rewards:length_reward"
    assert [r.value for r in reward.score([problem()] * 2, ["abc", ""])] == [-0.3, -0.0]


def test_callable_reward_rejects_non_finite_values():
    reward = CallableReward(lambda p, a: math.nan, "nan_reward")
    with pytest.raises(ValueError, match="nan_reward returned nan for p0"):
        reward.score([problem()], ["x"])


def test_import_callable():
    assert import_callable("math:sqrt") is math.sqrt
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        import_callable("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="math has no callable 'no_such_fn'"):
        import_callable("math:no_such_fn")
    with pytest.raises(ValueError, match="no callable 'pi'"):
        import_callable("math:pi")  # exists, but is not callable
    with pytest.raises(ValueError, match="no callable ''"):
        import_callable("math")


# --- template loaders -------------------------------------------------------------------------


def write(tmp_path, text: str, name: str = "t.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_shipped_solver_templates_load():
    boxed, js = load_solver_template("boxed"), load_solver_template("json")
    assert (boxed.style, js.style) == ("boxed", "json")
    msgs = boxed.messages("What is 1+1?")
    assert msgs == [{"role": "user", "content": msgs[0]["content"]}]
    assert msgs[0]["content"].startswith("What is 1+1?") and "\\boxed{}" in msgs[0]["content"]
    assert '{"thought process": "...", "final answer": "42"}' in js.messages("q")[0]["content"]


def test_solver_template_with_system_message(tmp_path):
    t = load_solver_template(
        write(tmp_path, "style: boxed\nsystem: Be brief.\nuser: 'Q: {question}'\n")
    )
    assert t.name == "t" and t.messages("1+1") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: 1+1"},
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("style: boxed\n", "missing key 'user'"),
        ("user: '{question}'\n", "missing key 'style'"),
        ("style: latex\nuser: '{question}'\n", "style='latex'"),
        ("style: boxed\nuser: '{question} {hint}'\n", "hint"),  # unknown placeholder
        ("style: boxed\nuser: 'Q: {question'\n", "bad placeholder"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_solver_template(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        load_solver_template(path)
    assert "t.yaml" in str(err.value)  # the message names the file


def test_unknown_template_names():
    with pytest.raises(ConfigError, match="known: boxed, json"):
        load_solver_template("no_such_template")
    with pytest.raises(ConfigError, match="not found"):
        load_solver_template("/no/such/dir/template.yaml")


VERIFIER_OK = """\
marker: "Check:"
verifiers:
  - name: only
    weight: 1
    user: "{question} / {answer}"
"""


def test_custom_verifiers(tmp_path):
    v = load_verifiers(write(tmp_path, VERIFIER_OK))
    assert (v.marker, v.format_penalty, v.total_weight) == ("Check:", 2.0, 1.0)
    assert v.parse_verdict("Check: false") is False and v.parse_verdict("Verdict: True") is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("marker: 'V:'\n", "non-empty list 'verifiers'"),
        ("verifiers: []\n", "non-empty list 'verifiers'"),
        ("verifiers:\n  - user: '{answer}'\n", "verifier 0 needs 'user' and 'weight'"),
        ("verifiers:\n  - weight: 1\n", "verifier 0 needs 'user' and 'weight'"),
        ("verifiers:\n  - {weight: -1, user: '{answer}'}\n", "negative weight"),
        ("verifiers:\n  - {weight: 0, user: '{answer}'}\n", "sum to > 0"),
        ("verifiers:\n  - {weight: 1, user: '{answer} {solution}'}\n", "solution"),
    ],
)
def test_bad_verifiers(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_verifiers(write(tmp_path, text))
