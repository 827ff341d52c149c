"""What `compat=reference` changes: the official LatentSeek code's behaviour, as rules the engine
follows, so that its outputs are token for token those of the official code (SPEC.md §6).

The default mode (`compat=none`) keeps this engine's decisions (README "The method and its
decisions"). `compat=reference` reproduces, as read from the official code
(github bigai-nlco/LatentSeek, `src/`):

- Token budget: its decoding loops stop once a counter *exceeds* the cap, so the CoT and every
  continuation decode up to cap + 1 tokens, and a continuation gets that whole budget after the
  U forced prefix tokens (the default: the answer, prefix included, has `max_new_tokens`).
- Stops: the CoT stops on a token that decodes to `</s>`, `<|im_end|>`, `<|endoftext|>` or the
  tokenizer's EOS token; a continuation stops on the tokenizer's EOS token only (the default: the
  model's EOS ids, both times).
- Answer text: token ids decoded with special tokens kept (the default drops them).
- Prompt ids: the chat template rendered to text, then tokenized (`render_chat(as_text=True)`).
- Latent step numerics: Z in the model's dtype, `softmax(W z) + 1e-8` in that dtype
  (`pipeline.latent`, `reference=True`).
- Grading, PSRM included, for GSM8K and AIME 2024: the official extraction (below) compared by
  string equality with the label as the data writes it (GSM8K: the text after `#### `, commas
  kept, so "1,600" never matches). Other datasets keep this engine's grading (math-verify): the
  official MATH-500 judge chains graders this project does not ship.

What `compat=reference` does not change: the self-reward keeps this project's verifier prompts
and greedy capped decoding (the official verifiers sample with the model's generation config for
up to 4096 tokens, which no engine can reproduce token for token); `max_update_length` (the
official cap is 300, our default too).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.config import COMPAT_MODES
from pipeline.grading import Grade, grade

OFFICIAL_STOP_STRINGS = ("</s>", "<|im_end|>", "<|endoftext|>")
OFFICIAL_GRADED_DATASETS = ("gsm8k", "aime2024")


@dataclass(frozen=True)
class DecodeRules:
    """How one mode prompts, budgets, stops and decodes (built by `decode_rules`)."""

    compat: str
    max_new_tokens: int  # the configured cap
    cot_stop_ids: frozenset[int]
    continuation_stop_ids: frozenset[int]
    keep_special_tokens: bool  # in answer text
    render_as_text: bool  # prompt: chat template to text, then tokenize

    @property
    def reference(self) -> bool:
        return self.compat == "reference"

    @property
    def cot_max_new_tokens(self) -> int:
        """Tokens the CoT (and every sampled answer) may decode."""
        return self.max_new_tokens + 1 if self.reference else self.max_new_tokens

    def continuation_max_new_tokens(self, prefix_length: int) -> int:
        """Tokens a continuation after a forced prefix of `prefix_length` may decode."""
        if self.reference:
            return self.max_new_tokens + 1
        return max(self.max_new_tokens - prefix_length, 0)


def token_ids_of(tokenizer: Any, strings: Iterable[str]) -> set[int]:
    """Ids of the single tokens that decode to exactly one of `strings` (special tokens kept)."""
    ids: set[int] = set()
    for text in strings:
        tid = tokenizer.convert_tokens_to_ids(text)  # an unknown text maps to the unk id,
        if isinstance(tid, int) and tid >= 0:  # which then fails the decode check
            if tokenizer.decode([tid], skip_special_tokens=False) == text:
                ids.add(tid)
    return ids


def decode_rules(
    compat: str, max_new_tokens: int, tokenizer: Any, eos_ids: set[int]
) -> DecodeRules:
    """The rules of `compat` ("none" or "reference"); `eos_ids` are the model's EOS ids."""
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat={compat!r}: allowed: {', '.join(COMPAT_MODES)}")
    if compat == "none":
        stops = frozenset(eos_ids)
        return DecodeRules(compat, max_new_tokens, stops, stops, False, False)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cot = token_ids_of(tokenizer, (*OFFICIAL_STOP_STRINGS, tokenizer.eos_token)) | eos
    return DecodeRules(compat, max_new_tokens, frozenset(cot), frozenset(eos), True, True)


# ---------------------------------------------------------------------------------------------
# The official grading for GSM8K and AIME 2024 (`extract_judge_answer/utils.py` in the official
# code: `extract_answer` for a model name that takes the generic path, then string equality).

_NUM = r"([$€£¥]?\s*-?\s*[\d,]+(?:\.\d+)?)"
_OFFICIAL_PATTERNS = (  # tried in order; the first match wins
    (re.compile(r"\\boxed\{\s*" + _NUM + r"\s*\}", re.IGNORECASE), "first"),
    (re.compile(r"Answer:\s*" + _NUM, re.IGNORECASE), "first"),
    (re.compile(r"=\s*" + _NUM), "first"),
    (re.compile(r"is\s*" + _NUM + r"\s*(?:dollars|euros|pounds|yen)", re.IGNORECASE), "first"),
    (re.compile(_NUM + r"\s*$"), "last_line"),  # the last non-empty line's trailing number
    (re.compile(_NUM), "last"),  # the last number anywhere
)
_JSON_FALLBACK = re.compile(r'(?:final answer|my answer)"?:?\s*(.*?)[}<]', re.I | re.M | re.DOTALL)


def _clean_number(text: str) -> str:
    return re.sub(r"[$€£¥,\s]", "", text)


def official_number(text: str | None) -> str | None:
    """The official numeric extraction: first boxed number, `Answer:`, `= N`, `is N dollars`,
    the trailing number of the last line that has one, the last number; currency signs, commas
    and spaces removed."""
    if text is None:
        return None
    text = text.strip()
    for pattern, where in _OFFICIAL_PATTERNS:
        if where == "first":
            found = pattern.search(text)
        elif where == "last":
            hits = pattern.findall(text)
            return _clean_number(hits[-1]) if hits else None
        else:  # from the last line upwards, the first line that ends in a number
            lines = (ln.strip() for ln in reversed(text.split("\n")))
            found = next((m for ln in lines if ln and (m := pattern.search(ln))), None)
        if found:
            return _clean_number(found.group(1))
    return None


def official_extract(text: str, style: str) -> str | None:
    """The official answer for the boxed prompt (numeric extraction) or the json prompt (the
    "final answer" value of the whole text parsed as JSON, else the text after `final answer`)."""
    if style != "json":
        return official_number(text)
    try:
        parsed = json.loads(text.strip("` \n"))
    except json.JSONDecodeError:
        found = _JSON_FALLBACK.search(text)
        return official_number(found.group(1) if found else text)
    value = parsed.get("final answer", "") if isinstance(parsed, dict) else ""
    return official_number(value if isinstance(value, str) else str(value))


def make_grader(compat: str, style: str) -> Callable[[Any, str], Grade]:
    """`grader(problem, text) -> Grade`: the official judge for compat=reference on GSM8K and
    AIME 2024, this engine's (`pipeline.grading.grade`) otherwise."""

    def engine(problem: Any, text: str) -> Grade:
        return grade(text, problem.gold, style)

    def official(problem: Any, text: str) -> Grade:
        if problem.dataset not in OFFICIAL_GRADED_DATASETS:
            return engine(problem, text)
        extracted = official_extract(text, style)
        label = problem.label or problem.gold
        return Grade(extracted, extracted is not None and extracted == label)

    return official if compat == "reference" else engine
