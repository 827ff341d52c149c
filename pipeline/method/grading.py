"""Answer extraction and grading for GSM8K, MATH-500, AIME and user data sets.

`extract_answer` pulls the final answer out of a completion, `normalize_answer` gives a
canonical string for grouping votes, `is_equivalent` compares a prediction with a gold
answer (numeric fast path, then math-verify), `grade` does both for one completion and
`same_answer` compares two predictions for majority voting.

Decisions:

- Extraction order, style "boxed": last non-empty `\\boxed{...}` / `\\fbox{...}` (nested
  braces; also the brace-less `\\boxed 5`), then a JSON "final answer" value, then
  "the answer is X" / "final answer: X", then the last number in the text. Style "json":
  JSON first, then the same chain (boxed, phrase, last number). A completion cut off
  mid-answer therefore still yields its last number (lenient, like most harnesses).
- JSON is read with a tolerant scan rather than `json.loads`: the key is matched
  case-insensitively ("final answer", "final_answer", "finalanswer"), fences and trailing
  text are ignored, and string values keep their backslashes (`json.loads` would turn
  `"\\frac{1}{2}"` into a form feed). A doubled backslash `\\\\` is read as one.
- Extracted strings are only lightly cleaned (spaces, surrounding `$` / `\\(` / `\\[`,
  markdown bold, one trailing period); everything else is `normalize_answer`'s job.
- `normalize_answer` drops currency (`$`, `\\$`, dollars, USD), `\\text{}`-like wrappers,
  `\\left` / `\\right`, degree marks, `\\%` / `%` (so "10\\%" groups with "10"),
  thousands separators (only in the strict `1,000` / `1{,}000` shape, so the tuple
  "1,2" stays a tuple), up to two plain words after a pure number ("18 apples",
  "5 per day"), a leading single-variable assignment ("x = 5" -> "5"), parentheses
  around a single choice letter ("(C)" -> "C"), and writes plain decimals in a canonical
  form ("18.00" -> "18", "033" -> "33", "-0" -> "0"). Whitespace is removed except
  between a LaTeX command and a following letter (`\\cot x` keeps its space).
- `is_equivalent`: exact match of normalised strings, then a numeric fast path with
  exact `Fraction` arithmetic when both sides are plain numbers or integer fractions
  (`0.5 == 1/2 == \\frac{1}{2}`); two different plain numbers are unequal without
  calling math-verify. Otherwise both normalised strings are wrapped as `$\\boxed{...}$`,
  parsed by math-verify and compared with `verify(gold, pred)` (not symmetric: gold first).
- Timeout: math-verify's own timeout uses SIGALRM, which only works on the main thread,
  so it is disabled (`parse(..., parsing_timeout=None)` and `verify(..., timeout_seconds=None)`
  in math-verify 0.9) and the work runs in a fresh daemon thread per call that we wait on
  for `timeout_s`.
  On timeout the answer is "not equivalent". A timed out thread cannot be killed; it keeps
  running in the background until it finishes and never blocks interpreter exit. No
  signals, no module-level mutable state.
- Failures: math-verify returns "no parse" (then "not equivalent") and catches the errors of
  parsing and comparing itself (`raise_on_error=False`), so an exception that reaches us is
  either an expression sympy cannot evaluate (`EXPECTED_ERRORS`: "not equivalent") or a
  broken call, e.g. an API that changed between math-verify versions (TypeError,
  AttributeError, ...): that raises `GradingError` in the caller, so the problem is recorded
  with an error instead of every symbolic comparison silently counting as wrong.
- A thread timeout cannot interrupt C code that holds the GIL, and sympy evaluates integer
  powers eagerly (`10^{10^{10}}` would block the whole process). So strings with a power
  tower, an exponent above `MAX_EXPONENT` or more than `MAX_SYMBOLIC_CHARS` characters
  are "not equivalent" unless their normalised strings match exactly.
- Model output is never evaluated as code: only regexes, `Fraction`/`Decimal` on strings
  that matched a strict number pattern, and math-verify's own LaTeX/expression parser.
- math-verify logs one warning per process that its timeout is disabled; it is left on.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = [
    "equivalence",
    "Grade",
    "GRADE_STATUSES",
    "GradingError",
    "extract_answer",
    "grade",
    "is_equivalent",
    "normalize_answer",
    "same_answer",
]

STYLES = ("boxed", "json")

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_JSON_KEY_RE = re.compile(r"""["']\s*final[\s_-]*answer\s*["']\s*:\s*""", re.IGNORECASE)
_PHRASE_RE = re.compile(r"\banswer\b[ \t]*(?:is\b|:|=)[ \t:]*\n?[ \t]*([^\n]+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")


def _match_braces(text: str, open_pos: int) -> str | None:
    """Content between `text[open_pos] == "{"` and its matching `}`; None if unbalanced."""
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character, e.g. "\\{" in a set, never counts as a brace
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last non-empty \\boxed{...} / \\fbox{...} / `\\boxed 5`."""
    found = None
    for m in _BOXED_RE.finditer(text):
        end = m.end()
        if end < len(text) and text[end] == "{":
            content = _match_braces(text, end)
        elif m.group(0) != m.group(0).rstrip():  # "\boxed 5": up to whitespace or "$"
            tail = re.match(r"[^\s$]+", text[end:])
            content = tail.group(0) if tail else None
        else:
            content = None
        if content is not None and content.strip():
            found = content
    return found


def _read_json_string(text: str, start: int) -> str | None:
    """Raw content of the JSON string whose opening quote is at `start`, backslashes kept."""
    quote = text[start]
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            raw = text[start + 1 : i]
            return raw.replace("\\\\", "\\").replace("\\" + quote, quote)
        i += 1
    return None


def _json_answer(text: str) -> str | None:
    """Value of the last "final answer" key (tolerant: fences, trailing text, bad JSON)."""
    found = None
    for m in _JSON_KEY_RE.finditer(text):
        start = m.end()
        if start >= len(text):
            continue
        if text[start] in "\"'":
            value = _read_json_string(text, start)
        else:
            bare = re.match(r"[^,}\n]+", text[start:])
            value = bare.group(0) if bare else None
        if value is not None and value.strip():
            found = value
    return found


def _phrase_answer(text: str) -> str | None:
    """X in the last "the answer is X" / "final answer: X", cut at the end of the sentence."""
    matches = _PHRASE_RE.findall(text)
    if not matches:
        return None
    value = matches[-1].replace("**", "")
    cut = _SENTENCE_END_RE.search(value)
    if cut:
        value = value[: cut.start()]
    return value if value.strip(" $") else None


def _last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return matches[-1] if matches else None


def _clean(ans: str | None) -> str | None:
    """Light clean-up of an extracted string; None when nothing is left."""
    if ans is None:
        return None
    s = ans.strip().replace("**", "").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
    s = s.strip("$").strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    return s or None


def extract_answer(text: str, style: str = "boxed") -> str | None:
    """The final answer in `text` (lightly cleaned), or None when none is found.

    `style` is the solver prompt style, "boxed" or "json"; it only changes which stage
    is tried first (see the module docstring).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if not text:
        return None
    stages = [_last_boxed, _json_answer] if style == "boxed" else [_json_answer, _last_boxed]
    for stage in (*stages, _phrase_answer, _last_number):
        ans = _clean(stage(text))
        if ans is not None:
            return ans
    return None


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_WITH_WORDS_RE = re.compile(r"([+-]?[\d.]+(?:/\d+)?)\s+[A-Za-z]+(?:\s+[A-Za-z]+)?\.?")
_ASSIGNMENT_RE = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?\s*=\s*([^=<>]+)")
_CURRENCY_WORD_RE = re.compile(r"\b(?:dollars?|usd|USD)\b")
_DEGREES_RE = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_SPACING_RE = re.compile(r"(?<!\\)\\[!,;: ]|\\q?quad\b")


def _strip_whitespace(s: str) -> str:
    """Remove whitespace, except one space between a \\command and a following letter."""

    def keep(m: re.Match[str]) -> str:
        before, after = s[: m.start()], s[m.end() :]
        if after[:1].isalpha() and re.search(r"\\[A-Za-z]+$", before):
            return " "
        return ""

    return re.sub(r"\s+", keep, s)


def _canonical_decimal(s: str) -> str:
    """'18.00' -> '18', '033' -> '33', '-0.50' -> '-0.5'; `s` must be a plain decimal."""
    d = Decimal(s)
    return "0" if d == 0 else format(d.normalize(), "f")


def normalize_answer(ans: str) -> str:
    """Canonical string for voting and grouping (see the module docstring for the rules)."""
    s = ans.strip()
    boxed = _last_boxed(s)
    if boxed is not None and s.startswith(("\\boxed", "\\fbox")):
        s = boxed
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\b|\\right\b", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("{,}", ",")
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREES_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    while True:  # innermost first, so nested wrappers unwrap too
        unwrapped = _TEXT_CMD_RE.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    s = _CURRENCY_WORD_RE.sub("", s).strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    m = _ASSIGNMENT_RE.fullmatch(s)
    if m:
        s = m.group(1).strip()
    m = _NUMBER_WITH_WORDS_RE.fullmatch(s)
    if m:
        s = m.group(1)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    s = _strip_whitespace(s)
    choice = re.fullmatch(r"\(([A-Ea-e])\)", s)
    if choice:
        s = choice.group(1).upper()
    if _PLAIN_NUMBER_RE.fullmatch(s):
        try:
            s = _canonical_decimal(s)
        except InvalidOperation:
            pass
    return s


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------

_FRAC_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_SLASH_RE = re.compile(r"([+-]?\d+)/([+-]?\d+)")


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number or integer fraction, else None (never evaluates code)."""
    if _PLAIN_NUMBER_RE.fullmatch(s):
        return Fraction(Decimal(s))
    m = _SLASH_RE.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = _FRAC_RE.fullmatch(s)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) == "-" else value
    return None


# Sympy evaluates integer powers eagerly in C code that holds the GIL, so a thread timeout
# cannot interrupt `10^{10^{10}}`; such inputs are refused before math-verify sees them.
MAX_SYMBOLIC_CHARS = 2000  # longer "answers" are rambling, not maths worth parsing
MAX_EXPONENT = 1_000_000  # 10^{1000000} takes ~0.5 s; 10^{10000000} blocks for ~6 s
_EXPONENT_RE = re.compile(r"\^\s*(\{)?")
_CHAINED_POWER_RE = re.compile(r"\^\s*(?:\{[^{}]*\}|[\w\\]+)\s*\^")


def _exponent(s: str, pos: int, braced: bool) -> str:
    """The exponent that starts at `pos` (after `^` and, if `braced`, after its `{`)."""
    if braced:
        content = _match_braces(s, pos - 1)
        return content if content is not None else s[pos:]
    token = re.match(r"\\?[A-Za-z]+|\d+|.", s[pos:])
    return token.group(0) if token else ""


def _too_costly(s: str) -> bool:
    """Whether parsing `s` could block the interpreter (power towers, huge exponents)."""
    if len(s) > MAX_SYMBOLIC_CHARS or _CHAINED_POWER_RE.search(s):
        return True
    for m in _EXPONENT_RE.finditer(s):
        exponent = _exponent(s, m.end(), braced=m.group(1) is not None)
        if "^" in exponent or any(int(n) > MAX_EXPONENT for n in re.findall(r"\d+", exponent)):
            return True
    return False


def _math_verify_equal(gold: str, pred: str) -> bool:
    """math-verify comparison with its signal-based timeouts disabled (run off-thread)."""
    from math_verify import parse, verify

    gold_parsed = parse(f"$\\boxed{{{gold}}}$", parsing_timeout=None)
    pred_parsed = parse(f"$\\boxed{{{pred}}}$", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class GradingError(RuntimeError):
    """math-verify failed in a way that is not an answer's fault (see the module docstring)."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What an expression sympy cannot evaluate raises (a pathological answer, not a bug)."""
    from sympy import SympifyError

    return (ArithmeticError, RecursionError, SympifyError)


def _run_with_timeout(gold: str, pred: str, timeout_s: float) -> tuple[bool, str]:
    """Run `_math_verify_equal` in a daemon thread: (equal, "ok"), (False, "timeout"), or (False,
    "ok") for an expression that cannot be evaluated; GradingError on any other exception."""
    result: list[bool] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            result.append(_math_verify_equal(gold, pred))
        except Exception as exc:  # noqa: BLE001 - sorted below, in the caller's thread
            failed.append(exc)

    worker = threading.Thread(target=work, name="grading-verify", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if failed and not isinstance(failed[0], _expected_errors()):
        exc = failed[0]
        raise GradingError(
            f"math-verify failed comparing {pred!r} with {gold!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if worker.is_alive():
        return False, "timeout"
    return bool(result and result[0]), "ok"


def equivalence(pred: str | None, gold: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """(whether `pred` equals `gold` numerically or symbolically, "ok"), or (False, "timeout")
    when math-verify did not decide within `timeout_s`; safe off the main thread. Raises
    GradingError when math-verify itself fails (not on an answer it cannot parse)."""
    if pred is None or not gold or not gold.strip():
        return False, "ok"
    norm_pred, norm_gold = normalize_answer(pred), normalize_answer(gold)
    if not norm_pred or not norm_gold:
        return False, "ok"
    if norm_pred == norm_gold:
        return True, "ok"
    num_pred, num_gold = _as_fraction(norm_pred), _as_fraction(norm_gold)
    if num_pred is not None and num_gold is not None:
        return num_pred == num_gold, "ok"
    if _too_costly(norm_pred) or _too_costly(norm_gold):
        return False, "ok"
    return _run_with_timeout(norm_gold, norm_pred, timeout_s)


def is_equivalent(pred: str | None, gold: str, timeout_s: float = 5.0) -> bool:
    """`equivalence` without its status (a timeout is "not equivalent")."""
    return equivalence(pred, gold, timeout_s)[0]


GRADE_STATUSES = ("ok", "timeout", "error")  # worst last


@dataclass(frozen=True)
class Grade:
    """One graded completion: the extracted answer (None if none), its correctness, and whether
    the grade was decided ("ok"), timed out ("timeout": counted as incorrect) or failed
    ("error": math-verify itself failed; the problem records the error)."""

    extracted: str | None
    correct: bool
    status: str = "ok"


def grade(text: str, gold: str, style: str = "boxed", timeout_s: float = 5.0) -> Grade:
    """Extract the answer from `text` and compare it with `gold`."""
    extracted = extract_answer(text, style)
    correct, status = equivalence(extracted, gold, timeout_s)
    return Grade(extracted=extracted, correct=correct, status=status)


def same_answer(a: str | None, b: str | None, timeout_s: float = 5.0) -> bool:
    """Whether two predictions agree, for majority voting; a missing answer agrees with none."""
    if a is None or b is None:
        return False
    return is_equivalent(a, b, timeout_s)
