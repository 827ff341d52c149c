"""Answer extraction and grading: table-driven cases from GSM8K, MATH-500 and AIME 2024.

Golds are taken from the shipped data (GSM8K label after "####", MATH-500 / AIME field
"answer"); predictions are the forms small models actually write.
"""

from __future__ import annotations

import threading

import pytest

from pipeline.method import grading
from pipeline.method.grading import (
    Grade,
    extract_answer,
    grade,
    is_equivalent,
    normalize_answer,
    same_answer,
)

# --- extraction: (completion, style, expected extracted string) ------------------------------

EXTRACTION_CASES = [
    # boxed style
    ("She makes 9 * 2 = $18 a day.\n\\boxed{18}", "boxed", "18"),
    ("So $x = \\boxed{\\frac{1}{\\sqrt{2}}}$.", "boxed", "\\frac{1}{\\sqrt{2}}"),
    ("First \\boxed{3}, then I corrected it: \\boxed{5}", "boxed", "5"),
    (
        "Final: \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
        "boxed",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
    ),
    ("The set is \\boxed{\\{1, 2\\}}.", "boxed", "\\{1, 2\\}"),
    ("Hence \\fbox{42}", "boxed", "42"),
    ("so the answer is $\\boxed 7$.", "boxed", "7"),
    ("Answer \\boxed{17} and an empty \\boxed{} at the end", "boxed", "17"),
    ("\\boxed{\\text{(C)}}", "boxed", "\\text{(C)}"),
    # json, read from a boxed-style prompt as the second stage
    ('{"thought process": "16-3-4=9, 9*2=18", "final answer": 18}', "boxed", "18"),
    # json style
    ('```json\n{"thought process": "...", "final answer": "18"}\n```', "json", "18"),
    ('{"thought process": "...", "final answer": 1000}', "json", "1000"),
    (
        '{"Thought Process": "x", "Final Answer": "\\frac{1}{2}"} I hope this helps!',
        "json",
        "\\frac{1}{2}",
    ),
    ('{"thought process": "a", "final_answer": "\\\\frac{14}{3}"}', "json", "\\frac{14}{3}"),
    ('Sure! {"thought process": "a", "final answer": 72, } trailing', "json", "72"),
    ("No JSON here, but \\boxed{204}", "json", "204"),
    # phrases and last number
    ("Adding them up, the answer is 42.", "boxed", "42"),
    ("The answer is: **$18.00** per day", "boxed", "18.00 per day"),
    ("Final answer: 3.5 apples.\nDone", "boxed", "3.5 apples"),
    ("He walks 3 miles, then 4 more, so 7 miles in total", "boxed", "7"),
    ("Total cost is 1,250 dollars", "json", "1,250"),
    ("Temperature changes from 5 to -3", "boxed", "-3"),
    # nothing at all
    ("I am not sure how to solve this problem.", "boxed", None),
    ("", "json", None),
]


@pytest.mark.parametrize(("text", "style", "expected"), EXTRACTION_CASES)
def test_extract_answer(text: str, style: str, expected: str | None) -> None:
    assert extract_answer(text, style) == expected


def test_extract_answer_rejects_unknown_style() -> None:
    with pytest.raises(ValueError, match="style"):
        extract_answer("\\boxed{1}", style="xml")


# --- normalisation: (raw answer, canonical string) ---------------------------------------------

NORMALIZE_CASES = [
    ("18.00", "18"),
    ("1,000", "1000"),
    ("1{,}000", "1000"),
    ("$18", "18"),
    ("\\$18.50", "18.5"),
    ("18 dollars", "18"),
    ("18 USD", "18"),
    ("18 apples", "18"),
    ("18.", "18"),
    ("033", "33"),
    ("-0.0", "0"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\text{Evelyn}", "Evelyn"),
    ("\\text{(C)}", "C"),
    ("90^\\circ", "90"),
    ("10\\%", "10"),
    ("x = 5", "5"),
    ("1,-2", "1,-2"),
    ("\\cot x", "\\cot x"),
    ("\\boxed{5}", "5"),
]


@pytest.mark.parametrize(("raw", "canonical"), NORMALIZE_CASES)
def test_normalize_answer(raw: str, canonical: str) -> None:
    assert normalize_answer(raw) == canonical


# --- equivalence: (prediction, gold, expected) --------------------------------------------------

EQUIVALENCE_CASES = [
    # GSM8K
    ("18.00", "18", True),
    ("1,000", "1000", True),
    ("$18", "18", True),
    ("18 dollars", "18", True),
    ("18.", "18", True),
    ("\\$70{,}000", "70000", True),
    ("17", "18", False),
    ("18.5", "18", False),
    ("180", "18", False),
    # MATH-500
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\dfrac{1}{2}", True),
    ("\\frac{14}{3}", "\\frac{14}{3}", True),
    ("4.67", "\\frac{14}{3}", False),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True),
    ("11\\sqrt{2}", "11\\sqrt2", True),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(-\\infty, 3)", "(-\\infty,3]", False),
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("(6, 31, -1)", "(6,31,-1)", True),
    ("(31, 6, -1)", "(6,31,-1)", False),
    ("-2, 1", "1,-2", True),
    ("\\pi", "\\pi", True),
    ("3.14", "\\pi", False),
    ("30^\\circ", "30", True),
    ("90", "90^\\circ", True),
    ("x = 5", "x=5", True),
    ("5", "x=5", True),
    ("x=5", "5", True),
    ("10\\%", "10", True),
    ("\\text{(C)}", "C", True),
    ("(C)", "\\text{(C)}", True),
    ("(B)", "\\text{(C)}", False),
    ("Evelyn", "\\text{Evelyn}", True),
    ("6-5i", "6 - 5i", True),
    ("-q + p", "p - q", True),
    ("p + q", "p - q", False),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    # AIME 2024
    ("033", "33", True),
    ("204", "204", True),
    ("113", "204", False),
    # nothing extracted
    (None, "18", False),
    ("", "18", False),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), EQUIVALENCE_CASES)
def test_is_equivalent(pred: str | None, gold: str, expected: bool) -> None:
    assert is_equivalent(pred, gold) is expected


# --- grade: completion to Grade end to end ------------------------------------------------------

GRADE_CASES = [
    ("... so she makes $18 every day. \\boxed{18}", "18", "boxed", Grade("18", True)),
    ('{"thought process": "2 + 1", "final answer": 3}', "3", "json", Grade("3", True)),
    ("The answer is 4.", "3", "boxed", Grade("4", False)),
    (
        "Thus $f = \\boxed{\\dfrac{14}{3}}$.",
        "\\frac{14}{3}",
        "boxed",
        Grade("\\dfrac{14}{3}", True),
    ),
    ("I give up.", "204", "boxed", Grade(None, False)),
]


@pytest.mark.parametrize(("text", "gold", "style", "expected"), GRADE_CASES)
def test_grade(text: str, gold: str, style: str, expected: Grade) -> None:
    assert grade(text, gold, style) == expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("18.00", "18", True),
        ("\\frac{1}{2}", "0.5", True),
        ("3", "4", False),
        (None, "4", False),
        (None, None, False),
    ],
)
def test_same_answer(a: str | None, b: str | None, expected: bool) -> None:
    assert same_answer(a, b) is expected


# --- timeout and threads -----------------------------------------------------------------------


def test_is_equivalent_works_off_the_main_thread() -> None:
    # math-verify's own timeout uses SIGALRM and raises outside the main thread.
    results: dict[str, bool] = {}

    def work() -> None:
        results["sqrt"] = is_equivalent("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}")
        results["wrong"] = is_equivalent("\\sqrt{3}/2", "\\frac{\\sqrt2}{2}")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert results == {"sqrt": True, "wrong": False}


def test_slow_verification_times_out_as_not_equivalent(monkeypatch: pytest.MonkeyPatch) -> None:
    # The verification hangs until released; the call must give up on its own (timeout_s) and
    # answer "not equivalent" while the hang is still going on.
    release = threading.Event()
    finished = threading.Event()

    def hang(gold: str, pred: str) -> bool:
        release.wait(120)
        finished.set()
        return True

    monkeypatch.setattr(grading, "_math_verify_equal", hang)
    try:
        assert is_equivalent("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", timeout_s=0.2) is False
        assert not finished.is_set()  # it returned before the verification ended
    finally:
        release.set()


@pytest.mark.parametrize(
    "tower", ["10^{10^{10}}", "{10^{10}}^{10^{10}}", "10^10^10", "10^{10000000}"]
)
def test_power_towers_are_refused_without_blocking(
    tower: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sympy would evaluate these in C while holding the GIL, beyond any thread timeout (minutes
    # to forever): they must never reach it. Refused early, math-verify is not even called.
    calls = []
    monkeypatch.setattr(grading, "_math_verify_equal", lambda g, p: calls.append(p) or False)
    assert is_equivalent(tower, "5") is False
    assert is_equivalent(tower, tower) is True  # identical strings still match
    assert calls == []


def test_ordinary_powers_still_reach_math_verify() -> None:
    assert is_equivalent("2^{10}", "1024") is True
    assert is_equivalent("2^{11}", "1024") is False


@pytest.mark.parametrize("error", [ZeroDivisionError, OverflowError, RecursionError])
def test_an_expression_sympy_cannot_evaluate_is_not_equivalent(
    error: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(gold: str, pred: str) -> bool:
        raise error("cannot evaluate")

    monkeypatch.setattr(grading, "_math_verify_equal", boom)
    assert is_equivalent("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}") is False


@pytest.mark.parametrize("error", [TypeError, AttributeError])
def test_a_broken_math_verify_call_is_reported_not_graded_wrong(
    error: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An API mismatch (math-verify's verify no longer takes our arguments) must not turn every
    # symbolic comparison into "not equivalent": the caller gets a GradingError naming it.
    import math_verify

    def verify(*args, **kwargs):
        raise error("verify() got an unexpected keyword argument 'timeout_seconds'")

    monkeypatch.setattr(math_verify, "verify", verify)
    with pytest.raises(grading.GradingError, match=f"{error.__name__}: verify\\(\\) got"):
        is_equivalent("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}")
    assert is_equivalent("18.0", "18") is True  # the numeric fast path needs no math-verify
