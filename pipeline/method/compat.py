"""What `compat=reference` changes: the official LatentSeek code's behaviour, as rules the engine
follows, so that its outputs are token for token those of the official code (SPEC.md §6).

The default mode (`compat=none`) keeps this engine's decisions (docs/method.md, "Decisions").
`compat=reference` reproduces, as read from the official code (github bigai-nlco/LatentSeek,
`src/`):

- Token budget: its decoding loops stop once a counter *exceeds* the cap, so the CoT and every
  continuation decode up to cap + 1 tokens, and a continuation gets that whole budget after the
  U forced prefix tokens (the default: the answer, prefix included, has `max_new_tokens`).
- Stops: the CoT stops on a token that decodes to `</s>`, `<|im_end|>`, `<|endoftext|>` or the
  tokenizer's EOS token; a continuation stops on the tokenizer's EOS token only (the default: the
  model's EOS ids, both times).
- Answer text: token ids decoded with special tokens kept (the default drops them).
- Prompt ids: the chat template rendered to text, then tokenized (`render_chat(as_text=True)`).
- Latent step numerics: Z in the model's dtype, `softmax(W z) + 1e-8` in that dtype
  (`pipeline.method.latent`, `reference=True`).
- Grading, PSRM included, for the benchmarks that declare the official extraction
  (`Benchmark.official_extract`, `pipeline.benchmarks.official`): it is compared by string
  equality with the label as the data writes it (GSM8K: the text after `#### `, commas kept, so
  "1,600" never matches). Other datasets keep this engine's grading (math-verify).

The self-reward's reference rules (the model's generation config, 4096 tokens, the official
verdict) live in `pipeline.method.rewards`; where that config samples, its draws are not the official
code's (which seeds once per process). `max_update_length` stays a key (the official cap is
300, our default too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pipeline.benchmarks import get_benchmark
from pipeline.config import COMPAT_MODES
from pipeline.method.grading import Grade, grade

OFFICIAL_STOP_STRINGS = ("</s>", "<|im_end|>", "<|endoftext|>")


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


def make_grader(compat: str, style: str) -> Callable[[Any, str], Grade]:
    """`grader(problem, text) -> Grade`: under compat=reference, the official judge of the
    problem's benchmark where it declares one (`Benchmark.official_extract`); this engine's
    (`pipeline.method.grading.grade`) otherwise."""

    def engine(problem: Any, text: str) -> Grade:
        return grade(text, problem.gold, style)

    def official(problem: Any, text: str) -> Grade:
        bench = get_benchmark(problem.dataset)
        if bench is None or bench.official_extract is None:
            return engine(problem, text)
        extracted = bench.official_extract(text, style)
        label = problem.label or problem.gold
        return Grade(extracted, extracted is not None and extracted == label)

    return official if compat == "reference" else engine
