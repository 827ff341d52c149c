"""Rewards (SPEC.md §2): verdict arithmetic worked out by hand, verdict parsing, the self-reward
through the real engine on the embedded SmolLM2 (verdicts, reward and tokens recomputed from its
decoded verifier outputs), PSRM, user callables, and the prompt-template loaders' errors.

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

from pipeline.config import Config, ConfigError
from pipeline.engine.generation import GenerationResult, Generator
from pipeline.method.prompts import load_solver_template, load_verifiers, render_chat
from pipeline.method.rewards import (
    CallableReward,
    PsrmReward,
    SelfReward,
    VerifierDecoding,
    build_reward,
    combine_verdicts,
    has_format,
    import_callable,
    official_verdict,
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


def test_default_verifiers_are_the_papers():
    # SPEC §2: the four verifiers of the paper (Multi-Agent Verification), in the official order,
    # weights 2, 1, 2, 1, marker FINAL VERIFICATION ANSWER IS: (texts: tests/test_prompts.py).
    v = load_verifiers(Config().verifier_prompts)
    assert [(x.name, x.weight) for x in v.verifiers] == [
        ("calculation_check", 2),
        ("answer_correct", 1),
        ("answer_completeness", 2),
        ("understanding_check", 1),
    ]
    assert (v.marker, v.format_penalty, v.total_weight) == ("FINAL VERIFICATION ANSWER IS:", 2, 6)


def test_our_earlier_verifiers_stay_available():
    v = load_verifiers("verifiers-short")
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
        ("Verdict: 'True'", True),  # wrapped the ways models wrap a verdict (issue 28)
        ("Verdict: `False`", False),
        ("Verdict: \\boxed{True}", True),
        ("Verdict: $\\boxed{\\text{False}}$", False),
        ("Verdict: {True}", True),
        ('Verdict: "False".', False),
        ("Verdict: [**True**]", True),
        ("Verdict: 'Truely'", None),
    ],
)
def test_parse_verdict(generated, expected):
    assert load_verifiers("verifiers-short").parse_verdict(generated) is expected
    assert read_verdict(generated) is expected  # the test's own reader agrees on every case


@pytest.mark.parametrize(
    "generated, expected",
    [  # the paper's marker, as the issue found verdicts written (each read as None before)
        ("FINAL VERIFICATION ANSWER IS: 'True'", True),
        ("FINAL VERIFICATION ANSWER IS: `True`", True),
        ("FINAL VERIFICATION ANSWER IS: \\boxed{True}", True),
        ("**FINAL VERIFICATION ANSWER IS:** **True**", True),
        ("**FINAL VERIFICATION ANSWER IS:** {False}", False),
        ("FINAL VERIFICATION ANSWER IS: the answer is True", None),  # words between: no verdict
    ],
)
def test_parse_verdict_wrapped_paper_marker(generated, expected):
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
    reward = SelfReward(gen.tokenizer, load_verifiers("verifiers-short"), 32, "boxed")
    (rr,) = reward.score([problem()], ["\\boxed{2}"], gen)
    assert all("Verdict: True" in p for p in gen.prompts) and len(gen.prompts) == 4
    assert rr.value == -1.0 and rr.unparsed == 4
    assert rr.verdicts == dict.fromkeys(
        ["calculation", "answer_correct", "completeness", "understanding"]
    )


def test_self_reward_combines_the_four_verdicts():
    # calculation True, answer_correct False, completeness unparsed, understanding True:
    # -(1 + 2) / 6 = -0.5; two answers, each scored by its own 4 verifier outputs.
    gen = ScriptedGenerator(["Verdict: True", "Verdict: False", "hmm", "**Verdict:** true"])
    reward = SelfReward(
        gen.tokenizer, load_verifiers("verifiers-short"), 32, "boxed", format_rule=True
    )
    first, second = reward.score([problem(), problem(pid="p1")], ["\\boxed{2}", "it is 2"], gen)
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
        for v in load_verifiers("verifiers-short").verifiers
    )


def test_self_reward_on_the_tiny_model_is_unparsed():
    # A random model never writes a verdict: every verifier unparsed, reward -1 (not 0).
    loaded = tiny_loaded()
    reward = build_reward(
        "self", loaded.tokenizer, load_verifiers("verifiers-short"), "boxed", 8, False
    )
    (rr,) = reward.score([problem()], ["\\boxed{2}"], Generator(loaded.model, loaded.tokenizer))
    assert rr.value == -1.0 and rr.unparsed == 4 and rr.generated_tokens == 4 * 8


class RecordingGenerator:
    """Wraps the real `Generator`: decodes with it and keeps every request and result."""

    def __init__(self, real: Generator) -> None:
        self.real = real
        self.tokenizer = real.tokenizer
        self.requests: list = []
        self.outputs: list[GenerationResult] = []

    def generate(self, requests):
        outputs = self.real.generate(requests)
        self.requests.extend(requests)
        self.outputs.extend(outputs)
        return outputs


def read_verdict(text: str) -> bool | None:
    """The SPEC §2 verdict, read without the library's regex: the last "Verdict:" followed (after
    spaces, markdown, quotes, braces and LaTeX wrappers) by the whole word True or False, any
    case; else None."""
    verdict = None
    lower = text.lower()
    start = lower.find("verdict:")
    while start >= 0:
        rest = lower[start + len("verdict:") :]
        while True:  # spaces, markdown, quotes, braces and LaTeX wrappers before the word
            stripped = rest.lstrip(" \t\n*_'\"`{[($")
            for latex in ("\\boxed", "\\textbf", "\\text", "\\mathrm", "\\mathbf"):
                if stripped.startswith(latex + "{"):
                    stripped = stripped[len(latex) + 1 :]
            if stripped == rest:
                break
            rest = stripped
        for word, value in (("true", True), ("false", False)):
            after = rest[len(word) : len(word) + 1]
            if rest.startswith(word) and not (after.isalnum() or after == "_"):
                verdict = value
        start = lower.find("verdict:", start + 1)
    return verdict


def test_self_reward_on_the_embedded_model(make_solver, embedded_cfg):
    # The real engine: the solver's SelfReward, its Generator, the shipped verifier templates,
    # the embedded SmolLM2, 32 verifier tokens. The answers hold verdicts, which the 135M model
    # tends to echo, so its outputs hold True, False, no verdict, and two verdicts in one text
    # (checked at the end: every path of the parsing is exercised by real generated text).
    cfg = embedded_cfg.replace(reward="self", verifier_max_new_tokens=32)
    solver = make_solver(cfg.replace(verifier_prompts="verifiers-short"))
    reward = solver.reward
    assert isinstance(reward, SelfReward) and reward.max_new_tokens == 32
    recorder = RecordingGenerator(solver.backend)
    probs = [problem("What is 2+3?", "5", "p0"), problem("What is 2+3?", "5", "p1")]
    answers = ["2 + 3 = 5. Verdict: True", "Verdict: False. Verdict: True"]
    results = reward.score(probs, answers, recorder)

    tok, verifiers = solver.tokenizer, load_verifiers("verifiers-short")
    n = len(verifiers.verifiers)
    weights = [v.weight for v in verifiers.verifiers]
    assert len(recorder.outputs) == n * len(answers)  # every verifier of every answer, once
    seen, all_texts = [], []
    for j, (p, answer, rr) in enumerate(zip(probs, answers, results)):
        prompts = [render_chat(tok, v.messages(p.question, answer)) for v in verifiers.verifiers]
        outs = recorder.outputs[j * n : (j + 1) * n]
        assert [list(q.prompt_ids) for q in recorder.requests[j * n : (j + 1) * n]] == prompts
        texts = [tok.decode(o.tokens, skip_special_tokens=True) for o in outs]
        verdicts = [read_verdict(t) for t in texts]
        seen += verdicts
        all_texts += texts
        assert list(rr.verdicts) == [v.name for v in verifiers.verifiers]
        assert list(rr.verdicts.values()) == verdicts, texts
        assert rr.unparsed == verdicts.count(None)
        failed = sum(w for d, w in zip(verdicts, weights) if d is not True)
        assert rr.value == pytest.approx(-failed / sum(weights))
        assert rr.prompt_tokens == sum(len(q) for q in prompts)
        assert all(len(o.tokens) <= 32 for o in outs)
        assert rr.generated_tokens == sum(len(o.tokens) for o in outs)
    # the test's premise: all three outcomes occur, and some text has two verdicts (the last wins)
    assert {True, False, None} <= set(seen), all_texts
    assert any(t.lower().count("verdict:") > 1 for t in all_texts), all_texts


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
    for bad in ("math", "math:", ":sqrt"):
        with pytest.raises(ValueError, match="expected 'module:function'"):
            import_callable(bad)
    with pytest.raises(ValueError, match="cannot import module 'tests.no_such': ModuleNotFound"):
        import_callable("tests.no_such:fn")


# --- template loaders -------------------------------------------------------------------------


def write(tmp_path, text: str, name: str = "t.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_shipped_solver_templates_load():
    boxed, js = load_solver_template("boxed"), load_solver_template("json")
    assert (boxed.style, js.style) == ("boxed", "json")
    # SPEC §3: the instruction is the system message, the user message the question alone
    assert boxed.messages("What is 1+1?") == [
        {
            "role": "system",
            "content": "Please reason step by step, and put your final answer within \\boxed{}.",
        },
        {"role": "user", "content": "What is 1+1?"},
    ]
    system, user = js.messages("q")
    assert system == {
        "role": "system",
        "content": "You are a precise math question solver. Solve this math problem. ",
    }
    assert user["role"] == "user" and user["content"].startswith("QUESTION: q \nLet's think")
    assert '{"thought process": "your thought process", "final answer"' in user["content"]


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
        ("verifiers:\n  - {weight: 1, user: '{answer} {proof}'}\n", "proof"),
    ],
)
def test_bad_verifiers(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_verifiers(write(tmp_path, text))


# --- compat=reference: the official verdict, decoding and format rule -----------------------------

OFFICIAL_VERIFIERS = load_verifiers("verifiers")
MARK = "FINAL VERIFICATION ANSWER IS:"


def _whole(name: str, response: str) -> str:
    """A verifier's whole decoded sequence (special tokens skipped, ChatML role words kept):
    its prompt for a made-up answer, then `response`."""
    v = {x.name: x for x in OFFICIAL_VERIFIERS.verifiers}[name]
    prompt = v.messages("What is 2+3?", "2 + 3 = 5")[0]["content"]
    return f"system\nYou are helpful\nuser\n{prompt}\nassistant\n{response}"


@pytest.mark.parametrize(
    "name, response, expected",
    [
        ("answer_correct", "Checked. FINAL VERIFICATION ANSWER IS:True", True),
        ("answer_correct", "FINAL VERIFICATION ANSWER IS: **False**", False),
        ("answer_correct", "final verification answer is: false", False),  # any case
        # "true" anywhere after the last marker wins over "false"
        ("answer_correct", "FINAL VERIFICATION ANSWER IS: False, not True", True),
        # No marker in the response: the prompt's own last marker is read. calculation_check's
        # is followed by "True'", so a silent verifier approves ...
        ("calculation_check", "I would need more time.", True),
        # ... the others' by "False'", so they reject unless "true" appears anywhere later,
        ("answer_correct", "I would need more time.", False),
        ("understanding_check", "I would need more time.", False),
        # ... even inside another word.
        ("answer_completeness", "That claim is untrue.", True),
        ("understanding_check", "FINAL VERIFICATION ANSWER IS:", False),  # nothing after it
    ],
)
def test_official_verdict_reads_prompt_and_answer(name, response, expected):
    assert official_verdict(_whole(name, response), MARK) is expected


def test_official_verdict_without_any_marker_is_false():
    assert official_verdict("no marker at all, true", MARK) is False


def test_reference_self_reward_uses_the_official_rules():
    # Byte tokenizer: the prompt is the rendered chat text; the verdict is read from prompt and
    # answer together. calculation_check silent (approves through its prompt), answer_correct
    # says False, completeness says True, understanding says nothing (rejects): -(1 + 1) / 6.
    gen = ScriptedGenerator(["hmm", f"{MARK}False", f"{MARK} **True**", "no idea"])
    reward = SelfReward(
        gen.tokenizer, OFFICIAL_VERIFIERS, 32, "boxed", format_rule=True, reference=True
    )
    (rr,) = reward.score([problem()], ["\\boxed{5}"], gen)
    assert rr.value == pytest.approx(-2 / 6)
    assert rr.verdicts == {
        "calculation_check": True,
        "answer_correct": False,
        "answer_completeness": True,
        "understanding_check": False,
    }
    assert rr.unparsed == 2  # verifiers whose own text held no marker
    # The official format rule: the regex \\boxed{(.*)} on the answer, -2 before dividing.
    (no_box,) = reward.score([problem()], ["the answer is 5"], gen)
    assert no_box.value == pytest.approx(-(2 + 2) / 6)


def test_reference_decoding_is_the_models_generation_config():
    from transformers import GenerationConfig

    tok = ByteTokenizer()
    sampled = GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
        eos_token_id=[3, 7],
    )  # fmt: skip
    d = VerifierDecoding.of_model(sampled, tok, 4096)
    assert (d.sample, d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (
        True, 0.7, 0.8, 20, 1.05,
    )  # fmt: skip
    assert (d.max_new_tokens, d.stop_ids) == (4096, frozenset({3, 7}))
    greedy = VerifierDecoding.of_model(GenerationConfig(eos_token_id=2), tok, 16)
    assert (greedy.sample, greedy.top_k, greedy.repetition_penalty, greedy.stop_ids) == (
        False, 0, 1.0, frozenset({2}),
    )  # fmt: skip
    # Requests carry it, each verifier of each call seeded apart.
    reward = SelfReward(tok, OFFICIAL_VERIFIERS, 4096, "boxed", reference=True, decoding=d, seed=1)
    first, again, later = (reward.requests(problem(), "x", i) for i in (0, 0, 1))
    assert [q.seed for q in first] == [q.seed for q in again]
    assert len({q.seed for q in first + later}) == 8
    assert all((q.sample, q.top_k, q.max_new_tokens) == (True, 20, 4096) for q in first)
